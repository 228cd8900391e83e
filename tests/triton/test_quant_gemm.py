"""Triton quantizers, FP8/FP4 GEMMs and the grouped GEMM against the reference backend (under
the Triton interpreter on the CPU).

* Quantizers and dequantizers must match the reference bit for bit: random data of several
  magnitudes, all-zero blocks, signed zeros, every e4m3 rounding tie (normal and subnormal), every
  e2m1 tie, property-based inputs (hypothesis).
* GEMMs: ``calc_diff < 1e-5`` against the reference plus ``assert_close`` at the output dtype's
  tolerance; bf16/fp16 outputs must also be correctly rounded (within half an ulp of the
  reference's fp32 result, equal to the reference's own output on >= 99% of the elements), on
  odd M (1, 3, 33), N not a multiple of the tile (200, and 384 against 256-wide tiles), split-K
  and the fp16 MMA path of the FP4 kernel; the grouped GEMM with empty experts, E = 1 and row
  tiles that cross expert boundaries.
* Every output buffer the kernels allocate starts poisoned (``poison_like``): torch.empty is
  patched for each test, so an element a kernel never writes fails the comparison.
"""
from __future__ import annotations

import os
from dataclasses import replace

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

import v4hal
from tests.numerics import assert_close, bits, calc_diff, poisoned_empty  # noqa: F401  (fixture)
from tests.triton.rounding import assert_matches_rounded_reference, assert_rounded
from v4hal.backends import triton as tri_backend
from v4hal.backends.cuda import scaled_mm
from v4hal.backends.reference import gemm as ref_gemm
from v4hal.backends.reference import quant as ref_quant
from v4hal.backends.triton import gemm as tri_gemm
from v4hal.backends.triton import grouped as tri_grouped
from v4hal.backends.triton import quant as tri_quant
from v4hal.hal import formats as F
from v4hal.hal.errors import BackendUnavailableError, DTypeError, ShapeError

E8M0 = F.E8M0_DTYPE
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


pytestmark = pytest.mark.usefixtures("poisoned_empty")


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, \
        f"{what}: {actual.dtype} {list(actual.shape)} vs {expected.dtype} {list(expected.shape)}"
    same = bits(actual.contiguous()) == bits(expected.contiguous())
    if not bool(same.all()):
        where = (~same).nonzero()[:4].tolist()
        raise AssertionError(f"{what}: {int((~same).sum())} elements differ, first at {where}: "
                             f"{actual[tuple(torch.tensor(where[0]))]} vs {expected[tuple(torch.tensor(where[0]))]}")


def rand(shape, dtype, seed, spread=True):
    """Random values over many magnitudes (per last-dim position), with a zero block and a -0.0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    if spread:
        x = x * torch.logspace(-9, 4, shape[-1], base=2.0)
    x = x.to(dtype)
    flat = x.view(-1, shape[-1])
    flat[0, : min(32, shape[-1])] = 0.0
    flat[-1, 1] = -0.0
    return x


# ============================================================================ quantizers
QUANT_SHAPES = [(1, 128), (3, 5, 256), (33, 384)]
FP8_MODES = [(None, torch.float32), ("ue8m0", torch.float32), (None, E8M0), ("ue8m0", E8M0)]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", QUANT_SHAPES)
def test_act_quant_bitwise(dtype, shape):
    x = rand(shape, dtype, seed=len(shape) + shape[-1])
    for fmt, sd in FP8_MODES:
        y, s = tri_quant.act_quant(x, 128, fmt, sd)
        y_ref, s_ref = ref_quant.act_quant(x, 128, fmt, sd)
        assert_bitwise(y, y_ref, f"act_quant y {fmt} {sd}")
        assert_bitwise(s, s_ref, f"act_quant s {fmt} {sd}")
        if sd == torch.float32:
            xa, xb = x.clone(), x.clone()
            tri_quant.act_quant_inplace(xa, 128, fmt)
            ref_quant.act_quant_inplace(xb, 128, fmt)
            assert_bitwise(xa, xb, f"act_quant_inplace {fmt}")


@pytest.mark.parametrize("block", [32, 64, 96])
def test_act_quant_other_blocks_and_strided_input(block):
    x = rand((6, 384), torch.bfloat16, seed=block)
    xt = rand((384, 6), torch.bfloat16, seed=block + 1).t()          # non-contiguous [6, 384]
    for inp in (x, xt):
        for fmt, sd in FP8_MODES:
            y, s = tri_quant.act_quant(inp, block, fmt, sd)
            y_ref, s_ref = ref_quant.act_quant(inp, block, fmt, sd)
            assert_bitwise(y, y_ref, "y")
            assert_bitwise(s, s_ref, "s")
    xa, xb = xt.clone(), xt.clone()          # clone keeps the transposed strides
    assert not xa.is_contiguous()
    tri_quant.act_quant_inplace(xa, block, "ue8m0")
    ref_quant.act_quant_inplace(xb, block, "ue8m0")
    assert_bitwise(xa, xb, "act_quant_inplace on a strided view")


def _e4m3_grid() -> torch.Tensor:
    """All finite positive e4m3 values, ascending."""
    v = torch.arange(1, 127, dtype=torch.uint8).view(F.FP8_DTYPE).float()
    return torch.cat([torch.zeros(1), v])


def test_fp8_rounding_ties_and_subnormals():
    """Every midpoint between neighbouring e4m3 values (a tie: to the even code), one fp32 ulp on
    either side, and the subnormal range, quantized with a block scale of exactly 1."""
    grid = _e4m3_grid()
    mid = (grid[:-1] + grid[1:]) / 2                                      # exact in fp32
    vals = torch.cat([grid, mid, torch.nextafter(mid, torch.zeros_like(mid)),
                      torch.nextafter(mid, torch.full_like(mid, 1e9)), torch.tensor([1e-6, 2.0 ** -10])])
    vals = vals[vals <= 440.0]
    vals = torch.cat([vals, -vals])
    pad = (-vals.numel()) % 127
    vals = torch.cat([vals, torch.zeros(pad)]).view(-1, 127)
    x = torch.cat([torch.full((vals.shape[0], 1), 440.0), vals], dim=1)   # amax 440 -> scale 1 (ue8m0)
    y, s = tri_quant.act_quant(x, 128, "ue8m0", torch.float32)
    assert bool((s == 1.0).all())
    y_ref, s_ref = ref_quant.act_quant(x, 128, "ue8m0", torch.float32)
    assert_bitwise(y, y_ref, "e4m3 ties")
    assert_bitwise(y, x.to(F.FP8_DTYPE), "e4m3 ties vs torch's cast")


def test_fp4_rounding_ties():
    """e2m1 ties (0.25, 0.75, ... 5: to the even code), one ulp around them, signed zeros."""
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    vals = torch.cat([ties, torch.nextafter(ties, torch.zeros(7)), torch.nextafter(ties, torch.full((7,), 9.0)),
                      torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 1e-30])])
    vals = torch.cat([vals, -vals, torch.tensor([-0.0])])
    vals = torch.cat([vals, torch.zeros((-vals.numel()) % 31)]).view(-1, 31)
    x = torch.cat([torch.full((vals.shape[0], 1), 6.0), vals], dim=1)    # amax 6 -> scale 1
    for dtype in (torch.float32, torch.bfloat16):
        y, s = tri_quant.fp4_act_quant(x.to(dtype), 32)
        y_ref, s_ref = ref_quant.fp4_act_quant(x.to(dtype), 32)
        assert bool((F.e8m0_to_float(s) == 1.0).all())
        assert_bitwise(y, y_ref, "e2m1 ties")
        assert_bitwise(s, s_ref, "e8m0 scales")
        xa, xb = x.to(dtype), x.to(dtype)
        tri_quant.fp4_act_quant_inplace(xa, 32)
        ref_quant.fp4_act_quant_inplace(xb, 32)
        assert_bitwise(xa, xb, "fp4 round trip (signed zeros kept)")


NONFINITE = (float("inf"), -float("inf"), float("nan"), -float("nan"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_blocks_follow_the_reference(dtype):
    """Value checks off: a block holding inf or NaN gets a NaN scale (fp32 NaN / e8m0 0xFF) and a NaN
    payload (e4m3 0x7F, e2m1 code 7), the same bits as the reference; in-place round trips write NaN."""
    x = rand((3, 256), dtype, seed=5)
    w = rand((2, 200, 260), dtype, seed=6)
    for i, bad in enumerate(NONFINITE):
        x[i % 3, 37 * i] = bad
        w[i % 2, 50 * i + 3, 70 * i + 1] = bad
    for fmt, sd in FP8_MODES:
        for bs in (32, 128):
            y, s = tri_quant.act_quant(x, bs, fmt, sd)
            y_ref, s_ref = ref_quant.act_quant(x, bs, fmt, sd)
            assert_bitwise(y, y_ref, f"act_quant y {fmt} {sd} {bs}")
            assert_bitwise(s, s_ref, f"act_quant s {fmt} {sd} {bs}")
            assert int(F.scale_to_float(s).isnan().sum()) >= 3
    for bs in (32, 64):
        y, s = tri_quant.fp4_act_quant(x, bs)
        y_ref, s_ref = ref_quant.fp4_act_quant(x, bs)
        assert_bitwise(y, y_ref, f"fp4_act_quant y {bs}")
        assert_bitwise(s, s_ref, f"fp4_act_quant s {bs}")
    for fmt in ("ue8m0", None):
        y, s = tri_quant.quant_weight_fp8(w, 128, fmt)
        y_ref, s_ref = ref_quant.quant_weight_fp8(w, 128, fmt)
        assert_bitwise(y, y_ref, f"quant_weight_fp8 y {fmt}")
        assert_bitwise(s, s_ref, f"quant_weight_fp8 s {fmt}")
    y, s = tri_quant.quant_weight_fp4(w[..., :256], 32)
    y_ref, s_ref = ref_quant.quant_weight_fp4(w[..., :256], 32)
    assert_bitwise(y, y_ref, "quant_weight_fp4 y")
    assert_bitwise(s, s_ref, "quant_weight_fp4 s")
    for tri_fn, ref_fn, args in ((tri_quant.act_quant_inplace, ref_quant.act_quant_inplace, (128, None)),
                                 (tri_quant.act_quant_inplace, ref_quant.act_quant_inplace, (128, "ue8m0")),
                                 (tri_quant.fp4_act_quant_inplace, ref_quant.fp4_act_quant_inplace, (32,))):
        xa, xb = x.clone(), x.clone()
        tri_fn(xa, *args)
        ref_fn(xb, *args)
        assert torch.equal(xa.isnan(), xb.isnan()) and torch.equal(xa[~xa.isnan()], xb[~xb.isnan()])
        bs = args[0]
        bad_blocks = (~torch.isfinite(x.float())).unflatten(-1, (-1, bs)).any(-1)
        assert torch.equal(xa.isnan(), bad_blocks.repeat_interleave(bs, dim=-1)), "NaN over every bad block"


@pytest.mark.parametrize("kind", ["fp8", "fp4"])
def test_moe_experts_nonfinite_activations_follow_the_reference(kind, monkeypatch):
    """Value checks off: a token holding inf/NaN, and a finite token whose h overflows, give NaN output
    rows on both backends (the x and h quantizations mark their blocks); other rows agree."""
    monkeypatch.setenv("V4HAL_CHECK_VALUES", "0")
    v4hal.hal.dispatch.refresh()
    g = torch.Generator().manual_seed(9)
    ws = [torch.randn(2, 256, 128, generator=g) * 0.05, torch.randn(2, 128, 256, generator=g) * 0.05,
          torch.randn(2, 256, 128, generator=g) * 0.05]
    q = [v4hal.quant_weight_fp8(t) if kind == "fp8" else v4hal.quant_weight_fp4(t) for t in ws]
    x = torch.randn(5, 128, generator=g)
    x[1, 3], x[2, 100], x[3] = float("inf"), float("nan"), x[3] * 1e30      # h of token 3 overflows
    idx = torch.tensor([[0, 1]] * 5, dtype=torch.int32)
    wts = torch.full((5, 2), 0.5)
    outs = []
    for backend in ("reference", "triton"):
        with v4hal.use_backend(backend):
            outs.append(v4hal.moe_experts(x, wts, idx, q[0][0], q[1][0], q[2][0], w_scales=tuple(t[1] for t in q)))
    ref, tri = outs
    assert torch.equal(tri.isnan().all(1), torch.tensor([False, True, True, True, False]))
    assert torch.equal(tri.isnan(), ref.isnan())
    assert_close(tri[[0, 4]], ref[[0, 4]], torch.float32, atol=1e-5)


def test_top_of_the_range_follows_the_reference():
    """Products beyond the fp32 range are inf on both backends (no saturation): e8m0 scales 2**127
    with every e4m3 / e2m1 code, and quantizer round trips of values next to the fp32 maximum."""
    codes8 = torch.arange(256, dtype=torch.uint8).view(F.FP8_DTYPE).reshape(2, 128)
    top = torch.full((2, 1), 254, dtype=torch.uint8).view(E8M0)
    for od in FLOATS:       # NaN codes give NaN (bits: see _cast.cast_out), every other code the same bits
        d, d_ref = tri_quant.dequant_fp8(codes8, top, 128, od), ref_quant.dequant_fp8(codes8, top, 128, od)
        assert torch.equal(d.isnan(), d_ref.isnan()) and int(d.isnan().sum()) == 2
        assert_bitwise(d[~d.isnan()], d_ref[~d_ref.isnan()], f"dequant_fp8 2**127 {od}")
    packed = torch.arange(256, dtype=torch.uint8).reshape(8, 32)
    top4 = torch.full((8, 2), 254, dtype=torch.uint8).view(E8M0)
    d4 = tri_quant.dequant_fp4(packed, top4, 32)
    assert_bitwise(d4, ref_quant.dequant_fp4(packed, top4, 32), "dequant_fp4 2**127")
    assert bool(d4.isinf().any()) and bool(torch.isfinite(d4).any())
    big = torch.finfo(torch.float32).max
    edge = torch.tensor([big, -big, 248 * 2.0 ** 120, 3.5 * 2.0 ** 126, 3.0 * 2.0 ** 126, 1.0, 0.0, -3e38])
    for dtype in (torch.float32, torch.bfloat16):
        x = edge.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).repeat(1, 16).to(dtype)
        for fmt, sd in FP8_MODES:
            y, s = tri_quant.act_quant(x, 128, fmt, sd)
            d, d_ref = tri_quant.dequant_fp8(y, s, 128), ref_quant.dequant_fp8(*ref_quant.act_quant(x, 128, fmt, sd))
            assert_bitwise(d, d_ref, f"fp8 round trip {dtype} {fmt} {sd}")
            assert bool(d.isinf().any()) == (sd == E8M0 or fmt is not None)
        y, s = tri_quant.fp4_act_quant(x, 32)
        d = tri_quant.dequant_fp4(y, s, 32)
        assert_bitwise(d, ref_quant.dequant_fp4(*ref_quant.fp4_act_quant(x, 32)), f"fp4 round trip {dtype}")
        assert bool(d.isinf().any())
        for tri_fn, ref_fn, args in ((tri_quant.act_quant_inplace, ref_quant.act_quant_inplace, (128, "ue8m0")),
                                     (tri_quant.fp4_act_quant_inplace, ref_quant.fp4_act_quant_inplace, (32,))):
            xa, xb = x.clone(), x.clone()
            tri_fn(xa, *args)
            ref_fn(xb, *args)
            assert_bitwise(xa, xb, f"in-place round trip at the top {dtype} {args}")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("block", [16, 32, 128])
def test_fp4_act_quant_bitwise(dtype, block):
    x = rand((7, 256), dtype, seed=block)
    y, s = tri_quant.fp4_act_quant(x, block)
    y_ref, s_ref = ref_quant.fp4_act_quant(x, block)
    assert_bitwise(y, y_ref, "packed e2m1")
    assert_bitwise(s, s_ref, "e8m0 scales")
    xa, xb = x.clone(), x.clone()
    tri_quant.fp4_act_quant_inplace(xa, block)
    ref_quant.fp4_act_quant_inplace(xb, block)
    assert_bitwise(xa, xb, "fp4 round trip")


finite32 = st.floats(min_value=-3e4, max_value=3e4, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=25, deadline=None)
@given(values=st.lists(finite32 | st.sampled_from([0.0, -0.0, 1e-30, -2.0 ** -9, 448.0, 6.0]),
                       min_size=64, max_size=64 * 4),
       dtype=st.sampled_from(FLOATS), scale=st.sampled_from([2.0 ** -20, 1.0, 2.0 ** 10]))
def test_quantizers_property_bitwise(values, dtype, scale):
    k = len(values) // 32 * 32
    big = torch.finfo(dtype).max
    x = (torch.tensor(values[:k], dtype=torch.float32) * scale).clamp(-big, big).to(dtype).view(-1, 32)
    for fmt, sd in FP8_MODES:
        y, s = tri_quant.act_quant(x, 32, fmt, sd)
        y_ref, s_ref = ref_quant.act_quant(x, 32, fmt, sd)
        assert_bitwise(y, y_ref, "act_quant y")
        assert_bitwise(s, s_ref, "act_quant s")
    y, s = tri_quant.fp4_act_quant(x, 32)
    y_ref, s_ref = ref_quant.fp4_act_quant(x, 32)
    assert_bitwise(y, y_ref, "fp4 y")
    assert_bitwise(s, s_ref, "fp4 s")
    xa, xb = x.clone(), x.clone()
    tri_quant.act_quant_inplace(xa, 32, None)
    ref_quant.act_quant_inplace(xb, 32, None)
    assert_bitwise(xa, xb, "act_quant_inplace")


@pytest.mark.parametrize("dtype", FLOATS)
def test_weight_quantizers_bitwise(dtype):
    w = rand((2, 150, 200), dtype, seed=3, spread=False) * 0.05      # partial tiles in N and K
    for block in ((128, 64) if dtype == torch.bfloat16 else (128,)):
        for fmt in (None, "ue8m0"):
            y, s = tri_quant.quant_weight_fp8(w, block, fmt)
            y_ref, s_ref = ref_quant.quant_weight_fp8(w, block, fmt)
            assert_bitwise(y, y_ref, f"quant_weight_fp8 y block {block} {fmt}")
            assert_bitwise(s, s_ref, f"quant_weight_fp8 s block {block} {fmt}")
    y, s = tri_quant.quant_weight_fp4(w[..., :192], 32)
    y_ref, s_ref = ref_quant.quant_weight_fp4(w[..., :192], 32)
    assert_bitwise(y, y_ref, "quant_weight_fp4 y")
    assert_bitwise(s, s_ref, "quant_weight_fp4 s")


@pytest.mark.parametrize("out_dtype", FLOATS)
def test_dequantizers_bitwise(out_dtype):
    x = rand((5, 256), torch.float32, seed=11)
    w = rand((300, 200), torch.float32, seed=12, spread=False)
    for fmt, sd in FP8_MODES:
        y, s = ref_quant.act_quant(x, 128, fmt, sd)
        assert_bitwise(tri_quant.dequant_fp8(y, s, 128, out_dtype), ref_quant.dequant_fp8(y, s, 128, out_dtype),
                       f"dequant_fp8 per-row {sd}")
    for fmt in (None, "ue8m0"):
        y, s = ref_quant.quant_weight_fp8(w, 128, fmt)
        assert_bitwise(tri_quant.dequant_fp8(y, s, 128, out_dtype), ref_quant.dequant_fp8(y, s, 128, out_dtype),
                       f"dequant_fp8 2-D tiles {fmt}")
    y, s = ref_quant.fp4_act_quant(x, 32)
    assert_bitwise(tri_quant.dequant_fp4(y, s, 32, out_dtype), ref_quant.dequant_fp4(y, s, 32, out_dtype),
                   "dequant_fp4 e8m0")
    s32 = F.e8m0_to_float(s) * 1.5
    assert_bitwise(tri_quant.dequant_fp4(y, s32, 32, out_dtype), ref_quant.dequant_fp4(y, s32, 32, out_dtype),
                   "dequant_fp4 fp32 scales")


def test_quantizer_errors_name_the_argument():
    """Invalid calls fail in the op layer; a valid block size the FP4 kernel cannot tile is refused."""
    with v4hal.use_backend("triton"):
        with pytest.raises(DTypeError, match="x must be"):
            v4hal.act_quant(torch.zeros(2, 128, dtype=torch.int32))
        with pytest.raises(ShapeError, match="block_size"):
            v4hal.act_quant(torch.zeros(2, 100))
        with pytest.raises(BackendUnavailableError, match="power of two"):
            v4hal.fp4_act_quant(torch.zeros(2, 96), 24)
        with pytest.raises(DTypeError, match="y must be float8_e4m3fn"):
            v4hal.dequant_fp8(torch.zeros(2, 128), torch.ones(2, 1))


# ============================================================================ GEMMs
GEMM_CASES = [((1,), 200, 256), ((3,), 384, 384), ((3, 11), 200, 256), ((33,), 384, 256)]


def _fp8_operands(lead, n, k, sd, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g)
    w = torch.randn(n, k, generator=g) * 0.05
    a, a_s = ref_quant.act_quant(x, 128, "ue8m0" if sd == E8M0 else None, sd)
    b, b_s = ref_quant.quant_weight_fp8(w, 128, "ue8m0" if sd == E8M0 else None)
    b4, b4_s = ref_quant.quant_weight_fp4(w, 32)
    return a, a_s, b, b_s, b4, b4_s


def check_gemm(out: torch.Tensor, expected: torch.Tensor, what: str, exact: torch.Tensor | None = None) -> None:
    """``out`` against the reference's ``expected``; a 16-bit ``out`` also against ``exact`` (the reference's
    fp32 result), of which it must be the correctly rounded value."""
    assert out.dtype == expected.dtype and out.shape == expected.shape, what
    assert not bool(out.isnan().any()), f"{what}: unwritten (NaN) outputs"
    assert calc_diff(out, expected) < 1e-5, f"{what}: calc_diff {calc_diff(out, expected):.2e}"
    assert_close(out, expected, out.dtype, msg=what)
    if out.dtype != torch.float32:
        assert exact is not None and exact.dtype == torch.float32, f"{what}: a 16-bit output needs the fp32 result"
        assert_rounded(out, exact, what=what)
        assert_matches_rounded_reference(out, expected, what=what)


@pytest.mark.parametrize("lead,n,k", GEMM_CASES)
@pytest.mark.parametrize("sd", [torch.float32, E8M0])
def test_fp8_and_fp4_gemm_match_reference(lead, n, k, sd):
    a, a_s, b, b_s, b4, b4_s = _fp8_operands(lead, n, k, sd, seed=n + k + len(lead))
    out_dtype = torch.bfloat16 if sd == torch.float32 else torch.float32
    check_gemm(tri_gemm.fp8_gemm(a, a_s, b, b_s, sd, out_dtype), ref_gemm.fp8_gemm(a, a_s, b, b_s, sd, out_dtype),
               f"fp8_gemm {lead} {n} {k} {sd}", ref_gemm.fp8_gemm(a, a_s, b, b_s, sd, torch.float32))
    check_gemm(tri_gemm.fp4_gemm(a, a_s, b4, b4_s, sd, out_dtype),
               ref_gemm.fp4_gemm(a, a_s, b4, b4_s, sd, out_dtype), f"fp4_gemm {lead} {n} {k} {sd}",
               ref_gemm.fp4_gemm(a, a_s, b4, b4_s, sd, torch.float32))


def test_fp4_gemm_fp16_mma_and_fp32_weight_scales():
    """The FP4 path with fp16 MMA operands (decoded weights in fp16) and with float32 weight scales."""
    a, a_s, _, _, b4, b4_s = _fp8_operands((5,), 200, 256, torch.float32, seed=7)
    expected = ref_gemm.fp4_gemm(a, a_s, b4, b4_s, torch.float32, torch.float32)
    out = tri_gemm.launch_gemm(a, a_s, b4, b4_s, torch.float32, tri_gemm.B_FP4, tri_gemm.INTERPRETER_CONFIG,
                               dot=tl.float16)
    check_gemm(out, expected, "fp4_gemm fp16 MMA")
    s32 = F.e8m0_to_float(b4_s) * 0.75
    check_gemm(tri_gemm.fp4_gemm(a, a_s, b4, s32, torch.float32, torch.float32),
               ref_gemm.fp4_gemm(a, a_s, b4, s32, torch.float32, torch.float32), "fp4_gemm fp32 weight scales")


@pytest.mark.parametrize("split", [2, 3])
def test_split_k_and_tile_order(split):
    a, a_s, b, b_s, b4, b4_s = _fp8_operands((33,), 384, 512, torch.float32, seed=split)
    cfg = replace(tri_gemm.INTERPRETER_CONFIG, block_n=128, group_m=3, split_k=split)
    check_gemm(tri_gemm.launch_gemm(a, a_s, b, b_s, torch.bfloat16, tri_gemm.B_FP8, cfg),
               ref_gemm.fp8_gemm(a, a_s, b, b_s, torch.float32, torch.bfloat16), f"fp8 split {split}",
               ref_gemm.fp8_gemm(a, a_s, b, b_s, torch.float32, torch.float32))
    check_gemm(tri_gemm.launch_gemm(a, a_s, b4, b4_s, torch.float32, tri_gemm.B_FP4, cfg, dot=tl.float32),
               ref_gemm.fp4_gemm(a, a_s, b4, b4_s, torch.float32, torch.float32), f"fp4 split {split}")


def test_gpu_tile_plan():
    """The split-K rule: only when the tile grid leaves most SMs idle, >= 4 K blocks per split."""
    assert tri_gemm._split_for(tiles=128, k_blocks=56, sms=132) == 1
    assert tri_gemm._split_for(tiles=16, k_blocks=32, sms=132) == 8
    assert tri_gemm._split_for(tiles=16, k_blocks=12, sms=132) == 3
    assert tri_gemm._split_for(tiles=4, k_blocks=4, sms=132) == 1


# ============================================================================ grouped GEMM
GROUPS = [[5, 0, 20, 0, 8], [33], [0, 0, 3]]


def _offsets(counts):
    off = torch.zeros(len(counts) + 1, dtype=torch.int64)
    off[1:] = torch.tensor(counts).cumsum(0)
    return off


@pytest.mark.parametrize("counts", GROUPS)
def test_grouped_gemm_quantized(counts):
    e, m, n, k = len(counts), sum(counts), 200, 256
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(e, n, k, generator=g) * 0.05
    off = _offsets(counts)
    for sd, fmt in ((torch.float32, None), (E8M0, "ue8m0")):
        a, a_s = ref_quant.act_quant(x, 128, fmt, sd)
        b, b_s = ref_quant.quant_weight_fp8(w, 128, fmt)
        check_gemm(tri_grouped.grouped_gemm(a, b, off, a_s, b_s, torch.bfloat16),
                   ref_gemm.grouped_gemm(a, b, off, a_s, b_s, torch.bfloat16), f"grouped fp8 {counts} {sd}",
                   ref_gemm.grouped_gemm(a, b, off, a_s, b_s, torch.float32))
    b4, b4_s = ref_quant.quant_weight_fp4(w, 32)
    check_gemm(tri_grouped.grouped_gemm(a, b4, off, a_s, b4_s, torch.float32),
               ref_gemm.grouped_gemm(a, b4, off, a_s, b4_s, torch.float32), f"grouped fp4 {counts}")


@pytest.mark.parametrize("counts", GROUPS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_grouped_gemm_float(counts, dtype):
    e, m, n, k = len(counts), sum(counts), 200, 192
    g = torch.Generator().manual_seed(m + 1)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(e, n, k, generator=g) * 0.1).to(dtype)
    off = _offsets(counts)
    check_gemm(tri_grouped.grouped_gemm(x, w, off, None, None, dtype),
               ref_gemm.grouped_gemm(x, w, off, None, None, dtype), f"grouped {dtype} {counts}",
               ref_gemm.grouped_gemm(x.float(), w.float(), off, None, None, torch.float32))


def test_grouped_gemm_no_rows_and_bad_offsets_dtype():
    x = torch.zeros(0, 128, dtype=torch.float32)
    w = torch.randn(3, 64, 128)
    out = tri_grouped.grouped_gemm(x, w, torch.zeros(4, dtype=torch.int64), None, None, torch.float32)
    assert out.shape == (0, 64)
    with v4hal.use_backend("triton"), pytest.raises(DTypeError, match="group_offsets"):
        v4hal.grouped_gemm(torch.zeros(2, 128), w, torch.tensor([0, 1, 2, 2], dtype=torch.int32))


# ============================================================================ registration
def test_registration_and_requirements(monkeypatch):
    from v4hal.hal import dispatch, registry

    registry.ensure_device_backends("cpu")
    ops = ("act_quant", "act_quant_inplace", "fp4_act_quant", "fp4_act_quant_inplace", "quant_weight_fp8",
           "quant_weight_fp4", "dequant_fp8", "dequant_fp4", "fp8_gemm", "fp4_gemm", "grouped_gemm")
    for op in ops:
        impl = {i.backend: i for i in registry.implementations(op, "cpu")}["triton"]
        assert not impl.auto, op                     # CPU: only when asked for
        cuda = {i.backend: i for i in registry.implementations(op, "cuda")}["triton"]
        assert cuda.auto and cuda.priority == tri_backend.PRIORITY
    x = torch.randn(3, 256)
    fp4 = {i.backend: i for i in registry.implementations("fp4_act_quant", "cpu")}["triton"]
    assert any("power of two" in r for r in fp4.why_not({"x": x, "block_size": 24}))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert any("TRITON_INTERPRET=1" in r for r in fp4.why_not({"x": x, "block_size": 32}))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fp4.why_not({"x": x, "block_size": 32}) == []
    grouped = {i.backend: i for i in registry.implementations("grouped_gemm", "cpu")}["triton"]
    big = torch.empty(tri_grouped.MAX_EXPERTS + 1, 1, 1)
    assert any("E must be <=" in r for r in grouped.why_not({"x": x, "w": big}))

    # the public op, when asked for the Triton backend, runs the Triton kernel: same bits
    with v4hal.use_backend("triton"):
        assert dispatch.select("act_quant", "cpu", {"x": x, "block_size": 128, "scale_fmt": None,
                                                    "scale_dtype": torch.float32}).backend == "triton"
        y, s = v4hal.act_quant(x, 128, scale_dtype=E8M0)
    y_ref, s_ref = ref_quant.act_quant(x, 128, None, E8M0)
    assert_bitwise(y, y_ref, "public act_quant")
    assert_bitwise(s, s_ref, "public act_quant scales")


def test_scaled_mm_path_explains_itself_here():
    """The cuBLASLt path: its requirements say why it does not serve on this machine; the layouts it
    hands to torch._scaled_mm are the ones torch checks; its probe oracle is the contract."""
    from v4hal.hal import registry

    a, a_s, b, b_s, _, _ = _fp8_operands((4,), 256, 512, torch.float32, seed=1)
    args = {"a": a, "a_s": a_s, "b": b, "b_s": b_s, "scale_dtype": torch.float32, "out_dtype": torch.bfloat16}
    if not torch.cuda.is_available():
        assert scaled_mm.PLATFORM.reason(args) is not None
    assert scaled_mm.K_BLOCKS.reason(args) is None and scaled_mm.N_ALIGNED.reason(args) is None
    assert "multiple of 512" in scaled_mm.K_BLOCKS.reason({**args, "a": torch.empty(4, 384, dtype=F.FP8_DTYPE)})
    assert "multiple of 16" in scaled_mm.N_ALIGNED.reason({**args, "b": torch.empty(520, 256, dtype=F.FP8_DTYPE)})
    decl = registry.declarations("cuda")["fp8_gemm"]
    assert decl.fn is scaled_mm.fp8_gemm and decl.requires == scaled_mm.REQUIREMENTS
    assert decl.devices == ("cuda",) and decl.priority == scaled_mm.PRIORITY == 20
    a_c, b_t, sa, sb = scaled_mm._layouts(a, a_s, b, b_s)
    assert sa.shape == (4, 4) and sa.stride() == (1, 4)                  # [M, K/128], M-major
    assert sb.shape == (4, 2) and sb.stride() == (1, 4)                  # ([N/128, K/128] row-major)^T
    assert b_t.shape == (512, 256) and b_t.stride() == (1, 512)          # B column-major
    expected = ref_gemm.fp8_gemm(a, a_s, b, b_s, torch.float32, torch.float32)
    assert calc_diff(scaled_mm._formula(a, a_s, b, b_s), expected) < 1e-12


# ============================================================================ Hopper code generation
def sm90_compile_report() -> list[tuple[str, str]]:
    """Compile the kernels through their real wrappers for sm_90a without a GPU (run in a process
    with the interpreter off): the active driver is a stub, every launch becomes a compile-only
    warmup, the wrappers take their GPU tile configurations. Returns (kernel, PTX features)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver, jit

    from v4hal.backends.triton import moe_permute

    class StubDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    driver.set_active(StubDriver())
    report: list[tuple[str, str]] = []
    original = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        ptx = kernel.asm["ptx"]
        feats = [name for name, pat in (("wgmma", "wgmma.mma_async"), ("mma.sync", "mma.sync"),
                                        ("cvt.e4m3", "cvt.rn.satfinite.e4m3x2"), ("fma", "fma.rn.f32"))
                 if pat in ptx]
        report.append((self.fn.__name__, " ".join(feats)))
        return kernel

    jit.JITFunction.run = compile_only
    for mod in (tri_quant, tri_gemm, tri_grouped, moe_permute):
        for name in ("on_interpreter", "interpreting"):
            if hasattr(mod, name):
                setattr(mod, name, lambda *_: False)
    tri_gemm._num_sms = lambda _device: 132
    assert isinstance(tri_gemm.gemm_kernel, triton.runtime.jit.JITFunction)

    x = torch.randn(64, 512, dtype=torch.bfloat16)
    tri_quant.act_quant(x, 128, "ue8m0", E8M0)
    a, a_s = torch.zeros(64, 512, dtype=F.FP8_DTYPE), torch.ones(64, 4)
    tri_gemm.fp8_gemm(a, a_s, torch.zeros(256, 512, dtype=F.FP8_DTYPE), torch.ones(2, 4))        # 64x64 wgmma
    off = torch.arange(0, 65, 4, dtype=torch.int64)                                              # 16 experts
    w4 = torch.zeros(16, 256, 256, dtype=torch.uint8)
    w4_s = torch.full((16, 256, 16), 127, dtype=torch.uint8).view(E8M0)
    tri_grouped.grouped_gemm(a, w4, off, a_s, w4_s)                                              # 16-row mma.sync
    y = torch.randn(64 * 2, 256, dtype=torch.bfloat16)
    moe_permute.moe_combine(y, torch.rand(64, 2), torch.randperm(128))
    return report


def test_kernels_compile_for_hopper():
    """The compiled (not interpreted) kernels build for sm_90a: FP8 MMA as wgmma (64-row tiles) and
    mma.sync (16-row tiles), hardware e4m3 conversion in act_quant, no FMA contraction in combine."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists() and shutil.which("ptxas") is None:
        pytest.skip("no ptxas in this Triton install: cannot compile for sm_90a here")
    code = ("from tests.triton.test_quant_gemm import sm90_compile_report\n"
            "for name, feats in sm90_compile_report(): print(name, '|', feats)\n")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [tuple(part.strip() for part in line.split("|")) for line in proc.stdout.splitlines() if "|" in line]
    feats = {name: [f for n, f in got if n == name] for name, _ in got}
    assert any("cvt.e4m3" in f for f in feats.get("_fp8_quant_kernel", [])), got
    assert len(feats.get("gemm_kernel", [])) == 2, got
    assert "wgmma" in feats["gemm_kernel"][0] and "mma.sync" in feats["gemm_kernel"][1], got
    assert feats.get("_combine_kernel") and all("fma" not in f for f in feats["_combine_kernel"]), got
