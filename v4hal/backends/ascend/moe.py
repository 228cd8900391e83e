"""MoE routing and the routed experts on Ascend.

- ``moe_gate``: the gate GEMM stays a torch fp32 matmul (as the reference); the top-k and weight
  normalisation go to the CANN gating ops, which take the fp32 logits:
  ``sqrtsoftplus`` -> ``_C_ascend.moe_gating_top_k_hash(..., norm_type=2)`` (softplus + sqrt in the
  kernel, ``y / (sum + eps) * routed_scaling_factor``; ``norm_type=2`` needs ``group_count=1``,
  which V4 uses); ``softmax`` / ``sigmoid`` -> ``torch_npu.npu_moe_gating_top_k(norm_type=0/1)``
  (softmax weights not renormalised, sigmoid renormalised: the reference's rule). Hash layers pass
  ``input_ids`` / ``tid2eid`` to the same ops. ``eps=1e-20`` is below fp32 resolution of the sums
  (a positive ``norm_eps`` is passed as the op's ``eps``). V4.1's router maps onto the same ops:
  the gate temperature divides the fp32 logits in torch before the op (as the reference does), and
  since the ops take one bias row ``[E]``, an image bias runs the op a second time with
  ``image_bias`` and each token's row is taken from the run its ``image_mask`` selects (exact, no
  host synchronisation; twice the gating op's cost).
- ``moe_dispatch`` -> ``torch_npu.npu_moe_init_routing_v2(..., expert_tokens_num_type=1,
  row_idx_type=1)``: a stable key-value sort by expert id (the op doc's numpy equivalent uses
  ``argsort(kind="stable")``), so ``expanded_row_idx`` (scatter type) is our ``sorted_to_flat`` and
  the order is bit-identical to the reference.
- ``moe_combine`` -> ``torch_npu.npu_moe_token_unpermute(permuted, sorted_indices, probs)`` whose
  ``sorted_indices`` is the inverse permutation (flat slot -> sorted row, as torch_npu's own test
  shows). Tokens are upcast to fp32 so probs stay fp32 and the sum is fp32, cast once.
- ``moe_experts``: dispatch, ``npu_grouped_matmul`` for w1/w3/w2 (see :mod:`.gemm`), clamped SwiGLU
  and the gate weight in torch, combine -- the reference's dataflow with Ascend kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn

from v4hal.backends.reference import moe as ref
from v4hal.backends.reference import moe_experts as ref_experts
from v4hal.backends.reference import quant as ref_quant
from v4hal.hal import formats as F
from v4hal.hal.registry import implements

from . import binding, gemm, limits, runtime
from ._route import route, schema_args
from .limits import ALL, fallback_when

GATING = (("torch_npu", "npu_moe_gating_top_k"),)
GATING_HASH = (("_C_ascend", "moe_gating_top_k_hash"),)
INIT_ROUTING = (("torch_npu", "npu_moe_init_routing_v2"),)
UNPERMUTE = (("torch_npu", "npu_moe_token_unpermute"),)
_FLOATS = (torch.bfloat16, torch.float16, torch.float32)

limits.plan("moe_gate", {c: "fp32 gate GEMM + _C_ascend.moe_gating_top_k_hash (norm_type=2) / "
                            "torch_npu.npu_moe_gating_top_k (norm_type 0/1)" for c in ALL})
MOE_GATE_LIMITS = (
    fallback_when("more than 2048 experts (gating op limit)", lambda a: a["weight"].shape[0] > 2048),
    fallback_when("2 or fewer experts (E / group_count must exceed 2)", lambda a: a["weight"].shape[0] <= 2),
    fallback_when("empty input", lambda a: a["x"].shape[0] == 0),
)
limits.plan("moe_dispatch", {c: "torch_npu.npu_moe_init_routing_v2 (row_idx_type=1)" for c in ALL})
MOE_DISPATCH_LIMITS = (
    fallback_when("x not bf16/fp16/fp32", lambda a: a["x"].dtype not in _FLOATS),
    fallback_when("more than 10240 experts", lambda a: a["num_experts"] > 10240),
    fallback_when("empty input", lambda a: a["indices"].numel() * a["x"].shape[1] == 0),
)
limits.plan("moe_combine", {c: "torch_npu.npu_moe_token_unpermute (fp32 tokens and probs)" for c in ALL})
MOE_COMBINE_LIMITS = (fallback_when("empty input", lambda a: a["y"].numel() == 0),)
limits.plan("moe_experts", {c: "init_routing_v2 + npu_grouped_matmul x3 + token_unpermute" for c in ALL})
MOE_EXPERTS_LIMITS = (
    fallback_when("x not bf16/fp16/fp32", lambda a: a["x"].dtype not in _FLOATS),
    fallback_when("more than 1024 experts (grouped matmul group_list limit)", lambda a: a["w1"].shape[0] > 1024),
    fallback_when("empty input", lambda a: a["indices"].numel() * a["x"].shape[1] == 0),
)


@implements("moe_gate", "ascend", requires=MOE_GATE_LIMITS)
def moe_gate(x: torch.Tensor, weight: torch.Tensor, topk: int, bias: torch.Tensor | None = None,
             score_func: str = "sqrtsoftplus", route_scale: float = 1.0, tid2eid: torch.Tensor | None = None,
             input_ids: torch.Tensor | None = None, gate_temp: float = 1.0, image_bias: torch.Tensor | None = None,
             image_mask: torch.Tensor | None = None, norm_eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[T, D]``, weight ``[E, D]`` -> (weights fp32 ``[T, topk]``, indices int32 ``[T, topk]``)."""
    values = (x, weight, topk, bias, score_func, route_scale, tid2eid, input_ids, gate_temp, image_bias, image_mask,
              norm_eps)
    cands = GATING_HASH if score_func == "sqrtsoftplus" else GATING
    chip, op, why = route("moe_gate", cands, *values)
    if op is None:
        return limits.fallback("moe_gate", chip, why, ref.moe_gate, *values)
    logits = Fn.linear(x.float(), weight.float())                     # [T, E] fp32, as the reference
    if gate_temp != 1.0:
        logits = logits / gate_temp
    logits = logits.contiguous()
    norm_type = 2 if score_func == "sqrtsoftplus" else (0 if score_func == "softmax" else 1)

    def gating(row_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        y, idx, _ = op(logits, topk, norm_type=norm_type, bias=row_bias, input_ids=input_ids, tid2eid=tid2eid,
                       k_group=1, group_count=1, group_select_mode=0, renorm=0, out_flag=False,
                       routed_scaling_factor=float(route_scale), eps=float(norm_eps) or 1e-20)
        return y.float(), idx.to(torch.int32)

    y, idx = gating(bias)
    if image_bias is not None and image_mask is not None:
        y_img, idx_img = gating(image_bias)
        pick = image_mask.unsqueeze(1)
        y, idx = torch.where(pick, y_img, y), torch.where(pick, idx_img, idx)
    return y.contiguous(), idx.contiguous()


@implements("moe_dispatch", "ascend", requires=MOE_DISPATCH_LIMITS)
def moe_dispatch(x: torch.Tensor, indices: torch.Tensor,
                 num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x ``[T, D]``, indices int32 ``[T, k]`` -> (x_sorted ``[T*k, D]``, group_offsets int64 ``[E+1]``,
    sorted_to_flat int64 ``[T*k]``), the reference's stable order."""
    t, k = indices.shape
    chip, op, why = route("moe_dispatch", INIT_ROUTING, x, indices, num_experts)
    if op is None:
        return limits.fallback("moe_dispatch", chip, why, ref.moe_dispatch, x, indices, num_experts)
    expanded_x, expanded_row_idx, counts, _ = op(
        x.contiguous(), indices.contiguous(), active_num=t * k, expert_num=num_experts, expert_tokens_num_type=1,
        expert_tokens_num_flag=True, quant_mode=-1, active_expert_range=[0, num_experts], row_idx_type=1)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=x.device)
    offsets[1:] = torch.cumsum(counts.to(torch.int64), dim=0)
    return expanded_x, offsets, expanded_row_idx.to(torch.int64)


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), dtype=perm.dtype, device=perm.device)
    return inv


@implements("moe_combine", "ascend", requires=MOE_COMBINE_LIMITS)
def moe_combine(y: torch.Tensor, weights: torch.Tensor, sorted_to_flat: torch.Tensor) -> torch.Tensor:
    """y ``[T*k, D]`` (dispatch order), weights fp32 ``[T, k]`` -> ``[T, D]`` in y's dtype."""
    chip, op, why = route("moe_combine", UNPERMUTE, y, weights, sorted_to_flat)
    if op is None:
        return limits.fallback("moe_combine", chip, why, ref.moe_combine, y, weights, sorted_to_flat)
    flat_to_sorted = _inverse(sorted_to_flat).to(torch.int32)
    out = op(y.float().contiguous(), flat_to_sorted, probs=weights.float().contiguous())
    return out.to(y.dtype)


@implements("moe_experts", "ascend", requires=MOE_EXPERTS_LIMITS)
def moe_experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                w3: torch.Tensor, w1_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                w3_scale: torch.Tensor | None = None, swiglu_limit: float = 0.0) -> torch.Tensor:
    """Routed SwiGLU experts: x ``[T, D]``, weights fp32 ``[T, k]``, indices ``[T, k]``, w1/w3 ``[E, I, D(/2)]``,
    w2 ``[E, D, I(/2)]`` (float, fp8 + tile scales or FP4 + e8m0) -> ``[T, D]`` in x's dtype."""
    e = w1.shape[0]
    t, k = indices.shape
    chip = runtime.chip()
    why = limits.violation("moe_experts", chip, schema_args("moe_experts", (
        x, weights, indices, w1, w2, w3, w1_scale, w2_scale, w3_scale, swiglu_limit)))
    if why is None:
        missing = [c for c in (INIT_ROUTING, gemm.GROUPED_MATMUL, UNPERMUTE) if binding.lookup(c) is None]
        if missing:
            why = "CANN op not installed (" + ", ".join(binding.describe(c) for c in missing) + ")"
    if why is not None:
        return limits.fallback("moe_experts", chip, why, ref_experts.moe_experts, x, weights, indices, w1, w2, w3,
                               w1_scale, w2_scale, w3_scale, swiglu_limit)
    limits.record("moe_experts", chip, "native:composite")
    xs, offsets, s2f = moe_dispatch(x, indices.to(torch.int32), e)
    quantized = w1_scale is not None
    if quantized:
        assert w1_scale is not None and w2_scale is not None and w3_scale is not None
        e8m0 = w1_scale.dtype == F.E8M0_DTYPE
        sfmt, sdtype = ("ue8m0", F.E8M0_DTYPE) if e8m0 else (None, torch.float32)
        xq, xq_s = ref_quant.act_quant(xs, F.FP8_BLOCK, sfmt, sdtype)   # per-row blocks: same as before the gather
        gate = gemm.grouped_gemm(xq, w1, offsets, xq_s, w1_scale, x.dtype)
        up = gemm.grouped_gemm(xq, w3, offsets, xq_s, w3_scale, x.dtype)
    else:
        gate = gemm.grouped_gemm(xs, w1, offsets, out_dtype=x.dtype)
        up = gemm.grouped_gemm(xs, w3, offsets, out_dtype=x.dtype)
    gate, up = gate.float(), up.float()
    if swiglu_limit > 0:
        up = torch.clamp(up, min=-swiglu_limit, max=swiglu_limit)
        gate = torch.clamp(gate, max=swiglu_limit)
    h = (weights.reshape(-1)[s2f].float().unsqueeze(1) * (Fn.silu(gate) * up)).to(x.dtype)
    if quantized:
        hq, hq_s = ref_quant.act_quant(h, F.FP8_BLOCK, sfmt, sdtype)
        y = gemm.grouped_gemm(hq, w2, offsets, hq_s, w2_scale, x.dtype)
    else:
        y = gemm.grouped_gemm(h, w2, offsets, out_dtype=x.dtype)
    ones = torch.ones(t, k, dtype=torch.float32, device=x.device)
    return moe_combine(y, ones, s2f)
