"""Reference mHC ops (hc_split_sinkhorn, hc_pre, hc_post, hc_head) against independent float64 formulas.

The expectations follow V4_OPS.md section 7 and the public ``Block.hc_pre``/``hc_post``,
``ParallelHead.hc_head`` and ``kernel.py`` ``hc_split_sinkhorn``, written here as scalar
float64 loops (``math``) so they share no code with the implementation.
"""
from __future__ import annotations

import math

import pytest
import torch

from v4hal.backends.reference.mhc import hc_head, hc_post, hc_pre, hc_split_sinkhorn
from v4hal.hal.errors import DTypeError, RangeError, ShapeError

try:
    from tests.numerics import assert_close, calc_diff
except ImportError:  # pytest put tests/ itself on sys.path
    from numerics import assert_close, calc_diff

FP32_TOL = dict(atol=2e-6, rtol=2e-6)  # pre/post/comb: fp32 math against float64


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))


def _split64(m: list[float], scale: list[float], base: list[float], hc: int, iters: int, eps: float):
    """Scalar float64 hc_split_sinkhorn of one token's mixes: (pre, post, comb[j][k])."""
    pre = [_sigmoid(m[j] * scale[0] + base[j]) + eps for j in range(hc)]
    post = [2.0 * _sigmoid(m[hc + j] * scale[1] + base[hc + j]) for j in range(hc)]
    c = [[m[2 * hc + j * hc + k] * scale[2] + base[2 * hc + j * hc + k] for k in range(hc)] for j in range(hc)]
    for j in range(hc):  # softmax over k, then + eps
        top = max(c[j])
        ex = [math.exp(v - top) for v in c[j]]
        c[j] = [v / sum(ex) + eps for v in ex]

    def cols() -> None:
        sums = [sum(c[j][k] for j in range(hc)) for k in range(hc)]
        for j in range(hc):
            c[j] = [c[j][k] / (sums[k] + eps) for k in range(hc)]

    def rows() -> None:
        for j in range(hc):
            s = sum(c[j])
            c[j] = [v / (s + eps) for v in c[j]]

    cols()
    for _ in range(iters - 1):
        rows()
        cols()
    return pre, post, c


def _mixes64(xt: torch.Tensor, hc_fn: torch.Tensor, norm_eps: float) -> list[float]:
    """One token: x [hc, D] -> float64 mixes, RMS factor over all hc*D values applied after the GEMM."""
    flat = xt.double().flatten().tolist()
    r = 1.0 / math.sqrt(sum(v * v for v in flat) / len(flat) + norm_eps)
    fn = hc_fn.double()
    return [float(fn[i] @ torch.tensor(flat, dtype=torch.float64)) * r for i in range(fn.shape[0])]


def _assert_rounded_once(actual: torch.Tensor, expected64: torch.Tensor) -> None:
    """A 16-bit output of fp32 math equals the float64 value rounded once to its dtype, except at
    near-ties (off by one unit in the last place): catches intermediate roundings to 16 bits."""
    if actual.dtype not in (torch.bfloat16, torch.float16) or actual.numel() == 0:
        return
    rounded = expected64.to(actual.dtype)
    off = actual != rounded
    assert float(off.double().mean()) <= 2e-3, f"{int(off.sum())} of {off.numel()} elements not rounded once"
    ulp = 2.0 ** -7 if actual.dtype == torch.bfloat16 else 2.0 ** -10
    assert bool(((actual.double() - expected64).abs() <= expected64.abs() * ulp + 1e-30).all())


def _weighted_rows64(xt: torch.Tensor, coef: list[float]) -> torch.Tensor:
    acc = torch.zeros(xt.shape[-1], dtype=torch.float64)
    for j, c in enumerate(coef):
        acc += c * xt[j].double()
    return acc


def _params(hc: int, dim: int, seed: int, head: bool = False):
    g = torch.Generator().manual_seed(seed)
    rows = hc if head else (2 + hc) * hc
    hc_fn = torch.randn(rows, hc * dim, generator=g) / math.sqrt(hc * dim)
    hc_scale = torch.rand(1 if head else 3, generator=g) + 0.5
    hc_base = torch.randn(rows, generator=g) * 0.5
    return g, hc_fn, hc_scale, hc_base


LEADS = [(), (0,), (1,), (5,), (2, 3)]


@pytest.mark.parametrize("hc", [1, 2, 4])
@pytest.mark.parametrize("iters", [1, 3, 20])
@pytest.mark.parametrize("lead", [(0,), (7,), (2, 3)])
@pytest.mark.parametrize("eps", [1e-6, 0.1])  # a large eps makes its placement visible
def test_hc_split_sinkhorn_vs_float64(hc, iters, lead, eps) -> None:
    g = torch.Generator().manual_seed(hc * 100 + iters)
    mix = (2 + hc) * hc
    mixes = torch.randn(*lead, mix, generator=g) * 2
    scale = torch.rand(3, generator=g) + 0.5
    base = torch.randn(mix, generator=g)
    pre, post, comb = hc_split_sinkhorn(mixes, scale, base, hc, iters, eps)
    assert pre.dtype == post.dtype == comb.dtype == torch.float32
    assert pre.shape == lead + (hc,) and post.shape == lead + (hc,) and comb.shape == lead + (hc, hc)
    exp = [_split64(m, scale.tolist(), base.tolist(), hc, iters, eps) for m in mixes.reshape(-1, mix).tolist()]
    if exp:
        assert_close(pre, torch.tensor([e[0] for e in exp], dtype=torch.float64).reshape(pre.shape), **FP32_TOL)
        assert_close(post, torch.tensor([e[1] for e in exp], dtype=torch.float64).reshape(post.shape), **FP32_TOL)
        assert_close(comb, torch.tensor([e[2] for e in exp], dtype=torch.float64).reshape(comb.shape), **FP32_TOL)


def test_hc_split_sinkhorn_doubly_stochastic_and_ranges() -> None:
    g = torch.Generator().manual_seed(11)
    hc, mix = 4, 24
    # comb logits of std ~0.6 (RMS-normalised mixes times a moderate scale): Sinkhorn converges in
    # 20 rounds to fp32 precision. Much peakier logits (std >= 2) converge slower (rows off by ~1e-2).
    mixes = torch.randn(256, mix, generator=g) * 3
    scale = torch.tensor([1.0, 1.0, 0.2])
    base = torch.randn(mix, generator=g) * 0.25
    pre, post, comb = hc_split_sinkhorn(mixes, scale, base, hc, 20, 1e-6)
    col = comb.double().sum(-2)
    row = comb.double().sum(-1)
    assert float((col - 1).abs().max()) < 1e-5  # the last step normalises columns
    assert float((row - 1).abs().max()) < 1e-4  # rows converge geometrically
    assert bool((comb > 0).all())
    assert bool((pre > 0).all()) and bool((pre <= 1 + 1e-6).all())
    assert bool((post > 0).all()) and bool((post < 2).all())
    # one Sinkhorn round only: rows are visibly off, so the 20 rounds above are what converged
    _, _, comb1 = hc_split_sinkhorn(mixes, scale, base, hc, 1, 1e-6)
    assert float((comb1.double().sum(-1) - 1).abs().max()) > 1e-2


def test_hc_split_sinkhorn_saturated_stays_finite() -> None:
    mixes = torch.tensor([[1e4] * 24, [-1e4] * 24])
    pre, post, comb = hc_split_sinkhorn(mixes, torch.ones(3), torch.zeros(24), 4, 20, 1e-6)
    assert bool(torch.isfinite(comb).all()) and bool((pre >= 1e-6).all())
    assert bool((post >= 0).all()) and bool((post <= 2).all())


def _hc_pre64(x, hc_fn, scale, base, norm_eps, hc, iters, hc_eps):
    hd = x.shape[-2:]
    xs = x.reshape(-1, *hd)
    ys, posts, combs = [], [], []
    for xt in xs:
        pre, post, comb = _split64(_mixes64(xt, hc_fn, norm_eps), scale.tolist(), base.tolist(), hc, iters, hc_eps)
        ys.append(_weighted_rows64(xt, pre))
        posts.append(post)
        combs.append(comb)
    lead = x.shape[:-2]
    y = torch.stack(ys).reshape(*lead, hd[1]) if ys else torch.zeros(*lead, hd[1], dtype=torch.float64)
    return (y, torch.tensor(posts, dtype=torch.float64).reshape(*lead, hc),
            torch.tensor(combs, dtype=torch.float64).reshape(*lead, hc, hc))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("hc,dim", [(4, 24), (2, 7)])
@pytest.mark.parametrize("norm_eps,hc_eps", [(1e-6, 1e-6), (0.5, 0.05)])  # large eps: placement visible
def test_hc_pre_vs_float64(dtype, lead, hc, dim, norm_eps, hc_eps) -> None:
    g, hc_fn, scale, base = _params(hc, dim, seed=hc * 10 + len(lead))
    x = (torch.randn(*lead, hc, dim, generator=g) * 0.7).to(dtype)
    y, post, comb = hc_pre(x, hc_fn, scale, base, norm_eps, hc, 20, hc_eps)
    assert y.dtype == dtype and y.shape == lead + (dim,)
    assert post.dtype == comb.dtype == torch.float32
    assert post.shape == lead + (hc,) and comb.shape == lead + (hc, hc)
    ey, epost, ecomb = _hc_pre64(x, hc_fn, scale, base, norm_eps, hc, 20, hc_eps)
    assert_close(y, ey, dtype)
    _assert_rounded_once(y, ey)
    assert_close(post, epost, **FP32_TOL)
    assert_close(comb, ecomb, atol=1e-5, rtol=1e-5)


def test_hc_pre_rms_factor_scales_mixes_not_x() -> None:
    """Scaling x by c leaves pre/post/comb unchanged (RMS factor) and scales y by c (y from raw x)."""
    g, hc_fn, scale, base = _params(4, 16, seed=5)
    x = torch.randn(3, 4, 16, generator=g)
    y1, post1, comb1 = hc_pre(x, hc_fn, scale, base, 0.0)
    y2, post2, comb2 = hc_pre(8.0 * x, hc_fn, scale, base, 0.0)
    torch.testing.assert_close(post2, post1)
    torch.testing.assert_close(comb2, comb1)
    torch.testing.assert_close(y2, 8.0 * y1)
    # norm_eps sits inside the rsqrt: with tiny x a large eps damps the mixes towards 0
    tiny = x * 1e-4
    _, post_eps, _ = hc_pre(tiny, hc_fn, scale, base, norm_eps=1.0)
    expected = 2 * torch.sigmoid(base[4:8].double())  # mixes ~ 0 -> post = 2*sigmoid(base)
    assert_close(post_eps, expected.expand(3, 4), atol=1e-3, rtol=0)


def test_hc_pre_realistic_shape() -> None:
    """V4-Flash width: x bf16 [T, 4, 4096] (the Ascend npu_hc_pre_v2 shape)."""
    g, hc_fn, scale, base = _params(4, 4096, seed=7)
    x = torch.randn(2, 4, 4096, generator=g).to(torch.bfloat16)
    y, post, comb = hc_pre(x, hc_fn, scale, base)
    ey, epost, ecomb = _hc_pre64(x, hc_fn, scale, base, 1e-6, 4, 20, 1e-6)
    assert_close(y, ey, torch.bfloat16)
    _assert_rounded_once(y, ey)
    assert_close(post, epost, atol=1e-5, rtol=1e-5)
    assert_close(comb, ecomb, atol=1e-5, rtol=1e-5)
    assert calc_diff(y, ey) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lead", LEADS)
def test_hc_post_vs_float64(dtype, lead) -> None:
    hc, dim = 4, 24
    g = torch.Generator().manual_seed(len(lead) + 3)
    x = torch.randn(*lead, dim, generator=g).to(dtype)
    residual = torch.randn(*lead, hc, dim, generator=g).to(dtype)
    post = torch.rand(*lead, hc, generator=g) * 2
    comb = torch.rand(*lead, hc, hc, generator=g)
    out = hc_post(x, residual, post, comb)
    assert out.dtype == dtype and out.shape == residual.shape
    xs, rs = x.reshape(-1, dim), residual.reshape(-1, hc, dim)
    ps, cs = post.reshape(-1, hc).tolist(), comb.reshape(-1, hc, hc).tolist()
    expected = torch.zeros(xs.shape[0], hc, dim, dtype=torch.float64)
    for t in range(xs.shape[0]):
        for k in range(hc):
            expected[t, k] = ps[t][k] * xs[t].double() + _weighted_rows64(rs[t], [cs[t][j][k] for j in range(hc)])
    assert_close(out, expected.reshape(residual.shape), dtype)
    _assert_rounded_once(out, expected.reshape(residual.shape))


def test_hc_post_uses_comb_columns() -> None:
    """out[k] mixes residual rows with comb[:, k] (column), not comb[k, :]."""
    residual = torch.arange(4.0).view(4, 1).expand(4, 3).contiguous()  # residual[j] = j
    comb = torch.zeros(4, 4)
    comb[2, 0] = 1.0  # out[0] takes residual[2]
    out = hc_post(torch.zeros(3), residual, torch.zeros(4), comb)
    assert out[0].tolist() == [2.0, 2.0, 2.0] and out[1:].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("norm_eps,hc_eps", [(1e-6, 1e-6), (0.5, 0.05)])
def test_hc_head_vs_float64(dtype, lead, norm_eps, hc_eps) -> None:
    hc, dim = 4, 24
    g, hc_fn, scale, base = _params(hc, dim, seed=20 + len(lead), head=True)
    x = (torch.randn(*lead, hc, dim, generator=g) * 0.7).to(dtype)
    y = hc_head(x, hc_fn, scale, base, norm_eps, hc_eps)
    assert y.dtype == dtype and y.shape == lead + (dim,)
    expected = []
    for xt in x.reshape(-1, hc, dim):
        m = _mixes64(xt, hc_fn, norm_eps)
        pre = [_sigmoid(m[j] * float(scale[0]) + float(base[j])) + hc_eps for j in range(hc)]
        expected.append(_weighted_rows64(xt, pre))
    ey = torch.stack(expected).reshape(*lead, dim) if expected else torch.zeros(*lead, dim, dtype=torch.float64)
    assert_close(y, ey, dtype)
    _assert_rounded_once(y, ey)


def test_mhc_errors() -> None:
    _, hc_fn, scale, base = _params(4, 8, seed=1)
    x = torch.randn(3, 4, 8)
    with pytest.raises(ShapeError, match="mixes"):
        torch.ops.v4hal.hc_split_sinkhorn(torch.randn(3, 23), scale, base)
    with pytest.raises(DTypeError, match="mixes"):
        torch.ops.v4hal.hc_split_sinkhorn(torch.randn(3, 24, dtype=torch.float64), scale, base)
    with pytest.raises(RangeError, match="sinkhorn_iters"):
        torch.ops.v4hal.hc_split_sinkhorn(torch.randn(3, 24), scale, base, 4, 0)
    with pytest.raises(ShapeError, match="hc_scale"):
        torch.ops.v4hal.hc_split_sinkhorn(torch.randn(3, 24), scale[:1], base)
    with pytest.raises(ShapeError, match="hc_fn"):
        torch.ops.v4hal.hc_pre(x, hc_fn[:, :16], scale, base)
    with pytest.raises(DTypeError, match="hc_fn"):
        torch.ops.v4hal.hc_pre(x, hc_fn.bfloat16(), scale, base)
    with pytest.raises(ShapeError, match="x"):
        torch.ops.v4hal.hc_pre(torch.randn(3, 2, 8), hc_fn, scale, base)
    with pytest.raises(DTypeError, match="x"):
        torch.ops.v4hal.hc_pre(x.double(), hc_fn, scale, base)
    with pytest.raises(ShapeError, match="post"):
        torch.ops.v4hal.hc_post(torch.randn(3, 8), x, torch.rand(3, 3), torch.rand(3, 4, 4))
    with pytest.raises(ShapeError, match="x"):
        torch.ops.v4hal.hc_post(torch.randn(3, 7), x, torch.rand(3, 4), torch.rand(3, 4, 4))
    with pytest.raises(DTypeError, match="comb"):
        torch.ops.v4hal.hc_post(torch.randn(3, 8), x, torch.rand(3, 4), torch.rand(3, 4, 4).bfloat16())
    with pytest.raises(ShapeError, match="hc_scale"):
        torch.ops.v4hal.hc_head(x, hc_fn[:4], scale, base[:4])
    with pytest.raises(ShapeError, match="hc_fn"):
        torch.ops.v4hal.hc_head(x, hc_fn, scale[:1], base[:4])
