"""Triton lightning indexer over paged key caches: logits read straight from the FP4 / FP8 cache bytes.

``_indexer_logits_paged_kernel``: a program owns one query row (request ``b``, draft row ``i``) and
``BLOCK_T`` logical key positions. It looks each position's block up in the request's block-table row,
loads the key bytes from the page (``D`` the key width, q's last dim: ``indexer_fp4``: ``D / 2`` packed
e2m1 bytes, low nibble = even element, and ``D / 32`` ue8m0 scales, padded to a multiple of 4 bytes per
key, after the page's ``block_size * D / 2`` data bytes; ``indexer_fp8``: ``D`` e4m3 bytes and one fp32
scale after ``block_size * D``), decodes them with integer arithmetic (no device fp4/fp8 conversion),
and multiplies the row's ``[HP, D]`` query heads with the ``[BLOCK_T, D]`` keys as two products of
``K = JP >= D / 2`` (columns past ``D`` masked to 0), one over the even and one over the odd dims (the two
nibbles of a byte). ReLU, the head weights and the sum over heads run on the fp32 accumulator (a NaN
stays NaN: ``relu(NaN)`` is NaN, like the reference's); positions at or past the row's limit get ``-inf``,
and a tile wholly past it skips the product. A block id outside ``[0, blocks)`` (-1, or any value when the
value checks did not run) is no key: its positions get ``-inf`` and its page is never addressed. V4's ``D = 128``
gives ``JP = 64``; keys wider than 128 run on the reference (a requirement: they spill registers).

Precision: an FP4 key (e2m1 value times a power of two) is exact in bf16, so on a GPU the FP4 product
is a bf16 MMA whose products are exact and whose sum is fp32; an FP8 key's e4m3 value is exact in bf16
too, and its fp32 scale multiplies the fp32 dot afterwards (as DeepGEMM does). Under the interpreter
(whose bf16 ``tl.dot`` is wrong) both operands are fp32.

:func:`indexer_topk_paged` is these logits plus ``torch.topk``; :func:`paged_slots` is plain torch.

Verified where: under the Triton interpreter against the reference (tests/triton); compiled for sm_90a
without spills (tests/triton/sm90_compile.py). GPU numerics and speed are checked only on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4hal.backends.reference import paged_indexer as ref
from v4hal.backends.reference import sparse_indexer as sparse_ref
from v4hal.hal import requirements as R
from v4hal.hal.registry import implements
from v4hal.ops.paged import PAGED_LAYOUTS

from ._attn_common import cdiv, dot_precision, dot_upcast, next_pow2, on_interpreter

MAX_INDEX_HEADS = 128   # all heads of a query row in one MMA tile
MAX_INDEX_DIM = 128     # the key width V4 uses; wider keys spill registers on sm_90 (tests/triton/sm90_compile.py)
_REQUIRES = (R.one_of("layout", ("indexer_fp4", "indexer_fp8"), why="the kernel decodes the quantized key bytes"),
             R.at_most("indexer heads H", MAX_INDEX_HEADS, "q.shape[2]", why="all heads of a row in one MMA tile"),
             R.at_most("indexer key width D", MAX_INDEX_DIM, "q.shape[-1]",
                       why="the query heads and a key tile, each in two halves of D / 2, in registers"),
             R.min_capability(8, 0, tensor="q", only_for=(torch.bfloat16,), why="bf16 tl.dot"))


@triton.jit
def _e8m0_to_f32(s):
    """uint8-valued int32 ue8m0 bytes -> fp32 ``2**(s - 127)`` (0: the subnormal 2**-127, 255: NaN)."""
    bits = tl.where(s == 0, 0x400000, s << 23)
    bits = tl.where(s == 255, 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _e2m1_to_f32(c):
    """int32 e2m1 codes (4 bits: sign, 2 exponent bits, 1 mantissa bit) -> fp32."""
    e = (c >> 1) & 3
    m = (c & 1).to(tl.float32)
    mag = tl.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * tl.where(e == 3, 4.0, tl.where(e == 2, 2.0, 1.0)))
    return tl.where((c & 8) != 0, -mag, mag)


@triton.jit
def _e4m3_to_f32(c):
    """int32 e4m3 bytes -> fp32 (0x7F / 0xFF: NaN)."""
    e = (c >> 3) & 15
    m = (c & 7).to(tl.float32)
    pow2 = ((tl.maximum(e, 1) + 120) << 23).to(tl.float32, bitcast=True)       # 2**(max(e, 1) - 7)
    mag = tl.where(e == 0, m * 0.125, 1.0 + m * 0.125) * pow2
    mag = tl.where((c & 0x7F) == 0x7F, float("nan"), mag)
    return tl.where((c & 0x80) != 0, -mag, mag)


@triton.jit
def _positions(cand_ptr, row, offs_c, limit, L, SPAN, s_c,
               SPARSE: tl.constexpr, CB: tl.constexpr):
    """(logical positions [BLOCK_T] int32, scored mask) of output columns ``offs_c``: the columns
    themselves (dense), or ``candidate * CB + column % CB`` of the row's candidate blocks (sparse; a
    candidate outside ``[0, SPAN)`` is no block)."""
    if SPARSE:
        cand = tl.load(cand_ptr + row.to(tl.int64) * s_c + offs_c // CB, mask=offs_c < L, other=-1)
        c_ok = (cand >= 0) & (cand < SPAN)
        offs_t = tl.where(c_ok, cand, 0) * CB + offs_c % CB
        t_ok = c_ok & (offs_t >= 0) & (offs_t < limit)       # >= 0: a wrapped product near 2**31 is no key
    else:
        offs_t = offs_c
        t_ok = offs_t < limit
    return offs_t, t_ok


@triton.jit
def _indexer_logits_paged_kernel(q_ptr, cache_ptr, w_ptr, ctx_ptr, bt_ptr, out_ptr, cand_ptr,
                                 NEXT_N, H, BS, MB, NB, L, SPAN,
                                 s_qb, s_qn, s_qh, s_w, s_bt, s_page, s_o, s_c,
                                 CTX_2D: tl.constexpr, FP8: tl.constexpr, HP: tl.constexpr,
                                 BLOCK_T: tl.constexpr, TO_F32: tl.constexpr, PREC: tl.constexpr,
                                 D: tl.constexpr, JP: tl.constexpr, SB: tl.constexpr,
                                 SPARSE: tl.constexpr = False, CB: tl.constexpr = 1):
    """program_id(0) = query row ``b * NEXT_N + i``, program_id(1) = tile of BLOCK_T output columns. ``D``:
    the key width; ``JP``: the even / odd halves' tile width (a power of two >= max(ceil(D / 2), 16)); ``SB``:
    indexer_fp4 scale bytes per key (V4: D = 128, JP = 64, SB = 4). Dense (``SPARSE`` False): column = logical
    position. ``SPARSE``: column ``j * CB + o`` is position ``cand[row, j] * CB + o`` (``cand_ptr``: int32
    ``[rows, K]`` of row stride ``s_c``, ``SPAN`` = ceil(MB * BS / CB) blocks addressable); per column the
    same products and sums as the dense kernel's, so the logits are the same bits."""
    row = tl.program_id(0)
    b = row // NEXT_N
    i = row % NEXT_N
    t0 = tl.program_id(1) * BLOCK_T
    offs_c = t0 + tl.arange(0, BLOCK_T)
    if CTX_2D:
        limit = tl.load(ctx_ptr + row).to(tl.int64)
    else:       # int64: a context length near 2**31 or -2**31 must not wrap
        limit = tl.load(ctx_ptr + b).to(tl.int64) - NEXT_N + 1 + i
    limit = tl.maximum(tl.minimum(limit, MB * BS), 0).to(tl.int32)       # in [0, MB * BS]: int32 again
    offs_t, t_ok = _positions(cand_ptr, row, offs_c, limit, L, SPAN, s_c, SPARSE, CB)
    if SPARSE:
        run = tl.max(t_ok.to(tl.int32), axis=0) > 0
    else:
        run = t0 < limit
    if run:
        col = offs_t // BS
        blk = tl.load(bt_ptr + b.to(tl.int64) * s_bt + col, mask=t_ok, other=0)
        blk = tl.minimum(tl.maximum(blk, 0), NB - 1).to(tl.int64)         # in the cache, whatever the id
        tok = (offs_t % BS).to(tl.int64)
        bs = (t0 * 0 + BS).to(tl.int64)                                          # int64 byte offsets below
        page = cache_ptr + blk * s_page                                          # [BLOCK_T] page starts
        offs_j = tl.arange(0, JP)
        heads = tl.arange(0, HP)
        h_ok = heads < H
        km = t_ok[:, None]
        if D < 2 * JP:       # masks for the even / odd dims past D
            qm_even = h_ok[:, None] & (2 * offs_j < D)[None, :]
            qm_odd = h_ok[:, None] & (2 * offs_j + 1 < D)[None, :]
            km_even = km & (2 * offs_j < D)[None, :]
            km_odd = km & (2 * offs_j + 1 < D)[None, :]
        else:
            qm_even = h_ok[:, None]
            qm_odd = h_ok[:, None]
            km_even = km
            km_odd = km
        q_row = q_ptr + b.to(tl.int64) * s_qb + i * s_qn + heads * s_qh
        q_even = tl.load(q_row[:, None] + 2 * offs_j[None, :], mask=qm_even, other=0.0)
        q_odd = tl.load(q_row[:, None] + 2 * offs_j[None, :] + 1, mask=qm_odd, other=0.0)
        if FP8:
            data = page[:, None] + tok[:, None] * D + 2 * offs_j[None, :]
            k_even = _e4m3_to_f32(tl.load(data, mask=km_even, other=0).to(tl.int32))
            k_odd = _e4m3_to_f32(tl.load(data + 1, mask=km_odd, other=0).to(tl.int32))
            scales = page + bs * D                                                # the page's scale region
            sb = tl.load(scales[:, None] + tok[:, None] * 4 + tl.arange(0, 4)[None, :], mask=km, other=0)
            bits = tl.sum(sb.to(tl.uint32) << (tl.arange(0, 4) * 8).to(tl.uint32)[None, :], axis=1)
            k_scale = bits.to(tl.float32, bitcast=True)                           # [BLOCK_T]
        else:       # byte j holds dims 2j (low nibble) and 2j + 1; D even, so one mask serves both
            packed = tl.load(page[:, None] + tok[:, None] * (D // 2) + offs_j[None, :], mask=km_even,
                             other=0).to(tl.int32)
            scales = page + bs * (D // 2)                                         # the page's scale region
            sc = tl.load(scales[:, None] + tok[:, None] * SB + offs_j[None, :] // 16, mask=km_even, other=127)
            scale = _e8m0_to_f32(sc.to(tl.int32))                                 # [BLOCK_T, 64]
            k_even = _e2m1_to_f32(packed & 15) * scale
            k_odd = _e2m1_to_f32(packed >> 4) * scale
        if TO_F32:
            q_even = q_even.to(tl.float32)
            q_odd = q_odd.to(tl.float32)
        else:
            k_even = k_even.to(tl.bfloat16)
            k_odd = k_odd.to(tl.bfloat16)
        acc = tl.dot(q_even, tl.trans(k_even), input_precision=PREC)             # [HP, BLOCK_T] fp32
        acc = tl.dot(q_odd, tl.trans(k_odd), acc, input_precision=PREC)
        if FP8:
            acc = acc * k_scale[None, :]
        w = tl.load(w_ptr + row.to(tl.int64) * s_w + heads, mask=h_ok, other=0.0)
        relu = tl.where(acc < 0.0, 0.0, acc)                                     # relu(NaN) = NaN, as IEEE
        score = tl.sum(relu * w[:, None], axis=0)                                # [BLOCK_T]
        # a block id outside [0, NB) holds no key: -inf. Read from the block table again here rather than
        # kept from above: a mask held across the products costs registers (tests/triton/sm90_compile.py)
        offs_t, t_ok = _positions(cand_ptr, row, offs_c, limit, L, SPAN, s_c, SPARSE, CB)
        ids = tl.load(bt_ptr + b.to(tl.int64) * s_bt + offs_t // BS, mask=t_ok, other=0)
        score = tl.where(t_ok & (ids >= 0) & (ids < NB), score, float("-inf"))
    else:
        score = tl.full([BLOCK_T], float("-inf"), tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * s_o + offs_c, score, mask=offs_c < L)


def logits_into(out: torch.Tensor, q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor,
                context_lens: torch.Tensor, block_table: torch.Tensor, layout: str,
                candidates: torch.Tensor | None = None, candidate_block: int = 1) -> torch.Tensor:
    """The paged indexer logits written into fp32 ``out [b * next_n, L]`` (last dim contiguous): at every
    position ``< L``, or with ``candidates`` (int32 ``[b, next_n, K]``, ``L = K * candidate_block``) at the
    positions of the candidate blocks."""
    b, n, h, d = q.shape
    if out.numel() == 0:
        return out
    if h == 0:       # no heads: every visible logit is 0, which positions are visible is the reference's
        if candidates is None:
            logits = ref.indexer_logits_paged(q, kv_cache, weights, context_lens, block_table, out.shape[1], layout)
        else:
            logits = sparse_ref.indexer_logits_paged_sparse(q, kv_cache, weights, context_lens, block_table,
                                                            candidates, candidate_block, layout)
        out.copy_(logits)
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    weights = weights.float()                                   # bf16 weights: exact in fp32
    weights = weights if weights.stride(-1) == 1 else weights.contiguous()
    context_lens = context_lens.contiguous()
    block_table = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
    interp = on_interpreter(q)
    to_f32 = dot_upcast(q.dtype, q.device)
    hp = max(16, next_pow2(h))
    block_t = 32 if interp else 64
    cache = kv_cache if kv_cache.dtype == torch.uint8 else kv_cache.view(torch.uint8)
    nb, bs = cache.shape[0], cache.shape[1]
    s_page = cache.stride(0) if nb > 1 else 0
    grid = (b * n, cdiv(out.shape[1], block_t))
    kwargs = {} if interp else {"num_warps": 4, "num_stages": 2}
    mb = block_table.shape[1]
    if candidates is None:
        cand, s_c, span, sparse = block_table, 0, 0, {}
    else:
        cand = candidates.reshape(b * n, -1)
        cand = cand if cand.stride(-1) == 1 else cand.contiguous()
        s_c, span = cand.stride(0), cdiv(mb * bs, candidate_block)
        sparse = {"SPARSE": True, "CB": candidate_block}
    _indexer_logits_paged_kernel[grid](
        q, cache, weights, context_lens, block_table, out, cand, n, h, bs, mb, nb, out.shape[1], span,
        q.stride(0), q.stride(1), q.stride(2), weights.stride(0), block_table.stride(0), s_page, out.stride(0), s_c,
        CTX_2D=context_lens.dim() == 2, FP8=layout == "indexer_fp8", HP=hp, BLOCK_T=block_t, TO_F32=to_f32,
        PREC=dot_precision(torch.float32 if to_f32 else q.dtype), D=d, JP=max(16, next_pow2(-(-d // 2))),
        SB=PAGED_LAYOUTS["indexer_fp4"].scale_bytes(d) if layout == "indexer_fp4" else 0, **sparse, **kwargs)
    return out


@implements("indexer_logits_paged", "triton", requires=_REQUIRES)
def indexer_logits_paged(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor, context_lens: torch.Tensor,
                         block_table: torch.Tensor, max_context_len: int,
                         layout: str = "indexer_fp4") -> torch.Tensor:
    """fp32 ``[b * next_n, max_context_len]`` paged indexer logits (-inf past each row's limit)."""
    out = torch.empty(q.shape[0] * q.shape[1], max_context_len, dtype=torch.float32, device=q.device)
    return logits_into(out, q, kv_cache, weights, context_lens, block_table, layout)


@implements("indexer_topk_paged", "triton", requires=_REQUIRES)
def indexer_topk_paged(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor, context_lens: torch.Tensor,
                       block_table: torch.Tensor, topk: int, layout: str = "indexer_fp4",
                       offset: int = 0) -> torch.Tensor:
    """int32 ``[b, next_n, topk]``: the Triton logits over the block table's positions, then ``torch.topk``."""
    width = block_table.shape[1] * kv_cache.shape[1]
    out = torch.empty(q.shape[0] * q.shape[1], width, dtype=torch.float32, device=q.device)
    logits = logits_into(out, q, kv_cache, weights, context_lens, block_table, layout)
    return ref.topk_from_logits(logits, ref.row_limits(context_lens, q.shape[1]), topk, offset)


@implements("paged_slots", "triton")
def paged_slots(positions: torch.Tensor, block_table: torch.Tensor, block_size: int,
                req_index: torch.Tensor | None = None) -> torch.Tensor:
    """int32 slots like ``positions`` (plain torch ops: one gather, no kernel)."""
    return ref.paged_slots(positions, block_table, block_size, req_index)


@implements("indexer_logits_paged_sparse", "triton", requires=_REQUIRES)
def indexer_logits_paged_sparse(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor,
                                context_lens: torch.Tensor, block_table: torch.Tensor, candidates: torch.Tensor,
                                candidate_block: int = 8, layout: str = "indexer_fp4") -> torch.Tensor:
    """fp32 ``[b * next_n, K * candidate_block]``: the kernel's logits at the candidate blocks' positions."""
    out = torch.empty(q.shape[0] * q.shape[1], candidates.shape[2] * candidate_block, dtype=torch.float32,
                      device=q.device)
    return logits_into(out, q, kv_cache, weights, context_lens, block_table, layout, candidates, candidate_block)


@implements("indexer_topk_paged_sparse", "triton", requires=_REQUIRES)
def indexer_topk_paged_sparse(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor,
                              context_lens: torch.Tensor, block_table: torch.Tensor, candidates: torch.Tensor,
                              topk: int, candidate_block: int = 8, layout: str = "indexer_fp4",
                              offset: int = 0) -> torch.Tensor:
    """int32 ``[b, next_n, topk]``: the kernel's sparse logits, then the reference's stable top-k."""
    logits = indexer_logits_paged_sparse(q, kv_cache, weights, context_lens, block_table, candidates,
                                         candidate_block, layout)
    return sparse_ref.sparse_topk(logits, kv_cache, context_lens, block_table, candidates, topk, candidate_block,
                                  offset)


@implements("indexer_candidate_blocks", "triton")
def indexer_candidate_blocks(logits: torch.Tensor, context_lens: torch.Tensor, n_blocks: int,
                             candidate_block: int = 8) -> torch.Tensor:
    """int32 ``[b, next_n, n_blocks]`` (plain torch ops: a block max and a sort, no kernel)."""
    return sparse_ref.indexer_candidate_blocks(logits, context_lens, n_blocks, candidate_block)
