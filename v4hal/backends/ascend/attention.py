"""Sparse attention, the lightning indexer and the compressor on Ascend.

Contract ops (registered):

- ``sparse_attn`` -> ``npu_sparse_flash_attention`` (SFA; torch_npu, ``_C_ascend`` or ``custom``
  schema). Our ``[b, m, h, d]`` q becomes TND ``[b*m, h, d]``; ``[b, n, d]`` kv becomes paged
  PA_BSND ``[blocks, 128, 1, d]`` with an identity block table and per-batch lengths; ``topk_idxs``
  become ``sparse_indices [T, 1, K]`` with the valid entries first (the op's requirement; softmax
  does not care about order). SFA runs in MLA-absorb mode (``attention_mode=2``): scores are
  ``scale * (q.k + q_rope.k_rope)`` and values are ``k``. V4's whole 512-wide head (448 no-rope +
  64 rope dims) goes into the 512-wide ``query``/``key``, so the 64-wide rope slot is free and
  carries the **attention sink** where the op has no ``sinks`` argument (A2/A3, ``_C_ascend``,
  ``custom``): one extra KV row with key = value = 0 and ``key_rope = [1, 1, 0, ...]``, and
  ``query_rope[h] = [hi, lo, 0, ...]`` with ``hi + lo = attn_sink[h] / scale`` (a two-term split in
  q's dtype, exact to ~2**-16 relative). That row scores exactly ``attn_sink[h]`` and adds nothing
  to the output: the sink of the contract. On 950 the torch_npu schema's ``sinks`` is used instead.
  Rows whose indices are all -1 are set to 0 explicitly.
- ``indexer_topk`` -> ``npu_lightning_indexer`` (TND query, PA_BSND keys) when its masks express
  ours: the same visible count for every query of the call (decode: ``sparse_mode=0`` with the key
  length set to that count) or token-level causality (``ratio == 1``: ``sparse_mode=3``). The
  staircase of a ratio-4 prefill (``t < (pos+1)//4``) is neither: reference.
- ``index_scores``: the CANN indexers return top-k indices, never the score matrix: reference.
- ``compress_kv``: our op is pooling only. The CANN ``compressor`` fuses the two projections
  (``x @ wkv``, ``x @ wgate``), the pooling, RMSNorm, rope and its own paged state cache into one
  call, so it cannot serve a pooling-only op: reference. The fused computation is the contract op
  ``compressor_ragged``, which binds ``_C_ascend.compressor`` on A3 and 950
  (:mod:`.ragged_compress`).

Ascend-only entry points (not contract ops; contract-tested against reference decompositions):

- :func:`shared_kv_attention` -> ``npu_sparse_attn_sharedkv`` (+ ``_metadata``) on A2/A3 and
  ``npu_kv_quant_sparse_attn_sharedkv`` (+ ``_metadata``, KV packed to 640 bytes with FP8 no-rope
  dims) on 950: V4's window + compressed attention in one fused call.
- :func:`quant_indexer_topk` -> ``npu_vllm_quant_lightning_indexer`` (+ ``_metadata``): V4's
  quantized indexer with the ratio staircase built in.
"""
from __future__ import annotations

import math

import torch

from v4hal.backends.reference import attention as ref
from v4hal.hal import formats as F
from v4hal.hal.registry import implements
from v4hal.ops import _checks as C

from . import binding, limits, runtime
from ._route import always_reference, route
from .limits import ALL, always, fallback_when

SFA = (("torch_npu", "npu_sparse_flash_attention"), ("_C_ascend", "npu_sparse_flash_attention"),
       ("custom", "npu_sparse_flash_attention"))
LIGHTNING_INDEXER = (("torch_npu", "npu_lightning_indexer"), ("_C_ascend", "npu_lightning_indexer"),
                     ("custom", "npu_lightning_indexer"))
SHAREDKV = (("_C_ascend", "npu_sparse_attn_sharedkv"), ("custom", "npu_sparse_attn_sharedkv"))
SHAREDKV_META = (("_C_ascend", "npu_sparse_attn_sharedkv_metadata"),
                 ("custom", "npu_sparse_attn_sharedkv_metadata"))
KVQ_SHAREDKV = (("_C_ascend", "npu_kv_quant_sparse_attn_sharedkv"),)
KVQ_SHAREDKV_META = (("_C_ascend", "npu_kv_quant_sparse_attn_sharedkv_metadata"),)
QUANT_INDEXER = (("_C_ascend", "npu_vllm_quant_lightning_indexer"),)
QUANT_INDEXER_META = (("_C_ascend", "npu_vllm_quant_lightning_indexer_metadata"),)

PAGE = 128          # block size of the paged layouts we build (a multiple of 16, <= 1024)
SFA_D, SFA_DR = 512, 64
INDEXER_D = 128
_HALF = (torch.bfloat16, torch.float16)
_POW2_N1 = (1, 2, 4, 8, 16, 32, 64, 128)


def _sink_flags(attn_sink: torch.Tensor) -> tuple[bool, bool]:
    """(every sink is -inf, some sink is -inf), read with one host sync."""
    inf = torch.isneginf(attn_sink)
    all_inf, any_inf = torch.stack([inf.all(), inf.any()]).tolist()
    return bool(all_inf), bool(any_inf)


def _scale_unusable(a: limits.Args) -> bool:
    """The sink rides in the rope slot as sink / scale: a 0 or non-finite scale cannot carry it."""
    scale = float(a["softmax_scale"])
    return not _sink_flags(a["attn_sink"])[0] and not (math.isfinite(scale) and scale != 0.0)


def _sink_mixed(a: limits.Args) -> bool:
    all_inf, any_inf = _sink_flags(a["attn_sink"])
    return any_inf and not all_inf


def _sink_overflow(a: limits.Args) -> bool:
    """fp16 q cannot hold sink / scale (hi + lo in q's dtype) at or above 65504."""
    scale = float(a["softmax_scale"])
    if a["q"].dtype != torch.float16 or not math.isfinite(scale) or scale == 0.0:
        return False
    if _sink_flags(a["attn_sink"])[0]:
        return False
    return bool((a["attn_sink"].float() / scale).abs().max() >= 65504.0)


def _empty_attn(a: limits.Args) -> bool:
    q, kv, idx = a["q"], a["kv"], a["topk_idxs"]
    return q.shape[0] * q.shape[1] * kv.shape[1] * idx.shape[-1] == 0


limits.plan("sparse_attn", {c: "npu_sparse_flash_attention (TND q, PA_BSND kv, attention_mode=2)" for c in ALL})
SPARSE_ATTN_LIMITS = (
    fallback_when("head dim d != 512 (SFA: D = 512 plus a 64-wide rope slot)", lambda a: a["q"].shape[-1] != SFA_D),
    fallback_when("q/kv not bf16/fp16", lambda a: a["q"].dtype not in _HALF),
    fallback_when("heads not in {1,2,4,...,128} (A2/A3 N1 limit)", lambda a: a["q"].shape[2] not in _POW2_N1,
                  ("A2", "A3")),
    fallback_when("heads not in 1..128 (950 N1 limit)", lambda a: not 1 <= a["q"].shape[2] <= 128, ("950",)),
    fallback_when("empty batch, query, key or index list", _empty_attn),
    fallback_when("softmax_scale is 0 or not finite (the sink rides in the rope slot as sink/scale)",
                  _scale_unusable),
    fallback_when("attn_sink mixes -inf with finite values", _sink_mixed),
    fallback_when("fp16 q with |attn_sink / softmax_scale| >= 65504", _sink_overflow),
)


def _indexer_width(a: limits.Args) -> int:
    return min(a["topk"], a["k"].shape[1])


def _indexer_mask(a: limits.Args) -> str:
    return _indexer_mode(a["q"].shape[1], a["k"].shape[1], a["start_pos"], a["ratio"])[0]


limits.plan("indexer_topk", {c: "npu_lightning_indexer (TND q, PA_BSND k)" for c in ALL})
INDEXER_TOPK_LIMITS = (
    fallback_when("indexer head dim D != 128", lambda a: a["q"].shape[-1] != INDEXER_D),
    fallback_when("q/k not bf16/fp16 or of different dtypes",
                  lambda a: a["q"].dtype not in _HALF or a["k"].dtype != a["q"].dtype),
    fallback_when("weights neither q's dtype nor fp32",
                  lambda a: a["weights"].dtype not in (a["q"].dtype, torch.float32)),
    fallback_when("fp32 weights (950 takes none)", lambda a: a["weights"].dtype == torch.float32, ("950",)),
    fallback_when("more than 64 indexer heads", lambda a: a["q"].shape[2] > 64, ("A2", "A3")),
    fallback_when("indexer heads not in {8, 16, 24, 32, 64}", lambda a: a["q"].shape[2] not in (8, 16, 24, 32, 64),
                  ("950",)),
    fallback_when("empty input or nothing to pick",
                  lambda a: a["q"].shape[0] * a["q"].shape[1] * _indexer_width(a) == 0),
    fallback_when("min(topk, t) > 8192 (sparse_count limit)", lambda a: _indexer_width(a) > 8192),
    fallback_when("no compressed entry visible yet", lambda a: _indexer_mask(a) == "none"),
    fallback_when("prefill staircase mask (ratio > 1, queries see different counts): no sparse_mode expresses it",
                  lambda a: _indexer_mask(a) == "staircase"),
)

limits.plan("index_scores", {})
limits.plan("compress_kv", {})


# ------------------------------------------------------------------------------------- helpers
def _pages(x: torch.Tensor, rows: int, page: int = PAGE) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[b, n, w]`` -> (paged ``[b*nblk, page, 1, w]`` holding ``rows >= n`` rows per batch, zero
    padded, and the identity block table int32 ``[b, nblk]``)."""
    b, n, w = x.shape
    nblk = max(1, -(-rows // page))
    paged = x.new_zeros(b, nblk * page, w)
    paged[:, :n] = x
    table = torch.arange(b * nblk, dtype=torch.int32, device=x.device).view(b, nblk)
    return paged.view(b * nblk, page, 1, w), table


def _valid_first(idx: torch.Tensor) -> torch.Tensor:
    """int ``[..., k]`` -> the same entries with every non -1 entry before every -1 (stable)."""
    order = torch.argsort((idx < 0).to(torch.int8), dim=-1, stable=True)
    return torch.gather(idx, -1, order)


def _cum_lengths(b: int, per_batch: int, device: torch.device, leading_zero: bool = False) -> torch.Tensor:
    start = 0 if leading_zero else 1
    return (torch.arange(start, b + 1, dtype=torch.int32, device=device) * per_batch).contiguous()


def _sink_rope(attn_sink: torch.Tensor, scale: float, t: int, dtype: torch.dtype) -> torch.Tensor:
    """``query_rope [t, h, 64]`` whose first two lanes hold ``attn_sink / scale`` as hi + lo in ``dtype``."""
    v = attn_sink.float() / scale
    hi = v.to(dtype)
    lo = (v - hi.float()).to(dtype)
    rope = torch.zeros(t, attn_sink.shape[0], SFA_DR, dtype=dtype, device=attn_sink.device)
    rope[:, :, 0] = hi
    rope[:, :, 1] = lo
    return rope


# ---------------------------------------------------------------------------------- sparse_attn
@implements("sparse_attn", "ascend", requires=SPARSE_ATTN_LIMITS)
def sparse_attn(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, topk_idxs: torch.Tensor,
                softmax_scale: float) -> torch.Tensor:
    """q ``[b, m, h, d]``, kv ``[b, n, d]``, attn_sink fp32 ``[h]``, topk_idxs int32 ``[b, m, k]`` in
    ``[-1, n)`` -> ``[b, m, h, d]`` in q's dtype (sink in the denominator, all -1 rows exactly 0)."""
    b, m, h, d = q.shape
    n, k = kv.shape[1], topk_idxs.shape[-1]
    chip, op, why = route("sparse_attn", SFA, q, kv, attn_sink, topk_idxs, softmax_scale)
    if op is None:
        return limits.fallback("sparse_attn", chip, why, ref.sparse_attn, q, kv, attn_sink, topk_idxs, softmax_scale)
    all_inf = _sink_flags(attn_sink)[0]
    scale = float(softmax_scale)
    native_sinks = chip == "950" and op.tier == "torch_npu"   # only the torch_npu schema on 950 has `sinks`
    sink_row = not all_inf and not native_sinks
    t = b * m
    rows = n + (1 if sink_row else 0)
    kv_pages, table = _pages(kv.contiguous(), rows)
    key_rope = kv.new_zeros(b, kv_pages.shape[0] // b * PAGE, SFA_DR)
    idx = topk_idxs.reshape(t, k)
    if sink_row:
        key_rope[:, n, 0:2] = 1.0
        idx = torch.cat([idx, torch.full((t, 1), n, dtype=idx.dtype, device=idx.device)], dim=1)
        query_rope = _sink_rope(attn_sink, scale, t, q.dtype)
    else:
        query_rope = q.new_zeros(t, h, SFA_DR)
    key_rope = key_rope.view(kv_pages.shape[0], PAGE, 1, SFA_DR)
    sparse_indices = _valid_first(idx).to(torch.int32).view(t, 1, -1).contiguous()
    common = dict(block_table=table, actual_seq_lengths_query=_cum_lengths(b, m, q.device),
                  actual_seq_lengths_kv=torch.full((b,), rows, dtype=torch.int32, device=q.device),
                  query_rope=query_rope, key_rope=key_rope, layout_query="TND", layout_kv="PA_BSND",
                  sparse_mode=0)
    qt = q.reshape(t, h, d).contiguous()
    if op.tier == "custom":   # cann-recipes schema: sparse_block_size positional, one output
        out = op(qt, kv_pages, kv_pages, sparse_indices, scale, 1, **common)
    elif op.tier == "torch_npu":
        sinks = attn_sink.float().contiguous() if (native_sinks and not all_inf) else None
        out = op(qt, kv_pages, kv_pages, sparse_indices, scale, sparse_block_size=1, attention_mode=2,
                 return_softmax_lse=False, sinks=sinks, **common)[0]
    else:                     # _C_ascend: same keywords, attention_mode default 2, no sinks
        out = op(qt, kv_pages, kv_pages, sparse_indices, scale, sparse_block_size=1, attention_mode=2,
                 return_softmax_lse=False, **common)[0]
    out = out.view(b, m, h, d)
    any_valid = (topk_idxs >= 0).any(dim=-1).view(b, m, 1, 1)
    return torch.where(any_valid, out, torch.zeros((), dtype=out.dtype, device=out.device))


# ---------------------------------------------------------------------------------- indexer ops
@implements("index_scores", "ascend", requires=(
    always("the CANN indexers return top-k indices, not the score matrix"),))
def index_scores(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Reference logits ``[b, s, t]`` fp32 (no CANN op returns them)."""
    return always_reference("index_scores", ref.index_scores, q, k, weights)


def _indexer_mode(s: int, t: int, start_pos: int, ratio: int) -> tuple[str, int]:
    """('uniform', visible count) | ('causal', key length) | ('staircase', 0) | ('none', 0)."""
    first = min(t, (start_pos + 1) // ratio)
    last = min(t, (start_pos + s) // ratio)
    if last == 0:
        return "none", 0
    if first == last:
        return "uniform", first
    if ratio == 1 and start_pos + s <= t:
        return "causal", start_pos + s
    return "staircase", 0


def _sparse_count(width: int) -> int:
    return width if width <= 2048 else min(8192, -(-width // 1024) * 1024)


@implements("indexer_topk", "ascend", requires=INDEXER_TOPK_LIMITS)
def indexer_topk(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, topk: int, start_pos: int = 0,
                 ratio: int = 4, offset: int = 0) -> torch.Tensor:
    """q ``[b, s, H, D]``, k ``[b, t, D]``, weights ``[b, s, H]`` -> int32 ``[b, s, min(topk, t)]``:
    top entries (``+ offset``) among ``t < (start_pos + i + 1) // ratio``, -1 for masked picks."""
    b, s, h, d = q.shape
    t = k.shape[1]
    width = min(topk, t)
    chip, op, why = route("indexer_topk", LIGHTNING_INDEXER, q, k, weights, topk, start_pos, ratio, offset)
    if op is None:
        return limits.fallback("indexer_topk", chip, why, ref.indexer_topk, q, k, weights, topk, start_pos,
                               ratio, offset)
    mode, key_len = _indexer_mode(s, t, start_pos, ratio)
    count = _sparse_count(width)
    k_pages, table = _pages(k.contiguous(), max(key_len, 1))
    kwargs = dict(actual_seq_lengths_query=_cum_lengths(b, s, q.device),
                  actual_seq_lengths_key=torch.full((b,), key_len, dtype=torch.int32, device=q.device),
                  block_table=table, layout_query="TND", layout_key="PA_BSND", sparse_count=count,
                  sparse_mode=3 if mode == "causal" else 0)
    qt, wt = q.reshape(b * s, h, d).contiguous(), weights.reshape(b * s, h).contiguous()
    res = op(qt, k_pages, wt, **kwargs)
    idx = res if isinstance(res, torch.Tensor) else res[0]
    idx = idx.view(b, s, count)[..., :width]
    out = torch.where(idx >= 0, idx + offset, torch.full_like(idx, -1))
    return out.to(torch.int32)


@implements("compress_kv", "ascend", requires=(always(
    "our op is pooling only; the CANN compressor fuses projections, norm, rope and its state cache"),))
def compress_kv(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, ratio: int, overlap: bool) -> torch.Tensor:
    """Reference pooling (the CANN compressor is a different, fused op; see the module doc)."""
    return always_reference("compress_kv", ref.compress_kv, kv, score, ape, ratio, overlap)


# ------------------------------------------------------------------ shared-KV (window + compressed)
def _check_shared_kv(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, start_pos: int, window: int,
                     cmp_kv: torch.Tensor | None, cmp_ratio: int, cmp_idxs: torch.Tensor | None) -> None:
    """The input contract of :func:`shared_kv_attention`, with the op layer's checks."""
    op = "shared_kv_attention"
    C.rank(op, "q", q, (4,), "[b, m, h, d]")
    b, m, h, d = q.shape
    C.dtype(op, "q", q, C.FLOATS)
    C.rank(op, "kv", kv, (3,), "[b, n, d]")
    n = kv.shape[1]
    C.shape(op, "kv", kv, (b, n, d), "[b, n, d]")
    C.dtype(op, "kv", kv, (q.dtype,))
    C.dtype(op, "attn_sink", attn_sink, (torch.float32,))
    C.shape(op, "attn_sink", attn_sink, (h,), "[h]")
    C.positive(op, "window", window)
    C.index_range(op, "start_pos and start_pos + m", torch.tensor([start_pos, start_pos + m]), 0, n + 1)
    if cmp_kv is not None:
        C.rank(op, "cmp_kv", cmp_kv, (3,), "[b, nc, d]")
        C.shape(op, "cmp_kv", cmp_kv, (b, cmp_kv.shape[1], d), "[b, nc, d]")
        C.dtype(op, "cmp_kv", cmp_kv, (q.dtype,))
        C.positive(op, "cmp_ratio", cmp_ratio)
    if cmp_idxs is not None:
        C.dtype(op, "cmp_kv (required with cmp_idxs)", cmp_kv, (q.dtype,))
        assert cmp_kv is not None
        C.dtype(op, "cmp_idxs", cmp_idxs, (torch.int32,))
        C.rank(op, "cmp_idxs", cmp_idxs, (3,), "[b, m, K]")
        C.shape(op, "cmp_idxs", cmp_idxs, (b, m, cmp_idxs.shape[2]), "[b, m, K]")
        if C.value_checks_enabled(cmp_idxs.device.type):
            C.index_range(op, "cmp_idxs", cmp_idxs, -1, cmp_kv.shape[1])


def shared_kv_indices(m: int, b: int, start_pos: int, window: int, n: int, cmp_n: int, cmp_ratio: int,
                      cmp_idxs: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The rows of ``cat([kv, cmp_kv], 1)`` that query ``i`` (position ``p = start_pos + i``) attends:
    window rows ``p-window+1 .. p`` (>= 0), then compressed rows ``n + c`` for the listed (or, without
    ``cmp_idxs``, all) entries ``c < (p+1) // cmp_ratio``; -1 elsewhere. int32 ``[b, m, window + K]``."""
    pos = torch.arange(start_pos, start_pos + m, device=device)
    win = pos.unsqueeze(1) - window + 1 + torch.arange(window, device=device)
    win = torch.where(win >= 0, win, torch.full_like(win, -1)).unsqueeze(0).expand(b, m, window)
    if cmp_n == 0 or cmp_ratio < 1:
        return win.to(torch.int32)
    limit = ((pos + 1) // cmp_ratio).view(1, m, 1)
    if cmp_idxs is None:
        c = torch.arange(cmp_n, device=device).view(1, 1, cmp_n).expand(b, m, cmp_n)
    else:
        c = cmp_idxs.long()
    cmp = torch.where((c >= 0) & (c < limit), c + n, torch.full_like(c, -1))
    return torch.cat([win, cmp], dim=-1).to(torch.int32)


def shared_kv_reference(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, softmax_scale: float, *,
                        start_pos: int, window: int, cmp_kv: torch.Tensor | None = None, cmp_ratio: int = 0,
                        cmp_idxs: torch.Tensor | None = None) -> torch.Tensor:
    """The decomposition :func:`shared_kv_attention` must equal: index lists + reference sparse_attn."""
    b, m = q.shape[:2]
    n = kv.shape[1]
    cmp_n = 0 if cmp_kv is None else cmp_kv.shape[1]
    idx = shared_kv_indices(m, b, start_pos, window, n, cmp_n, cmp_ratio, cmp_idxs, q.device)
    rows = kv if cmp_kv is None else torch.cat([kv, cmp_kv], dim=1)
    return ref.sparse_attn(q, rows, attn_sink, idx.contiguous(), softmax_scale)


SHARED_KV_RULES = {
    "A2/A3": [
        ("heads != 64", lambda a: a["h"] != 64),
        ("head dim != 512", lambda a: a["d"] != 512),
        ("q/kv not bf16/fp16", lambda a: a["dtype"] not in _HALF),
        ("window != 128 (ori_win_left only 127)", lambda a: a["window"] != 128),
        ("cmp_ratio not 4 or 128", lambda a: a["has_cmp"] and a["ratio"] not in (4, 128)),
        ("compressed top-k K != 512", lambda a: a["K"] not in (0, 512)),
    ],
    "950": [
        ("heads not 64 or 128", lambda a: a["h"] not in (64, 128)),
        ("head dim != 512", lambda a: a["d"] != 512),
        ("q/kv not bf16", lambda a: a["dtype"] != torch.bfloat16),
        ("window != 128 (ori_win_left only 127)", lambda a: a["window"] != 128),
        ("cmp_ratio not 4 or 128", lambda a: a["has_cmp"] and a["ratio"] not in (4, 128)),
        ("compressed top-k K not 512 or 1024", lambda a: a["K"] not in (0, 512, 1024)),
    ],
}
_COMMON_SHARED_RULES = [
    ("attn_sink not finite (sinks are passed as is)", lambda a: not a["sink_finite"]),
    ("empty tensor", lambda a: a["empty"]),
]


def sharedkv_ops(quant: bool, why: str | None) -> tuple[object, object, str | None]:
    """The shared-KV attention op and its metadata op (the KV-quant pair on 950: ``quant``), looked up only when
    nothing rules the call out yet (``why`` None); ``why`` names the missing ops when they are not installed."""
    if why is not None:
        return None, None, why
    cands, meta_cands = (KVQ_SHAREDKV, KVQ_SHAREDKV_META) if quant else (SHAREDKV, SHAREDKV_META)
    op, meta = binding.lookup(cands), binding.lookup(meta_cands)
    if op is None or meta is None:
        return op, meta, f"CANN op not installed ({binding.describe(cands)} + metadata)"
    return op, meta, None


def shared_kv_violation(chip: str | None, args: dict) -> str | None:
    """Why :func:`shared_kv_attention` cannot use the fused op here (None: it can)."""
    if chip is None:
        return "unknown Ascend chip"
    rules = SHARED_KV_RULES["950" if chip == "950" else "A2/A3"] + _COMMON_SHARED_RULES
    for text, test in rules:
        if test(args):
            return text
    return None


def pack_kv_fp8(kv: torch.Tensor, rope_dim: int = 64, tile: int = 64) -> torch.Tensor:
    """950 KV layout: bf16 ``[..., 512]`` ([no-rope 448 | rope 64]) -> 640 bytes per row, viewed as
    ``float8_e4m3fn [..., 640]``: rope bf16 x64 (128 B), no-rope FP8 x448, e8m0 tile scales x7
    (tile 64, power-of-two scales of the V4 KV round trip), zero pad to 640."""
    lead, d = kv.shape[:-1], kv.shape[-1]
    nope_dim = d - rope_dim
    nope = kv[..., :nope_dim].float().unflatten(-1, (nope_dim // tile, tile))
    s = F.fp8_block_scale(nope.abs().amax(dim=-1), pow2=True)                  # [..., 7]
    y = F.fp8_round(nope / s.unsqueeze(-1)).flatten(-2)
    parts = [kv[..., nope_dim:].to(torch.bfloat16).contiguous().view(torch.uint8),
             y.view(torch.uint8), F.float_to_e8m0(s).view(torch.uint8)]
    used = sum(p.shape[-1] for p in parts)
    parts.append(torch.zeros(*lead, 640 - used, dtype=torch.uint8, device=kv.device))
    return torch.cat(parts, dim=-1).view(F.FP8_DTYPE)


def unpack_kv_fp8(packed: torch.Tensor, rope_dim: int = 64, tile: int = 64) -> torch.Tensor:
    """The inverse of :func:`pack_kv_fp8`: 640-byte rows ``[..., 640]`` -> fp32 ``[..., 512]``
    ([no-rope 448 | rope 64])."""
    raw = packed.contiguous().view(torch.uint8)
    rope_bytes = 2 * rope_dim
    nope_dim = 512 - rope_dim
    rope = raw[..., :rope_bytes].contiguous().view(torch.bfloat16).float()
    nope = raw[..., rope_bytes:rope_bytes + nope_dim].contiguous().view(F.FP8_DTYPE).float()
    scales = F.e8m0_to_float(raw[..., rope_bytes + nope_dim:rope_bytes + nope_dim + nope_dim // tile].contiguous())
    nope = (nope.unflatten(-1, (nope_dim // tile, tile)) * scales.unsqueeze(-1)).flatten(-2)
    return torch.cat([nope, rope], dim=-1)


def shared_kv_attention(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, softmax_scale: float, *,
                        start_pos: int, window: int, cmp_kv: torch.Tensor | None = None, cmp_ratio: int = 0,
                        cmp_idxs: torch.Tensor | None = None) -> torch.Tensor:
    """V4 attention over the sliding window and the compressed entries in one fused call.

    q ``[b, m, h, d]`` at positions ``start_pos .. start_pos+m-1``; kv ``[b, n, d]`` the original KV
    rows by position (``n >= start_pos + m``); attn_sink fp32 ``[h]``; optional cmp_kv ``[b, nc, d]``
    (compressed entries, ratio ``cmp_ratio``) and cmp_idxs int32 ``[b, m, K]`` (the indexer's picks,
    -1 for none). Returns ``[b, m, h, d]`` equal to :func:`shared_kv_reference`.
    On 950 the KV goes through the FP8 packing of :func:`pack_kv_fp8` (exact for KV that already
    went through V4's 64-tile power-of-two FP8 round trip, as the model's does).
    """
    _check_shared_kv(q, kv, attn_sink, start_pos, window, cmp_kv, cmp_ratio, cmp_idxs)
    b, m, h, d = q.shape
    length = start_pos + m
    chip = runtime.chip()
    args = {"h": h, "d": d, "dtype": q.dtype, "window": window, "has_cmp": cmp_kv is not None,
            "ratio": cmp_ratio, "K": 0 if cmp_idxs is None else cmp_idxs.shape[-1],
            "sink_finite": bool(torch.isfinite(attn_sink).all()), "empty": b * m == 0}
    why = shared_kv_violation(chip, args)
    quant = chip == "950"
    op, meta, why = sharedkv_ops(quant, why)
    if why is not None or op is None or meta is None:
        limits.record("shared_kv_attention", chip, f"reference: {why}")
        return shared_kv_reference(q, kv, attn_sink, softmax_scale, start_pos=start_pos, window=window,
                                   cmp_kv=cmp_kv, cmp_ratio=cmp_ratio, cmp_idxs=cmp_idxs)
    limits.record("shared_kv_attention", chip, f"native:{op.tier}.{op.name}")
    has_cmp = cmp_kv is not None
    ratio = cmp_ratio if has_cmp else 1
    store = pack_kv_fp8 if quant else (lambda x: x)
    ori_pages, ori_table = _pages(store(kv[:, :length].contiguous()), length)
    cu_q = _cum_lengths(b, m, q.device, leading_zero=True)
    seqused = torch.full((b,), length, dtype=torch.int32, device=q.device)
    kw = dict(ori_kv=ori_pages, ori_block_table=ori_table, cu_seqlens_q=cu_q, seqused_kv=seqused,
              sinks=attn_sink.contiguous(), softmax_scale=float(softmax_scale), cmp_ratio=ratio,
              ori_mask_mode=4, cmp_mask_mode=3, ori_win_left=window - 1, ori_win_right=0,
              layout_q="TND", layout_kv="PA_ND")
    meta_kw = dict(num_heads_q=h, num_heads_kv=1, head_dim=d, cu_seqlens_q=cu_q, seqused_kv=seqused,
                   batch_size=b, max_seqlen_q=m, max_seqlen_kv=length, cmp_topk=args["K"], cmp_ratio=ratio,
                   ori_mask_mode=4, cmp_mask_mode=3, ori_win_left=window - 1, ori_win_right=0,
                   layout_q="TND", layout_kv="PA_ND", has_ori_kv=True, has_cmp_kv=has_cmp, device=str(q.device))
    if has_cmp:
        cmp_rows = max(1, length // ratio)
        cmp_pages, cmp_table = _pages(store(cmp_kv[:, :cmp_rows].contiguous()), cmp_rows)
        kw.update(cmp_kv=cmp_pages, cmp_block_table=cmp_table)
        if cmp_idxs is not None:
            kw["cmp_sparse_indices"] = _valid_first(cmp_idxs.reshape(b * m, -1)).view(b * m, 1, -1).contiguous()
    if quant:
        meta_kw.update(kv_quant_mode=1, tile_size=64, rope_head_dim=64)
        kw.update(tile_size=64, rope_head_dim=64)
        kw["metadata"] = meta(**meta_kw)
        out = op(q.reshape(b * m, h, d).contiguous(), 1, **kw)[0]
    else:
        kw["metadata"] = meta(**meta_kw)
        out = op(q.reshape(b * m, h, d).contiguous(), **kw)[0]
    return out.view(b, m, h, d)


# -------------------------------------------------------------------- quantized V4 indexer entry
def quant_indexer_reference(q: torch.Tensor, q_scale: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor,
                            weights: torch.Tensor, topk: int, start_pos: int = 0, ratio: int = 4,
                            offset: int = 0) -> torch.Tensor:
    """Dequantize (per token-head / per key scales) and run the reference :func:`indexer_topk`."""
    qf = q.float() * q_scale.float().unsqueeze(-1)
    kf = k.float() * k_scale.float().unsqueeze(-1)
    return ref.indexer_topk(qf, kf, weights.float(), topk, start_pos, ratio, offset)


def quant_indexer_topk(q: torch.Tensor, q_scale: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor,
                       weights: torch.Tensor, topk: int, start_pos: int = 0, ratio: int = 4,
                       offset: int = 0) -> torch.Tensor:
    """V4's quantized lightning indexer.

    q int8 (A2/A3) or fp8 (950) ``[b, s, 64, 128]`` with per token-head scales ``q_scale [b, s, 64]``
    (fp16 on A2/A3, fp32 on 950); k ``[b, t, 128]`` (compressed keys) with ``k_scale [b, t]``;
    weights ``[b, s, 64]`` (fp16 on A2/A3, fp32 on 950). Returns int32 ``[b, s, min(topk, t)]``
    exactly as :func:`quant_indexer_reference` (``indexer_topk`` on the dequantized tensors).
    """
    op_name = "quant_indexer_topk"
    C.rank(op_name, "q", q, (4,), "[b, s, H, D]")
    b, s, h, d = q.shape
    C.rank(op_name, "k", k, (3,), "[b, t, D]")
    t = k.shape[1]
    C.shape(op_name, "k", k, (b, t, d), "[b, t, D]")
    C.shape(op_name, "q_scale", q_scale, (b, s, h), "[b, s, H]")
    C.shape(op_name, "k_scale", k_scale, (b, t), "[b, t]")
    C.shape(op_name, "weights", weights, (b, s, h), "[b, s, H]")
    chip = runtime.chip()
    width = min(topk, t)
    quant_dtype, scale_dtype = (F.FP8_DTYPE, torch.float32) if chip == "950" else (torch.int8, torch.float16)
    checks = [
        ("indexer heads != 64", h != 64), ("head dim != 128", d != INDEXER_D),
        (f"q/k not {quant_dtype} on {chip}", q.dtype != quant_dtype or k.dtype != quant_dtype),
        (f"scales/weights not {scale_dtype} on {chip}",
         q_scale.dtype != scale_dtype or k_scale.dtype != scale_dtype or weights.dtype != scale_dtype),
        ("sparse_count (topk) not 512 on 950", chip == "950" and topk != 512),
        ("sparse_count (topk) not in [1, 2048]", not 1 <= topk <= 2048),
        ("cmp_ratio not 1, 4 or 128 on 950", chip == "950" and ratio not in (1, 4, 128)),
        ("cmp_ratio not a power of two <= 128", ratio < 1 or ratio > 128 or ratio & (ratio - 1) != 0),
        ("empty input", b * s * width == 0), ("negative start_pos", start_pos < 0),
        ("k holds fewer entries than (start_pos + s) // ratio (the op derives the count from positions)",
         ratio >= 1 and (start_pos + s) // ratio > t),
    ]
    why = "unknown Ascend chip" if chip is None else next((text for text, bad in checks if bad), None)
    op = meta = None
    if why is None:
        op, meta = binding.lookup(QUANT_INDEXER), binding.lookup(QUANT_INDEXER_META)
        if op is None or meta is None:
            why = f"CANN op not installed ({binding.describe(QUANT_INDEXER)} + metadata)"
    if why is not None or op is None or meta is None:
        limits.record("quant_indexer_topk", chip, f"reference: {why}")
        return quant_indexer_reference(q, q_scale, k, k_scale, weights, topk, start_pos, ratio, offset)
    limits.record("quant_indexer_topk", chip, f"native:{op.tier}.{op.name}")
    length = start_pos + s                         # uncompressed tokens per sequence
    rows = max(1, min(t, length // ratio))
    k_pages, table = _pages(k[:, :rows].contiguous(), rows)
    ks_pages, _ = _pages(k_scale[:, :rows].unsqueeze(-1).contiguous(), rows)
    cu_q = _cum_lengths(b, s, q.device)
    seq_k = torch.full((b,), length, dtype=torch.int32, device=q.device)
    common = dict(actual_seq_lengths_query=cu_q, actual_seq_lengths_key=seq_k, layout_query="TND",
                  layout_key="PA_BSND", sparse_count=topk, sparse_mode=3, pre_tokens=(1 << 63) - 1,
                  next_tokens=(1 << 63) - 1, cmp_ratio=ratio)
    metadata = meta(num_heads_q=h, num_heads_k=1, head_dim=d, query_quant_mode=0, key_quant_mode=0,
                    batch_size=b, max_seqlen_q=s, max_seqlen_k=length, device=str(q.device), **common)
    idx, _ = op(q.reshape(b * s, h, d).contiguous(), k_pages, weights.reshape(b * s, h).contiguous(),
                q_scale.reshape(b * s, h).contiguous(), ks_pages.view(k_pages.shape[0], PAGE, 1).contiguous(),
                query_quant_mode=0, key_quant_mode=0, block_table=table, metadata=metadata,
                return_value=False, **common)
    idx = idx.view(b, s, topk)[..., :width]
    return torch.where(idx >= 0, idx + offset, torch.full_like(idx, -1)).to(torch.int32)
