"""v4hal.hal.formats against slow scalar implementations written here with ``math``/``struct``
only (independent of the module under test): e2m1 rounding and packing, e8m0 codecs,
power-of-two ceilings and the block-scale rules of the public kernel."""
from __future__ import annotations

import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from v4hal.hal import formats as F
from v4hal.hal.errors import DTypeError, RangeError, ShapeError

E2M1_GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
FP32_FLOATS = st.floats(width=32, allow_nan=False, allow_infinity=False)


# ------------------------------------------------------------------ scalar oracles
def f32(v: float) -> float:
    return struct.unpack("<f", struct.pack("<f", v))[0]


def f32_bits(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


def e2m1_code_scalar(v: float) -> int:
    """Nearest e2m1 magnitude by exhaustive distance, ties to the even code, saturating; sign bit 3."""
    sign = 8 if math.copysign(1.0, v) < 0 else 0
    if math.isnan(v):
        return 7 | sign
    a = min(abs(v), 6.0)
    best = 0
    for code, g in enumerate(E2M1_GRID):
        d, db = abs(a - g), abs(a - E2M1_GRID[best])
        if d < db or (d == db and code % 2 == 0 and best % 2 == 1):
            best = code
    return best | sign


def e2m1_value_scalar(code: int) -> float:
    """Value of a nibble from its bits: s eem (bias 1, one subnormal step of 0.5)."""
    sign = -1.0 if code & 8 else 1.0
    e, m = (code >> 1) & 3, code & 1
    mag = m * 0.5 if e == 0 else (1 + m / 2) * 2.0 ** (e - 1)
    return math.copysign(mag, sign)


def pow2_ceil_scalar(v: float) -> float:
    m, e = math.frexp(v)
    return math.ldexp(1.0, e - 1 if m == 0.5 else e)


def fast_round_scale_scalar(v: float) -> float:
    """The public kernel's bit formula (normal fp32 inputs): exponent + (mantissa != 0)."""
    bits = f32_bits(v)
    e = ((bits >> 23) & 0xFF) - 127 + (1 if bits & 0x7FFFFF else 0)
    return struct.unpack("<f", struct.pack("<I", (e + 127) << 23))[0]


def e8m0_byte_scalar(p: float) -> int:
    return int(round(math.log2(p))) + 127


# ------------------------------------------------------------------ constants
def test_constants() -> None:
    assert F.FP8_MAX == 448.0 and F.FP4_MAX == 6.0
    assert F.FP8_MAX_INV == f32(1 / 448) and F.FP4_MAX_INV == f32(1 / 6)
    assert F.FP8_AMAX_FLOOR == f32(1e-4) and F.FP4_AMAX_FLOOR == 6 * 2.0 ** -126
    assert [abs(v) for v in F.E2M1_VALUES[:8]] == E2M1_GRID
    assert [e2m1_value_scalar(c) for c in range(16)] == list(F.E2M1_VALUES)
    assert torch.finfo(F.FP8_DTYPE).max == F.FP8_MAX


# ------------------------------------------------------------------ e2m1
def _check_encode(values: list[float]) -> None:
    got = F.e2m1_encode(torch.tensor(values, dtype=torch.float32)).tolist()
    want = [e2m1_code_scalar(f32(v)) for v in values]
    assert got == want, [(v, g, w) for v, g, w in zip(values, got, want) if g != w][:8]


def test_e2m1_encode_ties_grid_and_specials() -> None:
    mids = [(a + b) / 2 for a, b in zip(E2M1_GRID, E2M1_GRID[1:])]
    assert mids == [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    # ties to the even code: 0.25->0, 0.75->1.0, 1.25->1.0, 1.75->2, 2.5->2, 3.5->4, 5->4
    assert F.e2m1_encode(torch.tensor(mids)).tolist() == [0, 2, 2, 4, 4, 6, 6]
    assert F.e2m1_encode(-torch.tensor(mids)).tolist() == [8, 10, 10, 12, 12, 14, 14]
    # one fp32 ulp either side of every tie
    near = [struct.unpack("<f", struct.pack("<I", f32_bits(m) + d))[0] for m in mids for d in (-1, 1)]
    specials = [0.0, -0.0, 1e-45, -1e-45, 2.0 ** -126, 6.0, -6.0, 6.5, 7.0, 1e30, -1e30,
                float("inf"), float("-inf"), 0.2, -0.2]
    _check_encode(mids + [-m for m in mids] + near + [-v for v in near] + E2M1_GRID
                  + [-g for g in E2M1_GRID] + specials)
    nan = F.e2m1_encode(torch.tensor([float("nan")])).item()
    assert nan & 7 == 7


def test_e2m1_encode_bf16_and_fp16_inputs() -> None:
    vals = torch.linspace(-7, 7, 2001)
    for dt in (torch.bfloat16, torch.float16):
        xs = vals.to(dt)
        assert F.e2m1_encode(xs).tolist() == [e2m1_code_scalar(v) for v in xs.float().tolist()]


@settings(max_examples=300, deadline=None)
@given(st.lists(FP32_FLOATS, min_size=1, max_size=64))
def test_e2m1_encode_matches_scalar(values: list[float]) -> None:
    _check_encode(values)


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=-6.0, max_value=6.0, width=32))
def test_e2m1_round_trip_is_nearest(v: float) -> None:
    q = F.e2m1_decode(F.e2m1_encode(torch.tensor([v]))).item()
    assert q in E2M1_GRID or -q in E2M1_GRID
    assert all(abs(q - v) <= abs(g - v) for g in E2M1_GRID + [-g for g in E2M1_GRID])
    assert math.copysign(1.0, q) == math.copysign(1.0, v)


def test_e2m1_decode_all_codes_and_round_trip() -> None:
    codes = torch.arange(16, dtype=torch.uint8)
    vals = F.e2m1_decode(codes)
    assert vals.dtype == torch.float32
    assert vals.tolist() == [e2m1_value_scalar(c) for c in range(16)]
    assert torch.signbit(vals).tolist() == [c >= 8 for c in range(16)]      # code 8 is -0.0
    assert torch.equal(F.e2m1_encode(vals), codes)
    with pytest.raises(DTypeError, match="codes must be uint8"):
        F.e2m1_decode(codes.int())
    with pytest.raises(DTypeError):
        F.e2m1_encode(codes)


# ------------------------------------------------------------------ packing
def test_pack_fp4_layout_low_nibble_even() -> None:
    codes = torch.tensor([[1, 2, 15, 8, 0, 7]], dtype=torch.uint8)
    packed = F.pack_fp4(codes)
    assert packed.tolist() == [[0x21, 0x8F, 0x70]]
    assert torch.equal(F.unpack_fp4(packed), codes)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=1, max_size=40).map(lambda v: v + v[:1] if len(v) % 2 else v))
def test_pack_unpack_round_trip(values: list[int]) -> None:
    codes = torch.tensor(values, dtype=torch.uint8).reshape(1, -1)
    packed = F.pack_fp4(codes)
    assert packed.shape == (1, len(values) // 2)
    want = [values[2 * i] | (values[2 * i + 1] << 4) for i in range(len(values) // 2)]
    assert packed[0].tolist() == want
    assert torch.equal(F.unpack_fp4(packed), codes)


def test_pack_errors() -> None:
    with pytest.raises(ShapeError, match="K even"):
        F.pack_fp4(torch.zeros(3, 5, dtype=torch.uint8))
    with pytest.raises(RangeError, match="< 16"):
        F.pack_fp4(torch.full((4,), 16, dtype=torch.uint8))
    with pytest.raises(DTypeError):
        F.pack_fp4(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(DTypeError):
        F.unpack_fp4(torch.zeros(4, dtype=torch.int8))


# ------------------------------------------------------------------ e8m0
def test_e8m0_to_float_all_bytes() -> None:
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    got = F.e8m0_to_float(b.view(F.E8M0_DTYPE))
    assert got.dtype == torch.float32
    for byte in range(255):
        assert got[byte].item() == math.ldexp(1.0, byte - 127), byte
    assert math.isnan(got[255].item())
    raw = F.e8m0_to_float(b)                      # raw bytes are accepted too
    assert torch.equal(raw[:255], got[:255]) and math.isnan(raw[255].item())
    # agrees with torch's own widening of e8m0
    assert torch.equal(got[:255], b.view(F.E8M0_DTYPE).float()[:255])
    assert torch.equal(F.scale_to_float(b.view(F.E8M0_DTYPE))[:255], got[:255])
    s = torch.rand(5)
    assert F.scale_to_float(s) is s
    with pytest.raises(DTypeError):
        F.e8m0_to_float(torch.ones(2))
    with pytest.raises(DTypeError):
        F.scale_to_float(torch.ones(2, dtype=torch.float16))


def test_float_to_e8m0_powers_of_two() -> None:
    exps = list(range(-127, 128))
    p = torch.tensor([math.ldexp(1.0, e) for e in exps], dtype=torch.float32)
    got = F.float_to_e8m0(p)
    assert got.dtype == F.E8M0_DTYPE
    assert got.view(torch.uint8).tolist() == [e8m0_byte_scalar(math.ldexp(1.0, e)) for e in exps]
    assert torch.equal(F.e8m0_to_float(got), p)
    for bad in (1.5, 3.0, 0.0, -1.0, -0.5, float("inf"), float("nan"), 2.0 ** -128, 2.0 ** -140):
        with pytest.raises(RangeError, match="powers of two"):
            F.float_to_e8m0(torch.tensor([1.0, bad]))
    with pytest.raises(DTypeError):
        F.float_to_e8m0(torch.ones(2, dtype=torch.float64))
    assert F.float_to_e8m0(torch.empty(0)).shape == (0,)


# ------------------------------------------------------------------ pow2_ceil and scale rules
def _check_pow2_ceil(values: list[float]) -> None:
    got = F.pow2_ceil(torch.tensor(values, dtype=torch.float32)).tolist()
    assert got == [pow2_ceil_scalar(f32(v)) for v in values]


def test_pow2_ceil_edges() -> None:
    vals = []
    for e in range(-149, 128):
        p = math.ldexp(1.0, e)
        bits = f32_bits(p)
        vals += [p, struct.unpack("<f", struct.pack("<I", bits + 1))[0]]
        if bits > 1:
            vals.append(struct.unpack("<f", struct.pack("<I", bits - 1))[0])
    vals = [v for v in vals if v <= 2.0 ** 127]
    _check_pow2_ceil(vals)
    normal = [v for v in vals if v >= 2.0 ** -126]
    assert F.pow2_ceil(torch.tensor(normal)).tolist() == [fast_round_scale_scalar(v) for v in normal]
    out = F.pow2_ceil(torch.tensor([0.0, -1.0, float("nan"), float("inf"), 3e38]))
    assert out[:3].isnan().all() and out[3] == float("inf") and out[4] == float("inf")
    with pytest.raises(DTypeError):
        F.pow2_ceil(torch.ones(2, dtype=torch.float64))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=2.0 ** -149, max_value=2.0 ** 127, width=32), min_size=1, max_size=32))
def test_pow2_ceil_matches_scalar(values: list[float]) -> None:
    _check_pow2_ceil(values)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=2.0 ** 127, width=32), min_size=1, max_size=16))
def test_block_scale_rules(amaxes: list[float]) -> None:
    a = torch.tensor(amaxes, dtype=torch.float32)
    inv8, inv4 = f32(1 / 448), f32(1 / 6)
    plain = [f32(max(v, f32(1e-4)) * inv8) for v in amaxes]
    assert F.fp8_block_scale(a, pow2=False).tolist() == plain
    assert F.fp8_block_scale(a, pow2=True).tolist() == [pow2_ceil_scalar(v) for v in plain]
    fp4 = [pow2_ceil_scalar(f32(max(v, 6 * 2.0 ** -126) * inv4)) for v in amaxes]
    assert F.fp4_block_scale(a).tolist() == fp4


def test_block_scale_floors_and_exact_boundaries() -> None:
    # all-zero blocks take the floors: 2**-126 for FP4 (e8m0 byte 1), fp32(1e-4)*fp32(1/448) for FP8
    z = torch.zeros(2)
    assert F.fp4_block_scale(z).tolist() == [2.0 ** -126] * 2
    assert F.float_to_e8m0(F.fp4_block_scale(z)).view(torch.uint8).tolist() == [1, 1]
    assert F.fp8_block_scale(z, False).tolist() == [f32(f32(1e-4) * f32(1 / 448))] * 2
    assert F.fp8_block_scale(z, True).tolist() == [2.0 ** -22] * 2
    # amax exactly max * 2**k gives scale 2**k (the fp32 reciprocal does not push it up)
    ks = list(range(-20, 110, 7))
    assert F.fp8_block_scale(torch.tensor([448 * 2.0 ** k for k in ks]), True).tolist() == [2.0 ** k for k in ks]
    assert F.fp4_block_scale(torch.tensor([6 * 2.0 ** k for k in ks])).tolist() == [2.0 ** k for k in ks]


def test_fp8_round_clamps_and_is_rne() -> None:
    v = torch.tensor([500.0, -1e9, 448.0, 1.0625, 1.1875, -1.0625, 2.0 ** -10, 3 * 2.0 ** -11])
    got = F.fp8_round(v).float().tolist()
    # e4m3: 3 mantissa bits, so 1.0625 ties to 1.0 (even), 1.1875 ties to 1.25; 2**-10 ties to 0
    assert got == [448.0, -448.0, 448.0, 1.0, 1.25, -1.0, 0.0, 2.0 ** -9]
