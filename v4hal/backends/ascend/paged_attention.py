"""Sparse attention over paged caches on Ascend: ``sparse_attn_paged`` -> CANN's shared-KV sparse attention.

V4's attention over the window cache plus the compressed cache is one CANN call when the picks are
given in the op's position form (``positions`` + ``block_table`` + ``window_size``: the window as a
band; ``extra_block_table`` + ``extra_ratio``: the compressed picks as entry indices):

- A2/A3: ``npu_sparse_attn_sharedkv`` (+ ``npu_sparse_attn_sharedkv_metadata``; ``_C_ascend`` or
  ``custom``) reads the ``bf16`` pages as they are (``PA_ND`` ``[blocks, block_size, 1, 512]``).
- 950: that op is not built there; ``npu_kv_quant_sparse_attn_sharedkv`` (+ metadata) reads FP8 KV
  packed into 640 bytes per entry (rope bf16 x 64 | no-rope e4m3 x 448 | e8m0 x 7 | pad). No 640-byte
  page layout is added to the pools (it would be a fourth attention layout that every backend's
  ``paged_cache_write`` must write); the adapter packs the ``bf16`` pages the call reads (the window's
  band, the visible compressed entries) per call instead, with the tables remapped onto them.
  V4 writes its KV and compressed entries after the FP8 round trip (64-wide tiles, power-of-two
  scales), so the packing is lossless for them; the adapter checks that it is (unpack and compare)
  and runs the reference when it is not. ``npu_sparse_flash_attention`` (950's other paged op) takes
  one cache per call and no LSE with paged keys, so it cannot merge the two caches' softmaxes.

The mapping: ``q [b, s_q, h, 512]`` -> TND ``[b * s_q, h, 512]`` with ``cu_seqlens_q`` ``[b + 1]``;
row ``i`` of the call is one CANN batch whose key length ``seqused_kv[i]`` is its last query position
+ 1 (the op puts query ``j`` of a batch at ``seqused_kv - s_q + j``, so a row's positions must be
consecutive); ``ori_mask_mode=4`` (band) with ``ori_win_left = window_size - 1``; the compressed
picks go in as ``cmp_sparse_indices`` ``[T, 1, K]`` (valid first, padded with -1 to the op's K)
with ``cmp_mask_mode=3`` (causal, ``c < (p + 1) // cmp_ratio``: the op's own statement of the
``extra_ratio`` rule); ``sinks`` = ``attn_sink``. Block-table columns a row never reads are set to
block 0 (the op validates the table up to its longest row).

Falls back to the reference on the NPU tensors (``v4hal info`` lists each case): slot indices (the
CANN ops take positions through block tables, not slots), ``return_lse`` (none returns it with
paged caches), ``model1_fp8`` pages (584 bytes, read by neither op), V4.1's ``v41_window_fp8`` /
``v41_compressed_fp4`` pages (528 / 288 bytes: no CANN op on A2, A3 or 950 reads either), and the shape limits of the op
(64 heads, 128 on 950 too; D = 512; window 128; ratio 4 or 128; K <= 512, 1024 on 950).
"""
from __future__ import annotations

import torch

from v4hal.backends.reference import paged_attention as ref
from v4hal.hal.registry import implements
from v4hal.ops.paged_attention import entry_picks, lse_out

from . import limits, runtime
from ._route import schema_args
from .attention import _cum_lengths, _valid_first, pack_kv_fp8, sharedkv_ops, unpack_kv_fp8
from .limits import fallback_when

OP = "sparse_attn_paged"
D = 512
WINDOW = 128          # ori_win_left = 127 is the one window the ops are documented with
RATIOS = (4, 128)
MAX_K = {"A2": 512, "A3": 512, "950": 1024}


def _extra_k(a: limits.Args) -> int:
    return 0 if a["extra_indices"] is None else a["extra_indices"].shape[-1]


def _not_consecutive(a: limits.Args) -> bool:
    """Some row's query positions are not consecutive (one host sync; only for s_q > 1)."""
    pos = a["positions"]
    return pos.shape[1] > 1 and bool((pos[:, 1:] - pos[:, :-1] != 1).any())


def _pages_needed(lengths: torch.Tensor, block_size: int, columns: int) -> torch.Tensor:
    """bool ``[b, columns]``: the block-table columns holding positions ``< lengths[b]``."""
    need = (lengths.long() + block_size - 1) // block_size
    return torch.arange(columns, device=lengths.device).unsqueeze(0) < need.unsqueeze(1)


def _row_lengths(positions: torch.Tensor) -> torch.Tensor:
    """int64 ``[b]``: the key length of each row, its last query position + 1."""
    return positions[:, -1].long() + 1


def _missing_pages(a: limits.Args) -> bool:
    """A page the op reads (up to the row's length, or its visible entries) is not in the table (one sync)."""
    lens = _row_lengths(a["positions"])
    bt = a["block_table"]
    bad = (_pages_needed(lens, a["kv_cache"].shape[1], bt.shape[1]) & (bt < 0)).any()
    if a["extra_block_table"] is not None:
        xt = a["extra_block_table"]
        xlen = lens // a["extra_ratio"]
        bad = bad | (_pages_needed(xlen, a["extra_kv_cache"].shape[1], xt.shape[1]) & (xt < 0)).any()
    too_short = (lens > bt.shape[1] * a["kv_cache"].shape[1]).any()
    return bool(bad | too_short)


def _sink_not_finite(a: limits.Args) -> bool:
    return not bool(torch.isfinite(a["attn_sink"]).all())


def _layouts(a: limits.Args) -> tuple[str, ...]:
    """The layouts of the caches the call reads (the extra cache's only when there is one)."""
    if a["extra_kv_cache"] is None:
        return (a["layout"],)
    return a["layout"], a.get("extra_layout") or a["layout"]


def _v41_pages(a: limits.Args) -> bool:
    return any(lay.startswith("v41_") for lay in _layouts(a))


def _block_ok(cache: torch.Tensor | None) -> bool:
    return cache is None or (cache.shape[1] % 16 == 0 and 16 <= cache.shape[1] <= 1024)


limits.plan(OP, {"A2": "npu_sparse_attn_sharedkv (TND q, bf16 PA_ND pages, band window, cmp_sparse_indices)",
                 "A3": "npu_sparse_attn_sharedkv (TND q, bf16 PA_ND pages, band window, cmp_sparse_indices)",
                 "950": "npu_kv_quant_sparse_attn_sharedkv (bf16 pages packed to its 640-byte FP8 entries)"})
SPARSE_ATTN_PAGED_LIMITS = (
    fallback_when("return_lse (no CANN attention op over paged caches returns the log-sum-exp)",
                  lambda a: bool(a["return_lse"])),
    fallback_when("window given by slot (the CANN ops take it as a band: positions + block_table + window_size)",
                  lambda a: a["block_table"] is None),
    fallback_when("compressed picks given by slot (the CANN ops take entry indices through extra_block_table)",
                  lambda a: a["extra_indices"] is not None and a["extra_block_table"] is None),
    fallback_when("V4.1 pages (v41_window_fp8 528-byte / v41_compressed_fp4 288-byte entries; no CANN attention "
                  "op reads them: the CANN ops read bf16 pages, or 640-byte FP8 on 950)", _v41_pages),
    fallback_when("model1_fp8 pages (584-byte entries; the CANN ops read bf16 pages, or 640-byte FP8 on 950)",
                  lambda a: "model1_fp8" in _layouts(a)),
    fallback_when("head dim D != 512", lambda a: a["q"].shape[-1] != D),
    fallback_when("heads != 64", lambda a: a["q"].shape[2] != 64, ("A2", "A3")),
    fallback_when("heads not 64 or 128", lambda a: a["q"].shape[2] not in (64, 128), ("950",)),
    fallback_when(f"window_size != {WINDOW} (ori_win_left = {WINDOW - 1} only)", lambda a: a["window_size"] != WINDOW),
    fallback_when("extra_ratio not 4 or 128 (cmp_ratio)",
                  lambda a: a["extra_block_table"] is not None and a["extra_ratio"] not in RATIOS),
    fallback_when("more than 512 compressed picks (K = 512)", lambda a: _extra_k(a) > MAX_K["A2"], ("A2", "A3")),
    fallback_when("more than 1024 compressed picks (K = 512 or 1024)", lambda a: _extra_k(a) > MAX_K["950"],
                  ("950",)),
    fallback_when("extra_topk_length given (the op takes no per-batch pick counts)",
                  lambda a: a["extra_topk_length"] is not None),
    fallback_when("page size not a multiple of 16 in 16..1024",
                  lambda a: not (_block_ok(a["kv_cache"]) and _block_ok(a["extra_kv_cache"]))),
    fallback_when("empty input", lambda a: a["q"].numel() == 0),
    fallback_when("attn_sink not finite (the op adds exp(sinks) as given)", _sink_not_finite),
    fallback_when("a row's query positions are not consecutive (the op places query j at seqused_kv - s_q + j)",
                  _not_consecutive),
    fallback_when("a page up to a row's length is missing from its block table", _missing_pages),
)


def _dense_table(table: torch.Tensor, lengths: torch.Tensor, block_size: int) -> torch.Tensor:
    """int32 ``[b, pages]``: ``table`` with block 0 in the columns past each row's length and in place of -1
    (callers read no entry of such a page: a missing page within a length is a fallback or a masked row)."""
    need = _pages_needed(lengths, block_size, table.shape[1])
    keep = need & (table >= 0)
    return torch.where(keep, table, torch.zeros((), dtype=table.dtype, device=table.device)).contiguous()


def _packed_pages(cache: torch.Tensor, table: torch.Tensor, first: torch.Tensor, lengths: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """950: the pages rows read (positions ``first[b] .. lengths[b] - 1`` of row ``b``), packed to the op's
    640-byte FP8 entries, and the table remapped onto them (``[n, bs, 1, 640]`` e4m3 bytes, int32
    ``[b, pages]``; other columns: packed page 0, which the op does not read); None when packing would round
    an entry. Only the pages the band or the visible entries cover are packed, not the whole pool."""
    bs, cols = cache.shape[1], table.shape[1]
    col = torch.arange(cols, device=table.device).unsqueeze(0)
    read = (col >= (first.long() // bs).unsqueeze(1)) & _pages_needed(lengths, bs, cols) & (table >= 0)
    ids = torch.unique(table[read].long())
    pages = cache[ids]
    packed = pack_kv_fp8(pages)
    if not bool((unpack_kv_fp8(packed) == pages.float()).all()):
        return None
    remap = torch.zeros(cache.shape[0], dtype=torch.int32, device=table.device)
    remap[ids] = torch.arange(ids.numel(), dtype=torch.int32, device=table.device)
    new_table = torch.where(read, remap[table.long().clamp_min(0)], torch.zeros((), dtype=torch.int32,
                                                                                device=table.device))
    return packed, new_table.contiguous()


def _cmp_indices(extra_indices: torch.Tensor, positions: torch.Tensor, ratio: int, k: int) -> torch.Tensor:
    """int32 ``[T, 1, k]``: the visible entry indices of each query, valid first, -1 padded to ``k``."""
    b, s, n = extra_indices.shape
    c = _valid_first(entry_picks(extra_indices, positions, ratio).view(b * s, n))
    if k > n:
        c = torch.cat([c, c.new_full((b * s, k - n), -1)], dim=1)
    return c.to(torch.int32).view(b * s, 1, k).contiguous()


@implements(OP, "ascend", requires=SPARSE_ATTN_PAGED_LIMITS)
def sparse_attn_paged(q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor | None, attn_sink: torch.Tensor,
                      softmax_scale: float, topk_length: torch.Tensor | None = None,
                      extra_kv_cache: torch.Tensor | None = None, extra_indices: torch.Tensor | None = None,
                      extra_topk_length: torch.Tensor | None = None, layout: str = "model1_fp8",
                      positions: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
                      window_size: int = 0, extra_block_table: torch.Tensor | None = None, extra_ratio: int = 0,
                      return_lse: bool = False, extra_layout: str | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out bf16 ``[b, s_q, h, 512]``, lse): one shared-KV sparse attention call (module doc), else the
    reference on the NPU tensors."""
    args = (q, kv_cache, indices, attn_sink, softmax_scale, topk_length, extra_kv_cache, extra_indices,
            extra_topk_length, layout, positions, block_table, window_size, extra_block_table, extra_ratio, return_lse,
            extra_layout)
    chip = runtime.chip()
    why = limits.violation(OP, chip, schema_args(OP, args))
    quant = chip == "950"
    op, meta, why = sharedkv_ops(quant, why)
    has_cmp = extra_kv_cache is not None
    ratio = extra_ratio if has_cmp else 1
    lens = None if positions is None else _row_lengths(positions)
    ori = cmp = None
    if why is None:
        first = (positions[:, 0].long() - window_size + 1).clamp_min(0)
        zero = torch.zeros_like(lens)
        if quant:
            ori = _packed_pages(kv_cache, block_table, first, lens)
            cmp = _packed_pages(extra_kv_cache, extra_block_table, zero, lens // ratio) if has_cmp else None
            if ori is None or (has_cmp and cmp is None):
                why = "bf16 entries off V4's FP8 grid (950's op reads 640-byte FP8 entries; packing would round them)"
        else:
            ori = kv_cache, _dense_table(block_table, lens, kv_cache.shape[1])
            if has_cmp:
                cmp = extra_kv_cache, _dense_table(extra_block_table, lens // ratio, extra_kv_cache.shape[1])
    if why is not None or op is None or meta is None:
        return limits.fallback(OP, chip, why or "reference", ref.sparse_attn_paged, *args)
    limits.record(OP, chip, f"native:{op.tier}.{op.name}")
    b, s, h, d = q.shape
    seqused = lens.to(torch.int32).contiguous()
    cu_q = _cum_lengths(b, s, q.device, leading_zero=True)
    k = 0
    kw = dict(ori_kv=ori[0], ori_block_table=ori[1], cu_seqlens_q=cu_q,
              seqused_kv=seqused, sinks=attn_sink.float().contiguous(), softmax_scale=float(softmax_scale),
              cmp_ratio=ratio, ori_mask_mode=4, cmp_mask_mode=3, ori_win_left=window_size - 1, ori_win_right=0,
              layout_q="TND", layout_kv="PA_ND")
    if has_cmp:
        k = 512 if extra_indices.shape[-1] <= 512 else 1024
        kw.update(cmp_kv=cmp[0], cmp_block_table=cmp[1],
                  cmp_sparse_indices=_cmp_indices(extra_indices, positions, ratio, k))
    meta_kw = dict(num_heads_q=h, num_heads_kv=1, head_dim=d, cu_seqlens_q=cu_q, seqused_kv=seqused, batch_size=b,
                   max_seqlen_q=s, max_seqlen_kv=int(lens.max()), cmp_topk=k, cmp_ratio=ratio, ori_mask_mode=4,
                   cmp_mask_mode=3, ori_win_left=window_size - 1, ori_win_right=0, layout_q="TND",
                   layout_kv="PA_ND", has_ori_kv=True, has_cmp_kv=has_cmp, device=str(q.device))
    qt = q.reshape(b * s, h, d).contiguous()
    if quant:
        meta_kw.update(kv_quant_mode=1, tile_size=64, rope_head_dim=64)
        kw.update(tile_size=64, rope_head_dim=64, metadata=meta(**meta_kw))
        res = op(qt, 1, **kw)
    else:
        kw["metadata"] = meta(**meta_kw)
        res = op(qt, **kw)
    out = res if isinstance(res, torch.Tensor) else res[0]
    return out.view(b, s, h, d), lse_out(q, False)
