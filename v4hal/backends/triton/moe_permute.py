"""Triton kernels behind ``moe_dispatch`` (group the ``T*k`` token slots by expert) and
``moe_combine`` (the weighted sum back per token). No host synchronisation anywhere: every size
a kernel needs comes from shapes, every data-dependent quantity stays on the device.

Dispatch: the flat slots ``f = t*k + j`` (expert ``indices[t, j]``) are cut into chunks of
``BLOCK`` consecutive slots.

1. ``_chunk_rank_kernel`` (one program per chunk): the rank of each slot among the earlier slots
   of its chunk with the same expert (a ``BLOCK x BLOCK`` equality/order mask, summed), and the
   chunk's per-expert counts (written by the last slot of each expert in the chunk: no atomics).
2. Device-side torch scans over the small ``[chunks, E]`` count table: ``group_offsets`` (int64
   ``[E+1]``) and, per (chunk, expert), the rows of that expert in earlier chunks.
3. ``_scatter_kernel``: sorted row of slot ``f`` = ``group_offsets[e] + earlier[chunk, e] + rank``,
   ``sorted_to_flat[row] = f``. This is exactly the stable order of the contract (inside an expert,
   ascending flat index), so every backend agrees bit for bit.
4. ``_gather_rows_kernel``: ``x_sorted[r] = x[sorted_to_flat[r] // k]`` copied as raw bits
   (integer loads/stores of the element size), ``[BLOCK_R, BLOCK_D]`` tiles.

Combine: ``_invert_kernel`` builds ``flat_to_sorted`` from the permutation, then
``_combine_kernel`` computes ``out[t] = sum_j w[t, j] * y[flat_to_sorted[t*k + j]]`` in fp32,
from 0, in slot order j = 0..k-1 with a separate rounding per product and per sum (launched
with ``enable_fp_fusion=False`` so a GPU does not contract them into FMAs), one cast at the end:
the reference's arithmetic, so the result is bit-identical to it too.

Verified where: under the interpreter, bitwise against the reference (empty experts, E = 1,
chunks split across expert runs, T*k not a multiple of the chunk). GPU: the same kernels, timed
by the GPU check script.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4hal.hal.registry import implements

from ._cast import cast_out
from .quant import bits_view, cdiv, interpreting, next_pow2, tl_dtype


def _chunk(interp: bool) -> int:
    """Slots per rank chunk (the pairwise mask is chunk x chunk)."""
    return 32 if interp else 128


@triton.jit
def _chunk_rank_kernel(idx_ptr, rank_ptr, counts_ptr, n, E, BLOCK: tl.constexpr):
    """Chunk p = slots [p*BLOCK, (p+1)*BLOCK): rank[f] = #earlier slots of the chunk with the same
    expert; counts[p, e] = #slots of expert e in the chunk (entries of absent experts untouched)."""
    p = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    f = p.to(tl.int64) * BLOCK + i
    valid = f < n
    e = tl.load(idx_ptr + f, mask=valid, other=-1)
    same = e[:, None] == e[None, :]
    earlier = tl.sum((same & (i[None, :] < i[:, None])).to(tl.int32), axis=1)
    later = tl.sum((same & (i[None, :] > i[:, None])).to(tl.int32), axis=1)
    tl.store(rank_ptr + f, earlier, mask=valid)
    tl.store(counts_ptr + p.to(tl.int64) * E + e, earlier + 1, mask=valid & (later == 0))


@triton.jit
def _scatter_kernel(idx_ptr, rank_ptr, base_ptr, s2f_ptr, n, E, BLOCK: tl.constexpr):
    """sorted_to_flat[base[p, e_f] + rank[f]] = f for the slots f of chunk p."""
    p = tl.program_id(0)
    f = p.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = f < n
    e = tl.load(idx_ptr + f, mask=valid, other=0)
    rank = tl.load(rank_ptr + f, mask=valid, other=0)
    row = tl.load(base_ptr + p.to(tl.int64) * E + e, mask=valid, other=0) + rank
    tl.store(s2f_ptr + row, f, mask=valid)


@triton.jit
def _gather_rows_kernel(src_ptr, s2f_ptr, dst_ptr, R, D, k, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """dst[r, :] = src[s2f[r] // k, :] (bit copies)."""
    rr = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rr < R
    src_row = tl.load(s2f_ptr + rr, mask=rmask, other=0) // k
    mask = rmask[:, None] & (rd < D)[None, :]
    vals = tl.load(src_ptr + src_row[:, None] * D + rd[None, :], mask=mask)
    tl.store(dst_ptr + rr[:, None] * D + rd[None, :], vals, mask=mask)


@triton.jit
def _invert_kernel(s2f_ptr, inv_ptr, n, BLOCK: tl.constexpr):
    """inv[s2f[r]] = r."""
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = r < n
    f = tl.load(s2f_ptr + r, mask=mask, other=0)
    tl.store(inv_ptr + f, r, mask=mask)


@triton.jit
def _combine_kernel(y_ptr, w_ptr, inv_ptr, out_ptr, T, D,
                    TOPK: tl.constexpr, OUT: tl.constexpr, SOFT: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t, d] = cast(sum_j w[t, j] * fp32(y[inv[t*TOPK + j], d])), j ascending, from 0."""
    rt = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tmask = rt < T
    mask = tmask[:, None] & (rd < D)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(TOPK):
        row = tl.load(inv_ptr + rt * TOPK + j, mask=tmask, other=0)
        wj = tl.load(w_ptr + rt * TOPK + j, mask=tmask, other=0.0)
        yj = tl.load(y_ptr + row[:, None] * D + rd[None, :], mask=mask, other=0.0).to(tl.float32)
        acc = acc + wj[:, None] * yj
    tl.store(out_ptr + rt[:, None] * D + rd[None, :], cast_out(acc, OUT, SOFT), mask=mask)


def _row_tiles(d: int, elem_bytes: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D) of the row copy: up to 2 KiB of a row per tile column, about 8 KiB a program."""
    block_d = min(next_pow2(d), max(16, 2048 // elem_bytes))
    return max(1, 8192 // (block_d * elem_bytes)), block_d


@implements("moe_dispatch", "triton")
def moe_dispatch(x: torch.Tensor, indices: torch.Tensor,
                 num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the ``T*k`` (token, slot) rows by expert, stable inside an expert.

    x ``[T, D]`` (any dtype, copied bit for bit), indices int32 ``[T, k]`` in ``[0, num_experts)``
    (not re-checked here: the ops layer validates the range). Returns x_sorted ``[T*k, D]``,
    group_offsets int64 ``[E+1]`` and sorted_to_flat int64 ``[T*k]``.
    """
    t, k = indices.shape
    d = x.shape[1]
    n = t * k
    e = int(num_experts)
    device = x.device
    group_offsets = torch.zeros(e + 1, dtype=torch.int64, device=device)
    sorted_to_flat = torch.empty(n, dtype=torch.int64, device=device)
    x_sorted = torch.empty((n, d), dtype=x.dtype, device=device)
    if n == 0:
        return x_sorted, group_offsets, sorted_to_flat
    interp = interpreting(x)
    block = _chunk(interp)
    chunks = cdiv(n, block)
    idx = indices.contiguous().view(-1)
    rank = torch.empty(n, dtype=torch.int32, device=device)
    counts = torch.zeros((chunks, e), dtype=torch.int32, device=device)
    _chunk_rank_kernel[(chunks,)](idx, rank, counts, n, e, BLOCK=block, num_warps=4)
    totals = counts.sum(0)                                           # int64 [E]
    torch.cumsum(totals, 0, out=group_offsets[1:])
    base = counts.cumsum(0) - counts + group_offsets[:-1]           # int64 [chunks, E]
    _scatter_kernel[(chunks,)](idx, rank, base, sorted_to_flat, n, e, BLOCK=block, num_warps=4)
    if d:
        src = bits_view(x.contiguous())
        dst = bits_view(x_sorted)
        block_r, block_d = _row_tiles(d, x.element_size())
        _gather_rows_kernel[(cdiv(n, block_r), cdiv(d, block_d))](
            src, sorted_to_flat, dst, n, d, k, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return x_sorted, group_offsets, sorted_to_flat


@implements("moe_combine", "triton")
def moe_combine(y: torch.Tensor, weights: torch.Tensor, sorted_to_flat: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * y[row of (t, j)]`` in fp32 (slot order), cast to y's dtype.

    y float ``[T*k, D]`` in dispatch order, weights fp32 ``[T, k]``, sorted_to_flat int64 ``[T*k]``
    (the permutation from :func:`moe_dispatch`; not re-checked here). Returns ``[T, D]``.
    """
    t, k = weights.shape
    d = y.shape[1]
    out = torch.empty((t, d), dtype=y.dtype, device=y.device)
    if t == 0 or d == 0:
        return out
    if k == 0:
        return out.zero_()
    n = t * k
    inv = torch.empty(n, dtype=torch.int64, device=y.device)
    _invert_kernel[(cdiv(n, 1024),)](sorted_to_flat.contiguous(), inv, n, BLOCK=1024, num_warps=4)
    block_d = min(next_pow2(d), 512)
    block_t = max(1, 2048 // block_d)
    _combine_kernel[(cdiv(t, block_t), cdiv(d, block_d))](
        y.contiguous(), weights.contiguous(), inv, out, t, d, TOPK=k, OUT=tl_dtype(y.dtype),
        SOFT=interpreting(y), BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4, enable_fp_fusion=False)
    return out


__all__ = ["moe_dispatch", "moe_combine"]
