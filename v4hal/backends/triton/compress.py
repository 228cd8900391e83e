"""Triton ``compress_kv``: gated softmax pooling of every ``ratio`` KV rows into one compressed entry.

``out[b, i, c] = sum_j softmax_j(score[b, pos_j, col_j] + ape[row_j, col_j]) * kv[b, pos_j, col_j]``,
per channel ``c < d``, in fp32, cast once to kv's dtype (the reference: ``reference/attention.py``).

* Without overlap the candidates of entry ``i`` are the ``ratio`` rows of block ``i``
  (``pos_j = i*ratio + j``, ``col_j = c``, ``ape`` row ``j``).
* With overlap (``c*d = 2d``) they are the ``ratio`` rows of block ``i-1`` at channel ``c`` (the
  first half of the row) followed by the ``ratio`` rows of block ``i`` at channel ``d + c`` (the
  second half), each with the ``ape`` row of its position inside its own block; block 0 has no
  previous block (those candidates weigh 0: score ``-inf``).

Kernel layout: one program per (batch row, entry, channel block). It loads the candidate tile(s)
``[R_P2, BLOCK_C]`` (``R_P2`` = ratio padded to a power of two, masked rows score ``-inf``), takes
the per-channel max over all candidates, ``p = exp(logit - max) / sum`` (the softmax as torch
computes it) and ``sum_j p * kv``. Entries are independent: no state, no atomics, no host sync.
The whole window of a channel block sits in registers, so ``ratio`` is limited (``MAX_RATIO``;
V4 uses 4 and 128); the channel block shrinks as the ratio grows (about 4096 tile elements).

Verified where: under the Triton interpreter against the reference (ratios 4 with overlap, 2 with
overlap, 3 and 128 without, channel counts that are not powers of two, bf16/fp16/fp32 kv); the
kernel has no ``tl.dot``, so the interpreter runs the arithmetic a GPU runs (up to the GPU's
``exp`` rounding). The ratio-4 and ratio-128 tiles compile for sm_90a without spills (Triton's
compiler and ptxas, no GPU). GPU only: the hardware bf16/fp16 output casts (``SOFT=False``) and speed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4hal.hal import requirements as R
from v4hal.hal.registry import implements

from .quant import cast_out, cdiv, interpreting, next_pow2, tl_dtype

MAX_RATIO = 1024            # the [R_P2, BLOCK_C] window tile is held in registers
_TILE_ELEMS = 4096          # about this many elements per window tile


@triton.jit
def _compress_kernel(kv_ptr, score_ptr, ape_ptr, out_ptr,
                     N_ENT, D, CD,
                     s_kb, s_kn, s_sb, s_sn, s_ob, s_on,
                     RATIO: tl.constexpr, R_P2: tl.constexpr, OVERLAP: tl.constexpr,
                     BLOCK_C: tl.constexpr, OUT: tl.constexpr, SOFT: tl.constexpr):
    """program_id(0) = b * N_ENT + entry i, program_id(1) = channel block; out[b, i, c-block]."""
    pid = tl.program_id(0)
    b = (pid // N_ENT).to(tl.int64)
    i = pid % N_ENT
    j = tl.arange(0, R_P2)
    jm = j < RATIO
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < D
    m = jm[:, None] & cm[None, :]

    # candidates of block i: channel c (plain) or d + c (overlap: the second half of the row)
    col = c + D if OVERLAP else c
    pos = (i * RATIO + j).to(tl.int64)
    kv_cur = tl.load(kv_ptr + b * s_kb + pos[:, None] * s_kn + col[None, :], mask=m, other=0.0).to(tl.float32)
    lg_cur = tl.load(score_ptr + b * s_sb + pos[:, None] * s_sn + col[None, :], mask=m, other=0.0)
    lg_cur += tl.load(ape_ptr + j[:, None] * CD + col[None, :], mask=m, other=0.0)
    lg_cur = tl.where(jm[:, None], lg_cur, float("-inf"))
    mx = tl.max(lg_cur, axis=0)
    if OVERLAP:
        # block i-1, first half of the channels; absent for entry 0
        prev_ok = jm & (pos >= RATIO)        # i > 0
        pm = prev_ok[:, None] & cm[None, :]
        ppos = pos - RATIO
        kv_prv = tl.load(kv_ptr + b * s_kb + ppos[:, None] * s_kn + c[None, :], mask=pm, other=0.0).to(tl.float32)
        lg_prv = tl.load(score_ptr + b * s_sb + ppos[:, None] * s_sn + c[None, :], mask=pm, other=0.0)
        lg_prv += tl.load(ape_ptr + j[:, None] * CD + c[None, :], mask=m, other=0.0)
        lg_prv = tl.where(prev_ok[:, None], lg_prv, float("-inf"))
        mx = tl.maximum(mx, tl.max(lg_prv, axis=0))
        e_prv = tl.exp(lg_prv - mx[None, :])
        e_cur = tl.exp(lg_cur - mx[None, :])
        den = tl.sum(e_prv, axis=0) + tl.sum(e_cur, axis=0)
        pooled = tl.sum(e_prv / den[None, :] * kv_prv, axis=0) + tl.sum(e_cur / den[None, :] * kv_cur, axis=0)
    else:
        e_cur = tl.exp(lg_cur - mx[None, :])
        den = tl.sum(e_cur, axis=0)
        pooled = tl.sum(e_cur / den[None, :] * kv_cur, axis=0)
    tl.store(out_ptr + b * s_ob + i.to(tl.int64) * s_on + c, cast_out(pooled, OUT, SOFT), mask=cm)


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@implements("compress_kv", "triton", requires=(
    R.at_most("ratio", MAX_RATIO, why="the window of a channel block sits in registers"),))
def compress_kv(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, ratio: int, overlap: bool) -> torch.Tensor:
    """Softmax-gated pooling of ``ratio`` rows (``2*ratio`` candidates with overlap) per entry.

    kv float ``[b, n, c*d]`` (c = 2 when ``overlap`` else 1, ``n % ratio == 0``), score fp32
    ``[b, n, c*d]``, ape fp32 ``[ratio, c*d]``. Returns ``[b, n/ratio, d]`` in kv's dtype.
    """
    b, n, cd = kv.shape
    c = 2 if overlap else 1
    d = cd // c
    n_ent = n // ratio
    out = torch.empty((b, n_ent, d), dtype=kv.dtype, device=kv.device)
    if out.numel() == 0:
        return out
    kv, score, ape = _last_contiguous(kv), _last_contiguous(score), ape.contiguous()
    r_p2 = next_pow2(ratio)
    block_c = max(16, min(128, next_pow2(d), _TILE_ELEMS // r_p2))
    grid = (b * n_ent, cdiv(d, block_c))
    _compress_kernel[grid](kv, score, ape, out, n_ent, d, cd,
                           kv.stride(0), kv.stride(1), score.stride(0), score.stride(1),
                           out.stride(0), out.stride(1),
                           RATIO=ratio, R_P2=r_p2, OVERLAP=bool(overlap), BLOCK_C=block_c,
                           OUT=tl_dtype(kv.dtype), SOFT=interpreting(kv), num_warps=4)
    return out


__all__ = ["compress_kv", "MAX_RATIO"]
