"""Low-precision formats shared by every backend: FP8 e4m3, FP4 e2m1 (packed), e8m0 scales.

Everything here is plain, vectorized PyTorch that runs on any device and is bit exact:

* **FP8** is ``torch.float8_e4m3fn`` (round to nearest even, finite max 448). Torch casts to it
  natively; quantizers clamp to ``[-448, 448]`` first, so the cast never overflows.
* **FP4** is OCP e2m1: magnitudes ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}`` (codes 0..7), sign in bit 3 of
  the nibble. Torch cannot cast to e2m1 on the CPU, so :func:`e2m1_encode` rounds with
  threshold compares (round to nearest, ties to the even code, saturating at 6).
  Two codes share a byte; the **low nibble holds the even-indexed element**.
* **e8m0** (``torch.float8_e8m0fnu``) scales: byte ``b`` means ``2**(b - 127)``; 255 is NaN.
  ``Tensor.to(float8_e8m0fnu)`` rounds non powers of two to the nearest power (and drops the
  sign), so :func:`float_to_e8m0` takes the exponent bits itself and refuses anything that is
  not an exact power of two.

Block-scale rule of the public DeepSeek-V4 ``inference/kernel.py`` (``act_quant_kernel``,
``fp4_quant_kernel``): ``amax = max(|x|, floor)`` in fp32, then ``s = amax * fp32(1/max)``
(a multiply by the fp32 reciprocal, not a division: for non power-of-two fp32 scales the two
differ by up to one ulp), then for power-of-two formats ``s = 2**ceil(log2(s))`` taken from the
fp32 bits (``fast_round_scale``). :func:`fp8_block_scale` and :func:`fp4_block_scale` are that
rule; backends must produce the same bits.
"""
from __future__ import annotations

import struct

import torch

from .errors import DTypeError, RangeError, ShapeError

FP8_DTYPE = torch.float8_e4m3fn
E8M0_DTYPE = torch.float8_e8m0fnu
FP4_PACKED_DTYPE = torch.uint8


def _f32(value: float) -> float:
    """``value`` rounded to the nearest fp32 (as a Python float)."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


FP8_MAX: float = 448.0
FP8_MAX_INV: float = _f32(1.0 / 448.0)      # the fp32 constant the public kernel multiplies by
FP8_AMAX_FLOOR: float = _f32(1e-4)          # amax floor of FP8 block quantization (fp32 value)
FP4_MAX: float = 6.0
FP4_MAX_INV: float = _f32(1.0 / 6.0)
FP4_AMAX_FLOOR: float = 6.0 * 2.0 ** -126   # exact in fp32; gives the smallest scale 2**-126
FP8_BLOCK: int = 128                        # activation / weight block of the FP8 recipes
FP4_BLOCK: int = 32                         # K block of the MXFP4 recipes

#: e2m1 magnitudes by code 0..7; codes 8..15 are the same values negated (8 is -0.0).
E2M1_VALUES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                                  -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

# Rounding thresholds between neighbouring magnitudes and whether a tie goes up: a tie goes to
# the neighbour with the even code (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2,
# 3.5 -> 4, 5 -> 4).
_E2M1_THRESHOLDS: tuple[tuple[float, bool], ...] = (
    (0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


# ---------------------------------------------------------------------------------------- e2m1
def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Round to the e2m1 grid: float ``[...]`` -> uint8 codes ``[...]`` in ``[0, 16)``.

    Round to nearest, ties to the even code; magnitudes above 6 saturate to 6 (code 7), NaN
    encodes as 6 too (e2m1 has no NaN; this is what saturating hardware converts do). The sign
    bit (bit 3) is the input's sign bit, so ``-0.0`` and negatives that round to zero give
    code 8 (``-0.0``).
    """
    if not x.is_floating_point():
        raise DTypeError(f"e2m1_encode: x must be a floating tensor, got {x.dtype}")
    xf = x.float()
    a = xf.abs()
    mag = torch.zeros(a.shape, dtype=torch.uint8, device=a.device)
    for threshold, tie_up in _E2M1_THRESHOLDS:
        mag += (a >= threshold if tie_up else a > threshold).to(torch.uint8)
    mag = torch.where(torch.isnan(a), torch.full_like(mag, 7), mag)
    return mag | (torch.signbit(xf).to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[...]`` in ``[0, 16)`` -> fp32 values ``[...]`` (code 8 is ``-0.0``)."""
    if codes.dtype != torch.uint8:
        raise DTypeError(f"e2m1_decode: codes must be uint8, got {codes.dtype}")
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    return table[(codes & 0xF).long()]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[..., K]`` (K even, each < 16) -> packed uint8 ``[..., K/2]``.

    Byte ``j`` holds element ``2j`` in its low nibble and element ``2j+1`` in its high nibble.
    """
    if codes.dtype != torch.uint8:
        raise DTypeError(f"pack_fp4: codes must be uint8, got {codes.dtype}")
    if codes.dim() == 0 or codes.shape[-1] % 2:
        raise ShapeError(f"pack_fp4: codes must be [..., K] with K even, got {list(codes.shape)}")
    if codes.numel() and int(codes.max()) > 15:
        raise RangeError(f"pack_fp4: codes must be < 16, got max {int(codes.max())}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Packed uint8 ``[..., K/2]`` -> uint8 codes ``[..., K]`` (inverse of :func:`pack_fp4`)."""
    if packed.dtype != torch.uint8:
        raise DTypeError(f"unpack_fp4: packed must be uint8, got {packed.dtype}")
    if packed.dim() == 0:
        raise ShapeError("unpack_fp4: packed must be [..., K/2], got a 0-d tensor")
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


# ---------------------------------------------------------------------------------------- e8m0
def e8m0_to_float(s: torch.Tensor) -> torch.Tensor:
    """e8m0 scales (``float8_e8m0fnu``, or their raw uint8 bytes) -> fp32 ``2**(b - 127)``.

    Built from the bits (byte 0 is the fp32 subnormal ``2**-127``, byte 255 is NaN), so it does
    not depend on the device supporting e8m0 arithmetic.
    """
    if s.dtype == E8M0_DTYPE:
        b = s.view(torch.uint8)
    elif s.dtype == torch.uint8:
        b = s
    else:
        raise DTypeError(f"e8m0_to_float: s must be float8_e8m0fnu or uint8, got {s.dtype}")
    b = b.to(torch.int32)
    bits = torch.where(b == 0, torch.full_like(b, 0x00400000), b << 23)
    bits = torch.where(b == 255, torch.full_like(b, 0x7FC00000), bits)
    return bits.view(torch.float32)


def scale_to_float(s: torch.Tensor) -> torch.Tensor:
    """Scales in fp32 or e8m0 -> fp32 (a copy-free view of fp32 input)."""
    if s.dtype == torch.float32:
        return s
    if s.dtype == E8M0_DTYPE:
        return e8m0_to_float(s)
    raise DTypeError(f"scales must be float32 or float8_e8m0fnu, got {s.dtype}")


def _frexp_exponent(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``s > 0`` -> (is exact power of two, e) with ``s <= 2**e`` the least such power."""
    m, e = torch.frexp(s)          # s = m * 2**e, m in [0.5, 1), exact for subnormals too
    exact = m == 0.5
    return exact, torch.where(exact, e - 1, e).to(torch.int32)


def _pow2_from_exponent(e: torch.Tensor) -> torch.Tensor:
    """int32 ``e`` -> fp32 ``2**e`` built from bits (subnormal below -126, inf above 127)."""
    normal = ((e.clamp(-126, 128) + 127) << 23)                   # e = 128 -> 0x7F800000 = inf
    sub = torch.ones_like(e) << (e.clamp(-149, -127) + 149)       # 2**-149 .. 2**-127
    bits = torch.where(e < -126, sub, normal)
    bits = torch.where(e < -149, torch.zeros_like(bits), bits)
    return bits.view(torch.float32)


def pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """Least power of two ``>= s`` for fp32 ``s > 0`` (``2**ceil(log2(s))``), bit exact.

    For normal inputs this is the public kernel's ``fast_round_scale`` (exponent bits, plus one
    when any mantissa bit is set); subnormal inputs are handled exactly too. Inputs ``<= 0`` or
    NaN give NaN, ``inf`` gives ``inf`` (quantizers floor ``amax`` first, so never hit these).
    """
    if s.dtype != torch.float32:
        raise DTypeError(f"pow2_ceil: s must be float32, got {s.dtype}")
    _, e = _frexp_exponent(s)
    out = _pow2_from_exponent(e)
    out = torch.where(s > 0, out, torch.full_like(out, float("nan")))
    return torch.where(torch.isinf(s) & (s > 0), s, out)


def float_to_e8m0(s: torch.Tensor) -> torch.Tensor:
    """fp32 exact powers of two in ``[2**-127, 2**127]`` -> ``float8_e8m0fnu`` (bit exact).

    Raises ``RangeError`` for anything else (``Tensor.to`` would silently round those).
    """
    if s.dtype != torch.float32:
        raise DTypeError(f"float_to_e8m0: s must be float32, got {s.dtype}")
    exact, e = _frexp_exponent(s)
    ok = exact & (s > 0) & (e >= -127) & (e <= 127)
    if s.numel() and not bool(ok.all()):
        bad = s[~ok].flatten()[:4].tolist()
        raise RangeError(f"float_to_e8m0: s must hold powers of two in [2**-127, 2**127], got e.g. {bad}")
    return (e + 127).to(torch.uint8).view(E8M0_DTYPE)


# ------------------------------------------------------------------------------ block scales
def fp8_block_scale(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    """FP8 block scale from fp32 block amax: ``max(amax, 1e-4) * fp32(1/448)``, rounded up to a
    power of two when ``pow2`` (ue8m0 / e8m0 formats). Returns fp32 like ``amax``."""
    floor = torch.tensor(FP8_AMAX_FLOOR, dtype=torch.float32, device=amax.device)
    s = torch.maximum(amax.float(), floor) * torch.tensor(FP8_MAX_INV, dtype=torch.float32, device=amax.device)
    return pow2_ceil(s) if pow2 else s


def fp4_block_scale(amax: torch.Tensor) -> torch.Tensor:
    """MXFP4 block scale from fp32 block amax: ``pow2_ceil(max(amax, 6*2**-126) * fp32(1/6))``
    (always a power of two in ``[2**-126, 2**127]``). Returns fp32 like ``amax``."""
    floor = torch.tensor(FP4_AMAX_FLOOR, dtype=torch.float32, device=amax.device)
    return pow2_ceil(torch.maximum(amax.float(), floor)
                     * torch.tensor(FP4_MAX_INV, dtype=torch.float32, device=amax.device))


def fp8_round(v: torch.Tensor) -> torch.Tensor:
    """fp32 values -> ``float8_e4m3fn`` after clamping to ``[-448, 448]`` (RNE, NaN stays NaN)."""
    return v.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


__all__ = [
    "FP8_DTYPE", "E8M0_DTYPE", "FP4_PACKED_DTYPE", "FP8_MAX", "FP8_MAX_INV", "FP8_AMAX_FLOOR",
    "FP4_MAX", "FP4_MAX_INV", "FP4_AMAX_FLOOR", "FP8_BLOCK", "FP4_BLOCK", "E2M1_VALUES",
    "e2m1_encode", "e2m1_decode", "pack_fp4", "unpack_fp4", "e8m0_to_float", "scale_to_float",
    "pow2_ceil", "float_to_e8m0", "fp8_block_scale", "fp4_block_scale", "fp8_round",
]
