"""Reference (pure PyTorch) mHC: manifold-constrained hyper-connections.

Semantics: ``docs/ops.md`` (mHC) and the public DeepSeek-V4 inference code
(``model.py`` ``Block.hc_pre`` / ``Block.hc_post`` / ``ParallelHead.hc_head``, ``kernel.py``
``hc_split_sinkhorn``). Findings from that code, reproduced here:

* **Everything is fp32.** ``hc_pre``/``hc_head`` upcast x to fp32 once, flattened to
  ``[..., hc*D]``; mixes, pre, post, comb and the weighted sum are fp32; only ``y`` is cast
  back to x's dtype at the very end. post and comb are returned in fp32.
* **RMS factor.** ``r = rsqrt(mean(x_flat**2) + norm_eps)`` over all ``hc*D`` elements (eps
  inside the rsqrt, no learned norm weight). It scales the *mixes* after the GEMM
  (``mixes = (x_flat @ hc_fn^T) * r``); x itself is not normalised, and ``y`` is summed from
  the raw (upcast) x.
* **hc_eps placement.** ``pre = sigmoid(.) + eps`` (after the sigmoid); ``post = 2*sigmoid(.)``
  has no eps; comb: ``softmax(., -1) + eps``, then every normalisation divides by
  ``(sum + eps)``. Sinkhorn: one column normalisation, then ``iters - 1`` rounds of
  (row, column); the last step is a column normalisation, so columns sum to
  ``c/(c+eps)`` ~ 1 exactly while rows are only converged.
* ``hc_post`` computes ``sum_j comb[j, k] * residual[j]`` in fp32 (comb is fp32, so the bf16
  residual is promoted), adds ``post[k] * x`` and casts once.
* ``hc_head`` uses ``pre`` only: ``sigmoid(mixes * scale + base) + eps`` (scale ``[1]``), no Sinkhorn.

The Ascend ``npu_hc_pre_v2`` has the same outputs (y in x's dtype, post/comb fp32) but runs
the GEMM in HF32, so it matches this oracle only to HF32 precision.
"""
from __future__ import annotations

import torch

from v4hal.hal import formats
from v4hal.hal.registry import implements

from ._rows import pointwise, row_matmul

__all__ = ["hc_split_sinkhorn", "hc_pre", "hc_post", "hc_head", "hc_mix", "hc_collapse"]


def _split_sinkhorn(mixes: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, hc: int,
                    iters: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    e = formats.operand(eps, mixes)    # eps as an fp32 tensor operand: the same sums, less per-op overhead
    # pre and post in one sigmoid call: mixes[..., :2hc] as [2, hc], row 0 scaled by hc_scale[0], row 1 by [1]
    gates = (mixes[..., :2 * hc].unflatten(-1, (2, hc)) * hc_scale[:2, None]).flatten(-2).add_(hc_base[:2 * hc])
    gates = pointwise(torch.sigmoid, gates)
    pre = gates[..., :hc] + e
    post = gates[..., hc:] * formats.operand(2.0, mixes)
    logits = (mixes[..., 2 * hc:] * hc_scale[2] + hc_base[2 * hc:]).unflatten(-1, (hc, hc))
    comb = torch.softmax(logits, dim=-1)
    comb.add_(e)
    comb.div_(comb.sum(dim=-2, keepdim=True).add_(e))
    for _ in range(iters - 1):  # fixed, small iteration count
        comb.div_(comb.sum(dim=-1, keepdim=True).add_(e))
        comb.div_(comb.sum(dim=-2, keepdim=True).add_(e))
    return pre, post, comb


@implements("hc_split_sinkhorn", "reference")
def hc_split_sinkhorn(mixes: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
                      hc_mult: int = 4, sinkhorn_iters: int = 20,
                      eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split mixes into pre, post and the Sinkhorn-normalised comb.

    mixes fp32 ``[..., (2+hc)*hc]`` laid out as ``[pre hc | post hc | comb hc*hc (row-major j,k)]``,
    hc_scale fp32 ``[3]`` (pre, post, comb), hc_base fp32 ``[(2+hc)*hc]``.
    Returns fp32 pre ``[..., hc]`` (= sigmoid + eps), post ``[..., hc]`` (= 2*sigmoid, in (0, 2)),
    comb ``[..., hc, hc]`` (softmax over k + eps, then column/row normalisations with eps in each
    denominator, ending on a column normalisation; approximately doubly stochastic).
    """
    return _split_sinkhorn(mixes, hc_scale, hc_base, hc_mult, sinkhorn_iters, eps)


def _mixes(x: torch.Tensor, hc_fn: torch.Tensor, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[..., hc, D]`` -> (fp32 x, fp32 mixes ``[..., M]``): RMS factor applied after the GEMM."""
    xf = x.float()
    flat = xf.flatten(-2)
    rsqrt = flat.square().mean(dim=-1, keepdim=True).add_(formats.operand(norm_eps, flat)).rsqrt_()
    return xf, row_matmul(flat, hc_fn.float().T).mul_(rsqrt)


@implements("hc_pre", "reference")
def hc_pre(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
           norm_eps: float = 1e-6, hc_mult: int = 4, sinkhorn_iters: int = 20,
           hc_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collapse the ``hc`` residual copies into the sub-layer input.

    x float ``[..., hc, D]``, hc_fn fp32 ``[(2+hc)*hc, hc*D]``, hc_scale fp32 ``[3]``, hc_base fp32
    ``[(2+hc)*hc]``. ``mixes = (x_flat @ hc_fn^T) * rsqrt(mean(x_flat^2) + norm_eps)`` (fp32),
    ``pre, post, comb = hc_split_sinkhorn(mixes, ...)``, ``y = sum_j pre[j] * x[j]`` (fp32).
    Returns y ``[..., D]`` in x's dtype, post fp32 ``[..., hc]``, comb fp32 ``[..., hc, hc]``.
    """
    xf, mixes = _mixes(x, hc_fn, norm_eps)
    pre, post, comb = _split_sinkhorn(mixes, hc_scale, hc_base, hc_mult, sinkhorn_iters, hc_eps)
    return _collapse(xf, pre).to(x.dtype), post, comb


def _collapse(xf: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """fp32 ``sum_j pre[..., j] * xf[..., j, :]``."""
    return (pre.unsqueeze(-1) * xf).sum(dim=-2)


@implements("hc_mix", "reference")
def hc_mix(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
           norm_eps: float = 1e-6, hc_mult: int = 4, sinkhorn_iters: int = 20,
           hc_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (pre, post, comb) of `hc_pre` without the collapse: x float ``[..., hc, D]`` -> fp32
    ``[..., hc]``, ``[..., hc]``, ``[..., hc, hc]`` (the same mixes and split, so the same bits)."""
    _, mixes = _mixes(x, hc_fn, norm_eps)
    return _split_sinkhorn(mixes, hc_scale, hc_base, hc_mult, sinkhorn_iters, hc_eps)


@implements("hc_collapse", "reference")
def hc_collapse(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """x float ``[..., hc, D]``, pre fp32 ``[..., hc]`` -> ``sum_j pre[j] * fp32(x[j])`` in x's dtype (the
    collapse of `hc_pre`, with a given pre)."""
    return _collapse(x.float(), pre).to(x.dtype)


@implements("hc_post", "reference")
def hc_post(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """Expand the sub-layer output back to ``hc`` copies and mix the residual.

    x float ``[..., D]``, residual float ``[..., hc, D]``, post fp32 ``[..., hc]``, comb fp32
    ``[..., hc, hc]``. ``out[k] = post[k] * x + sum_j comb[j, k] * residual[j]`` in fp32 (the sum
    over j first, in order j = 0..hc-1, then the post term added), cast to residual's dtype.
    """
    hc = residual.shape[-2]
    res = residual.float()
    weight = comb.unsqueeze(-1)                                   # [..., j, k, 1]
    mixed = weight[..., 0, :, :] * res[..., 0:1, :]
    for j in range(1, hc):  # hc is a small fixed count; keeps the summation order explicit
        mixed += weight[..., j, :, :] * res[..., j:j + 1, :]
    return (post.unsqueeze(-1) * x.float().unsqueeze(-2)).add_(mixed).to(residual.dtype)


@implements("hc_head", "reference")
def hc_head(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
            norm_eps: float = 1e-6, hc_eps: float = 1e-6) -> torch.Tensor:
    """Final collapse of the ``hc`` copies before the output norm (pre weights only, no Sinkhorn).

    x float ``[..., hc, D]``, hc_fn fp32 ``[hc, hc*D]``, hc_scale fp32 ``[1]``, hc_base fp32 ``[hc]``.
    ``pre = sigmoid(mixes * scale + base) + hc_eps`` with the same RMS-scaled mixes as hc_pre;
    returns ``sum_j pre[j] * x[j]`` ``[..., D]`` in x's dtype (fp32 math).
    """
    xf, mixes = _mixes(x, hc_fn, norm_eps)
    pre = pointwise(torch.sigmoid, mixes * hc_scale + hc_base) + hc_eps
    return (pre.unsqueeze(-1) * xf).sum(dim=-2).to(x.dtype)
