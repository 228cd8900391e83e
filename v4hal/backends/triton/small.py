"""Triton small ops: RMSNorm, normalized Walsh-Hadamard transform, rotary embedding.

- ``rms_norm``: one program per row; rows up to ``_RMS_BLOCK`` wide stay in registers, wider
  rows take two more passes over the row (fp32 math, weight read as fp32, one cast at the end).
  A row whose max-abs reaches ``2**32`` is multiplied by ``2**-k`` before squaring (exact; the
  reference's rule), so the mean of squares cannot overflow; other rows are computed unscaled.
- ``hadamard_transform``: ``y = scale * x @ H_D`` (Sylvester order, ``H[i, j] = (-1)^popcount(i & j)``,
  generated in the kernel). ``D <= 128``: one MMA per block of rows with the ``[D, D]`` matrix
  (``D`` < 16 is zero-padded to 16: the top-left block of ``H_16`` is ``H_D``). ``D >= 256``: the
  row is viewed as ``X [A, B]`` (``D = A*B``, ``A, B >= 16``) and ``H_D x = H_A X H_B`` (the
  Kronecker factorization of the Sylvester matrix), two products per row. 16-bit operands go
  straight into the MMA (the +-1 products are exact, fp32 accumulation); fp32 operands, and the
  fp32 intermediate of the second product, are split into ``hi + lo`` (``hi`` = the top 11
  significand bits, exact in TF32) and multiplied by the exact +-1 matrix as two TF32 MMAs,
  about fp32 accuracy. ``D`` up to ``MAX_HADAMARD_DIM`` = 16384.
- ``rotary_emb``: interleaved pairs ``(x[2i], x[2i+1])`` times ``freqs_cis`` (complex64, read as
  its real view), conjugate when ``inverse``; one program per (b, s) and block of heads.

Outputs are rounded to nearest even from fp32 (:func:`._cast.cast_out`: the hardware cast on a GPU,
integer rounding under the interpreter, whose own bf16 cast truncates).

Verified where: numerics under the Triton interpreter (CPU) for fp32/fp16/bf16 inputs (the bf16
Hadamard tiles are converted to fp32 before ``tl.dot`` there); the GPU tiles compile for sm_90a
without spills (``tests/triton/test_sm90_compile.py``, no GPU needed). GPU numerics (bf16 MMA,
TF32 hi/lo products) and all speeds only on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4hal.hal import requirements as R
from v4hal.hal.registry import implements

from ._attn_common import cdiv, dot_upcast, next_pow2, on_interpreter
from ._cast import cast_out

MAX_HADAMARD_DIM = 16384
_RMS_BLOCK = 8192


# ---------------------------------------------------------------------------------------------
# RMSNorm


@triton.jit
def _rms_scale(amax):
    """fp32 row max-abs -> ``2**-k``: 1 below ``2**32``, else k = min(exponent of amax, 126) (the
    reference's ``rms_scale``: the squares of ``x * 2**-k`` cannot overflow; power of two, exact)."""
    k = tl.minimum(((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, 126)
    k = tl.where(k >= 32, k, 0)
    return ((127 - k) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, D, eps, s_x, s_o, BLOCK_D: tl.constexpr, SINGLE: tl.constexpr,
                     SOFT: tl.constexpr):
    """out[r] = w * u * rsqrt(mean(u^2) + eps * m^2) with u = x[r] * m, m = 1 or 2**-k (:func:`_rms_scale`),
    fp32 math: ``w * x[r] * rsqrt(mean(x[r]^2) + eps)`` without overflow of the squares."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    x_row = x_ptr + row * s_x
    o_row = out_ptr + row * s_o
    if SINGLE:
        ok = offs < D
        x = tl.load(x_row + offs, mask=ok, other=0.0).to(tl.float32)
        m = _rms_scale(tl.max(tl.abs(x), 0))
        u = x * m
        inv = tl.rsqrt(tl.sum(u * u, 0) / D + eps * (m * m))
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(o_row + offs, cast_out(w * (u * inv), out_ptr.dtype.element_ty, SOFT), mask=ok)
    else:
        amax = tl.zeros([BLOCK_D], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ok = d0 + offs < D
            x = tl.load(x_row + d0 + offs, mask=ok, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        m = _rms_scale(tl.max(amax, 0))
        acc = tl.zeros([BLOCK_D], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ok = d0 + offs < D
            u = tl.load(x_row + d0 + offs, mask=ok, other=0.0).to(tl.float32) * m
            acc += u * u
        inv = tl.rsqrt(tl.sum(acc, 0) / D + eps * (m * m))
        for d0 in range(0, D, BLOCK_D):
            ok = d0 + offs < D
            u = tl.load(x_row + d0 + offs, mask=ok, other=0.0).to(tl.float32) * m
            w = tl.load(w_ptr + d0 + offs, mask=ok, other=0.0).to(tl.float32)
            tl.store(o_row + d0 + offs, cast_out(w * (u * inv), out_ptr.dtype.element_ty, SOFT), mask=ok)


def rms_norm_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """:func:`rms_norm` writing into contiguous ``out`` (x's shape and dtype); returns it."""
    d = x.shape[-1]
    rows = x.numel() // d if d else 0
    if rows == 0:
        return out
    x2 = x.contiguous().reshape(rows, d)
    o2 = out.view(rows, d)
    block = min(next_pow2(d), _RMS_BLOCK if not on_interpreter(x) else 1024)
    single = block >= d
    kwargs = {} if on_interpreter(x) else {"num_warps": 4 if block <= 2048 else 8}
    _rms_norm_kernel[(rows,)](x2, weight.contiguous(), o2, d, float(eps), x2.stride(0), o2.stride(0),
                              BLOCK_D=block, SINGLE=single, SOFT=on_interpreter(x), **kwargs)
    return out


@implements("rms_norm", "triton")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x float ``[..., D]``, weight ``[D]`` (fp32 or x's dtype) -> ``[..., D]`` in x's dtype."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return rms_norm_into(out, x, weight, eps)


# ---------------------------------------------------------------------------------------------
# Hadamard


@triton.jit
def _hsign(i, j):
    """Sylvester Hadamard entry (-1)^popcount(i & j) for i, j < 2**16, as int32 +-1."""
    v = i & j
    v = v ^ (v >> 8)
    v = v ^ (v >> 4)
    v = v ^ (v >> 2)
    v = v ^ (v >> 1)
    return 1 - 2 * (v & 1)


@triton.jit
def _tf32_split(x):
    """x fp32 -> (hi, lo) with hi = x's top 11 significand bits (exact in TF32) and lo = x - hi."""
    hi = (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    return hi, x - hi


@triton.jit
def _hadamard_rows_kernel(x_ptr, out_ptr, R, D, scale, s_x, s_o,
                          BLOCK_R: tl.constexpr, DP: tl.constexpr, UPCAST: tl.constexpr, F32: tl.constexpr,
                          SOFT: tl.constexpr):
    """D <= 128: y[rows] = scale * x[rows] @ H_DP (zero-padded to DP >= 16 columns).

    16-bit x: one MMA in x's dtype (the +-1 products are exact, fp32 accumulation).
    fp32 x (F32): x = hi + lo, two TF32 MMAs with the exact +-1 matrix (about fp32 accuracy).
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, DP)
    ok = (rows < R)[:, None] & (cols < D)[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * s_x + cols[None, :], mask=ok, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    h = _hsign(cols[:, None], cols[None, :]).to(x.dtype)
    if F32:
        hi, lo = _tf32_split(x)
        y = tl.dot(hi, h, input_precision="tf32") + tl.dot(lo, h, input_precision="tf32")
    else:
        y = tl.dot(x, h)
    tl.store(out_ptr + rows64[:, None] * s_o + cols[None, :], cast_out(y * scale, out_ptr.dtype.element_ty, SOFT),
             mask=ok)


@triton.jit
def _hadamard_kron_kernel(x_ptr, out_ptr, scale, s_x, s_o, A: tl.constexpr, B: tl.constexpr,
                          UPCAST: tl.constexpr, F32: tl.constexpr, SOFT: tl.constexpr):
    """D = A*B >= 256: the row as X [A, B] (row-major), y = scale * H_A @ (X @ H_B).

    The first product runs like the rows kernel (F32: hi/lo TF32 split); the second always
    splits the fp32 intermediate into hi/lo TF32 halves against the exact +-1 matrix.
    """
    row = tl.program_id(0).to(tl.int64)
    ia = tl.arange(0, A)
    ib = tl.arange(0, B)
    offs = ia[:, None] * B + ib[None, :]
    x = tl.load(x_ptr + row * s_x + offs)
    if UPCAST:
        x = x.to(tl.float32)
    hb = _hsign(ib[:, None], ib[None, :]).to(x.dtype)
    if F32:
        hi, lo = _tf32_split(x)
        y1 = tl.dot(hi, hb, input_precision="tf32") + tl.dot(lo, hb, input_precision="tf32")
    else:
        y1 = tl.dot(x, hb)                                            # fp32 [A, B]
    ha = _hsign(ia[:, None], ia[None, :]).to(tl.float32)
    hi1, lo1 = _tf32_split(y1)
    y = tl.dot(ha, hi1, input_precision="tf32") + tl.dot(ha, lo1, input_precision="tf32")
    tl.store(out_ptr + row * s_o + offs, cast_out(y * scale, out_ptr.dtype.element_ty, SOFT))


def _kron_split(d: int) -> tuple[int, int]:
    """D = A * B with A = 2**floor(log2(D)/2) (both >= 16 for D >= 256)."""
    a = 1 << (d.bit_length() - 1) // 2
    return a, d // a


def hadamard_transform_into(out: torch.Tensor, x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """:func:`hadamard_transform` writing into contiguous ``out`` (x's shape and dtype); returns it."""
    d = x.shape[-1]
    if scale is None:
        scale = d ** -0.5
    rows = x.numel() // d
    if rows == 0:
        return out
    x2 = x.contiguous().reshape(rows, d)
    o2 = out.view(rows, d)
    interp = on_interpreter(x)
    upcast = dot_upcast(x.dtype, x.device)
    f32 = x.dtype == torch.float32 or upcast
    if d <= 128:
        dp = max(16, d)
        block_r = 16 if interp or f32 else 64
        kwargs = {} if interp else {"num_warps": 4}
        _hadamard_rows_kernel[(cdiv(rows, block_r),)](x2, o2, rows, d, float(scale), x2.stride(0), o2.stride(0),
                                                      BLOCK_R=block_r, DP=dp, UPCAST=upcast, F32=f32, SOFT=interp,
                                                      **kwargs)
    else:
        a, b = _kron_split(d)
        kwargs = {} if interp else {"num_warps": 4 if d <= 4096 else 8}
        _hadamard_kron_kernel[(rows,)](x2, o2, float(scale), x2.stride(0), o2.stride(0), A=a, B=b,
                                       UPCAST=upcast, F32=f32, SOFT=interp, **kwargs)
    return out


@implements("hadamard_transform", "triton", requires=(
    R.at_most("Hadamard size D", MAX_HADAMARD_DIM, "x.shape[-1]", why="one row per program in registers"),
    R.min_capability(8, 0, tensor="x", only_for=(torch.bfloat16,), why="bf16 tl.dot")))
def hadamard_transform(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """x float ``[..., D]`` (D a power of two <= 16384) -> ``scale * x @ H_D`` in x's dtype (scale ``D**-0.5``)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return hadamard_transform_into(out, x, scale)


# ---------------------------------------------------------------------------------------------
# rotary embedding


@triton.jit
def _rotary_kernel(x_ptr, f_ptr, out_ptr, S, H, HALF, s_xb, s_xs, s_xh, s_fb, s_fs, s_ob, s_os, s_oh,
                   INVERSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, SOFT: tl.constexpr):
    """(x[2i] + 1j x[2i+1]) * f[i] (conj when INVERSE) for one (b, s) and a block of heads."""
    pid = tl.program_id(0)
    b = (pid // S).to(tl.int64)
    s = (pid % S).to(tl.int64)
    hh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    pp = tl.arange(0, BLOCK_P)
    p_ok = pp < HALF
    f = f_ptr + b * s_fb + s * s_fs + 2 * pp
    c = tl.load(f, mask=p_ok, other=0.0)
    sn = tl.load(f + 1, mask=p_ok, other=0.0)
    if INVERSE:
        sn = -sn
    ok = (hh < H)[:, None] & p_ok[None, :]
    xp = x_ptr + b * s_xb + s * s_xs + hh[:, None] * s_xh + 2 * pp[None, :]
    xr = tl.load(xp, mask=ok, other=0.0).to(tl.float32)
    xi = tl.load(xp + 1, mask=ok, other=0.0).to(tl.float32)
    yr = xr * c[None, :] - xi * sn[None, :]
    yi = xr * sn[None, :] + xi * c[None, :]
    op = out_ptr + b * s_ob + s * s_os + hh[:, None] * s_oh + 2 * pp[None, :]
    tl.store(op, cast_out(yr, out_ptr.dtype.element_ty, SOFT), mask=ok)
    tl.store(op + 1, cast_out(yi, out_ptr.dtype.element_ty, SOFT), mask=ok)


def rotary_emb_into(out: torch.Tensor, x: torch.Tensor, freqs_cis: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """:func:`rotary_emb` writing into contiguous ``out`` (x's shape and dtype); returns it."""
    f = freqs_cis if freqs_cis.dim() == 3 else freqs_cis.unsqueeze(0)   # [1 or b, s, rd/2]
    if out.numel() == 0:
        return out
    x4 = x.contiguous()
    x4 = x4.unsqueeze(2) if x4.dim() == 3 else x4
    o4 = out.unsqueeze(2) if out.dim() == 3 else out
    b, s, h, rd = x4.shape
    half = rd // 2
    fr = torch.view_as_real(f.contiguous())                        # [fb, s, half, 2] float32
    s_fb = fr.stride(0) if fr.shape[0] > 1 else 0
    block_h = min(16, next_pow2(h))
    kwargs = {} if on_interpreter(x) else {"num_warps": 4}
    _rotary_kernel[(b * s, cdiv(h, block_h))](x4, fr, o4, s, h, half, x4.stride(0), x4.stride(1), x4.stride(2),
                                               s_fb, fr.stride(1), o4.stride(0), o4.stride(1), o4.stride(2),
                                               INVERSE=bool(inverse), BLOCK_H=block_h, BLOCK_P=next_pow2(half),
                                               SOFT=on_interpreter(x), **kwargs)
    return out


@implements("rotary_emb", "triton")
def rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x ``[b, s, rd]`` or ``[b, s, h, rd]`` float, freqs_cis complex64 ``[s, rd/2]`` or ``[b, s, rd/2]`` ->
    x's shape and dtype, interleaved pairs rotated (by the conjugate when ``inverse``)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return rotary_emb_into(out, x, freqs_cis, inverse)
