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
rule; backends must produce the same bits. A block holding an inf or a NaN (its amax is not
finite) gets a NaN scale (fp32 NaN, e8m0 byte 0xFF) and a NaN payload (e4m3 ``0x7F`` for every
element; e2m1 code 7, as e2m1 has no NaN): :func:`nonfinite_blocks`, :func:`mark_nonfinite_blocks`.

V4.1's caches (FlashMLA's formats) use two other block rules: the window cache's ue8m0 scale
floors the quotient, ``2**ceil(log2(max(amax / 448, 1e-4)))`` (:func:`fp8_cache_scale`, block 32),
and the compressed cache scales blocks of 16 e2m1 values by an e4m3 number,
``e4m3(clamp(amax / 6, 2**-9, 448))`` (:func:`e4m3_block_scale`, :func:`fp4_e4m3_block_quant`,
:func:`fp4_e4m3_round_trip`), both with fp32 divisions.

CPU speed without new numerics: e4m3 / e8m0 / e2m1 decoding on the CPU indexes small tables
holding exactly what the direct formulas (or torch's own cast) give, and :func:`operand` passes
fp32/int32 constants as cached 0-d tensors (torch wraps a Python number per call otherwise).
Every result is bit-identical to the plain formulation; ``tests/reference/test_fast_paths.py``
checks that.
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
FP8_NAN_BYTE: int = 0x7F                    # e4m3 payload of a block holding inf or NaN (positive NaN)
FP4_NAN_CODE: int = 7                       # e2m1 code of such a block (e2m1 has no NaN; its scale is NaN)
FP4_BLOCK: int = 32                         # K block of the MXFP4 recipes

#: e2m1 magnitudes by code 0..7; codes 8..15 are the same values negated (8 is -0.0).
E2M1_VALUES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                                  -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

# Rounding thresholds between neighbouring magnitudes and whether a tie goes up: a tie goes to
# the neighbour with the even code (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2,
# 3.5 -> 4, 5 -> 4).
_E2M1_THRESHOLDS: tuple[tuple[float, bool], ...] = (
    (0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


# ------------------------------------------------------------------------------ scalar operands
_OPERANDS: dict[tuple, torch.Tensor] = {}


def operand(value: float | int, like: torch.Tensor) -> torch.Tensor | float | int:
    """``value`` as the other operand of arithmetic on ``like`` (a float32 or int32 tensor).

    On the CPU: a cached 0-d tensor of like's dtype. Torch converts a Python number to that same
    value (it computes fp32/int32 ops in fp32/int32), but wraps it in a fresh tensor on every
    call, which costs more than the op itself on small tensors. Elsewhere: ``value`` itself.
    Only for like of dtype float32 or int32, where the two are the same operand.
    """
    if not like.is_cpu:
        return value
    key = (value.hex() if isinstance(value, float) else value, like.dtype)   # hex: keeps -0.0 apart
    t = _OPERANDS.get(key)
    if t is None:
        if like.dtype not in (torch.float32, torch.int32):
            raise DTypeError(f"operand: like must be float32 or int32, got {like.dtype}")
        if len(_OPERANDS) >= 1024:
            _OPERANDS.clear()
        with torch.inference_mode(False):      # a normal tensor, usable inside and outside inference mode
            t = _OPERANDS[key] = torch.tensor(value, dtype=like.dtype)
    return t


# ------------------------------------------------------------------------------ lookup tables
def _lookup(table: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``table[codes]`` for uint8 ``codes`` of any shape (fp32 result, contiguous, codes' shape)."""
    return table.index_select(0, codes.reshape(-1).to(torch.int32)).view(codes.shape)


# Below this many elements the direct fp8 cast (one op) beats the table lookup (a few ops).
_TABLE_MIN_NUMEL = 2048


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
        t = operand(threshold, a)
        mag += a >= t if tie_up else a > t                  # each passed threshold adds 1
    mag.masked_fill_(torch.isnan(a), 7)
    return mag.add_(torch.signbit(xf), alpha=8)             # sign into bit 3 (mag < 8: + 8 is the bit-or)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[...]`` in ``[0, 16)`` -> fp32 values ``[...]`` (code 8 is ``-0.0``)."""
    if codes.dtype != torch.uint8:
        raise DTypeError(f"e2m1_decode: codes must be uint8, got {codes.dtype}")
    if codes.device.type == "cpu":
        return _lookup(_E2M1_TO_F32_CPU, codes & 0xF)
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
    if b.device.type == "cpu":
        return _lookup(_E8M0_TO_F32_CPU, b)      # the table is this function's own bit formula
    return _e8m0_bits_to_float(b)


def _e8m0_bits_to_float(b: torch.Tensor) -> torch.Tensor:
    """uint8 e8m0 bytes -> fp32 built from bits: ``b << 23``, byte 0 the subnormal ``2**-127``, 255 NaN."""
    b = b.to(torch.int32)
    bits = torch.where(b == 0, torch.full_like(b, 0x00400000), b << 23)
    bits = torch.where(b == 255, torch.full_like(b, 0x7FC00000), bits)
    return bits.view(torch.float32)


def fp8_to_float(y: torch.Tensor) -> torch.Tensor:
    """``float8_e4m3fn`` ``[...]`` -> fp32 ``[...]``: the same bits as ``y.float()``, NaNs included.

    On the CPU torch converts e4m3 one element at a time (several ns each); for contiguous
    tensors of at least ``_TABLE_MIN_NUMEL`` elements this looks every byte up in a 256-entry
    table filled by that very cast, several times faster. Elsewhere it is ``y.float()``.
    """
    if y.dtype != FP8_DTYPE:
        raise DTypeError(f"fp8_to_float: y must be float8_e4m3fn, got {y.dtype}")
    if y.device.type == "cpu" and y.numel() >= _TABLE_MIN_NUMEL and y.is_contiguous():
        return _lookup(_FP8_TO_F32_CPU, y.view(torch.uint8))
    return y.float()


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
def _floored(amax: torch.Tensor, floor: float) -> torch.Tensor:
    """fp32 ``max(amax, floor)`` (a fresh tensor). ``torch.maximum`` with a 0-d tensor, not
    ``clamp_min``: the two differ in the bits of a NaN amax."""
    a = amax.float()
    f = operand(floor, a)
    if not isinstance(f, torch.Tensor):
        f = torch.tensor(floor, dtype=torch.float32, device=a.device)
    return torch.maximum(a, f)


def _pow2_ceil_normal(s: torch.Tensor) -> torch.Tensor:
    """:func:`pow2_ceil` for fp32 ``s`` that is a positive normal number, ``+inf`` or NaN.

    The public kernel's ``fast_round_scale``: adding ``0x7FFFFF`` to the bits carries into the
    exponent exactly when a mantissa bit is set, and clearing the mantissa leaves
    ``2**ceil(log2(s))`` (exponent 255, ``inf``, on overflow; ``inf`` stays ``inf``). NaN bits
    would wrap around, so NaNs are written back as the canonical NaN :func:`pow2_ceil` gives.
    """
    bits = s.view(torch.int32)
    up = bits.add(operand(0x7FFFFF, bits)).bitwise_and_(operand(0x7F800000, bits)).view(torch.float32)
    return up.masked_fill_(torch.isnan(s), float("nan"))


def fp8_block_scale(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    """FP8 block scale from fp32 block amax: ``max(amax, 1e-4) * fp32(1/448)``, rounded up to a
    power of two when ``pow2`` (ue8m0 / e8m0 formats). Returns fp32 like ``amax``."""
    s = _floored(amax, FP8_AMAX_FLOOR)
    s.mul_(operand(FP8_MAX_INV, s))
    # s >= 1e-4/448 is normal (or inf/NaN), the case _pow2_ceil_normal is exact for
    return _pow2_ceil_normal(s) if pow2 else s


def fp4_block_scale(amax: torch.Tensor) -> torch.Tensor:
    """MXFP4 block scale from fp32 block amax: ``pow2_ceil(max(amax, 6*2**-126) * fp32(1/6))``
    (always a power of two in ``[2**-126, 2**127]``). Returns fp32 like ``amax``."""
    s = _floored(amax, FP4_AMAX_FLOOR)
    s.mul_(operand(FP4_MAX_INV, s))
    # s >= 2**-126 is normal (or inf/NaN), the case _pow2_ceil_normal is exact for
    return _pow2_ceil_normal(s)


def block_scale_to_e8m0(s: torch.Tensor, *, nan: bool = False) -> torch.Tensor:
    """Power-of-two block scales from :func:`fp8_block_scale` / :func:`fp4_block_scale` -> e8m0.

    Those are normal powers of two, whose e8m0 byte is the biased fp32 exponent (bits 23..30).
    Non-finite scales (a block holding inf or NaN): with ``nan=True`` they become the e8m0 NaN
    byte 0xFF (what the quantizers return for such blocks, see :func:`mark_nonfinite_blocks`);
    otherwise they go to :func:`float_to_e8m0`, which refuses them with its error (a host sync).
    """
    bits = s.view(torch.int32)
    biased = bits.bitwise_right_shift(operand(23, bits))
    if nan:
        return biased.bitwise_and_(operand(0xFF, bits)).to(torch.uint8).view(E8M0_DTYPE)
    if s.numel() and bool(biased.ge(operand(255, bits)).any()):
        return float_to_e8m0(s)
    return biased.to(torch.uint8).view(E8M0_DTYPE)


def nonfinite_blocks(amax: torch.Tensor) -> torch.Tensor:
    """bool ``[...]``: the blocks whose fp32 amax ``[...]`` is inf or NaN (they hold an inf or a NaN)."""
    return torch.isfinite(amax).logical_not_()


def mark_nonfinite_blocks(s: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """The quantizers' result for blocks holding inf or NaN: fp32 block scales ``s [...]`` set to
    NaN where ``bad [...]`` (from :func:`nonfinite_blocks`), in place; returns ``s``.

    The payload of such a block is NaN too: e4m3 ``0x7F`` (:data:`FP8_NAN_BYTE`) for FP8, code 7
    (e2m1 has no NaN; the scale makes the dequantized values NaN) for FP4.
    """
    return s.masked_fill_(bad, float("nan"))


def fp8_round(v: torch.Tensor) -> torch.Tensor:
    """fp32 values -> ``float8_e4m3fn`` after clamping to ``[-448, 448]`` (RNE, NaN stays NaN)."""
    return v.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


# ------------------------------------------------------------------ V4.1 cache block formats
#: V4.1 window cache (FlashMLA's 528-byte format): floor of the ue8m0 scale before rounding it up,
#: ``s = 2**ceil(log2(max(amax / 448, 1e-4)))`` (the floor applies to the quotient, not to amax)
FP8_CACHE_SCALE_FLOOR: float = _f32(1e-4)
FP8_CACHE_BLOCK: int = 32                   # values per ue8m0 scale of the V4.1 window cache
FP4_E4M3_BLOCK: int = 16                    # values per e4m3 scale of the V4.1 compressed cache
E4M3_SCALE_MIN: float = 2.0 ** -9           # least e4m3 scale (the smallest e4m3 subnormal)
FP4_E4M3_NAN_CODE: int = 0                  # e2m1 code of a block holding inf or NaN (its scale is NaN)


def fp8_cache_scale(amax: torch.Tensor) -> torch.Tensor:
    """Power-of-two block scale of the V4.1 window cache from fp32 block amax ``[...]``:
    ``2**ceil(log2(max(amax / 448, 1e-4)))`` with ``amax / 448`` an fp32 division (an amax of
    ``448 * 2**k`` gives exactly ``2**k``; V4's :func:`fp8_block_scale` floors amax and multiplies
    by the reciprocal instead). Returns fp32 ``[...]``; inf / NaN amax give inf / NaN."""
    a = amax.float()
    s = _floored(torch.div(a, operand(FP8_MAX, a)), FP8_CACHE_SCALE_FLOOR)
    return _pow2_ceil_normal(s)          # s >= 1e-4 is normal (or inf / NaN)


def fp8_cache_block_quant(x: torch.Tensor, block: int = FP8_CACHE_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 with one ue8m0 scale per ``block`` values (the V4.1 window cache): float ``[..., D]``
    (``D % block == 0``) -> (``float8_e4m3fn [..., D]``, ``float8_e8m0fnu [..., D / block]``).

    ``s`` is :func:`fp8_cache_scale`, ``y = e4m3(x / s)`` (exact division by a power of two, then
    RNE; ``|x / s| <= 448``). A block holding inf or NaN gets the NaN scale byte 0xFF and the NaN
    payload 0x7F for every element, as V4's quantizers give."""
    if x.dim() == 0 or x.shape[-1] % block:
        raise ShapeError(f"fp8_cache_block_quant: x must be [..., D] with D a multiple of {block}, "
                         f"got {list(x.shape)}")
    xb = x.float().unflatten(-1, (-1, block))
    amax = xb.abs().amax(dim=-1)
    bad = nonfinite_blocks(amax)
    s = mark_nonfinite_blocks(fp8_cache_scale(amax), bad)
    y = fp8_round(xb / s.unsqueeze(-1))
    y.view(torch.uint8).masked_fill_(bad.unsqueeze(-1), FP8_NAN_BYTE)
    return y.flatten(-2), block_scale_to_e8m0(s, nan=True)


def fp8_block_dequant(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``float8_e4m3fn [..., D]`` times e8m0 scales ``[..., D / block]`` (``float8_e8m0fnu`` or their
    uint8 bytes; ``block = D / scales``) -> fp32 ``[..., D]`` (the products are exact in fp32)."""
    vals = fp8_to_float(y.contiguous()).unflatten(-1, (s.shape[-1], -1))
    return (vals * e8m0_to_float(s.contiguous()).unsqueeze(-1)).flatten(-2)


def e4m3_block_scale(amax: torch.Tensor) -> torch.Tensor:
    """e4m3 block scale of the V4.1 compressed cache from fp32 block amax ``[...]``:
    ``e4m3(clamp(amax / 6, 2**-9, 448))`` (fp32 division, then RNE to e4m3). Returns
    ``float8_e4m3fn [...]``; a NaN amax gives the e4m3 NaN, an infinite one 448 (callers mark
    non-finite blocks themselves)."""
    a = amax.float()
    return torch.div(a, operand(FP4_MAX, a)).clamp_(E4M3_SCALE_MIN, FP8_MAX).to(FP8_DTYPE)


def fp4_e4m3_block_codes(x: torch.Tensor, block: int = FP4_E4M3_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """e2m1 with one e4m3 scale per ``block`` values: float ``[..., D]`` (``D % block == 0``) ->
    (uint8 codes ``[..., D]`` (unpacked), ``float8_e4m3fn`` scales ``[..., D / block]``).

    ``s = e4m3_block_scale(amax)``; ``code = e2m1(x / fp32(s))``: an fp32 division by the (not
    power-of-two) scale, then round to nearest, ties to the even code, saturating at 6, the sign of
    the quotient in bit 3. A block holding inf or NaN gets the NaN scale (e4m3 0x7F) and code 0 for
    every element (FlashMLA's V4.1 reference quantizer)."""
    if x.dim() == 0 or x.shape[-1] % block:
        raise ShapeError(f"fp4_e4m3_block_codes: x must be [..., D] with D a multiple of {block}, "
                         f"got {list(x.shape)}")
    xb = x.float().unflatten(-1, (-1, block))
    amax = xb.abs().amax(dim=-1)
    bad = nonfinite_blocks(amax)
    s = e4m3_block_scale(amax)
    s.view(torch.uint8).masked_fill_(bad, FP8_NAN_BYTE)
    codes = e2m1_encode(xb / fp8_to_float(s).unsqueeze(-1))
    codes.masked_fill_(bad.unsqueeze(-1), FP4_E4M3_NAN_CODE)
    return codes.flatten(-2), s


def fp4_e4m3_block_quant(x: torch.Tensor, block: int = FP4_E4M3_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fp4_e4m3_block_codes` packed: float ``[..., D]`` -> (uint8 ``[..., D / 2]``, even
    element in the low nibble; ``float8_e4m3fn`` scales ``[..., D / block]``)."""
    codes, s = fp4_e4m3_block_codes(x, block)
    return pack_fp4(codes), s


def fp4_e4m3_block_dequant(packed: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Packed e2m1 uint8 ``[..., D / 2]`` and e4m3 scales ``[..., D / block]`` (``float8_e4m3fn`` or
    their uint8 bytes) -> fp32 ``[..., D]`` (e2m1 value times scale: exact in fp32, and in bf16)."""
    s8 = s if s.dtype == FP8_DTYPE else s.contiguous().view(FP8_DTYPE)
    vals = e2m1_decode(unpack_fp4(packed)).unflatten(-1, (s8.shape[-1], -1))
    return (vals * fp8_to_float(s8.contiguous()).unsqueeze(-1)).flatten(-2)


def fp4_e4m3_round_trip(x: torch.Tensor, block: int = FP4_E4M3_BLOCK) -> torch.Tensor:
    """The FP4 round trip with e4m3 block scales (V4.1's compressed KV): float ``[..., D]`` ->
    fp32 ``[..., D]``, ``e2m1_value * s`` per :func:`fp4_e4m3_block_codes` (signed zeros kept; a
    block holding inf or NaN comes back NaN). Bit for bit what a ``v41_compressed_fp4`` cache
    write then read gives (after the cast to bf16, which is exact)."""
    codes, s = fp4_e4m3_block_codes(x, block)
    vals = e2m1_decode(codes).unflatten(-1, (-1, block))
    return (vals * fp8_to_float(s).unsqueeze(-1)).flatten(-2)


# CPU tables (built once; CPU only: elsewhere the direct formulas run on the device).
_FP8_TO_F32_CPU = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()   # torch's own cast
_E8M0_TO_F32_CPU = _e8m0_bits_to_float(torch.arange(256, dtype=torch.uint8))
_E2M1_TO_F32_CPU = torch.tensor(E2M1_VALUES, dtype=torch.float32)


__all__ = [
    "FP8_DTYPE", "E8M0_DTYPE", "FP4_PACKED_DTYPE", "FP8_MAX", "FP8_MAX_INV", "FP8_AMAX_FLOOR",
    "FP4_MAX", "FP4_MAX_INV", "FP4_AMAX_FLOOR", "FP8_BLOCK", "FP4_BLOCK", "E2M1_VALUES",
    "e2m1_encode", "e2m1_decode", "pack_fp4", "unpack_fp4", "e8m0_to_float", "fp8_to_float", "scale_to_float",
    "pow2_ceil", "float_to_e8m0", "fp8_block_scale", "fp4_block_scale", "block_scale_to_e8m0", "fp8_round",
    "FP8_NAN_BYTE", "FP4_NAN_CODE", "nonfinite_blocks", "mark_nonfinite_blocks",
    "FP8_CACHE_SCALE_FLOOR", "FP8_CACHE_BLOCK", "FP4_E4M3_BLOCK", "E4M3_SCALE_MIN", "FP4_E4M3_NAN_CODE",
    "fp8_cache_scale", "fp8_cache_block_quant", "fp8_block_dequant", "e4m3_block_scale",
    "fp4_e4m3_block_codes", "fp4_e4m3_block_quant", "fp4_e4m3_block_dequant", "fp4_e4m3_round_trip",
]
