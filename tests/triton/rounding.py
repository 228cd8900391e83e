"""Checks that a kernel's 16-bit output is the correctly rounded value of the exact result.

``assert_rounded(got, exact)``: ``got`` (bf16 / fp16) against the unrounded result ``exact``
(fp32 / fp64: the reference computed on the same values upcast). Every element must satisfy
``|got - exact| <= ulp(exact)/2 + slack``: round to nearest (a tie may go either way). A cast
that truncates toward zero is up to a whole ulp off and fails on about half the elements;
``slack`` absorbs the fp32 arithmetic differences between kernel and reference (another
summation order), which are far below half a 16-bit ulp.

``ulp_distance(a, b)``: how many representable values of a's dtype lie between ``a`` and ``b``.
"""
from __future__ import annotations

import torch

# (explicit mantissa bits, exponent of the smallest normal) per 16-bit float
_FORMATS = {torch.bfloat16: (7, -126), torch.float16: (10, -14)}


def half_ulp(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of ``dtype``'s values around ``exact`` (float64; subnormal spacing below the normals)."""
    mant, emin = _FORMATS[dtype]
    x = exact.double().abs()
    _, e = torch.frexp(x)                          # x = m * 2**e, m in [0.5, 1): floor(log2 x) = e - 1
    e = torch.where(x == 0, torch.full_like(e, emin), torch.clamp(e - 1, min=emin))
    return torch.ldexp(torch.ones_like(x), (e - mant - 1).to(torch.float64))


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Number of steps between same-dtype 16-bit floats ``a`` and ``b`` (``+0`` and ``-0`` are 0 apart)."""
    assert a.dtype == b.dtype and a.dtype in _FORMATS, (a.dtype, b.dtype)

    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = t.view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)

    return (ordered(a) - ordered(b)).abs()


def assert_rounded(got: torch.Tensor, exact: torch.Tensor, slack: float | None = None, what: str = "") -> None:
    """``got`` (bf16/fp16) is ``exact`` rounded to nearest, up to ``slack`` (default ``2**-20 * max|exact|``).

    Also requires the same non-finite positions (NaN where exact is NaN, same infinities).
    """
    assert got.shape == exact.shape, f"{what}: shape {list(got.shape)} vs {list(exact.shape)}"
    assert got.dtype in _FORMATS, f"{what}: {got.dtype} is not a 16-bit float"
    g, x = got.double(), exact.double()
    fin = torch.isfinite(x) & (x.abs() <= torch.finfo(got.dtype).max)
    assert bool(torch.equal(g.isnan(), x.isnan())), f"{what}: NaN positions differ"
    assert bool(torch.isfinite(g[fin]).all()), f"{what}: non-finite output where the exact value is finite"
    if slack is None:
        slack = 2.0 ** -20 * float(x[fin].abs().max()) if bool(fin.any()) else 0.0
    err = (g - x).abs()[fin]
    bound = half_ulp(x, got.dtype)[fin]
    bad = err > bound + slack
    if bool(bad.any()):
        n = int(bad.sum())
        ratio = err / (2 * bound)
        worst = int(ratio.argmax())
        raise AssertionError(
            f"{what}: {n} of {err.numel()} elements are not {got.dtype} roundings of the exact result "
            f"(slack {slack:.3g}); worst {float(ratio[worst]):.3f} ulp off: got {float(g[fin][worst])!r}, "
            f"exact {float(x[fin][worst])!r}")


def assert_matches_rounded_reference(got: torch.Tensor, ref: torch.Tensor, max_ulp: int = 1,
                                     max_frac: float = 0.01, slack: float | None = None, what: str = "") -> None:
    """``got`` vs the reference's own 16-bit output: every element within ``max_ulp`` steps (or within
    ``slack``, default ``2**-20 * max|ref|``, for elements so close to 0 that fp32 summation-order
    differences are several of their ulps), and at most a fraction ``max_frac`` of the elements
    differing at all (a truncating cast differs on about half of them)."""
    assert got.dtype == ref.dtype and got.shape == ref.shape, what
    fin = torch.isfinite(ref)
    assert bool(torch.equal(fin, torch.isfinite(got))), f"{what}: non-finite positions differ"
    g, r = got[fin], ref[fin]
    if r.numel() == 0:
        return
    if slack is None:
        slack = 2.0 ** -20 * float(r.double().abs().max())
    d = torch.where((g.double() - r.double()).abs() <= slack, 0, ulp_distance(g, r))
    assert int(d.max()) <= max_ulp, f"{what}: {int(d.max())} ulps from the reference (allowed {max_ulp})"
    frac = float((g != r).double().mean())
    assert frac <= max_frac, f"{what}: {frac:.1%} of the elements differ from the reference (allowed {max_frac:.1%})"
