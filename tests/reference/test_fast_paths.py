"""The reference backend's CPU fast paths against the plain formulations they replace, bit for bit.

The reference is the oracle, so its speedups must not move a single bit: each test below writes
the straightforward version of a computation (torch's own casts, Python-number operands,
out-of-place steps, one GEMM call per weight) and asserts ``torch.equal`` on the raw bits,
NaN payloads included, against the fast path.
"""
from __future__ import annotations

import pytest
import torch

from tests.numerics import bits
from v4hal.backends.reference import gemm as G
from v4hal.backends.reference import mhc as M
from v4hal.backends.reference import quant as Q
from v4hal.backends.reference import small as S
from v4hal.backends.reference._rows import ROW_TILE
from v4hal.hal import formats as F
from v4hal.hal.errors import DTypeError, RangeError

FP8 = torch.float8_e4m3fn
E8M0 = torch.float8_e8m0fnu


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def random_f32_bits(n: int, seed: int) -> torch.Tensor:
    """n fp32 values with uniformly random bit patterns (NaNs, infs, subnormals, both signs) plus edges."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(-2**31, 2**31 - 1, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    edges = torch.tensor([0, 1, 0x7FFFFF, 0x800000, 0x800001, 0x7F7FFFFF, 0x7F800000, 0x7F800001, 0x7FC00000,
                          -1, -2**31, 0x3F800000, 0x3F800001, 0x00400000], dtype=torch.int32)
    return torch.cat([raw, edges]).view(torch.float32)


# ------------------------------------------------------------------ format conversions
@pytest.mark.parametrize("shape", [(256,), (5000,), (3, 128, 256), (7, 33), ()])
def test_fp8_to_float_is_torchs_cast(shape) -> None:
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 256, shape, generator=g, dtype=torch.int32).to(torch.uint8)
    y = codes.view(FP8)
    assert same_bits(F.fp8_to_float(y), y.float())
    every = torch.arange(256, dtype=torch.uint8).repeat(16).view(FP8)      # above the table threshold
    assert same_bits(F.fp8_to_float(every), every.float())
    strided = every.view(64, 64).t()                                        # not contiguous: torch's cast
    out = F.fp8_to_float(strided)
    assert same_bits(out, strided.float()) and out.stride() == strided.float().stride()
    with pytest.raises(DTypeError, match="float8_e4m3fn"):
        F.fp8_to_float(torch.zeros(4))


def test_e8m0_and_e2m1_tables_are_the_bit_formulas() -> None:
    b = torch.arange(256, dtype=torch.uint8)
    assert same_bits(F.e8m0_to_float(b), F._e8m0_bits_to_float(b))
    assert same_bits(F.e8m0_to_float(b.view(E8M0).view(16, 16).t()), F._e8m0_bits_to_float(b.view(16, 16).t()))
    codes = torch.randint(0, 256, (9, 40), dtype=torch.int32).to(torch.uint8)
    table = torch.tensor(F.E2M1_VALUES, dtype=torch.float32)
    assert same_bits(F.e2m1_decode(codes), table[(codes & 0xF).long()])
    # e2m1 rounding: threshold counting on 0-d tensor operands against Python-number compares
    v = torch.cat([random_f32_bits(20_000, seed=8) * 1e-37, torch.linspace(-7, 7, 2801),
                   torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.0, float("nan"), float("-inf")])])
    a = v.abs()
    mag = torch.zeros(a.shape, dtype=torch.uint8)
    for threshold, tie_up in F._E2M1_THRESHOLDS:
        mag += (a >= threshold if tie_up else a > threshold).to(torch.uint8)
    mag = torch.where(torch.isnan(a), torch.full_like(mag, 7), mag)
    assert same_bits(F.e2m1_encode(v), mag | (torch.signbit(v).to(torch.uint8) << 3))


def test_block_scales_are_the_plain_rule() -> None:
    amax = random_f32_bits(200_000, seed=2)
    for pow2 in (False, True):
        plain = torch.maximum(amax, torch.tensor(F.FP8_AMAX_FLOOR)) * torch.tensor(F.FP8_MAX_INV)
        want = F.pow2_ceil(plain) if pow2 else plain
        assert same_bits(F.fp8_block_scale(amax, pow2), want)
    plain4 = torch.maximum(amax, torch.tensor(F.FP4_AMAX_FLOOR)) * torch.tensor(F.FP4_MAX_INV)
    assert same_bits(F.fp4_block_scale(amax), F.pow2_ceil(plain4))
    finite = amax[torch.isfinite(amax)]
    for s in (F.fp8_block_scale(finite, True), F.fp4_block_scale(finite)):
        assert same_bits(F.block_scale_to_e8m0(s), F.float_to_e8m0(s))
    for bad in (float("inf"), float("nan")):
        with pytest.raises(RangeError, match="powers of two"):
            F.block_scale_to_e8m0(F.fp8_block_scale(torch.tensor([1.0, bad]), True))


def test_operand_is_the_python_number() -> None:
    big = random_f32_bits(50_000, seed=3)
    for x in (big, big[:5]):                 # vectorized loop and short tail
        for value in (1e-6, 2.0, 1 / 448, 0.1234567891234, -3.5e-41, 1e38, -0.0):
            op = F.operand(value, x)
            assert same_bits(x + value, x + op) and same_bits(x * value, x * op) and same_bits(x / value, x / op)
            assert same_bits(x.clone().add_(value), x.clone().add_(op))
            assert same_bits(x > value, x > op) and same_bits(x >= value, x >= op)
    x = big
    i = x.view(torch.int32)
    assert same_bits(i + 0x7FFFFF, i + F.operand(0x7FFFFF, i))
    assert same_bits(i & 0x7F800000, i & F.operand(0x7F800000, i))
    assert same_bits(i >> 23, i >> F.operand(23, i))
    assert F.operand(1.5, torch.zeros(2, device="meta")) == 1.5          # off the CPU: the number itself
    with pytest.raises(DTypeError):
        F.operand(1.0, torch.zeros(2, dtype=torch.bfloat16))


# ------------------------------------------------------------------ ops against their plain forms
def plain_act_quant(x: torch.Tensor, bs: int, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    xb = x.float().unflatten(-1, (-1, bs))
    s = torch.maximum(xb.abs().amax(-1), torch.tensor(F.FP8_AMAX_FLOOR)) * torch.tensor(F.FP8_MAX_INV)
    s = F.pow2_ceil(s) if pow2 else s
    bad = ~torch.isfinite(xb).all(-1)                     # docs/ops.md: NaN scale and payload for inf/NaN blocks
    s = torch.where(bad, torch.tensor(float("nan")), s)
    y = torch.where(bad.unsqueeze(-1), torch.tensor(float("nan")), (xb / s.unsqueeze(-1)).clamp(-448.0, 448.0))
    return y.to(FP8).flatten(-2), s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_quant_matches_plain_form(dtype) -> None:
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(6, 512, generator=g) * torch.logspace(-6, 4, 512)).to(dtype)
    x[0, :128] = 0
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    for fmt, sd in ((None, torch.float32), ("ue8m0", torch.float32)):
        y, s = Q.act_quant(x, 128, fmt, sd)
        py, ps = plain_act_quant(x, 128, fmt is not None)
        assert same_bits(y, py) and same_bits(s, ps)
    clean = x.nan_to_num(0.0, 1.0, -1.0)
    y, s = Q.act_quant(clean, 128, "ue8m0", E8M0)
    py, ps = plain_act_quant(clean, 128, True)
    assert same_bits(y, py) and same_bits(s, F.float_to_e8m0(ps))
    inplace = clean.clone()
    Q.act_quant_inplace(inplace, 64, "ue8m0")
    py, ps = plain_act_quant(clean, 64, True)
    want = (py.float().unflatten(-1, (-1, 64)) * ps.unsqueeze(-1)).flatten(-2).to(dtype)
    assert same_bits(inplace, want)


def test_fp8_gemm_matches_plain_form() -> None:
    g = torch.Generator().manual_seed(5)
    for m, n, k in ((1, 768, 128), (3, 300, 384), (64, 256, 256)):
        a, a_s = Q.act_quant(torch.randn(m, k, generator=g), 128, "ue8m0", E8M0)
        b, b_s = Q.quant_weight_fp8(torch.randn(n, k, generator=g) * 0.05, 128, "ue8m0")
        sa, sb = a_s.float(), b_s.float().repeat_interleave(128, 0)[:n]
        acc = torch.zeros(m, n)
        rows = torch.cat([a.float(), torch.zeros(-m % ROW_TILE, k)])     # rows padded: row-invariant bits
        for kb in range(k // 128):
            sl = slice(kb * 128, (kb + 1) * 128)
            acc += (rows[:, sl] @ b.float()[:, sl].T)[:m] * (sa[:, kb:kb + 1] * sb[:, kb])
        assert same_bits(G.fp8_gemm(a, a_s, b, b_s, E8M0, torch.float32), acc)


def test_grouped_gemm_shared_and_single_group_paths_agree() -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(9, 256, generator=g)
    xq, xs = Q.act_quant(x, 128, "ue8m0", E8M0)
    w1, s1 = Q.quant_weight_fp8(torch.randn(5, 128, 256, generator=g) * 0.05, 128, "ue8m0")
    w3, s3 = Q.quant_weight_fp8(torch.randn(5, 128, 256, generator=g) * 0.05, 128, "ue8m0")
    # group sizes 0, 1, 3, 4, 1: an empty expert, two size classes, padding in the class of 3 and 4
    offs = torch.tensor([0, 0, 1, 4, 8, 9])
    both = G.grouped_gemms(xq, [(w1, s1), (w3, s3)], offs, xs, torch.float32)
    assert same_bits(both[0], G.grouped_gemm(xq, w1, offs, xs, s1, torch.float32))
    assert same_bits(both[1], G.grouped_gemm(xq, w3, offs, xs, s3, torch.float32))
    # E == 1 takes its own path; E == 2 with an empty second group runs the general driver
    wf = torch.randn(2, 64, 256, generator=g)
    one = G.grouped_gemm(x, wf[:1], torch.tensor([0, 9]), out_dtype=torch.float32)
    two = G.grouped_gemm(x, wf, torch.tensor([0, 9, 9]), out_dtype=torch.float32)
    assert same_bits(one, two)


def test_mhc_and_rms_norm_match_plain_forms() -> None:
    g = torch.Generator().manual_seed(7)
    for lead in ((1, 1), (2, 33)):
        mixes = torch.randn(*lead, 24, generator=g)
        scale, base = torch.randn(3, generator=g), torch.randn(24, generator=g)
        # sigmoid in float64, rounded once (the same bits wherever an element sits in the tensor)
        pre = torch.sigmoid((mixes[..., :4] * scale[0] + base[:4]).double()).float() + 1e-6
        post = 2 * torch.sigmoid((mixes[..., 4:8] * scale[1] + base[4:8]).double()).float()
        comb = torch.softmax((mixes[..., 8:] * scale[2] + base[8:]).unflatten(-1, (4, 4)), dim=-1) + 1e-6
        comb = comb / (comb.sum(dim=-2, keepdim=True) + 1e-6)
        for _ in range(19):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + 1e-6)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + 1e-6)
        got = M.hc_split_sinkhorn(mixes, scale, base, 4, 20, 1e-6)
        assert all(same_bits(a, b) for a, b in zip(got, (pre, post, comb)))

        x = torch.randn(*lead, 256, generator=g).bfloat16()
        res = torch.randn(*lead, 4, 256, generator=g).bfloat16()
        p, c = got[1], got[2]
        mixed = c[..., 0, :].unsqueeze(-1) * res.float()[..., 0:1, :]
        for j in range(1, 4):
            mixed = mixed + c[..., j, :].unsqueeze(-1) * res.float()[..., j:j + 1, :]
        want = (p.unsqueeze(-1) * x.float().unsqueeze(-2) + mixed).to(torch.bfloat16)
        assert same_bits(M.hc_post(x, res, p, c), want)

        for w in (torch.randn(256, generator=g), torch.randn(256, generator=g).bfloat16()):
            xf = x.float()
            want = (w.float() * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6))).to(x.dtype)
            assert same_bits(S.rms_norm(x, w, 1e-6), want)
