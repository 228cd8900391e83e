"""Reference routed-expert path of a DeepSeek-V4 MoE layer (``moe_experts``), pure PyTorch.

What it computes, per token t and chosen slot j (expert ``e = indices[t, j]``), following
``docs/ops.md`` (MoE) and the public ``inference/model.py`` (``MoE.forward``, ``Expert``,
``linear``):

1. ``gate = W1[e] x``, ``up = W3[e] x``, each a GEMM whose output is rounded to x's dtype
   (the public ``linear`` returns the default dtype, bf16 in the model) and then widened to fp32.
2. With ``swiglu_limit > 0``: ``up = clamp(up, -limit, limit)``, ``gate = min(gate, limit)``.
3. ``h = weights[t, j] * (silu(gate) * up)`` in fp32 (the gate weight is applied **before**
   w2), rounded to x's dtype.
4. ``y = W2[e] h`` (GEMM output in x's dtype), and ``out[t] = sum_j y`` in fp32, cast to x's
   dtype once at the end (the public code accumulates the routed outputs in fp32 and casts after
   adding the shared expert, which is not part of this op).

Weights: float ``[E, I, D]`` / ``[E, D, I]`` of x's dtype (plain GEMMs in fp32), FP8 with
128x128 tile scales, or packed FP4 (uint8 ``[E, I, D/2]`` / ``[E, D, I/2]``) with e8m0 scales per
32 along K. For quantized weights, as the public ``linear``, the GEMM inputs ``x`` and ``h`` go
through ``act_quant`` first with block 128. Choice made here: the activation scale format follows
the weight scales, which is how the public model configures both from one setting
(``scale_fmt="ue8m0"`` with ``scale_dtype=e8m0`` for the released checkpoints): e8m0 weight
scales -> power-of-two activation scales stored as e8m0; float32 weight scales -> plain fp32
activation scales (``scale_fmt=None``). ``D`` and ``I`` must then be multiples of 128.

Dispatch and combine are inline: rows are sorted by expert id with a **stable** argsort of the
flat ``t*k + j`` order (the ``moe_dispatch`` order), the three GEMMs are grouped GEMMs over
contiguous groups (no Python loop over experts or tokens), and the outputs are put back in flat
order and summed over j.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn

from v4hal.hal import formats as F
from v4hal.hal.registry import implements
from v4hal.ops._prepare import register_preparer

from ._rows import pointwise
from .gemm import GroupPlan, grouped_gemms, prepare_weights
from .quant import act_quant


def prepare_experts(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                    w_scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> bool:
    """Decode the three stacks once for the grouped GEMMs of later :func:`moe_experts` calls with these very
    tensors (`prepare_weights`: the same bits, fp32 memory); True when all three were kept."""
    scales = (None, None, None) if w_scales is None else w_scales
    return all([prepare_weights(w, s) for w, s in zip((w1, w2, w3), scales)])


register_preparer("moe_experts", "reference", prepare_experts)


@implements("moe_experts", "reference")
def moe_experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                w1_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                w3_scale: torch.Tensor | None = None, swiglu_limit: float = 0.0) -> torch.Tensor:
    """Routed SwiGLU experts with dispatch and weighted combine.

    Args:
        x: ``[T, D]`` float.
        weights: fp32 ``[T, k]`` gate weights (applied before w2).
        indices: int32/int64 ``[T, k]`` expert ids in ``[0, E)``.
        w1, w3: ``[E, I, D]`` (float / fp8) or uint8 ``[E, I, D/2]`` (FP4).
        w2: ``[E, D, I]`` (float / fp8) or uint8 ``[E, D, I/2]`` (FP4).
        w1_scale, w2_scale, w3_scale: FP8 ``[E, ceil(N/128), ceil(K/128)]`` float32 or e8m0;
            FP4 e8m0 ``[E, N, K/32]``; None for float weights.
        swiglu_limit: > 0 clamps ``up`` to ``[-limit, limit]`` and ``gate`` to ``<= limit``.

    Returns:
        ``[T, D]`` in x's dtype.
    """
    t, d = x.shape
    e = w1.shape[0]
    fmt = "quantized" if w1.dtype in (F.FP8_DTYPE, torch.uint8) else "float"
    k = indices.shape[1]
    flat = indices.reshape(-1).long()

    # dispatch: stable sort of the flat (t, j) order by expert id
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=e)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    token = torch.div(order, k, rounding_mode="floor")
    # shared by the three GEMMs; its bucket shapes come from the distinct counts (read on the host)
    plan = GroupPlan(offsets, torch.unique(counts).tolist(), t * k)

    if fmt == "float":
        gate, up = grouped_gemms(x[token], [(w1, None), (w3, None)], offsets, out_dtype=x.dtype, plan=plan)
    else:
        e8m0 = w1_scale.dtype == F.E8M0_DTYPE
        sfmt, sdtype = ("ue8m0", F.E8M0_DTYPE) if e8m0 else (None, torch.float32)
        xq, xq_s = act_quant(x, F.FP8_BLOCK, sfmt, sdtype)     # per-row blocks: quantize once, gather
        gate, up = grouped_gemms(xq[token], [(w1, w1_scale), (w3, w3_scale)], offsets, xq_s[token], x.dtype,
                                 plan=plan)

    gate, up = gate.float(), up.float()
    if swiglu_limit > 0:
        up = torch.clamp(up, min=-swiglu_limit, max=swiglu_limit)
        gate = torch.clamp(gate, max=swiglu_limit)
    h = weights.reshape(-1)[order].float().unsqueeze(1) * (pointwise(Fn.silu, gate) * up)
    h = h.to(x.dtype)

    if fmt == "float":
        y, = grouped_gemms(h, [(w2, None)], offsets, out_dtype=x.dtype, plan=plan)
    else:
        hq, hq_s = act_quant(h, F.FP8_BLOCK, sfmt, sdtype)
        y, = grouped_gemms(hq, [(w2, w2_scale)], offsets, hq_s, x.dtype, plan=plan)

    # combine: back to flat (t, j) order, sum over j in fp32
    y_flat = torch.empty_like(y)
    y_flat[order] = y
    return y_flat.float().reshape(t, k, d).sum(dim=1).to(x.dtype)
