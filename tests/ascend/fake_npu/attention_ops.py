"""Schema checks + documented math of the attention / indexer stand-ins (shared by the tiers)."""
from __future__ import annotations

from typing import Any

import torch

from v4hal.hal import formats as F

from . import kernels
from .contract import STATE, block_table, cumulative, defaults, desc, paged_kv, pow2, require, tensor, valid_first

HALF = (torch.bfloat16, torch.float16)
E8M0_CODE = 293


# ------------------------------------------------------------------------------ query layouts
def _query(op: str, name: str, q: Any, layout: str, d: int, cu: Any, *, dtypes=HALF, leading_zero: bool = False
           ) -> tuple[torch.Tensor, list[int], int]:
    """(q as [T, N, d], cumulative query ends per batch, N) for BSND or TND layouts."""
    require(layout in ("BSND", "TND"), op, f"layout of {name} must be BSND or TND, got {layout!r}")
    tensor(op, name, q, dtypes=dtypes, contiguous=True)
    if layout == "TND":
        tensor(op, name, q, ndim=3)
        require(cu is not None, op, "TND layout needs the cumulative query lengths")
        ends = cumulative(op, "cumulative query lengths", cu, total=q.shape[0], leading_zero=leading_zero)
        ends = ends[1:] if leading_zero else ends
        qt = q
    else:
        tensor(op, name, q, ndim=4)
        b, s = q.shape[:2]
        if cu is not None:
            lens = [int(v) for v in cu.tolist()]
            require(len(lens) == b and all(v == s for v in lens), op, "BSND query lengths other than S are not modeled")
        ends = [s * (i + 1) for i in range(b)]
        qt = q.reshape(b * s, q.shape[2], q.shape[3])
    require(qt.shape[-1] == d, op, f"{name} head dim must be {d}, got {desc(q)}")
    return qt, ends, qt.shape[1]


# -------------------------------------------------------------------------------------- SFA
def sfa(op: str, tier: str, query: Any, key: Any, value: Any, sparse_indices: Any, scale_value: float,
        block_table_: Any, aslq: Any, aslkv: Any, query_rope: Any, key_rope: Any, sparse_block_size: int,
        layout_query: str, layout_kv: str, sparse_mode: int, pre_tokens: int, next_tokens: int,
        attention_mode: int, return_softmax_lse: bool, sinks: Any) -> torch.Tensor:
    """npu_sparse_flash_attention (op-plugin doc): returns attention_out ``[T, N1, 512]`` (TND) or BSND."""
    chip = STATE.chip
    require(attention_mode == 2, op, f"attention_mode supports only 2 (MLA-absorb), got {attention_mode}")
    require(sparse_mode in (0, 3), op, f"sparse_mode must be 0 or 3, got {sparse_mode}")
    defaults(op, pre_tokens, next_tokens)
    require(isinstance(scale_value, float), op, f"scale_value must be a float, got {type(scale_value).__name__}")
    require(layout_kv in ("TND", "BSND", "PA_BSND"), op, f"layout_kv must be TND, BSND or PA_BSND, got {layout_kv!r}")
    require(layout_kv != "PA_BSND" or not return_softmax_lse, op, "return_softmax_lse is not supported with PA_BSND")
    require(layout_kv == "PA_BSND", op, "the stand-in models the paged (PA_BSND) key layout only")
    qt, ends, n1 = _query(op, "query", query, layout_query, 512, aslq)
    if chip == "950":
        require(1 <= n1 <= 128, op, f"950: query heads must be 1..128, got {n1}")
        require(sparse_block_size == 1, op, f"950: sparse_block_size must be 1, got {sparse_block_size}")
    else:
        require(n1 in (1, 2, 4, 8, 16, 32, 64, 128), op, f"{chip}: query heads must be a power of 2 <= 128, got {n1}")
        require(pow2(sparse_block_size) and sparse_block_size <= 128, op,
                f"sparse_block_size must be a power of 2 in [1, 128], got {sparse_block_size}")
        require(sinks is None, op, f"sinks are not supported on {chip}")
    blocks, blk = paged_kv(op, "key", key, 512, dtypes=(query.dtype,))
    require(blk % sparse_block_size == 0, op, "sparse_block_size must divide block_size")
    tensor(op, "value", value, dtypes=(query.dtype,), shape=tuple(key.shape))
    require(query_rope is not None and key_rope is not None, op, "attention_mode 2 needs query_rope and key_rope")
    tensor(op, "query_rope", query_rope, dtypes=(query.dtype,), shape=(qt.shape[0], n1, 64) if layout_query == "TND"
           else tuple(query.shape[:3]) + (64,), contiguous=True)
    tensor(op, "key_rope", key_rope, dtypes=(query.dtype,), shape=(blocks, blk, 1, 64))
    b = len(ends)
    require(aslkv is not None, op, "PA_BSND needs actual_seq_lengths_kv")
    tensor(op, "actual_seq_lengths_kv", aslkv, dtypes=(torch.int32,), shape=(b,))
    kv_lens = aslkv.long()
    require(bool((kv_lens >= 0).all()), op, "actual_seq_lengths_kv must be >= 0")
    require(block_table_ is not None, op, "PA_BSND needs block_table")
    block_table(op, "block_table", block_table_, b, blocks, blk, int(kv_lens.max()) if b else 0)
    t = qt.shape[0]
    shape = (t, 1, None) if layout_query == "TND" else (query.shape[0], query.shape[1], 1, None)
    tensor(op, "sparse_indices", sparse_indices, dtypes=(torch.int32,), shape=shape, contiguous=True)
    idx = sparse_indices.reshape(t, -1).long()
    require(idx.shape[1] > 0, op, "sparse_size must be > 0")
    valid_first(op, "sparse_indices", idx)
    if sinks is not None:
        tensor(op, "sinks", sinks, dtypes=(torch.float32,), shape=(n1,))
    batch, i_in, q_len = kernels.token_batches(ends, query.device)
    lim = kv_lens[batch].unsqueeze(1)
    pos = idx * sparse_block_size
    require(bool(((idx < 0) | (pos < lim)).all()), op, "sparse_indices point past actual_seq_lengths_kv")
    valid = idx >= 0
    if sparse_mode == 3:
        valid &= pos <= (lim - q_len.unsqueeze(1) + i_in.unsqueeze(1))
    bb = batch.unsqueeze(1).expand_as(idx)
    safe = pos.clamp_min(0)
    k_rows = kernels.paged_rows(key, block_table_, bb, safe)                 # [T, K, 512]
    kr_rows = kernels.paged_rows(key_rope, block_table_, bb, safe)           # [T, K, 64]
    v_rows = kernels.paged_rows(value, block_table_, bb, safe)
    scores = (torch.einsum("tnd,tkd->tnk", qt.float(), k_rows)
              + torch.einsum("tnd,tkd->tnk", query_rope.reshape(t, n1, 64).float(), kr_rows)) * scale_value
    out = kernels.softmax_attend(scores, valid, v_rows, sinks).to(query.dtype)
    return out if layout_query == "TND" else out.view(query.shape)


# -------------------------------------------------------------------------- lightning indexer
LI_COUNTS = set(range(1, 2049)) | {3072, 4096, 5120, 6144, 7168, 8192}


def lightning_indexer(op: str, query: Any, key: Any, weights: Any, aslq: Any, aslk: Any, block_table_: Any,
                      layout_query: str, layout_key: str, sparse_count: int, sparse_mode: int, pre_tokens: int,
                      next_tokens: int, return_value: bool) -> torch.Tensor:
    """npu_lightning_indexer (op-plugin doc) -> int32 ``[T, 1, sparse_count]``, -1 padded."""
    chip = STATE.chip
    require(sparse_count in LI_COUNTS, op,
            f"sparse_count must be in [1, 2048] or 3072..8192 step 1024, got {sparse_count}")
    require(sparse_mode in (0, 3), op, f"sparse_mode must be 0 or 3, got {sparse_mode}")
    defaults(op, pre_tokens, next_tokens)
    require(layout_key in ("PA_BSND", "BSND", "TND"), op,
            f"layout_key must be PA_BSND, BSND or TND, got {layout_key!r}")
    require(layout_key == "PA_BSND", op, "the stand-in models the paged (PA_BSND) key layout only")
    require(not return_value, op, "return_value is not supported with PA_BSND")
    qt, ends, n1 = _query(op, "query", query, layout_query, 128, aslq)
    if chip == "950":
        require(n1 in (8, 16, 24, 32, 64), op, f"950: query heads must be 8, 16, 24, 32 or 64, got {n1}")
        require(weights.dtype != torch.float32, op, "950: weights cannot be float32")
    else:
        require(n1 <= 64, op, f"{chip}: query heads must be <= 64, got {n1}")
    blocks, blk = paged_kv(op, "key", key, 128, dtypes=(query.dtype,))
    tensor(op, "weights", weights, dtypes=HALF + (torch.float32,), contiguous=True)
    require(weights.dtype in (torch.float32, query.dtype), op, "weights must be float32 or query's dtype")
    b = len(ends)
    tensor(op, "weights", weights, shape=(qt.shape[0], n1) if layout_query == "TND" else tuple(query.shape[:3]))
    require(aslk is not None and block_table_ is not None, op, "PA_BSND needs actual_seq_lengths_key and block_table")
    tensor(op, "actual_seq_lengths_key", aslk, dtypes=(torch.int32,), shape=(b,))
    k_lens = aslk.long()
    block_table(op, "block_table", block_table_, b, blocks, blk, int(k_lens.max()) if b else 0)
    t = qt.shape[0]
    batch, i_in, q_len = kernels.token_batches(ends, query.device)
    s_max = int(k_lens.max()) if b else 0
    pos = torch.arange(max(s_max, 1), device=query.device).view(1, -1).expand(t, -1)
    keys = kernels.paged_rows(key, block_table_, batch.unsqueeze(1).expand_as(pos),
                              pos.clamp(max=max(blocks * blk - 1, 0)))
    lim = k_lens[batch].unsqueeze(1)
    valid = pos < lim
    if sparse_mode == 3:
        valid &= pos <= (lim - q_len.unsqueeze(1) + i_in.unsqueeze(1))
    scores = kernels.indexer_scores(qt, keys, weights.reshape(t, n1))
    return kernels.topk_padded(scores, valid, sparse_count).view(t, 1, sparse_count)


# ----------------------------------------------------------------- shared-KV metadata + attention
_LAYOUT = {"BSND": 1, "TND": 2, "PA_ND": 3}
MAGIC = 0x5A5


def sharedkv_metadata(op: str, *, num_heads_q: int, num_heads_kv: int, head_dim: int, cu_seqlens_q: Any,
                      seqused_kv: Any, batch_size: int, max_seqlen_q: int, max_seqlen_kv: int, cmp_topk: int,
                      cmp_ratio: int, ori_mask_mode: int, cmp_mask_mode: int, ori_win_left: int, ori_win_right: int,
                      layout_q: str, layout_kv: str, has_ori_kv: bool, has_cmp_kv: bool, quant: int,
                      device: str) -> torch.Tensor:
    """The tiling summary both metadata ops produce: int32 ``[1024]`` (what the stand-in attention
    checks against its own arguments)."""
    require(layout_q in ("TND", "BSND") and layout_kv == "PA_ND", op,
            f"layouts must be TND/BSND and PA_ND, got {layout_q}, {layout_kv}")
    require(num_heads_kv == 1, op, f"num_heads_kv must be 1, got {num_heads_kv}")
    require(seqused_kv is not None, op, "seqused_kv is required")
    tensor(op, "seqused_kv", seqused_kv, dtypes=(torch.int32,), shape=(batch_size,))
    if layout_q == "TND":
        ends = cumulative(op, "cu_seqlens_q", cu_seqlens_q, leading_zero=True)
        require(len(ends) == batch_size + 1, op, f"cu_seqlens_q must have B+1={batch_size + 1} entries")
        q_lens = [b - a for a, b in zip(ends, ends[1:])]
        require(max(q_lens, default=0) <= max_seqlen_q, op,
                f"max_seqlen_q {max_seqlen_q} < longest query {max(q_lens)}")
    require(int(seqused_kv.max()) <= max_seqlen_kv, op, "max_seqlen_kv smaller than the longest sequence")
    require(isinstance(device, str), op, "device must be a string")
    meta = torch.zeros(1024, dtype=torch.int32)
    vals = [MAGIC, num_heads_q, num_heads_kv, head_dim, batch_size, cmp_topk, cmp_ratio, ori_mask_mode, cmp_mask_mode,
            ori_win_left, ori_win_right, int(has_ori_kv), int(has_cmp_kv), _LAYOUT[layout_q], _LAYOUT[layout_kv], quant]
    meta[: len(vals)] = torch.tensor(vals, dtype=torch.int32)
    return meta


def sharedkv(op: str, q: Any, *, ori_kv: Any, cmp_kv: Any, ori_sparse_indices: Any, cmp_sparse_indices: Any,
             ori_block_table: Any, cmp_block_table: Any, cu_seqlens_q: Any, seqused_kv: Any, sinks: Any,
             metadata: Any, softmax_scale: float, cmp_ratio: int, ori_mask_mode: int, cmp_mask_mode: int,
             ori_win_left: int, ori_win_right: int, layout_q: str, layout_kv: str, return_softmax_lse: bool,
             quant: bool, kv_dim: int, kv_dtypes: tuple[torch.dtype, ...], heads: tuple[int, ...],
             topks: tuple[int, ...], unpack: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """npu_(kv_quant_)sparse_attn_sharedkv (vllm-ascend READMEs): sliding window over ori_kv (band mask
    ``[p - ori_win_left, p + ori_win_right]``), plus compressed entries ``c < (p + 1) // cmp_ratio``
    (all of them, or those listed in cmp_sparse_indices), sinks in the denominator; query i of a
    batch sits at ``p = seqused_kv - q_len + i``."""
    require(layout_kv == "PA_ND", op, f"layout_kv supports only PA_ND, got {layout_kv!r}")
    require(layout_q == "TND", op, "the stand-in models layout_q TND")
    require(ori_mask_mode == 4 and cmp_mask_mode == 3, op,
            f"mask modes must be 4 (band) / 3 (causal), got {ori_mask_mode}/{cmp_mask_mode}")
    require(ori_win_left == 127 and ori_win_right == 0, op,
            f"ori_win_left/right support only 127/0, got {ori_win_left}/{ori_win_right}")
    require(not return_softmax_lse, op, "return_softmax_lse is not supported")
    require(ori_sparse_indices is None, op, "ori_sparse_indices is not supported (ignored by the op)")
    qt, ends, n1 = _query(op, "q", q, layout_q, 512, cu_seqlens_q, dtypes=(torch.bfloat16,) if quant else HALF,
                          leading_zero=True)
    require(n1 in heads, op, f"q heads must be one of {heads}, got {n1}")
    require(ori_kv is not None, op, "ori_kv is required (all three scenarios use it)")
    blocks, blk = paged_kv(op, "ori_kv", ori_kv, kv_dim, dtypes=kv_dtypes)
    require(quant or ori_kv.dtype == q.dtype, op, "ori_kv must have q's dtype")
    b = len(ends)
    tensor(op, "seqused_kv", seqused_kv, dtypes=(torch.int32,), shape=(b,))
    lens = seqused_kv.long()
    block_table(op, "ori_block_table", ori_block_table, b, blocks, blk, int(lens.max()))
    if quant or sinks is not None:
        require(sinks is not None, op, "sinks are required")
        tensor(op, "sinks", sinks, dtypes=(torch.float32,), shape=(n1,))
    require(isinstance(softmax_scale, float) and softmax_scale != 0.0, op,
            f"softmax_scale must be a non-zero float, got {softmax_scale!r}")
    has_cmp = cmp_kv is not None
    require(cmp_sparse_indices is None or has_cmp, op, "cmp_sparse_indices needs cmp_kv")
    if has_cmp:
        require(cmp_ratio in (4, 128), op, f"cmp_ratio must be 4 or 128, got {cmp_ratio}")
        cblocks, cblk = paged_kv(op, "cmp_kv", cmp_kv, kv_dim, dtypes=kv_dtypes)
        require(cmp_kv.dtype == ori_kv.dtype, op, "cmp_kv must have ori_kv's dtype")
        block_table(op, "cmp_block_table", cmp_block_table, b, cblocks, cblk, int(lens.max()) // cmp_ratio)
    else:
        require(cmp_ratio in (0, 1), op, f"without cmp_kv cmp_ratio must be 1, got {cmp_ratio}")
    k2 = 0
    if cmp_sparse_indices is not None:
        tensor(op, "cmp_sparse_indices", cmp_sparse_indices, dtypes=(torch.int32,), ndim=3, contiguous=True)
        require(cmp_sparse_indices.shape[:2] == (qt.shape[0], 1), op,
                f"cmp_sparse_indices must be [T, 1, K], got {desc(cmp_sparse_indices)}")
        k2 = cmp_sparse_indices.shape[2]
        require(k2 in topks, op, f"cmp_sparse_indices K must be one of {topks}, got {k2}")
        valid_first(op, "cmp_sparse_indices", cmp_sparse_indices)
    tensor(op, "metadata", metadata, dtypes=(torch.int32,), shape=(1024,))
    m = [int(v) for v in metadata[:16].tolist()]
    expect = [MAGIC, n1, 1, 512, b, k2, cmp_ratio if has_cmp else m[6], ori_mask_mode, cmp_mask_mode, ori_win_left,
              ori_win_right, 1, int(has_cmp), _LAYOUT[layout_q], _LAYOUT[layout_kv], int(quant)]
    require(m == expect, op, f"metadata does not match the call (metadata {m}, call {expect})")

    t = qt.shape[0]
    batch, i_in, q_len = kernels.token_batches(ends, q.device)
    p = lens[batch] - q_len + i_in                                     # absolute query positions
    win = ori_win_left + ori_win_right + 1
    wpos = p.unsqueeze(1) - ori_win_left + torch.arange(win, device=q.device)
    wvalid = (wpos >= 0) & (wpos < lens[batch].unsqueeze(1)) & (wpos <= p.unsqueeze(1) + ori_win_right)
    read = unpack or (lambda raw: raw.float())
    rows = [read(kernels.paged_raw(ori_kv, ori_block_table, batch.unsqueeze(1).expand_as(wpos), wpos.clamp_min(0)))]
    valid = [wvalid]
    if has_cmp:
        limit = ((p + 1) // cmp_ratio).unsqueeze(1)
        if cmp_sparse_indices is not None:
            c = cmp_sparse_indices.view(t, -1).long()
        else:
            c = torch.arange(int(lens.max()) // cmp_ratio, device=q.device).view(1, -1).expand(t, -1)
        cvalid = (c >= 0) & (c < limit)
        rows.append(read(kernels.paged_raw(cmp_kv, cmp_block_table, batch.unsqueeze(1).expand_as(c), c.clamp_min(0))))
        valid.append(cvalid)
    kv_rows, ok = torch.cat(rows, dim=1), torch.cat(valid, dim=1)
    scores = torch.einsum("tnd,tkd->tnk", qt.float(), kv_rows) * softmax_scale
    out = kernels.softmax_attend(scores, ok, kv_rows, sinks).to(q.dtype)
    return out, torch.zeros(0, dtype=torch.float32)


def unpack_fp8_bytes(packed: torch.Tensor) -> torch.Tensor:
    """Packed rows (float8_e4m3fn or uint8 bytes) ``[..., 640]`` = rope bf16 x64 | no-rope fp8 x448 | e8m0 x7 | pad
    -> fp32 ``[..., 512]`` ordered [no-rope 448 | rope 64] (the layout of q)."""
    packed = packed.contiguous().view(torch.uint8)
    rope = packed[..., :128].contiguous().view(torch.bfloat16).float()
    nope = packed[..., 128:576].contiguous().view(F.FP8_DTYPE).float()
    scales = F.e8m0_to_float(packed[..., 576:583].contiguous())
    nope = (nope.unflatten(-1, (7, 64)) * scales.unsqueeze(-1)).flatten(-2)
    return torch.cat([nope, rope], dim=-1)


# ------------------------------------------------------------------ V4 quantized indexer (+meta)
def quant_indexer_metadata(op: str, **kw: Any) -> torch.Tensor:
    require(kw["num_heads_q"] == 64 and kw["num_heads_k"] == 1 and kw["head_dim"] == 128, op,
            "num_heads_q/num_heads_k/head_dim must be 64/1/128")
    require(kw["layout_key"] == "PA_BSND", op, "layout_key must be PA_BSND")
    require(kw["actual_seq_lengths_query"] is not None and kw["actual_seq_lengths_key"] is not None, op,
            "actual sequence lengths are required")
    b = kw["batch_size"]
    tensor(op, "actual_seq_lengths_key", kw["actual_seq_lengths_key"], dtypes=(torch.int32,), shape=(b,))
    meta = torch.zeros(1024, dtype=torch.int32)
    vals = [MAGIC + 1, kw["num_heads_q"], kw["head_dim"], b, kw["sparse_count"], kw["sparse_mode"], kw["cmp_ratio"],
            kw["query_quant_mode"], kw["key_quant_mode"]]
    meta[: len(vals)] = torch.tensor(vals, dtype=torch.int32)
    return meta


def quant_indexer(op: str, query: Any, key: Any, weights: Any, query_dequant_scale: Any, key_dequant_scale: Any,
                  query_quant_mode: int, key_quant_mode: int, aslq: Any, aslk: Any, block_table_: Any, metadata: Any,
                  layout_query: str, layout_key: str, sparse_count: int, sparse_mode: int, pre_tokens: int,
                  next_tokens: int, cmp_ratio: int, return_value: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """npu_vllm_quant_lightning_indexer (vllm-ascend README): dequantized indexer scores over the
    compressed entries ``c < (p + 1) // cmp_ratio`` with ``p = seq_len_key - q_len + i``."""
    chip = STATE.chip
    qdt, sdt = (F.FP8_DTYPE, torch.float32) if chip == "950" else (torch.int8, torch.float16)
    require(layout_key == "PA_BSND", op, f"layout_key supports only PA_BSND, got {layout_key!r}")
    require(query_quant_mode == 0 and key_quant_mode == 0, op, "quant modes must be 0")
    require(sparse_mode == 3, op, f"sparse_mode must be 3, got {sparse_mode}")
    defaults(op, pre_tokens, next_tokens)
    require(not return_value, op, "return_value is not supported with PA_BSND")
    if chip == "950":
        require(sparse_count == 512, op, f"950: sparse_count must be 512, got {sparse_count}")
        require(cmp_ratio in (1, 4, 128), op, f"950: cmp_ratio must be 1, 4 or 128, got {cmp_ratio}")
    else:
        require(1 <= sparse_count <= 2048, op, f"sparse_count must be <= 2048, got {sparse_count}")
        require(pow2(cmp_ratio) and cmp_ratio <= 128, op, f"cmp_ratio must be a power of 2 <= 128, got {cmp_ratio}")
    qt, ends, n1 = _query(op, "query", query, layout_query, 128, aslq, dtypes=(qdt,))
    require(n1 == 64, op, f"query heads must be 64, got {n1}")
    blocks, blk = paged_kv(op, "key", key, 128, dtypes=(qdt,))
    t, b = qt.shape[0], len(ends)
    tensor(op, "weights", weights, dtypes=(sdt,), shape=(t, 64), contiguous=True)
    tensor(op, "query_dequant_scale", query_dequant_scale, dtypes=(sdt,), shape=(t, 64), contiguous=True)
    tensor(op, "key_dequant_scale", key_dequant_scale, dtypes=(sdt,), shape=(blocks, blk, 1))
    tensor(op, "actual_seq_lengths_key", aslk, dtypes=(torch.int32,), shape=(b,))
    lens = aslk.long()
    rows_max = int(lens.max()) // cmp_ratio
    block_table(op, "block_table", block_table_, b, blocks, blk, rows_max)
    tensor(op, "metadata", metadata, dtypes=(torch.int32,), shape=(1024,))
    m = [int(v) for v in metadata[:9].tolist()]
    expect = [MAGIC + 1, 64, 128, b, sparse_count, sparse_mode, cmp_ratio, query_quant_mode, key_quant_mode]
    require(m == expect, op, f"metadata does not match the call (metadata {m}, call {expect})")
    batch, i_in, q_len = kernels.token_batches(ends, query.device)
    p = lens[batch] - q_len + i_in
    c = torch.arange(max(rows_max, 1), device=query.device).view(1, -1).expand(t, -1)
    valid = (c < ((p + 1) // cmp_ratio).unsqueeze(1)) & (c < rows_max)
    bb = batch.unsqueeze(1).expand_as(c)
    keys = kernels.paged_rows(key, block_table_, bb, c.clamp(max=max(rows_max - 1, 0)))
    kscale = kernels.paged_rows(key_dequant_scale.unsqueeze(-1), block_table_, bb, c.clamp(max=max(rows_max - 1, 0)))
    qf = qt.float() * query_dequant_scale.float().unsqueeze(-1)
    scores = kernels.indexer_scores(qf, keys * kscale, weights)
    idx = kernels.topk_padded(scores, valid, sparse_count).view(t, 1, sparse_count)
    return idx, torch.zeros(0, dtype=sdt)
