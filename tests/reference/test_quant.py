"""Reference quantizers against slow scalar implementations (pure Python loops over elements with
``math``/``struct``, independent of v4hal), bit for bit: values, signed zeros, scales."""
from __future__ import annotations

import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import v4hal
from v4hal.backends.reference import quant as Q
from v4hal.hal import formats as F
from v4hal.hal.errors import DTypeError, RangeError, ShapeError

FP8 = torch.float8_e4m3fn
E8M0 = torch.float8_e8m0fnu
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
E2M1_GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
# values of every magnitude (subnormal to near fp32 max), signed zeros, and exact ties of both grids
VALUES = st.one_of(
    st.builds(lambda m, e: m * 2.0 ** e, st.floats(-2.0, 2.0), st.integers(-150, 126)),
    st.builds(lambda t, e, neg: (-t if neg else t) * 2.0 ** e,
              st.sampled_from([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 1.0625, 17.0, 448.0, 0.0]),
              st.integers(-20, 10), st.booleans()),
    st.sampled_from([0.0, -0.0]))


# ------------------------------------------------------------------ scalar oracles
def f32(v: float) -> float:
    return struct.unpack("<f", struct.pack("<f", v))[0]


def round_to(v: float, dtype: torch.dtype) -> float:
    """RNE of a Python float to ``dtype`` (fp32 first, as the kernels compute in fp32)."""
    v = f32(v)
    if dtype == torch.float32 or math.isnan(v) or math.isinf(v):
        return v
    if dtype == torch.float16:
        try:
            return struct.unpack("<e", struct.pack("<e", v))[0]
        except OverflowError:
            return math.copysign(math.inf, v)
    bits = struct.unpack("<I", struct.pack("<f", v))[0]
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def pow2_ceil(v: float) -> float:
    m, e = math.frexp(v)
    return math.ldexp(1.0, e - 1 if m == 0.5 else e)


def e4m3(v: float) -> float:
    """RNE onto float8_e4m3fn for |v| <= 448: 3 mantissa bits, min normal 2**-6, step 2**-9 below."""
    if v == 0:
        return v
    m, e = math.frexp(abs(v))
    step = 2.0 ** (max(e - 1, -6) - 3)
    return math.copysign(round(abs(v) / step) * step, v)   # round(): ties to even, quotient exact


def e2m1_code(v: float) -> int:
    sign = 8 if math.copysign(1.0, v) < 0 else 0
    a = min(abs(v), 6.0)
    best = 0
    for code, g in enumerate(E2M1_GRID):
        d, db = abs(a - g), abs(a - E2M1_GRID[best])
        if d < db or (d == db and code % 2 == 0 and best % 2 == 1):
            best = code
    return best | sign


def e2m1_value(code: int) -> float:
    return math.copysign(E2M1_GRID[code & 7], -1.0 if code & 8 else 1.0)


def fp8_block_scalar(block: list[float], pow2: bool) -> tuple[list[float], float]:
    amax = max(max(abs(v) for v in block), f32(1e-4))
    s = f32(amax * f32(1 / 448))
    if pow2:
        s = pow2_ceil(s)
    return [e4m3(min(max(f32(v / s), -448.0), 448.0)) for v in block], s


def fp4_block_scalar(block: list[float]) -> tuple[list[int], float]:
    amax = max(max(abs(v) for v in block), 6 * 2.0 ** -126)
    s = pow2_ceil(f32(amax * f32(1 / 6)))
    return [e2m1_code(min(max(f32(v / s), -6.0), 6.0)) for v in block], s


def rows_of(x: torch.Tensor) -> list[list[float]]:
    return x.float().reshape(-1, x.shape[-1]).tolist()


def act_quant_scalar(x: torch.Tensor, bs: int, pow2: bool) -> tuple[list[list[float]], list[list[float]]]:
    ys, ss = [], []
    for row in rows_of(x):
        y_row, s_row = [], []
        for i in range(0, len(row), bs):
            y, s = fp8_block_scalar(row[i:i + bs], pow2)
            y_row += y
            s_row.append(s)
        ys.append(y_row)
        ss.append(s_row)
    return ys, ss


def fp4_quant_scalar(x: torch.Tensor, bs: int) -> tuple[list[list[int]], list[list[float]]]:
    cs, ss = [], []
    for row in rows_of(x):
        c_row, s_row = [], []
        for i in range(0, len(row), bs):
            c, s = fp4_block_scalar(row[i:i + bs])
            c_row += c
            s_row.append(s)
        cs.append(c_row)
        ss.append(s_row)
    return cs, ss


def e8m0_bytes(scales: list[list[float]]) -> list[list[int]]:
    return [[int(math.log2(s)) + 127 for s in row] for row in scales]


def fp8_bytes(values: list[list[float]]) -> torch.Tensor:
    """Exact fp8 encodings of values that are already on the e4m3 grid (signed zeros kept)."""
    return torch.tensor(values, dtype=torch.float32).to(FP8).view(torch.uint8)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[actual.element_size()]
    a, e = actual.view(view), expected.view(view)
    bad = (a != e).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} elements differ, first at {bad[:4].tolist()}: " \
                             f"{actual[tuple(bad[0])].item()} vs {expected[tuple(bad[0])].item()}"


# ------------------------------------------------------------------ inputs
def make_input(shape: tuple[int, ...], dtype: torch.dtype, bs: int, seed: int, fp4: bool = False) -> torch.Tensor:
    """Random blocks of very different magnitudes plus special blocks: all zero, signed zeros,
    subnormals, one huge outlier, and exact rounding ties of the target grid."""
    g = torch.Generator().manual_seed(seed)
    k = shape[-1]
    rows = math.prod(shape[:-1])
    x = torch.randn(rows, k // bs, bs, generator=g)
    hi = 5 if dtype == torch.float16 else 30
    x *= torch.exp2(torch.randint(-12, hi, (rows, k // bs, 1), generator=g).float())
    flat = x.reshape(-1, bs)
    nb = flat.shape[0]
    tiny = {torch.float32: 1e-40, torch.bfloat16: 1e-39, torch.float16: 1e-7}[dtype]
    huge = {torch.float32: 1e30, torch.bfloat16: 1e30, torch.float16: 6e4}[dtype]
    specials = [
        torch.zeros(bs),
        torch.tensor([0.0, -0.0] * (bs // 2)),
        torch.full((bs,), tiny) * torch.sign(torch.randn(bs, generator=g)),
        torch.cat([torch.tensor([huge]), torch.randn(bs - 1, generator=g) * 1e-3]),
        torch.full((bs,), -3.0e-5),                                  # below the FP8 amax floor
    ]
    if fp4:
        ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
        top = 6.0
    else:
        ties = [1.0625, 1.1875, 17.0, 2.0 ** -10, 3 * 2.0 ** -10, 0.5625, 240.0, 416.0]
        top = 448.0
    for j in range(3):
        scale = 2.0 ** (j - 3 if dtype == torch.float16 else 4 * j - 6)
        vals = [top] + [t * sign for t in ties for sign in (1, -1)]
        vals = (vals * bs)[:bs]
        specials.append(torch.tensor(vals) * scale)
    for i, blk in enumerate(specials):
        flat[(i * 7 + 3) % nb] = blk
    return x.reshape(shape).to(dtype)


CASES = [((4, 256), 128), ((2, 3, 128), 64), ((1, 384), 128), ((5, 64), 32)]


# ------------------------------------------------------------------ FP8 activations
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,bs", CASES)
@pytest.mark.parametrize("fmt", ["fp32", "ue8m0-fp32", "e8m0"])
def test_act_quant_bitexact(dtype: torch.dtype, shape: tuple[int, ...], bs: int, fmt: str) -> None:
    x = make_input(shape, dtype, bs, seed=hash((shape, bs, fmt)) % 1000)
    scale_fmt = None if fmt == "fp32" else "ue8m0"
    scale_dtype = E8M0 if fmt == "e8m0" else torch.float32
    x_before = x.clone()
    y, s = Q.act_quant(x, bs, scale_fmt, scale_dtype)
    assert torch.equal(x, x_before)
    assert y.dtype == FP8 and y.shape == x.shape
    assert s.dtype == scale_dtype and s.shape == (*shape[:-1], shape[-1] // bs)
    ys, ss = act_quant_scalar(x, bs, pow2=fmt != "fp32")
    assert_same_bits(y.reshape(-1, shape[-1]).view(torch.uint8), fp8_bytes(ys))
    if scale_dtype == E8M0:
        assert s.reshape(len(ss), -1).view(torch.uint8).tolist() == e8m0_bytes(ss)
    else:
        assert s.reshape(len(ss), -1).tolist() == ss


def test_act_quant_all_zero_block_takes_floor() -> None:
    x = torch.zeros(2, 256, dtype=torch.bfloat16)
    x[1, 128:] = -0.0
    y, s = Q.act_quant(x, 128, None, torch.float32)
    assert s.tolist() == [[f32(f32(1e-4) * f32(1 / 448))] * 2] * 2
    assert y.view(torch.uint8)[1, 128:].eq(0x80).all() and y.view(torch.uint8)[0].eq(0).all()
    _, s = Q.act_quant(x, 128, "ue8m0", E8M0)
    assert s.view(torch.uint8).eq(127 - 22).all()        # 2**-22 = pow2_ceil(1e-4 / 448)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(VALUES, min_size=32, max_size=32),
       dtype=st.sampled_from(FLOATS), fmt=st.sampled_from([None, "ue8m0"]))
def test_act_quant_hypothesis(values: list[float], dtype: torch.dtype, fmt: str | None) -> None:
    x = torch.tensor(values).to(dtype).reshape(2, 16)
    if not torch.isfinite(x).all():
        x = torch.nan_to_num(x, posinf=1.0, neginf=-1.0)
    y, s = Q.act_quant(x, 16, fmt, torch.float32)
    ys, ss = act_quant_scalar(x, 16, pow2=fmt is not None)
    assert_same_bits(y.view(torch.uint8), fp8_bytes(ys))
    assert s.tolist() == ss
    # round trip: within half an e4m3 step of the clamped value (relative 2**-4 or absolute 2**-10 * s)
    deq = y.float() * s.repeat_interleave(16, dim=-1)
    xf = x.float()
    tol = torch.maximum(xf.abs() * 2.0 ** -4, s.repeat_interleave(16, dim=-1) * 2.0 ** -10) * (1 + 1e-6)
    assert (deq - xf).abs().le(tol).all()


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("fmt", [None, "ue8m0"])
def test_act_quant_inplace_bitexact(dtype: torch.dtype, fmt: str | None) -> None:
    x = make_input((6, 256), dtype, 128, seed=7)
    ys, ss = act_quant_scalar(x, 128, pow2=fmt is not None)
    want = torch.tensor([[round_to(v * row_s[j // 128], dtype) for j, v in enumerate(row_y)]
                         for row_y, row_s in zip(ys, ss)], dtype=torch.float32).to(dtype)
    ret = Q.act_quant_inplace(x, 128, fmt)
    assert ret is None and x.dtype == dtype
    assert_same_bits(x, want)


# ------------------------------------------------------------------ FP4 activations
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,bs", [((4, 128), 32), ((2, 3, 64), 16), ((1, 96), 32), ((3, 64), 64)])
def test_fp4_act_quant_bitexact(dtype: torch.dtype, shape: tuple[int, ...], bs: int) -> None:
    x = make_input(shape, dtype, bs, seed=hash((shape, bs)) % 1000, fp4=True)
    y, s = Q.fp4_act_quant(x, bs)
    assert y.dtype == torch.uint8 and y.shape == (*shape[:-1], shape[-1] // 2)
    assert s.dtype == E8M0 and s.shape == (*shape[:-1], shape[-1] // bs)
    cs, ss = fp4_quant_scalar(x, bs)
    packed = [[row[2 * i] | (row[2 * i + 1] << 4) for i in range(len(row) // 2)] for row in cs]
    assert y.reshape(len(cs), -1).tolist() == packed
    assert s.reshape(len(ss), -1).view(torch.uint8).tolist() == e8m0_bytes(ss)


def test_fp4_ties_and_zero_blocks() -> None:
    # amax 6 -> scale 1: the ties land exactly on the e2m1 midpoints and round to even codes
    row = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -5.0, -0.0, 0.0, -0.1, 0.1, 5.5]
    x = torch.tensor([row * 2], dtype=torch.bfloat16)
    y, s = Q.fp4_act_quant(x, 16)
    assert s.view(torch.uint8).tolist() == [[127, 127]]
    codes = [e2m1_code(v) for v in row]
    assert codes[:8] == [7, 0, 2, 2, 4, 4, 6, 6] and codes[8:11] == [8, 10, 14]
    assert y[0, :8].tolist() == [codes[2 * i] | (codes[2 * i + 1] << 4) for i in range(8)]
    z = torch.zeros(1, 64)
    z[0, 32:] = -0.0
    y, s = Q.fp4_act_quant(z, 32)
    assert s.view(torch.uint8).tolist() == [[1, 1]]        # floor 6*2**-126 -> scale 2**-126
    assert y[0, :16].eq(0).all() and y[0, 16:].eq(0x88).all()


@settings(max_examples=60, deadline=None)
@given(values=st.lists(VALUES, min_size=32, max_size=32),
       dtype=st.sampled_from(FLOATS))
def test_fp4_act_quant_hypothesis(values: list[float], dtype: torch.dtype) -> None:
    x = torch.nan_to_num(torch.tensor(values).to(dtype), posinf=2.0, neginf=-2.0).reshape(1, 32)
    y, s = Q.fp4_act_quant(x, 16)
    cs, ss = fp4_quant_scalar(x, 16)
    assert y[0].tolist() == [cs[0][2 * i] | (cs[0][2 * i + 1] << 4) for i in range(16)]
    assert s.view(torch.uint8).tolist() == e8m0_bytes(ss)
    # round trip through dequant_fp4: the nearest grid point of x/s, times s
    deq = Q.dequant_fp4(y, s, 16)
    want = [e2m1_value(c) * ss[0][i // 16] for i, c in enumerate(cs[0])]
    assert deq[0].tolist() == want


@pytest.mark.parametrize("dtype", FLOATS)
def test_fp4_act_quant_inplace_bitexact(dtype: torch.dtype) -> None:
    x = make_input((5, 128), dtype, 32, seed=11, fp4=True)
    cs, ss = fp4_quant_scalar(x, 32)
    want = torch.tensor([[round_to(e2m1_value(c) * row_s[j // 32], dtype) for j, c in enumerate(row_c)]
                         for row_c, row_s in zip(cs, ss)], dtype=torch.float32).to(dtype)
    assert Q.fp4_act_quant_inplace(x, 32) is None
    assert_same_bits(x, want)


# ------------------------------------------------------------------ dequantizers
@pytest.mark.parametrize("scale_dtype", [torch.float32, E8M0])
@pytest.mark.parametrize("out_dtype", FLOATS)
def test_dequant_fp8_per_row(scale_dtype: torch.dtype, out_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    y = (torch.randn(3, 4, 192, generator=g) * 50).to(FP8)
    if scale_dtype == E8M0:
        sb = torch.randint(100, 150, (3, 4, 3), generator=g, dtype=torch.int32).to(torch.uint8)
        s, sf = sb.view(E8M0), [[2.0 ** (b - 127) for b in r] for r in sb.reshape(12, 3).tolist()]
    else:
        s = torch.rand(3, 4, 3, generator=g) + 0.01
        sf = s.reshape(12, 3).tolist()
    out = Q.dequant_fp8(y, s, 64, out_dtype)
    assert out.dtype == out_dtype and out.shape == y.shape
    yv = y.float().reshape(12, 192).tolist()
    want = [[round_to(v * sf[r][j // 64], out_dtype) for j, v in enumerate(yv[r])] for r in range(12)]
    assert_same_bits(out.reshape(12, 192), torch.tensor(want).to(out_dtype))


@pytest.mark.parametrize("scale_dtype", [torch.float32, E8M0])
def test_dequant_fp8_weight_tiles(scale_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(4)
    n, k, bs = 70, 100, 32                         # partial edge tiles in both dims
    y = (torch.randn(2, n, k, generator=g) * 30).to(FP8)
    if scale_dtype == E8M0:
        sb = torch.randint(110, 140, (2, 3, 4), generator=g, dtype=torch.int32).to(torch.uint8)
        s, sf = sb.view(E8M0), [[[2.0 ** (b - 127) for b in r] for r in m] for m in sb.tolist()]
    else:
        s = torch.rand(2, 3, 4, generator=g) + 0.01
        sf = s.tolist()
    out = Q.dequant_fp8(y, s, bs)
    yv = y.float().tolist()
    want = [[[f32(yv[e][i][j] * sf[e][i // bs][j // bs]) for j in range(k)] for i in range(n)] for e in range(2)]
    assert_same_bits(out, torch.tensor(want))
    with pytest.raises(ShapeError, match="per-row blocks"):
        v4hal.dequant_fp8(y, s[:, :2], bs)


@pytest.mark.parametrize("scale_dtype", [torch.float32, E8M0])
def test_dequant_fp4(scale_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    packed = torch.randint(0, 256, (3, 2, 48), generator=g, dtype=torch.int32).to(torch.uint8)
    if scale_dtype == E8M0:
        sb = torch.randint(100, 150, (3, 2, 3), generator=g, dtype=torch.int32).to(torch.uint8)
        s, sf = sb.view(E8M0), [[2.0 ** (b - 127) for b in r] for r in sb.reshape(6, 3).tolist()]
    else:
        s = torch.rand(3, 2, 3, generator=g)
        sf = s.reshape(6, 3).tolist()
    out = Q.dequant_fp4(packed, s, 32, torch.bfloat16)
    assert out.shape == (3, 2, 96) and out.dtype == torch.bfloat16
    pv = packed.reshape(6, 48).tolist()
    want = [[round_to(e2m1_value((pv[r][j // 2] >> (4 * (j % 2))) & 0xF) * sf[r][j // 32], torch.bfloat16)
             for j in range(96)] for r in range(6)]
    assert_same_bits(out.reshape(6, 96), torch.tensor(want).to(torch.bfloat16))
    with pytest.raises(ShapeError):
        v4hal.dequant_fp4(packed, s[..., :2], 32)
    with pytest.raises(DTypeError):
        v4hal.dequant_fp4(packed.view(torch.int8), s, 32)


# ------------------------------------------------------------------ weight quantizers
@pytest.mark.parametrize("shape,block", [((130, 200), 64), ((2, 100, 260), 128), ((128, 256), 128)])
@pytest.mark.parametrize("scale_fmt", ["ue8m0", None])
def test_quant_weight_fp8_bitexact(shape: tuple[int, ...], block: int, scale_fmt: str | None) -> None:
    g = torch.Generator().manual_seed(sum(shape) + block)
    w = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-8, 8, shape[:-2] + (1, 1), generator=g).float())
    w[..., :block, :block] = 0.0                     # an all-zero tile takes the amax floor
    w = w.to(torch.bfloat16)
    y, s = Q.quant_weight_fp8(w, block, scale_fmt)
    n, k = shape[-2:]
    nb, kb = -(-n // block), -(-k // block)
    assert y.dtype == FP8 and y.shape == w.shape
    assert s.shape == (*shape[:-2], nb, kb) and s.dtype == (E8M0 if scale_fmt else torch.float32)
    wm = w.float().reshape(-1, n, k).tolist()
    y_want, s_want = [], []
    for mat in wm:
        ym = [[0.0] * k for _ in range(n)]
        sm = [[0.0] * kb for _ in range(nb)]
        for bi in range(nb):
            for bj in range(kb):
                rs, cs = range(bi * block, min(n, (bi + 1) * block)), range(bj * block, min(k, (bj + 1) * block))
                tile = [mat[i][j] for i in rs for j in cs]
                q, sc = fp8_block_scalar(tile, pow2=scale_fmt is not None)
                sm[bi][bj] = sc
                for idx, (i, j) in enumerate((i, j) for i in rs for j in cs):
                    ym[i][j] = q[idx]
        y_want.append(ym)
        s_want.append(sm)
    assert_same_bits(y.reshape(-1, n, k).view(torch.uint8), torch.tensor(y_want).to(FP8).view(torch.uint8))
    if scale_fmt:
        assert s.reshape(-1, nb, kb).view(torch.uint8).tolist() == [e8m0_bytes(m) for m in s_want]
    else:
        assert s.reshape(-1, nb, kb).tolist() == s_want


def test_quant_weight_fp4_matches_row_quantizer() -> None:
    w = make_input((3, 40, 128), torch.bfloat16, 32, seed=9, fp4=True)
    y, s = Q.quant_weight_fp4(w, 32)
    assert y.shape == (3, 40, 64) and s.shape == (3, 40, 4) and s.dtype == E8M0
    cs, ss = fp4_quant_scalar(w, 32)
    assert y.reshape(120, 64).tolist() == [[r[2 * i] | (r[2 * i + 1] << 4) for i in range(64)] for r in cs]
    assert s.reshape(120, 4).view(torch.uint8).tolist() == e8m0_bytes(ss)


# ------------------------------------------------------------------ shapes and errors
def test_empty_and_leading_dims() -> None:
    x = torch.empty(0, 256)
    y, s = Q.act_quant(x, 128)
    assert y.shape == (0, 256) and s.shape == (0, 2)
    y, s = Q.fp4_act_quant(x, 32)
    assert y.shape == (0, 128) and s.shape == (0, 8)
    x = torch.randn(256)
    y, s = Q.act_quant(x, 128, "ue8m0", E8M0)
    assert y.shape == (256,) and s.shape == (2,)


def test_errors() -> None:
    x = torch.randn(2, 100)
    with pytest.raises(ShapeError, match="divisible by block_size"):
        v4hal.act_quant(x, 128)
    with pytest.raises(RangeError, match="scale_fmt"):
        v4hal.act_quant(torch.randn(2, 128), 128, "e4m3")
    with pytest.raises(DTypeError, match="scale_dtype"):
        v4hal.act_quant(torch.randn(2, 128), 128, None, torch.float16)
    with pytest.raises(DTypeError, match="x must be"):
        v4hal.act_quant(torch.randint(0, 3, (2, 128)), 128)
    with pytest.raises(ShapeError, match="even"):
        v4hal.fp4_act_quant(torch.randn(2, 99), 33)
    with pytest.raises(RangeError, match="block_size"):
        v4hal.act_quant(torch.randn(2, 128), 0, inplace=True)
    with pytest.raises(ShapeError, match=r"\[..., N, K\]"):
        v4hal.quant_weight_fp8(torch.randn(128))
    with pytest.raises(ShapeError):
        v4hal.quant_weight_fp4(torch.randn(4, 48), 32)
    with pytest.raises(DTypeError):
        v4hal.dequant_fp8(torch.randn(2, 128), torch.ones(2, 1), 128)


# ------------------------------------------------------------------ non-finite input, top of the range
NONFINITE = (float("inf"), float("-inf"), float("nan"), -float("nan"))


def _with_bad(dtype: torch.dtype, bad: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [3, 256] and w [2, 256, 256] holding one ``bad`` element each."""
    g = torch.Generator().manual_seed(21)
    x = torch.randn(3, 256, generator=g).to(dtype)
    x[1, 5] = bad
    w = torch.randn(2, 256, 256, generator=g).to(dtype)
    w[1, 7, 140] = bad
    return x, w


QUANTIZER_CALLS = {   # public call on (x, w) -> (op, input argument)
    "act_quant": (lambda x, w: v4hal.act_quant(x), "act_quant", "x"),
    "act_quant e8m0": (lambda x, w: v4hal.act_quant(x, 128, "ue8m0", E8M0), "act_quant", "x"),
    "act_quant inplace": (lambda x, w: v4hal.act_quant(x.clone(), inplace=True), "act_quant", "x"),
    "fp4_act_quant": (lambda x, w: v4hal.fp4_act_quant(x), "fp4_act_quant", "x"),
    "fp4_act_quant inplace": (lambda x, w: v4hal.fp4_act_quant(x.clone(), inplace=True), "fp4_act_quant", "x"),
    "quant_weight_fp8": (lambda x, w: v4hal.quant_weight_fp8(w), "quant_weight_fp8", "w"),
    "quant_weight_fp8 fp32": (lambda x, w: v4hal.quant_weight_fp8(w, 128, None), "quant_weight_fp8", "w"),
    "quant_weight_fp4": (lambda x, w: v4hal.quant_weight_fp4(w), "quant_weight_fp4", "w"),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", list(QUANTIZER_CALLS))
def test_nonfinite_input_is_refused_naming_the_input(name: str, dtype: torch.dtype, monkeypatch) -> None:
    """Value checks on (forced; the CPU default): a RangeError naming the op and its input."""
    monkeypatch.setenv("V4HAL_CHECK_VALUES", "1")
    v4hal.hal.dispatch.refresh()
    call, op, arg = QUANTIZER_CALLS[name]
    for bad in NONFINITE:
        x, w = _with_bad(dtype, bad)
        t = x if arg == "x" else w
        want = f"{op}: {arg} must be finite, got a NaN or Inf in {str(dtype)[6:]} {list(t.shape)} on cpu"
        with pytest.raises(RangeError) as err:
            call(x, w)
        assert str(err.value) == want


def _blocks_marked(y: torch.Tensor, s: torch.Tensor, bad: torch.Tensor, nan_byte: int) -> None:
    """Scales NaN (fp32 NaN / e8m0 0xFF) exactly where ``bad`` (per block), payload bytes ``nan_byte``."""
    sf = F.scale_to_float(s)
    assert torch.equal(sf.isnan(), bad), "NaN scales exactly on the blocks holding inf/NaN"
    yb = y.view(torch.uint8)
    per = yb.shape[-1] // bad.shape[-1]
    blocks = yb.unflatten(-1, (bad.shape[-1], per))
    assert bool((blocks[bad] == nan_byte).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bad", NONFINITE)
def test_nonfinite_blocks_with_value_checks_off(dtype: torch.dtype, bad: float) -> None:
    """The documented value: NaN scale, NaN payload (e4m3 0x7F, e2m1 code 7) for a block holding inf or
    NaN; every other block exactly what it is without the bad element."""
    x, w = _with_bad(dtype, bad)
    clean = x.clone()
    clean[1, 5] = 0.0
    bad_blocks = {bs: torch.zeros(3, 256 // bs, dtype=torch.bool) for bs in (128, 32)}
    for bs in bad_blocks:
        bad_blocks[bs][1, 5 // bs] = True
    for fmt, sd in ((None, torch.float32), ("ue8m0", torch.float32), ("ue8m0", E8M0)):
        y, s = Q.act_quant(x, 128, fmt, sd)
        _blocks_marked(y, s, bad_blocks[128], F.FP8_NAN_BYTE)
        y0, s0 = Q.act_quant(clean, 128, fmt, sd)
        keep = ~bad_blocks[128]
        assert torch.equal(F.scale_to_float(s)[keep], F.scale_to_float(s0)[keep])
        assert torch.equal(y.view(torch.uint8)[0], y0.view(torch.uint8)[0])
    y, s = Q.fp4_act_quant(x, 32)
    _blocks_marked(y, s, bad_blocks[32], F.FP4_NAN_CODE * 0x11)
    y0, s0 = Q.fp4_act_quant(clean, 32)
    assert torch.equal(y[0], y0[0]) and torch.equal(y[2], y0[2])
    for fn, bs in ((Q.act_quant_inplace, 128), (Q.fp4_act_quant_inplace, 32)):
        xi = x.clone()
        fn(xi, bs)
        assert torch.equal(xi.isnan(), bad_blocks[bs].repeat_interleave(bs, dim=1))
    tiles = torch.zeros(2, 2, 2, dtype=torch.bool)
    tiles[1, 0, 1] = True
    for fmt in ("ue8m0", None):
        y, s = Q.quant_weight_fp8(w, 128, fmt)
        assert torch.equal(F.scale_to_float(s).isnan(), tiles)
        assert bool((y[1, :128, 128:].view(torch.uint8) == F.FP8_NAN_BYTE).all())
        assert not bool(y[0].float().isnan().any()) and not bool(y[1, 128:].float().isnan().any())
    y, s = Q.quant_weight_fp4(w, 32)
    assert int(F.scale_to_float(s).isnan().sum()) == 1 and bool((y[1, 7, 64:80] == 0x77).all())


@pytest.mark.parametrize("kind", ["fp8", "fp4"])
def test_moe_experts_nonfinite_x(kind: str, monkeypatch) -> None:
    """Quantized moe_experts: inf/NaN x is refused naming x (value checks on); off, the token's output
    row is NaN and the other rows are what they are without it."""
    g = torch.Generator().manual_seed(5)
    ws = [torch.randn(2, 256, 128, generator=g) * 0.05, torch.randn(2, 128, 256, generator=g) * 0.05,
          torch.randn(2, 256, 128, generator=g) * 0.05]
    q = [v4hal.quant_weight_fp8(t) if kind == "fp8" else v4hal.quant_weight_fp4(t) for t in ws]
    x = torch.randn(4, 128, generator=g).to(torch.bfloat16)
    x[2, 3] = float("inf")
    idx = torch.tensor([[0, 1]] * 4, dtype=torch.int32)
    wts = torch.full((4, 2), 0.5)

    def run(xx: torch.Tensor) -> torch.Tensor:
        return v4hal.moe_experts(xx, wts, idx, q[0][0], q[1][0], q[2][0], w_scales=tuple(t[1] for t in q))

    monkeypatch.setenv("V4HAL_CHECK_VALUES", "1")
    v4hal.hal.dispatch.refresh()
    with pytest.raises(RangeError, match=r"^moe_experts: x must be finite"):
        run(x)
    monkeypatch.setenv("V4HAL_CHECK_VALUES", "0")
    v4hal.hal.dispatch.refresh()
    x0 = x.clone()
    x0[2] = 0
    out, clean = run(x), run(x0)
    assert bool(out[2].isnan().all()) and torch.equal(out[[0, 1, 3]], clean[[0, 1, 3]])


def test_top_of_the_range_round_trips_overflow_as_documented() -> None:
    """Inputs within one rounding step of the fp32 maximum: exact codes and scales, the products
    overflow to inf (FP8 pow2: |x| >= 248 * 2**120; FP4: |x| >= 3.5 * 2**126); fp32 FP8 scales stay finite."""
    fp8_edge, fp4_edge = 248 * 2.0 ** 120, 3.5 * 2.0 ** 126
    below8, below4 = float(torch.tensor(fp8_edge).nextafter(torch.tensor(0.0))), 3.0 * 2.0 ** 126
    x = torch.tensor([[fp8_edge, -fp8_edge, below8, 1.0] * 32])
    y, s = Q.act_quant(x, 128, "ue8m0", E8M0)
    assert F.e8m0_to_float(s).item() == 2.0 ** 120
    d = Q.dequant_fp8(y, s, 128)
    assert d[0, :3].tolist() == [math.inf, -math.inf, 240 * 2.0 ** 120]
    xi = x.clone()
    Q.act_quant_inplace(xi, 128, "ue8m0")
    assert torch.equal(xi, d)
    y, s = Q.act_quant(torch.full((1, 128), torch.finfo(torch.float32).max), 128, None, torch.float32)
    assert bool(torch.isfinite(Q.dequant_fp8(y, s, 128)).all())
    x4 = torch.tensor([[fp4_edge, -fp4_edge, below4, 1.0] * 8])
    y, s = Q.fp4_act_quant(x4, 32)
    assert F.e8m0_to_float(s).item() == 2.0 ** 126
    assert Q.dequant_fp4(y, s, 32)[0, :3].tolist() == [math.inf, -math.inf, below4]
    top = torch.full((1, 1), 254, dtype=torch.uint8).view(E8M0)          # 2**127
    assert Q.dequant_fp8(torch.tensor([[1.0, 1.5, 2.0, -448.0]]).to(FP8), top, 4)[0].tolist() == \
        [2.0 ** 127, 1.5 * 2.0 ** 127, math.inf, -math.inf]
    for packed, want in ((0x32, [2.0 ** 127, 1.5 * 2.0 ** 127]), (0xC4, [math.inf, -math.inf])):
        assert Q.dequant_fp4(torch.tensor([[packed]], dtype=torch.uint8), top, 2)[0].tolist() == want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quantizers_same_bits_on_cuda() -> None:
    """The reference runs on cuda tensors too (frexp, fp8 casts, e8m0 views) with the same bits."""
    x = make_input((8, 256), torch.bfloat16, 32, seed=12, fp4=True)
    for fn, args in ((Q.act_quant, (128, "ue8m0", E8M0)), (Q.act_quant, (128, None, torch.float32)),
                     (Q.fp4_act_quant, (32,))):
        y_cpu, s_cpu = fn(x, *args)
        y_gpu, s_gpu = fn(x.cuda(), *args)
        assert_same_bits(y_gpu.cpu(), y_cpu)
        assert_same_bits(s_gpu.cpu(), s_cpu)
    for fn in (Q.act_quant_inplace, Q.fp4_act_quant_inplace):
        a, b = x.clone(), x.clone().cuda()
        fn(a)
        fn(b)
        assert_same_bits(b.cpu(), a)
