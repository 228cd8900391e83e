"""mHC (manifold-constrained hyper-connections): Sinkhorn split of the mixes, the pre-mix that
collapses ``hc`` residual copies into a sub-layer input, the post-mix, and the head collapse.

DeepSeek-V4.1 lags the pre-mix by one site: ``hc_mix`` gives a site's (pre, post, comb) without
collapsing, ``hc_collapse`` collapses the copies with a given pre."""
from __future__ import annotations

import torch

from . import _checks as C
from ._checks import FLOATS
from ._define import call, define_op


def _check_hc_params(op, hc_scale, hc_base, hc_mult, n_scale):
    """hc_scale fp32 ``[n_scale]`` and hc_base fp32 ``[(2+hc)*hc]`` (``n_scale`` 3) or ``[hc]`` (1)."""
    C.dtype(op, "hc_scale", hc_scale, (torch.float32,))
    C.shape(op, "hc_scale", hc_scale, (n_scale,), f"[{n_scale}]")
    width = (2 + hc_mult) * hc_mult if n_scale == 3 else hc_mult
    C.dtype(op, "hc_base", hc_base, (torch.float32,))
    C.shape(op, "hc_base", hc_base, (width,), "[(2+hc)*hc]" if n_scale == 3 else "[hc]")


def _check_sinkhorn(mixes, hc_scale, hc_base, hc_mult, sinkhorn_iters, eps):
    op = "hc_split_sinkhorn"
    C.in_range(op, "hc_mult", hc_mult, 1, C.MAX_HC_MULT)
    C.in_range(op, "sinkhorn_iters", sinkhorn_iters, 1, C.MAX_SINKHORN_ITERS)
    C.eps_arg(op, "eps", eps)
    _check_hc_params(op, hc_scale, hc_base, hc_mult, 3)
    C.dtype(op, "mixes", mixes, (torch.float32,))
    C.min_rank(op, "mixes", mixes, 1, "[..., (2+hc)*hc]")
    if mixes.shape[-1] != (2 + hc_mult) * hc_mult:
        raise C.ShapeError(f"{op}: mixes must be [..., (2+hc)*hc = {(2 + hc_mult) * hc_mult}], got {C.describe(mixes)}")
    C.same_device(op, mixes=mixes, hc_scale=hc_scale, hc_base=hc_base)


def _fake_split(lead, like, hc):
    return (like.new_empty((*lead, hc), dtype=torch.float32), like.new_empty((*lead, hc), dtype=torch.float32),
            like.new_empty((*lead, hc, hc), dtype=torch.float32))


define_op("hc_split_sinkhorn",
          "(Tensor mixes, Tensor hc_scale, Tensor hc_base, int hc_mult=4, int sinkhorn_iters=20, float eps=1e-6)"
          " -> (Tensor, Tensor, Tensor)",
          check=_check_sinkhorn, fake=lambda m, s, b, hc, it, eps: _fake_split(m.shape[:-1], m, hc),
          doc=C.ranges_doc(hc_mult=C.interval(1, C.MAX_HC_MULT), sinkhorn_iters=C.interval(1, C.MAX_SINKHORN_ITERS),
                           eps=C.EPS_RANGE))


def hc_split_sinkhorn(mixes: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, hc_mult: int = 4,
                      sinkhorn_iters: int = 20, eps: float = 1e-6):
    """Split ``mixes [..., (2+hc)*hc]`` into (pre ``[..., hc]``, post ``[..., hc]``, comb ``[..., hc, hc]``), fp32;
    comb is made doubly stochastic by ``sinkhorn_iters`` Sinkhorn normalisations."""
    return call.hc_split_sinkhorn(mixes, hc_scale, hc_base, hc_mult, sinkhorn_iters, float(eps))


def _check_hc_x(op, x, hc_fn, hc_mult, rows):
    C.dtype(op, "x", x, FLOATS)
    C.min_rank(op, "x", x, 2, "[..., hc, D]")
    if x.shape[-2] != hc_mult:
        raise C.ShapeError(f"{op}: x must be [..., hc={hc_mult}, D], got {C.describe(x)}")
    d = x.shape[-1]
    C.dtype(op, "hc_fn", hc_fn, (torch.float32,))
    C.shape(op, "hc_fn", hc_fn, (rows, hc_mult * d), f"[{rows}, hc*D]")


def _check_site(op, x, hc_fn, hc_scale, hc_base, norm_eps, hc_mult, sinkhorn_iters, hc_eps):
    """The arguments of one mHC site's mixing (``hc_pre``, ``hc_mix``)."""
    C.in_range(op, "hc_mult", hc_mult, 1, C.MAX_HC_MULT)
    C.in_range(op, "sinkhorn_iters", sinkhorn_iters, 1, C.MAX_SINKHORN_ITERS)
    C.eps_arg(op, "norm_eps", norm_eps)
    C.eps_arg(op, "hc_eps", hc_eps)
    _check_hc_params(op, hc_scale, hc_base, hc_mult, 3)
    _check_hc_x(op, x, hc_fn, hc_mult, (2 + hc_mult) * hc_mult)
    C.same_device(op, x=x, hc_fn=hc_fn, hc_scale=hc_scale, hc_base=hc_base)


def _check_hc_pre(x, hc_fn, hc_scale, hc_base, norm_eps, hc_mult, sinkhorn_iters, hc_eps):
    _check_site("hc_pre", x, hc_fn, hc_scale, hc_base, norm_eps, hc_mult, sinkhorn_iters, hc_eps)


def _fake_hc_pre(x, hc_fn, hc_scale, hc_base, norm_eps, hc_mult, iters, hc_eps):
    lead = x.shape[:-2]
    return (x.new_empty((*lead, x.shape[-1])), *_fake_split(lead, x, hc_mult)[1:])


define_op("hc_pre",
          "(Tensor x, Tensor hc_fn, Tensor hc_scale, Tensor hc_base, float norm_eps=1e-6, int hc_mult=4, "
          "int sinkhorn_iters=20, float hc_eps=1e-6) -> (Tensor, Tensor, Tensor)",
          check=_check_hc_pre, fake=_fake_hc_pre,
          doc=C.ranges_doc(norm_eps=C.EPS_RANGE, hc_mult=C.interval(1, C.MAX_HC_MULT),
                           sinkhorn_iters=C.interval(1, C.MAX_SINKHORN_ITERS), hc_eps=C.EPS_RANGE))


def hc_pre(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, *,
           norm_eps: float = 1e-6, hc_mult: int = 4, sinkhorn_iters: int = 20, hc_eps: float = 1e-6):
    """Collapse the residual copies ``x [..., hc, D]`` into the sub-layer input:
    (y ``[..., D]`` in x's dtype, post fp32 ``[..., hc]``, comb fp32 ``[..., hc, hc]``)."""
    return call.hc_pre(x, hc_fn, hc_scale, hc_base, float(norm_eps), hc_mult, sinkhorn_iters,
                       float(hc_eps))


def _check_hc_post(x, residual, post, comb):
    op = "hc_post"
    C.dtype(op, "residual", residual, FLOATS)
    C.min_rank(op, "residual", residual, 2, "[..., hc, D]")
    lead, hc, d = tuple(residual.shape[:-2]), residual.shape[-2], residual.shape[-1]
    C.dtype(op, "x", x, FLOATS)
    C.shape(op, "x", x, (*lead, d), "[..., D] matching residual")
    C.dtype(op, "post", post, (torch.float32,))
    C.shape(op, "post", post, (*lead, hc), "[..., hc]")
    C.dtype(op, "comb", comb, (torch.float32,))
    C.shape(op, "comb", comb, (*lead, hc, hc), "[..., hc, hc]")
    C.same_device(op, x=x, residual=residual, post=post, comb=comb)


define_op("hc_post", "(Tensor x, Tensor residual, Tensor post, Tensor comb) -> Tensor",
          check=_check_hc_post, fake=lambda x, r, p, c: torch.empty_like(r))


def hc_post(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """``out[..., k, :] = post[k] * x + sum_j comb[j, k] * residual[..., j, :]`` -> ``[..., hc, D]``."""
    return call.hc_post(x, residual, post, comb)


def _check_hc_head(x, hc_fn, hc_scale, hc_base, norm_eps, hc_eps):
    op = "hc_head"
    C.dtype(op, "x", x, FLOATS)
    C.min_rank(op, "x", x, 2, "[..., hc, D]")
    C.eps_arg(op, "norm_eps", norm_eps)
    C.eps_arg(op, "hc_eps", hc_eps)
    hc = x.shape[-2]
    if hc < 1:
        raise C.ShapeError(f"{op}: x must be [..., hc, D] with hc >= 1, got {C.describe(x)}")
    _check_hc_params(op, hc_scale, hc_base, hc, 1)
    _check_hc_x(op, x, hc_fn, hc, hc)
    C.same_device(op, x=x, hc_fn=hc_fn, hc_scale=hc_scale, hc_base=hc_base)


define_op("hc_head",
          "(Tensor x, Tensor hc_fn, Tensor hc_scale, Tensor hc_base, float norm_eps=1e-6, float hc_eps=1e-6) -> Tensor",
          check=_check_hc_head, fake=lambda x, *a: x.new_empty((*x.shape[:-2], x.shape[-1])),
          doc=C.ranges_doc(norm_eps=C.EPS_RANGE, hc_eps=C.EPS_RANGE))


def hc_head(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, *,
            norm_eps: float = 1e-6, hc_eps: float = 1e-6) -> torch.Tensor:
    """Collapse ``x [..., hc, D]`` with ``pre = sigmoid(mixes*scale + base) + eps`` only -> ``[..., D]``."""
    return call.hc_head(x, hc_fn, hc_scale, hc_base, float(norm_eps), float(hc_eps))


def _check_hc_mix(x, hc_fn, hc_scale, hc_base, norm_eps, hc_mult, sinkhorn_iters, hc_eps):
    _check_site("hc_mix", x, hc_fn, hc_scale, hc_base, norm_eps, hc_mult, sinkhorn_iters, hc_eps)


define_op("hc_mix",
          "(Tensor x, Tensor hc_fn, Tensor hc_scale, Tensor hc_base, float norm_eps=1e-6, int hc_mult=4, "
          "int sinkhorn_iters=20, float hc_eps=1e-6) -> (Tensor, Tensor, Tensor)",
          check=_check_hc_mix, fake=lambda x, fn, s, b, ne, hc, it, he: _fake_split(x.shape[:-2], x, hc),
          doc=C.ranges_doc(norm_eps=C.EPS_RANGE, hc_mult=C.interval(1, C.MAX_HC_MULT),
                           sinkhorn_iters=C.interval(1, C.MAX_SINKHORN_ITERS), hc_eps=C.EPS_RANGE))


def hc_mix(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, *,
           norm_eps: float = 1e-6, hc_mult: int = 4, sinkhorn_iters: int = 20, hc_eps: float = 1e-6):
    """The mixes of one site without the collapse: x ``[..., hc, D]`` -> (pre ``[..., hc]``, post ``[..., hc]``,
    comb ``[..., hc, hc]``), fp32, exactly the (pre, post, comb) ``hc_pre`` computes (V4.1's lagged mHC
    collapses with the previous site's pre, `hc_collapse`)."""
    return call.hc_mix(x, hc_fn, hc_scale, hc_base, float(norm_eps), hc_mult, sinkhorn_iters, float(hc_eps))


def _check_hc_collapse(x, pre):
    op = "hc_collapse"
    C.dtype(op, "x", x, FLOATS)
    C.min_rank(op, "x", x, 2, "[..., hc, D]")
    hc = x.shape[-2]
    C.in_range(op, "x.shape[-2] (hc)", hc, 1, C.MAX_HC_MULT)
    C.dtype(op, "pre", pre, (torch.float32,))
    C.shape(op, "pre", pre, (*x.shape[:-1],), "[..., hc] matching x")
    C.same_device(op, x=x, pre=pre)


define_op("hc_collapse", "(Tensor x, Tensor pre) -> Tensor",
          check=_check_hc_collapse, fake=lambda x, pre: x.new_empty((*x.shape[:-2], x.shape[-1])),
          doc=C.ranges_doc(hc=C.interval(1, C.MAX_HC_MULT)))


def hc_collapse(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """``y = sum_j pre[..., j] * fp32(x[..., j, :])`` (in order j = 0..hc-1) -> ``[..., D]`` in x's dtype:
    x float ``[..., hc, D]``, pre fp32 ``[..., hc]``."""
    return call.hc_collapse(x, pre)
