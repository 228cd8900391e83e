"""Triton quantizers: FP8 e4m3 block quantization (activations and 2-D weight tiles), MXFP4 e2m1
block quantization, the in-place round trips, and the two dequantizers.

Every quantizer produces the same bits as the reference backend (``v4hal/backends/reference/quant.py``,
rule in :mod:`v4hal.hal.formats`):

* FP8: ``amax = max(|x_block|, fp32(1e-4))``, ``s = amax * fp32(1/448)``; for power-of-two formats
  ``s = 2**ceil(log2(s))`` from the fp32 bits (exponent, plus one when a mantissa bit is set);
  ``y = e4m3(clamp(x / s, -448, 448))`` with an IEEE division (``div_rn``; a multiply by the exact
  reciprocal when ``s`` is a power of two, which is the same number) and a round-to-nearest-even cast.
  Written once, in :func:`fp8_block_quant`: ``act_quant`` (row blocks), ``quant_weight_fp8`` (tiles)
  and the SwiGLU of ``moe_experts`` (:mod:`.moe`) end in it.
* FP4: ``amax = max(|x_block|, 6*2**-126)``, ``s = pow2_ceil(amax * fp32(1/6))`` (e8m0 byte = the
  biased exponent), ``y = e2m1(clamp(x / s, -6, 6))`` by threshold compares (ties to the even
  code; the sign bit is the sign bit of ``x / s``, so ``-0.0`` gives code 8).

Layout: a contiguous ``[..., K]`` tensor is a contiguous array of ``K / block`` blocks, so the
kernels see ``[n_blocks, block]`` tiles: each program owns ``BLOCK_G`` whole blocks (``BLOCK_G *
block`` ~ 4096 elements: 16-byte vector loads, one reduction per row of the tile).

Conversions: on a GPU the fp32 -> e4m3 / bf16 casts are the hardware's round-to-nearest-even
conversions (``cvt.rn.satfinite``), bit-identical to torch's. The Triton interpreter's own float
down-casts to e4m3 and bf16 do not round correctly (no carry into the exponent, bf16
truncates), so under the interpreter (``SOFT=True``) the kernels round with integer arithmetic
instead (:func:`e4m3_bits_soft`; bf16 outputs through :func:`._cast.cast_out`). Up-casts are exact in both.

Non-finite inputs (reached only with value checks off): a block holding an inf or a NaN gets
the reference's result, a NaN scale (fp32 NaN, e8m0 byte 0xFF) and a NaN payload (e4m3 ``0x7F``
for every element, e2m1 code 7). The kernels flag such blocks with a compare per element
(:func:`block_nonfinite`), not from the amax: a GPU's max reduction drops NaN.

Verified where: every kernel here runs under the interpreter in ``tests/triton`` and matches the
reference bit for bit (fp32 / bf16 / fp16 inputs, fp32 and e8m0 scales). The hardware-cast path
(``SOFT=False``) and the performance (target: >= 80% of device copy bandwidth for ``act_quant``)
are exercised only on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4hal.hal import formats as F
from v4hal.hal import requirements as R
from v4hal.hal.devices import triton_interpreter_on
from v4hal.hal.registry import implements

from ._cast import cast_out  # new kernels import it from ._cast; some still import it from here

_TILE_ELEMS = 4096          # elements per program in the block quantizers
_NUM_WARPS = 4
MAX_QUANT_BLOCK = 8192      # one quantization block per tile row (held in registers)
MAX_WEIGHT_TILE = 128       # quant_weight_fp8: one block x block tile per program


def fp8_gpu(name: str, use: str = "conversions") -> R.Requirement:
    """FP8 e4m3 conversions and MMA on CUDA tensors need sm_89+ (Ada, Hopper and later)."""
    return R.min_capability(8, 9, tensor=name, why=f"FP8 e4m3 {use} of {name}")


_QUANT_BLOCK = R.at_most("block_size", MAX_QUANT_BLOCK, why="one block per tile row, held in registers")


def _fp4_block(name: str) -> tuple[R.Requirement, ...]:
    why = "nibble pairs split in registers, one block per tile row"
    return R.power_of_two(name, why=why), R.at_most(name, MAX_QUANT_BLOCK, why=why)


# ============================================================================ shared helpers
def on_interpreter(device: torch.device) -> bool:
    """True when kernels launched on ``device``'s tensors run under the Triton interpreter."""
    return device.type == "cpu" or triton_interpreter_on()


def interpreting(t: torch.Tensor) -> bool:
    """True when a kernel launched on ``t`` runs under the Triton interpreter."""
    return on_interpreter(t.device)


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    n = max(int(n), 1)
    return 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceil division of non-negative ints."""
    return -(-a // b)


def bits_view(t: torch.Tensor) -> torch.Tensor:
    """A same-size integer view of ``t`` (what kernels load when they move bits or bytes)."""
    size = t.element_size()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size])


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    """The Triton element type of a float torch dtype."""
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


@triton.jit
def e4m3_bits_soft(q):
    """fp32 ``q`` with ``|q| <= 448`` -> e4m3 bit patterns (int32, 0..255), round to nearest even.

    Integer-only for normal results (round the mantissa to 3 bits, carry into the exponent);
    subnormal results (``|q| < 2**-6``) round to a multiple of ``2**-9`` with one fp32 add of
    ``2**14`` (whose ulp is ``2**-9``). The sign bit is copied, so ``-0.0`` gives 0x80 like torch;
    NaN gives 0x7F / 0xFF.
    """
    bits = q.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = tl.abs(q)
    abits = a.to(tl.int32, bitcast=True)
    r = abits + 0x7FFFF + ((abits >> 20) & 1)
    code_n = (((r >> 23) - 120) << 3) | ((r >> 20) & 7)
    t = (a + 16384.0) - 16384.0
    code_s = (t * 512.0).to(tl.int32)
    code = tl.where(a < 0.015625, code_s, code_n)
    code = tl.where(a != a, 0x7F, code)         # NaN -> e4m3 NaN, sign kept (torch's CPU cast)
    return code | sign


@triton.jit
def e4m3_bits(q, SOFT: tl.constexpr):
    """fp32 ``q`` (already clamped to [-448, 448]) -> e4m3 bit patterns as uint8."""
    if SOFT:
        return e4m3_bits_soft(q).to(tl.uint8)
    else:
        return q.to(tl.float8e4nv).to(tl.uint8, bitcast=True)


@triton.jit
def e8m0_to_f32(b):
    """e8m0 bytes (uint8) -> fp32 ``2**(b - 127)`` (byte 0 is the subnormal 2**-127, 255 is NaN)."""
    bi = b.to(tl.int32)
    bits = tl.where(bi == 0, 0x00400000, bi << 23)
    bits = tl.where(bi == 255, 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def load_scale(ptr, offs, mask, E8M0: tl.constexpr):
    """Load fp32 scales (``E8M0=False``) or e8m0 bytes (``E8M0=True``) as fp32."""
    if E8M0:
        return e8m0_to_f32(tl.load(ptr + offs, mask=mask, other=127))
    else:
        return tl.load(ptr + offs, mask=mask, other=1.0)


@triton.jit
def pow2_ceil_exp(s):
    """Biased fp32 exponent of ``2**ceil(log2(s))`` for normal fp32 ``s > 0`` (= the e8m0 byte)."""
    bits = s.to(tl.int32, bitcast=True)
    return ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)


@triton.jit
def clamp_nan(v, bound):
    """``clamp(v, -bound, bound)`` keeping NaN (as torch.clamp does)."""
    v = tl.maximum(v, -bound, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(v, bound, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def pow2_recip(e):
    """``2**(127 - e)``, the exact reciprocal of the power of two with biased exponent ``e`` in
    [1, 253]; 0 for ``e >= 254`` (only reached by an infinite amax: ``x / inf`` is 0, ``inf / inf``
    NaN, as the reference's division gives)."""
    return tl.where(e < 254, (254 - e) << 23, 0).to(tl.float32, bitcast=True)


@triton.jit
def nonfinite(x):
    """fp32 ``x`` -> True where ``x`` is inf or NaN."""
    return (x != x) | (tl.abs(x) > 3.4028234663852886e38)


@triton.jit
def block_nonfinite(x, axis: tl.constexpr):
    """fp32 ``x`` -> True for the rows along ``axis`` holding an inf or a NaN."""
    return tl.max(nonfinite(x).to(tl.int32), axis=axis) > 0


@triton.jit
def nan_where(bad, v):
    """``v`` (fp32) with the positive canonical NaN (0x7FC00000) where ``bad``."""
    return tl.where(bad, 0x7FC00000, v.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)


@triton.jit
def fp8_block_quant(x, amax, bad, max_inv, POW2: tl.constexpr, S_E8M0: tl.constexpr, SOFT: tl.constexpr):
    """The FP8 e4m3 block quantizer's epilogue: fp32 ``x`` and each block's floored ``amax`` and
    ``bad`` flag (an inf or a NaN in the block), both broadcastable against ``x`` (``[G, 1]`` for
    row blocks of a ``[G, C]`` tile, scalars for one whole tile).

    Returns ``(y, s, stored)``: ``y`` the e4m3 bytes (x's shape), ``s`` the fp32 scale per block
    (``amax / 448``, rounded up to a power of two when ``POW2``; NaN for bad blocks) and ``stored``
    the scale as written: its e8m0 byte (uint8) when ``S_E8M0`` (which needs ``POW2``), else ``s``.
    """
    s = amax * max_inv
    if POW2:
        e = tl.where(bad, 255, pow2_ceil_exp(s))
        s = (e << 23).to(tl.float32, bitcast=True)
        q = x * pow2_recip(e)
    else:
        q = tl.math.div_rn(x, s)
    s = nan_where(bad, s)
    y = e4m3_bits(nan_where(bad, clamp_nan(q, 448.0)), SOFT)
    if S_E8M0:
        stored = e.to(tl.uint8)
    else:
        stored = s
    return y, s, stored


@triton.jit
def e2m1_value(mag):
    """e2m1 magnitude codes 0..7 (int32) -> fp32 magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}."""
    m = mag.to(tl.float32)
    return tl.where(mag < 4, 0.5 * m, tl.where(mag < 6, m - 2.0, 2.0 * (m - 4.0)))


@triton.jit
def e2m1_codes(v):
    """fp32 ``v`` in [-6, 6] -> e2m1 codes (int32 0..15): ties to the even code, sign bit copied."""
    a = tl.abs(v)
    mag = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
           + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32)
           + (a > 5.0).to(tl.int32))
    sign = (v.to(tl.int32, bitcast=True) >> 28) & 0x8
    return mag | sign


# ============================================================================ FP8 block quantizer
@triton.jit
def _fp8_quant_kernel(x_ptr, y_ptr, s_ptr, out_ptr, n_groups,
                      amax_floor, max_inv,
                      GS: tl.constexpr, GS_P2: tl.constexpr, BLOCK_G: tl.constexpr,
                      POW2: tl.constexpr, S_E8M0: tl.constexpr, INPLACE: tl.constexpr,
                      OUT: tl.constexpr, SOFT: tl.constexpr):
    """x ``[n_groups, GS]`` (contiguous) -> y e4m3 bytes ``[n_groups, GS]`` and s ``[n_groups]``
    (fp32, or e8m0 bytes when ``S_E8M0``); ``INPLACE`` writes ``fp32(y) * s`` to ``out_ptr`` instead."""
    pid = tl.program_id(0)
    g = pid.to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    c = tl.arange(0, GS_P2)
    gmask = g < n_groups
    mask = gmask[:, None] & (c[None, :] < GS)
    offs = g[:, None] * GS + c[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    bad = block_nonfinite(x, 1)[:, None]
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), amax_floor)[:, None]
    yb, s, stored = fp8_block_quant(x, amax, bad, max_inv, POW2, S_E8M0, SOFT)
    if INPLACE:
        yv = yb.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        tl.store(out_ptr + offs, cast_out(yv * s, OUT, SOFT), mask=mask)
    else:
        tl.store(y_ptr + offs, yb, mask=mask)
        tl.store(s_ptr + g[:, None], stored, mask=gmask[:, None])


def _group_tiling(block_size: int) -> tuple[int, int]:
    gs_p2 = next_pow2(block_size)
    return gs_p2, max(1, _TILE_ELEMS // gs_p2)


def _launch_fp8_quant(x: torch.Tensor, block_size: int, pow2: bool, e8m0: bool,
                      inplace_out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the FP8 block quantizer over contiguous ``x``; returns (y, s) (unused in place)."""
    n_groups = x.numel() // block_size
    gs_p2, block_g = _group_tiling(block_size)
    y = torch.empty(x.shape, dtype=F.FP8_DTYPE, device=x.device)
    s = torch.empty((*x.shape[:-1], x.shape[-1] // block_size),
                    dtype=torch.uint8 if e8m0 else torch.float32, device=x.device)
    if n_groups:
        out = inplace_out if inplace_out is not None else x
        grid = (cdiv(n_groups, block_g),)
        _fp8_quant_kernel[grid](x, y.view(torch.uint8), s, out, n_groups, F.FP8_AMAX_FLOOR, F.FP8_MAX_INV,
                                GS=block_size, GS_P2=gs_p2, BLOCK_G=block_g, POW2=pow2, S_E8M0=e8m0,
                                INPLACE=inplace_out is not None, OUT=tl_dtype(out.dtype),
                                SOFT=interpreting(x), num_warps=_NUM_WARPS)
    return y, (s.view(F.E8M0_DTYPE) if e8m0 else s)


@implements("act_quant", "triton", requires=(_QUANT_BLOCK, fp8_gpu("x")))
def act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None,
              scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 quantization per ``block_size`` block of the last dim.

    x float ``[..., K]`` -> y fp8 e4m3 ``[..., K]`` and s ``[..., K/block_size]`` in ``scale_dtype``
    (float32 or e8m0; powers of two when ``scale_fmt`` is given or the scales are e8m0).
    """
    e8m0 = scale_dtype == F.E8M0_DTYPE
    return _launch_fp8_quant(x.contiguous(), block_size, scale_fmt is not None or e8m0, e8m0, None)


@implements("act_quant_inplace", "triton", requires=(_QUANT_BLOCK, fp8_gpu("x")))
def act_quant_inplace(x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None) -> None:
    """FP8 round trip in place: ``x <- fp32(y) * s`` in x's dtype ((y, s) as :func:`act_quant`, fp32 scales)."""
    xc = x if x.is_contiguous() else x.contiguous()
    _launch_fp8_quant(xc, block_size, scale_fmt is not None, False, xc)
    if xc is not x:
        x.copy_(xc)


# ============================================================================ FP4 block quantizer
@triton.jit
def _fp4_quant_kernel(x_ptr, y_ptr, s_ptr, out_ptr, n_groups, amax_floor, max_inv,
                      GS: tl.constexpr, BLOCK_G: tl.constexpr, INPLACE: tl.constexpr,
                      OUT: tl.constexpr, SOFT: tl.constexpr):
    """x ``[n_groups, GS]`` (GS a power of two) -> packed e2m1 ``[n_groups, GS/2]`` (low nibble =
    even element) and e8m0 bytes ``[n_groups]``; ``INPLACE`` writes ``e2m1_value * s`` to ``out_ptr``."""
    pid = tl.program_id(0)
    g = pid.to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    c = tl.arange(0, GS)
    gmask = g < n_groups
    mask = gmask[:, None] & (c[None, :] < GS)
    offs = g[:, None] * GS + c[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    bad = block_nonfinite(x, 1)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), amax_floor)
    e = tl.where(bad, 255, pow2_ceil_exp(amax * max_inv))
    v = clamp_nan(x * pow2_recip(e)[:, None], 6.0)
    codes = tl.where(bad[:, None], 7, e2m1_codes(v))
    if INPLACE:
        s = nan_where(bad, (e << 23).to(tl.float32, bitcast=True))
        val = e2m1_value(codes & 7)
        val = tl.where((codes & 8) != 0, -val, val) * s[:, None]
        tl.store(out_ptr + offs, cast_out(val, OUT, SOFT), mask=mask)
    else:
        lo, hi = tl.split(tl.reshape(codes, (BLOCK_G, GS // 2, 2)))
        packed = (lo | (hi << 4)).to(tl.uint8)
        h = tl.arange(0, GS // 2)
        tl.store(y_ptr + g[:, None] * (GS // 2) + h[None, :], packed, mask=gmask[:, None])
        tl.store(s_ptr + g, e.to(tl.uint8), mask=gmask)


def _launch_fp4_quant(x: torch.Tensor, block_size: int,
                      inplace_out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    n_groups = x.numel() // block_size
    block_g = max(1, _TILE_ELEMS // block_size)
    y = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=torch.uint8, device=x.device)
    s = torch.empty((*x.shape[:-1], x.shape[-1] // block_size), dtype=torch.uint8, device=x.device)
    if n_groups:
        out = inplace_out if inplace_out is not None else x
        _fp4_quant_kernel[(cdiv(n_groups, block_g),)](
            x, y, s, out, n_groups, F.FP4_AMAX_FLOOR, F.FP4_MAX_INV, GS=block_size, BLOCK_G=block_g,
            INPLACE=inplace_out is not None, OUT=tl_dtype(out.dtype), SOFT=interpreting(x),
            num_warps=_NUM_WARPS)
    return y, s.view(F.E8M0_DTYPE)


@implements("fp4_act_quant", "triton", requires=_fp4_block("block_size"))
def fp4_act_quant(x: torch.Tensor, block_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 quantization: x float ``[..., K]`` -> packed e2m1 uint8 ``[..., K/2]`` (low nibble =
    even element) and e8m0 scales ``[..., K/block_size]``. block_size: a power of two."""
    return _launch_fp4_quant(x.contiguous(), block_size, None)


@implements("fp4_act_quant_inplace", "triton", requires=_fp4_block("block_size"))
def fp4_act_quant_inplace(x: torch.Tensor, block_size: int = 32) -> None:
    """MXFP4 round trip in place: ``x <- e2m1_value * s`` in x's dtype (signed zeros kept)."""
    xc = x if x.is_contiguous() else x.contiguous()
    _launch_fp4_quant(xc, block_size, xc)
    if xc is not x:
        x.copy_(xc)


@implements("quant_weight_fp4", "triton", requires=_fp4_block("block"))
def quant_weight_fp4(w: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 weight quantization along K: w float ``[..., N, K]`` -> packed uint8 ``[..., N, K/2]``
    and e8m0 ``[..., N, K/block]`` (the :func:`fp4_act_quant` rule on every row)."""
    return _launch_fp4_quant(w.contiguous(), block, None)


# ============================================================================ FP8 weight tiles
@triton.jit
def _fp8_weight_quant_kernel(w_ptr, y_ptr, s_ptr, N, K, NB, KB, amax_floor, max_inv,
                             BS: tl.constexpr, BS_P2: tl.constexpr, POW2: tl.constexpr,
                             S_E8M0: tl.constexpr, SOFT: tl.constexpr):
    """One ``BS x BS`` tile of w ``[B, N, K]`` per program (grid ``(B * NB, KB)``): y e4m3 bytes and
    the tile scale ``s[b, nb, kb]``; edge tiles reduce over their real elements only."""
    pid_bn = tl.program_id(0)
    kb = tl.program_id(1)
    b = (pid_bn // NB).to(tl.int64)
    nb = pid_bn % NB
    rn = nb * BS + tl.arange(0, BS_P2)
    rk = kb * BS + tl.arange(0, BS_P2)
    mask = ((rn < N) & (tl.arange(0, BS_P2) < BS))[:, None] & ((rk < K) & (tl.arange(0, BS_P2) < BS))[None, :]
    offs = b * N * K + rn.to(tl.int64)[:, None] * K + rk[None, :]
    x = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    bad = tl.max(tl.max(nonfinite(x).to(tl.int32), axis=1), axis=0) > 0
    amax = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), amax_floor)
    yb, _, stored = fp8_block_quant(x, amax, bad, max_inv, POW2, S_E8M0, SOFT)
    tl.store(y_ptr + offs, yb, mask=mask)
    tl.store(s_ptr + pid_bn.to(tl.int64) * KB + kb, stored)


@implements("quant_weight_fp8", "triton", requires=(
    R.at_most("block", MAX_WEIGHT_TILE, why="one block x block tile per program"), fp8_gpu("w")))
def quant_weight_fp8(w: torch.Tensor, block: int = 128,
                     scale_fmt: str | None = "ue8m0") -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 quantization per ``block x block`` tile of the last two dims.

    w float ``[..., N, K]`` -> fp8 ``[..., N, K]`` and s ``[..., ceil(N/block), ceil(K/block)]``
    (e8m0 when ``scale_fmt == "ue8m0"``, else float32).
    """
    wc = w.contiguous()
    n, k = w.shape[-2:]
    nb, kb = cdiv(n, block), cdiv(k, block)
    batch = w.numel() // max(n * k, 1) if n * k else 0
    e8m0 = scale_fmt == "ue8m0"
    y = torch.empty(w.shape, dtype=F.FP8_DTYPE, device=w.device)
    s = torch.empty((*w.shape[:-2], nb, kb), dtype=torch.uint8 if e8m0 else torch.float32, device=w.device)
    if batch and nb and kb:
        _fp8_weight_quant_kernel[(batch * nb, kb)](
            wc, y.view(torch.uint8), s, n, k, nb, kb, F.FP8_AMAX_FLOOR, F.FP8_MAX_INV,
            BS=block, BS_P2=next_pow2(block), POW2=e8m0, S_E8M0=e8m0, SOFT=interpreting(w),
            num_warps=8 if block >= 128 else 4)
    return y, (s.view(F.E8M0_DTYPE) if e8m0 else s)


# ============================================================================ dequantizers
@triton.jit
def _dequant_fp8_kernel(y_ptr, s_ptr, out_ptr, R, K, ROWS_PER_B, NB, KB, BS_ROW, BS_COL,
                        S_E8M0: tl.constexpr, OUT: tl.constexpr, SOFT: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """out ``[R, K]`` = fp32(y) * s: the scale of (row, k) is
    ``s[(row // ROWS_PER_B) * NB + (row % ROWS_PER_B) // BS_ROW, k // BS_COL]`` (per-row layout:
    ROWS_PER_B = NB = BS_ROW = 1; 2-D tiles: ROWS_PER_B = N, NB = ceil(N/bs), BS_ROW = bs)."""
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rr < R)[:, None] & (rk < K)[None, :]
    rr64 = rr.to(tl.int64)
    srow = (rr64 // ROWS_PER_B) * NB + (rr64 % ROWS_PER_B) // BS_ROW
    soffs = srow[:, None] * KB + (rk // BS_COL)[None, :]
    s = load_scale(s_ptr, soffs, mask, S_E8M0)
    offs = rr64[:, None] * K + rk[None, :]
    yb = tl.load(y_ptr + offs, mask=mask, other=0)
    y = yb.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    if SOFT:    # the interpreter widens the e4m3 NaN codes 0x7F / 0xFF to inf: torch's NaN bits instead
        nan_bits = 0x7FF00000 | ((yb.to(tl.int32) & 0x80) << 24)
        y = tl.where((yb & 0x7F) == 0x7F, nan_bits, y.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)
    tl.store(out_ptr + offs, cast_out(y * s, OUT, SOFT), mask=mask)


def _fp8_layout(y: torch.Tensor, s: torch.Tensor, block_size: int) -> str:
    """'row' (s ``[..., K/bs]``), else 'block' (s ``[..., ceil(N/bs), ceil(K/bs)]``): the op layer
    accepted one of the two."""
    k = y.shape[-1]
    row = s.dim() == y.dim() and tuple(s.shape[:-1]) == tuple(y.shape[:-1]) and k % block_size == 0 \
        and s.shape[-1] == k // block_size
    return "row" if row else "block"


def _scale_arg(s: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(contiguous fp32 scales or their e8m0 bytes, is_e8m0) of float32 or e8m0 scales ``s``."""
    if s.dtype == F.E8M0_DTYPE:
        return s.contiguous().view(torch.uint8), True
    return s.contiguous(), False


@implements("dequant_fp8", "triton", requires=(fp8_gpu("y"),))
def dequant_fp8(y: torch.Tensor, s: torch.Tensor, block_size: int = 128,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``fp32(y) * s`` in ``out_dtype``: y fp8 ``[..., K]`` with per-row scales ``[..., K/bs]``, or
    y ``[..., N, K]`` with 2-D tile scales ``[..., ceil(N/bs), ceil(K/bs)]``; s float32 or e8m0."""
    layout = _fp8_layout(y, s, block_size)
    sc, e8m0 = _scale_arg(s)
    k = y.shape[-1]
    rows = y.numel() // k if k else 0
    out = torch.empty(y.shape, dtype=out_dtype, device=y.device)
    if layout == "row":
        rows_per_b, nb, bs_row, kb = 1, 1, 1, k // block_size
    else:
        rows_per_b, nb, bs_row, kb = y.shape[-2], cdiv(y.shape[-2], block_size), block_size, cdiv(k, block_size)
    if rows and k:
        block_k = min(256, next_pow2(k))
        block_r = max(1, 4096 // block_k)
        _dequant_fp8_kernel[(cdiv(rows, block_r), cdiv(k, block_k))](
            y.contiguous().view(torch.uint8), sc, out, rows, k, rows_per_b, nb, kb, bs_row, block_size,
            S_E8M0=e8m0, OUT=tl_dtype(out_dtype), SOFT=interpreting(y), BLOCK_R=block_r, BLOCK_K=block_k,
            num_warps=_NUM_WARPS)
    return out


@triton.jit
def _dequant_fp4_kernel(y_ptr, s_ptr, out_ptr, R, KH, KS, BS,
                        S_E8M0: tl.constexpr, OUT: tl.constexpr, SOFT: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """Packed e2m1 ``[R, KH]`` -> ``[R, 2*KH]``: element k = e2m1(nibble) * s[row, k // BS]."""
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    rr64 = rr.to(tl.int64)
    hmask = (rr < R)[:, None] & (rh < KH)[None, :]
    packed = tl.load(y_ptr + rr64[:, None] * KH + rh[None, :], mask=hmask, other=0).to(tl.int32)
    codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_R, 2 * BLOCK_H))
    rk = tl.program_id(1) * (2 * BLOCK_H) + tl.arange(0, 2 * BLOCK_H)
    mask = (rr < R)[:, None] & (rk < 2 * KH)[None, :]
    s = load_scale(s_ptr, rr64[:, None] * KS + (rk // BS)[None, :], mask, S_E8M0)
    val = e2m1_value(codes & 7)
    val = tl.where((codes & 8) != 0, -val, val) * s
    tl.store(out_ptr + rr64[:, None] * (2 * KH) + rk[None, :], cast_out(val, OUT, SOFT), mask=mask)


@implements("dequant_fp4", "triton")
def dequant_fp4(y: torch.Tensor, s: torch.Tensor, block_size: int = 32,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed e2m1 uint8 ``[..., K/2]`` with scales ``[..., K/block_size]`` (e8m0 or float32) ->
    ``[..., K]`` in ``out_dtype``."""
    kh = y.shape[-1]
    k = 2 * kh
    sc, e8m0 = _scale_arg(s)
    rows = y.numel() // kh if kh else 0
    out = torch.empty((*y.shape[:-1], k), dtype=out_dtype, device=y.device)
    if rows and kh:
        block_h = min(128, next_pow2(kh))
        block_r = max(1, 2048 // block_h)
        _dequant_fp4_kernel[(cdiv(rows, block_r), cdiv(kh, block_h))](
            y.contiguous(), sc, out, rows, kh, k // block_size, block_size,
            S_E8M0=e8m0, OUT=tl_dtype(out_dtype), SOFT=interpreting(y), BLOCK_R=block_r, BLOCK_H=block_h,
            num_warps=_NUM_WARPS)
    return out


__all__ = ["act_quant", "act_quant_inplace", "fp4_act_quant", "fp4_act_quant_inplace", "quant_weight_fp8",
           "quant_weight_fp4", "dequant_fp8", "dequant_fp4"]
