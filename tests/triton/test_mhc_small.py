"""Triton mHC kernels (hc_split_sinkhorn, hc_pre, hc_post, hc_head) and small ops (rms_norm,
hadamard_transform, rotary_emb) against the reference backend; outputs start poisoned (NaN).

16-bit outputs (bf16 and fp16 alike) must be correctly rounded: within half an ulp of the exact
result (the reference on the same values in fp32) and within one ulp of the reference's own
output, differing from it on at most 1% of the elements (a truncating cast misses on ~half)."""
from __future__ import annotations

import pytest
import torch

import v4hal
from tests.numerics import assert_close, poison_like
from tests.triton.rounding import assert_matches_rounded_reference, assert_rounded
from v4hal.backends.reference import mhc as ref_mhc
from v4hal.backends.reference import small as ref_small
from v4hal.backends.triton import mhc, small
from v4hal.hal.errors import BackendUnavailableError, ShapeError

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check(got: torch.Tensor, expected: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype,
          atol: float | None = None) -> None:
    """``assert_close`` at ``dtype``'s tolerance; for 16-bit outputs also correct rounding of ``exact``
    (the reference computed on fp32 copies of the same inputs)."""
    assert_close(got, expected, dtype, atol=atol)
    if dtype != torch.float32:
        assert_rounded(got, exact, what=f"{dtype}")
        assert_matches_rounded_reference(got, expected, what=f"{dtype}")


def make_hc(lead: tuple[int, ...], hc: int, dim: int, dtype: torch.dtype, seed: int, head: bool = False):
    g = _gen(seed)
    mix = hc if head else (2 + hc) * hc
    x = torch.randn(*lead, hc, dim, generator=g).to(dtype)
    fn = torch.randn(mix, hc * dim, generator=g) * (hc * dim) ** -0.5
    scale = torch.randn(1 if head else 3, generator=g)
    base = torch.randn(mix, generator=g)
    return x, fn, scale, base


# ---------------------------------------------------------------------------------------------
# mHC


@pytest.mark.parametrize("lead,hc,iters", [((1,), 4, 20), ((3, 5), 4, 20), ((7,), 3, 5), ((2,), 1, 1), ((33,), 4, 2)])
def test_hc_split_sinkhorn(lead, hc, iters) -> None:
    g = _gen(hc * 100 + iters)
    mix = (2 + hc) * hc
    mixes = torch.randn(*lead, mix, generator=g) * 3
    scale, base = torch.randn(3, generator=g), torch.randn(mix, generator=g)
    outs = tuple(poison_like(torch.empty(*lead, *s)) for s in ((hc,), (hc,), (hc, hc)))
    got = mhc.hc_split_sinkhorn_into(outs, mixes, scale, base, hc, iters, 1e-6)
    exp = ref_mhc.hc_split_sinkhorn(mixes, scale, base, hc, iters, 1e-6)
    for a, e in zip(got, exp):
        assert_close(a, e, torch.float32)


@pytest.mark.parametrize("lead,hc,dim,dtype", [
    ((1,), 4, 64, torch.float32),        # decode: one token; hc*D = 256 -> 2 K splits
    ((2, 3), 4, 40, torch.float32),      # D not a power of two
    ((5,), 4, 512, torch.float16),       # 2048-wide rows: 8 K splits, 8 D blocks
    ((17,), 4, 96, torch.bfloat16),      # more tokens than one block
    ((3,), 2, 48, torch.float32),        # hc != 4
])
def test_hc_pre(lead, hc, dim, dtype) -> None:
    x, fn, scale, base = make_hc(lead, hc, dim, dtype, seed=dim + hc)
    outs = (poison_like(torch.empty(*lead, dim, dtype=dtype)), poison_like(torch.empty(*lead, hc)),
            poison_like(torch.empty(*lead, hc, hc)))
    y, post, comb = mhc.hc_pre_into(outs, x, fn, scale, base, 1e-6, hc, 20, 1e-6)
    ey, epost, ecomb = ref_mhc.hc_pre(x, fn, scale, base, 1e-6, hc, 20, 1e-6)
    check(y, ey, ref_mhc.hc_pre(x.float(), fn, scale, base, 1e-6, hc, 20, 1e-6)[0], dtype)
    # mixes go through an fp32 MMA with a different summation order: a few fp32 ulps of the logits
    assert_close(post, epost, torch.float32, atol=2e-5, rtol=2e-5)
    assert_close(comb, ecomb, torch.float32, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("lead,hc,dim,dtype", [((1,), 4, 64, torch.bfloat16), ((2, 3), 4, 40, torch.float32),
                                               ((17,), 3, 96, torch.float16), ((5,), 4, 512, torch.bfloat16)])
def test_hc_mix_and_hc_collapse_are_hc_pre_bit_for_bit(lead, hc, dim, dtype) -> None:
    """V4.1's lagged mHC pieces: hc_mix gives hc_pre's (pre, post, comb) bits, hc_collapse with that pre its y;
    against the reference within fp32 ulps (the MMA's summation order), the collapse correctly rounded."""
    x, fn, scale, base = make_hc(lead, hc, dim, dtype, seed=dim + 7 * hc)
    y, post, comb = mhc.hc_pre(x, fn, scale, base, 1e-6, hc, 20, 1e-6)
    pre, post2, comb2 = mhc.hc_mix(x, fn, scale, base, 1e-6, hc, 20, 1e-6)
    assert torch.equal(post2, post) and torch.equal(comb2, comb)
    assert torch.equal(mhc.hc_collapse(x, pre), y)
    epre, epost, ecomb = ref_mhc.hc_mix(x, fn, scale, base, 1e-6, hc, 20, 1e-6)
    for a, e in ((pre, epre), (post2, epost), (comb2, ecomb)):
        assert_close(a, e, torch.float32, atol=2e-5, rtol=2e-5)
    check(mhc.hc_collapse(x, epre), ref_mhc.hc_collapse(x, epre), ref_mhc.hc_collapse(x.float(), epre), dtype)


@pytest.mark.parametrize("lead,hc,dim,dtype", [((1,), 4, 64, torch.float32), ((2, 3), 4, 72, torch.bfloat16),
                                               ((4,), 3, 32, torch.float16)])
def test_hc_head(lead, hc, dim, dtype) -> None:
    x, fn, scale, base = make_hc(lead, hc, dim, dtype, seed=3 * dim, head=True)
    y = poison_like(torch.empty(*lead, dim, dtype=dtype))
    assert mhc.hc_head_into(y, x, fn, scale, base, 1e-6, 1e-6) is y
    check(y, ref_mhc.hc_head(x, fn, scale, base, 1e-6, 1e-6), ref_mhc.hc_head(x.float(), fn, scale, base, 1e-6, 1e-6),
          dtype)


@pytest.mark.parametrize("lead,hc,dim,dtype", [((1,), 4, 64, torch.float32), ((2, 3), 4, 300, torch.bfloat16),
                                               ((5,), 3, 33, torch.float16)])
def test_hc_post(lead, hc, dim, dtype) -> None:
    g = _gen(dim)
    x = torch.randn(*lead, dim, generator=g).to(dtype)
    res = torch.randn(*lead, hc, dim, generator=g).to(dtype)
    post = torch.rand(*lead, hc, generator=g) * 2
    comb = torch.softmax(torch.randn(*lead, hc, hc, generator=g), dim=-1)
    out = poison_like(res)
    assert mhc.hc_post_into(out, x, res, post, comb) is out
    check(out, ref_mhc.hc_post(x, res, post, comb), ref_mhc.hc_post(x.float(), res.float(), post, comb), dtype)


def test_hc_pre_checks_shapes() -> None:
    x, fn, scale, base = make_hc((2,), 4, 32, torch.float32, seed=0)
    with v4hal.use_backend("triton"), pytest.raises(ShapeError, match="hc_fn"):
        v4hal.hc_pre(x, fn[:, :-1], scale, base)


# ---------------------------------------------------------------------------------------------
# small ops


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 64), (2, 1000), (1, 3000)])
def test_rms_norm(shape, dtype) -> None:
    g = _gen(shape[-1])
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    w = torch.randn(shape[-1], generator=g)
    for weight in (w, w.to(dtype)):
        out = poison_like(x)
        small.rms_norm_into(out, x, weight, 1e-6)
        check(out, ref_small.rms_norm(x, weight, 1e-6), ref_small.rms_norm(x.float(), weight.float(), 1e-6), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [256, 3000])
def test_rms_norm_large_rows(d, dtype) -> None:
    """Magnitudes 1e19 .. the dtype max (one-block and multi-block rows): the squares do not overflow,
    a constant row gives +-1, random rows match the reference; inf / NaN rows as the reference."""
    big = torch.finfo(dtype).max
    mags = [1e19, 1e25, 1e30, 1e38, big, -big, 2.0 ** 32, 2.0 ** 127]
    x = torch.stack([torch.full((d,), m, dtype=torch.float64).to(dtype) for m in mags])
    out = poison_like(x)
    small.rms_norm_into(out, x, torch.ones(d), 1e-6)
    want = torch.tensor([1.0 if m > 0 else -1.0 for m in mags]).unsqueeze(1).expand(-1, d)
    assert bool(((out.float() - want).abs() <= 1e-6).all()), out[:, 0]       # fp32: a few ulps; bf16: exact
    g = _gen(d)
    xr = ((torch.rand(len(mags), d, generator=g, dtype=torch.float64) * 2 - 1)
          * torch.tensor(mags, dtype=torch.float64).abs().unsqueeze(1)).to(dtype)
    xr[-2, 7] = float("inf")
    xr[-1, 9] = float("nan")
    w = torch.randn(d, generator=g)
    out = poison_like(xr)
    small.rms_norm_into(out, xr, w, 1e-6)
    expected = ref_small.rms_norm(xr, w, 1e-6)
    assert torch.equal(out.isnan(), expected.isnan()) and bool(out[-1].isnan().all())
    check(out[:-2], expected[:-2], ref_small.rms_norm(xr[:-2].float(), w, 1e-6), dtype)
    assert torch.equal(out[-2].nan_to_num(), expected[-2].nan_to_num())


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("d", [1, 2, 16, 128, 256, 1024, 8192])
def test_hadamard_transform(d, dtype) -> None:
    g = _gen(d)
    x = torch.randn(3, 2, d, generator=g).to(dtype)
    out = poison_like(x)
    small.hadamard_transform_into(out, x)
    for got, exp, exact in ((out, ref_small.hadamard_transform(x), ref_small.hadamard_transform(x.float())),
                            (small.hadamard_transform(x, 0.5), ref_small.hadamard_transform(x, 0.5),
                             ref_small.hadamard_transform(x.float(), 0.5))):
        # a D-term sum in another order: fp32 rounding grows with the output's magnitude
        atol = 1e-5 + 1e-6 * float(exp.float().abs().max()) if dtype == torch.float32 else None
        check(got, exp, exact, dtype, atol=atol)


def test_hadamard_is_its_own_inverse() -> None:
    x = torch.randn(4, 512, generator=_gen(1))
    assert_close(small.hadamard_transform(small.hadamard_transform(x)), x, torch.float32, atol=1e-5, rtol=1e-5)


def test_hadamard_limits() -> None:
    """A D that is not a power of two is an invalid call; D above the kernel's limit is a valid call the
    Triton backend refuses when asked for."""
    with v4hal.use_backend("triton"):
        with pytest.raises(ShapeError, match="power of two"):
            v4hal.hadamard_transform(torch.zeros(2, 24))
        with pytest.raises(BackendUnavailableError, match="<= 16384"):
            v4hal.hadamard_transform(torch.zeros(1, 32768))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("xshape,fshape", [((2, 3, 16), (3, 8)), ((2, 3, 5, 64), (2, 3, 32)), ((1, 4, 3, 6), (4, 3))])
def test_rotary_emb(xshape, fshape, dtype) -> None:
    g = _gen(xshape[-1])
    x = torch.randn(*xshape, generator=g).to(dtype)
    f = torch.polar(torch.ones(fshape), torch.randn(fshape, generator=g) * 3)
    for inverse in (False, True):
        out = poison_like(x)
        small.rotary_emb_into(out, x, f, inverse)
        check(out, ref_small.rotary_emb(x, f, inverse), ref_small.rotary_emb(x.float(), f, inverse), dtype)
    back = small.rotary_emb(small.rotary_emb(x.float(), f), f, inverse=True)
    assert_close(back, x.float(), torch.float32, atol=1e-5, rtol=1e-5)
