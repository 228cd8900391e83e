"""mHC (hyper-connections) on Ascend.

- ``hc_pre`` -> ``_C_ascend.npu_hc_pre_v2(x, hc_fn, hc_scale, hc_base, hc_mult, hc_sinkhorn_iters,
  norm_eps, hc_eps)`` (x ``[T, 4, D]``) or ``custom.npu_hc_pre(x, hc_fn, hc_scale, hc_base, *, hc_mult,
  hc_sinkhorn_iters, norm_eps, hc_eps)`` (x ``[B, S, 4, D]``). Hard limits from vllm-ascend's
  ``torch_binding.cpp`` checks: x bf16, ``hc_mult == 4``, ``D in {4096, 7168}``, hc_fn fp32
  ``[24, 4D]``, hc_scale fp32 ``[3]``, hc_base fp32 ``[24]``. The op does the mix GEMM in HF32 on
  the NPU (a real-hardware deviation from our fp32 reference; see docs/ascend.md).
- ``hc_post`` -> ``_C_ascend.npu_hc_post`` / ``custom.npu_hc_post`` on ``[B, S, D]`` /
  ``[B, S, hc, D]`` (our leading dims flattened into S with B = 1). The binding requires x and
  residual of one dtype and post/comb of one dtype.
- ``hc_split_sinkhorn`` and ``hc_head``: no A2/A3 op (torch_npu's ``npu_mhc_sinkhorn`` / ``npu_mhc_pre``
  are 950-only and their equivalence to V4's split is unverified; vllm-ascend runs ``hc_head`` in
  plain torch). Reference.
"""
from __future__ import annotations

import torch

from v4hal.backends.reference import mhc as ref
from v4hal.hal.registry import implements

from . import limits
from ._route import always_reference, route
from .limits import ALL, always, fallback_when

HC_PRE = (("_C_ascend", "npu_hc_pre_v2"), ("custom", "npu_hc_pre"))
HC_POST = (("_C_ascend", "npu_hc_post"), ("custom", "npu_hc_post"))
_FLOATS = (torch.bfloat16, torch.float16, torch.float32)

limits.plan("hc_pre", {c: "_C_ascend.npu_hc_pre_v2 / custom.npu_hc_pre" for c in ALL})
HC_PRE_LIMITS = (
    fallback_when("x not bf16", lambda a: a["x"].dtype != torch.bfloat16),
    fallback_when("hc_mult != 4", lambda a: a["hc_mult"] != 4 or a["x"].shape[-2] != 4),
    fallback_when("dim not 4096 or 7168", lambda a: a["x"].shape[-1] not in (4096, 7168)),
    fallback_when("empty tensor", lambda a: a["x"].numel() == 0),
)
limits.plan("hc_post", {c: "_C_ascend.npu_hc_post / custom.npu_hc_post" for c in ALL})
HC_POST_LIMITS = (
    fallback_when("x and residual of different dtypes", lambda a: a["x"].dtype != a["residual"].dtype),
    fallback_when("x/residual not bf16/fp16/fp32", lambda a: a["x"].dtype not in _FLOATS),
    fallback_when("empty tensor", lambda a: a["residual"].numel() == 0),
)
limits.plan("hc_split_sinkhorn", {})
limits.plan("hc_head", {})


@implements("hc_pre", "ascend", requires=HC_PRE_LIMITS)
def hc_pre(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
           norm_eps: float = 1e-6, hc_mult: int = 4, sinkhorn_iters: int = 20,
           hc_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x ``[..., hc, D]`` -> (y ``[..., D]`` x's dtype, post fp32 ``[..., hc]``, comb fp32 ``[..., hc, hc]``)."""
    chip, op, why = route("hc_pre", HC_PRE, x, hc_fn, hc_scale, hc_base, norm_eps, hc_mult, sinkhorn_iters,
                          hc_eps)
    if op is None:
        return limits.fallback("hc_pre", chip, why, ref.hc_pre, x, hc_fn, hc_scale, hc_base, norm_eps, hc_mult,
                               sinkhorn_iters, hc_eps)
    lead, d = x.shape[:-2], x.shape[-1]
    if op.tier == "custom":
        xt = x.reshape(1, -1, hc_mult, d).contiguous()
        y, post, comb = op(xt, hc_fn, hc_scale, hc_base, hc_mult=hc_mult, hc_sinkhorn_iters=sinkhorn_iters,
                           norm_eps=norm_eps, hc_eps=hc_eps)
    else:
        xt = x.reshape(-1, hc_mult, d).contiguous()
        y, post, comb = op(xt, hc_fn, hc_scale, hc_base, hc_mult, sinkhorn_iters, norm_eps, hc_eps)
    return (y.reshape(*lead, d).to(x.dtype), post.reshape(*lead, hc_mult).float(),
            comb.reshape(*lead, hc_mult, hc_mult).float())


@implements("hc_post", "ascend", requires=HC_POST_LIMITS)
def hc_post(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """x ``[..., D]``, residual ``[..., hc, D]``, post ``[..., hc]``, comb ``[..., hc, hc]`` ->
    ``[..., hc, D]`` in residual's dtype."""
    chip, op, why = route("hc_post", HC_POST, x, residual, post, comb)
    if op is None:
        return limits.fallback("hc_post", chip, why, ref.hc_post, x, residual, post, comb)
    hc, d = residual.shape[-2], residual.shape[-1]
    out = op(x.reshape(1, -1, d).contiguous(), residual.reshape(1, -1, hc, d).contiguous(),
             post.reshape(1, -1, hc).contiguous(), comb.reshape(1, -1, hc, hc).contiguous())
    return out.reshape(residual.shape)


@implements("hc_split_sinkhorn", "ascend", requires=(
    always("no A2/A3 op; torch_npu.npu_mhc_sinkhorn (950) not shown equivalent"),))
def hc_split_sinkhorn(mixes: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, hc_mult: int = 4,
                      sinkhorn_iters: int = 20, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference split + Sinkhorn (no standalone CANN op on A2/A3)."""
    return always_reference("hc_split_sinkhorn", ref.hc_split_sinkhorn, mixes, hc_scale, hc_base, hc_mult,
                            sinkhorn_iters, eps)


@implements("hc_head", "ascend", requires=(always("no CANN op (vllm-ascend runs hc_head in plain torch)"),))
def hc_head(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
            norm_eps: float = 1e-6, hc_eps: float = 1e-6) -> torch.Tensor:
    """Reference head collapse (plain torch in vllm-ascend as well)."""
    return always_reference("hc_head", ref.hc_head, x, hc_fn, hc_scale, hc_base, norm_eps, hc_eps)


# DeepSeek-V4.1's lagged mHC: CANN's fused pre-mix returns the collapse with the site's own pre and never pre
# itself, so neither piece has an op.
for _op in ("hc_mix", "hc_collapse"):
    limits.plan(_op, {})
NO_MIX_OP = (always("npu_hc_pre_v2 returns y with the site's own pre, never pre itself (V4.1 lags it)"),)
NO_COLLAPSE_OP = (always("no CANN op collapses the mHC streams with a given pre"),)


@implements("hc_mix", "ascend", requires=NO_MIX_OP)
def hc_mix(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
           norm_eps: float = 1e-6, hc_mult: int = 4, sinkhorn_iters: int = 20,
           hc_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pre, post, comb) fp32 (reference on the NPU tensors)."""
    return always_reference("hc_mix", ref.hc_mix, x, hc_fn, hc_scale, hc_base, norm_eps, hc_mult, sinkhorn_iters,
                            hc_eps)


@implements("hc_collapse", "ascend", requires=NO_COLLAPSE_OP)
def hc_collapse(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """``sum_j pre[j] * x[j]`` in x's dtype (reference on the NPU tensors)."""
    return always_reference("hc_collapse", ref.hc_collapse, x, pre)
