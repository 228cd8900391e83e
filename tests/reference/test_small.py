"""Reference small ops (rms_norm, rotary_emb, hadamard_transform) against float64 formulas."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import v4hal
from tests.numerics import assert_close
from v4hal.backends.reference import small as ref
from v4hal.hal.errors import DTypeError, ShapeError


def sylvester_f64(n: int) -> torch.Tensor:
    """H_1 = [1], H_2n = [[H, H], [H, -H]] in float64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    return h


# ----------------------------------------------------------------------------------------------
# rms_norm
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(7,), (1, 64), (3, 5, 512), (2, 1, 4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_fp32", [True, False])
def test_rms_norm_matches_f64(shape, dtype, weight_fp32) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    w = torch.randn(shape[-1], generator=g).to(torch.float32 if weight_fp32 else dtype)
    eps = 1e-6
    out = ref.rms_norm(x, w, eps)
    assert out.shape == x.shape and out.dtype == dtype
    x64 = x.double()
    expected = w.double() * x64 / torch.sqrt(x64.square().mean(-1, keepdim=True) + eps)
    assert_close(out, expected, dtype)


def test_rms_norm_eps_and_zero_rows() -> None:
    x = torch.zeros(2, 8)
    assert (ref.rms_norm(x, torch.ones(8), 1e-6) == 0).all()
    x = torch.full((1, 4), 1e-3)
    # eps dominates tiny inputs: 1e-3 / sqrt(1e-6 + 1e-2) ~ 1e-2
    assert_close(ref.rms_norm(x, torch.ones(4), 1e-2), torch.full((1, 4), 1e-3 / math.sqrt(1e-6 + 1e-2)))


def _rms_norm_plain(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The formula as it reads, fp32 without rescaling (the squares overflow above ~1.8e19)."""
    xf = x.float()
    inv = xf.square().mean(dim=-1, keepdim=True).add_(torch.tensor(eps, dtype=torch.float32)).rsqrt_()
    return (xf * inv).mul_(weight).to(x.dtype)


LARGE = (1e19, 1e20, 1e25, 1e30, 1e38)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_large_rows_do_not_overflow(dtype) -> None:
    """Every magnitude from 1e19 to the dtype max: a constant row gives +-1; random rows match float64."""
    big = torch.finfo(dtype).max
    mags = [*LARGE, big, -big, 2.0 ** 32, 2.0 ** 64, 2.0 ** 127]
    x = torch.stack([torch.full((256,), m, dtype=torch.float64).to(dtype) for m in mags])
    out = ref.rms_norm(x, torch.ones(256), 1e-6)
    want = torch.tensor([math.copysign(1.0, m) for m in mags]).unsqueeze(1).expand(-1, 256)
    assert torch.equal(out.float(), want), out[:, 0]
    assert not bool(torch.equal(_rms_norm_plain(x[:1], torch.ones(256), 1e-6).float(), want[:1]))  # the overflow
    g = torch.Generator().manual_seed(3)
    for mag in (*LARGE, big / 4):
        xr = (torch.rand(4, 512, generator=g, dtype=torch.float64) * 2 - 1).mul(mag).to(dtype)
        w = torch.randn(512, generator=g)
        x64 = xr.double()
        expected = w.double() * x64 / torch.sqrt(x64.square().mean(-1, keepdim=True) + 1e-6)
        assert_close(ref.rms_norm(xr, w, 1e-6), expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_bits_unchanged_where_the_plain_formula_holds(dtype) -> None:
    """Rows below 2**32 are the plain formula bit for bit; rescaled rows (>= 2**32) that the plain
    formula does not overflow give its bits too (the factor is a power of two)."""
    g = torch.Generator().manual_seed(4)
    mags = [1e-30, 1e-8, 1e-3, 1.0, 3.0, 1e4, 6e4] + ([2.0 ** 32, 1e12, 2.0 ** 50] if dtype != torch.float16 else [])
    for mag in mags:
        for d in (1, 64, 4096):
            big = torch.finfo(dtype).max
            x = (torch.randn(8, d, generator=g, dtype=torch.float64) * mag).clamp(-big, big).to(dtype)
            w = torch.randn(d, generator=g)
            for eps in (1e-6, 1e-2):
                want = _rms_norm_plain(x, w, eps)
                assert bool(torch.isfinite(want).all()) and torch.equal(ref.rms_norm(x, w, eps), want), (mag, d, eps)


def test_rms_norm_nonfinite_rows() -> None:
    """An inf row gives NaN at the inf and 0 elsewhere (as the plain formula); a NaN row is NaN throughout."""
    x = torch.ones(3, 8)
    x[0, 2] = float("inf")
    x[1, 5] = float("nan")
    out = ref.rms_norm(x, torch.ones(8), 1e-6)
    assert bool(out[0, 2].isnan()) and bool((out[0, [0, 1, 3, 4, 5, 6, 7]] == 0).all())
    assert bool(out[1].isnan().all()) and torch.allclose(out[2], torch.ones(8))
    assert torch.equal(out.isnan(), _rms_norm_plain(x, torch.ones(8), 1e-6).isnan())


def test_rms_norm_rejects_bad_weight() -> None:
    with pytest.raises(ShapeError, match="weight"):
        v4hal.rms_norm(torch.randn(2, 8), torch.ones(4))


# ----------------------------------------------------------------------------------------------
# rotary_emb
# ----------------------------------------------------------------------------------------------

def make_freqs(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(*shape, generator=g) * 2 * math.pi * 50
    return torch.polar(torch.ones_like(angle), angle)                      # complex64


def rotary_f64(x: torch.Tensor, freqs: torch.Tensor, inverse: bool) -> torch.Tensor:
    """(x0, x1) -> (x0 c - x1 s, x0 s + x1 c) per interleaved pair, s negated when inverse."""
    b, s = x.shape[:2]
    f = freqs if freqs.dim() == 3 else freqs.unsqueeze(0).expand(b, -1, -1)
    if x.dim() == 4:
        f = f.unsqueeze(2)
    c, sn = f.real.double(), f.imag.double()
    if inverse:
        sn = -sn
    x0, x1 = x[..., 0::2].double(), x[..., 1::2].double()
    out = torch.empty(x.shape, dtype=torch.float64)
    out[..., 0::2] = x0 * c - x1 * sn
    out[..., 1::2] = x0 * sn + x1 * c
    return out


@pytest.mark.parametrize("x_shape,f_shape", [
    ((2, 5, 64), (5, 32)),
    ((2, 5, 3, 64), (5, 32)),
    ((2, 5, 3, 64), (2, 5, 32)),
    ((3, 7, 16), (3, 7, 8)),
    ((1, 1, 16, 64), (1, 32)),               # decode
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inverse", [False, True])
def test_rotary_matches_f64(x_shape, f_shape, dtype, inverse) -> None:
    g = torch.Generator().manual_seed(len(x_shape) * 100 + len(f_shape))
    x = torch.randn(*x_shape, generator=g).to(dtype)
    freqs = make_freqs(f_shape, seed=sum(f_shape))
    out = ref.rotary_emb(x, freqs, inverse)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, rotary_f64(x, freqs, inverse), dtype)


def test_rotary_heads_share_position_frequencies() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 8, generator=g)
    freqs = make_freqs((2, 4, 4), seed=2)
    out = ref.rotary_emb(x, freqs)
    for h in range(3):
        assert_close(out[:, :, h], ref.rotary_emb(x[:, :, h].contiguous(), freqs))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(1, 6), st.sampled_from([0, 1, 4]),
       st.sampled_from([2, 16, 64]), st.booleans())
def test_prop_rotary_inverse_undoes_forward(seed, b, s, h, rd, per_batch) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*((b, s, h, rd) if h else (b, s, rd)), generator=g)
    freqs = make_freqs((b, s, rd // 2) if per_batch else (s, rd // 2), seed=seed + 1)
    y = ref.rotary_emb(x, freqs)
    assert_close(ref.rotary_emb(y, freqs, inverse=True), x, torch.float32)
    # a rotation keeps each pair's length
    assert_close(y.unflatten(-1, (-1, 2)).norm(dim=-1), x.unflatten(-1, (-1, 2)).norm(dim=-1), torch.float32)


def test_rotary_rejects_bad_inputs() -> None:
    x = torch.randn(2, 5, 8)
    with pytest.raises(ShapeError, match="freqs_cis"):
        v4hal.rotary_emb(x, make_freqs((4, 4), 0))
    with pytest.raises(ShapeError, match="even"):
        v4hal.rotary_emb(torch.randn(2, 5, 7), make_freqs((5, 3), 0))
    with pytest.raises(DTypeError, match="complex64"):
        v4hal.rotary_emb(x, torch.ones(5, 4))
    with pytest.raises(ShapeError, match="x must be"):
        v4hal.rotary_emb(torch.randn(5, 8), make_freqs((5, 4), 0))


# ----------------------------------------------------------------------------------------------
# hadamard_transform
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [1, 2, 4, 8, 64, 128, 512])
def test_hadamard_is_orthonormal(dim) -> None:
    m = ref.hadamard_transform(torch.eye(dim))                             # rows: H / sqrt(D)
    assert_close(m.double() @ m.double(), torch.eye(dim, dtype=torch.float64), atol=1e-6, rtol=0)
    assert_close(m.double(), m.double().T, torch.float32)                  # symmetric


@pytest.mark.parametrize("dim", [1, 2, 16, 128, 512])
@pytest.mark.parametrize("lead", [(), (1,), (3, 5)])
def test_hadamard_matches_sylvester_f64(dim, lead) -> None:
    g = torch.Generator().manual_seed(dim + len(lead))
    x = torch.randn(*lead, dim, generator=g)
    h = sylvester_f64(dim)
    assert_close(ref.hadamard_transform(x), x.double() @ h * dim ** -0.5, torch.float32)
    assert_close(ref.hadamard_transform(x, 1.0), x.double() @ h, atol=1e-5 * math.sqrt(dim), rtol=1e-5)
    assert_close(ref.hadamard_transform(x, 0.25), x.double() @ h * 0.25, atol=1e-5 * math.sqrt(dim), rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hadamard_low_precision(dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 128, generator=g).to(dtype)
    out = ref.hadamard_transform(x)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, x.double() @ sylvester_f64(128) / math.sqrt(128), dtype)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(0, 9))
def test_prop_hadamard_keeps_norm_and_is_an_involution(seed, log_dim) -> None:
    dim = 1 << log_dim
    x = torch.randn(3, dim, generator=torch.Generator().manual_seed(seed))
    y = ref.hadamard_transform(x)
    assert_close(y.norm(dim=-1), x.norm(dim=-1), torch.float32)
    assert_close(ref.hadamard_transform(y), x, torch.float32)


def test_hadamard_rejects_non_power_of_two() -> None:
    for dim in (3, 48, 0):
        with pytest.raises(ShapeError, match="power of two"):
            v4hal.hadamard_transform(torch.randn(2, dim))
