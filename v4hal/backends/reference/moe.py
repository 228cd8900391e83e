"""Reference (pure PyTorch) MoE routing: gate, dispatch (group tokens by expert), combine.

Semantics: ``docs/ops.md`` (MoE) and the public DeepSeek-V4 ``inference/model.py``
``Gate``/``MoE``. What that code does, step by step, and what this module reproduces:

* gate logits are an fp32 GEMM: both ``x`` and the gate weight are upcast to fp32 first;
* score functions: ``"sqrtsoftplus"`` = ``sqrt(softplus(logits))`` (torch softplus: beta 1, linear
  above 20), ``"sigmoid"``, ``"softmax"`` (over the experts); all in fp32;
* the bias (fp32 ``[E]``) is added to the scores only to pick the experts (top-k of
  ``scores + bias``); the routing weights are gathered from the **unbiased** scores;
* hash layers take the indices from ``tid2eid[input_ids]`` instead of the top-k (bias unused);
* the gathered weights are divided by their sum for ``"sqrtsoftplus"`` and ``"sigmoid"`` (no eps),
  and **not** for ``"softmax"`` (the V3 lineage: softmax probabilities already share one
  denominator), then multiplied by ``route_scale``.

Dispatch/combine have no public counterpart (the public code loops over experts); their
contract (``docs/op_contract.md``) is ours: dispatch is a stable sort of the ``T*k`` flat
slots by expert id, combine sums the ``k`` weighted rows per token in fp32 in slot order.
Inputs arrive validated (ids in range, a permutation for combine) by :mod:`v4hal.ops.moe`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from v4hal.hal import formats
from v4hal.hal.registry import implements

from ._rows import pointwise64, row_matmul

__all__ = ["moe_gate", "moe_dispatch", "moe_combine", "SCORE_FUNCS"]

SCORE_FUNCS = ("sqrtsoftplus", "softmax", "sigmoid")


@implements("moe_gate", "reference")
def moe_gate(x: torch.Tensor, weight: torch.Tensor, topk: int, bias: torch.Tensor | None = None,
             score_func: str = "sqrtsoftplus", route_scale: float = 1.0,
             tid2eid: torch.Tensor | None = None,
             input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Route each token to ``topk`` experts.

    x float ``[T, D]``, weight float ``[E, D]``, bias fp32 ``[E]`` (choice only), tid2eid int32
    (int64 accepted) ``[vocab, topk]`` + input_ids int ``[T]`` (hash routing, both or neither).
    Returns weights fp32 ``[T, topk]`` and indices int32 ``[T, topk]``. Score routing lists the
    experts by descending ``scores + bias`` (``torch.topk`` order; ties unspecified); hash routing
    keeps the table's order.
    """
    logits = row_matmul(x.float(), weight.float().T)                   # [T, E] fp32
    if score_func == "softmax":
        scores = logits.softmax(dim=-1)
    elif score_func == "sigmoid":
        scores = pointwise64(torch.sigmoid, logits)
    else:
        scores = pointwise64(F.softplus, logits).sqrt()
    if tid2eid is not None and input_ids is not None:
        indices = tid2eid.index_select(0, input_ids.long()).long()    # [T, topk]
    else:
        choice = scores if bias is None else scores + bias
        indices = choice.topk(topk, dim=-1).indices
    weights = scores.gather(1, indices)
    if score_func != "softmax":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights * formats.operand(route_scale, weights)      # fp32 route_scale as a tensor operand
    return weights.contiguous(), indices.to(torch.int32).contiguous()


@implements("moe_dispatch", "reference")
def moe_dispatch(x: torch.Tensor, indices: torch.Tensor,
                 num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the ``T*k`` (token, slot) rows by expert.

    x ``[T, D]`` (any dtype, copied bit for bit), indices int32 ``[T, k]`` in ``[0, num_experts)``.
    Returns x_sorted ``[T*k, D]`` (x's dtype): row r is ``x[sorted_to_flat[r] // k]``; rows of
    expert e are ``group_offsets[e]:group_offsets[e+1]``, inside an expert in ascending flat index
    ``t*k + j`` (stable); group_offsets int64 ``[E+1]``; sorted_to_flat int64 ``[T*k]``.
    """
    k = indices.shape[1]
    flat = indices.reshape(-1).long()
    # A stable sort keeps equal expert ids in ascending flat index: exactly the contract order.
    sorted_to_flat = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    group_offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=x.device)
    group_offsets[1:] = torch.cumsum(counts, dim=0)
    rows = torch.div(sorted_to_flat, k, rounding_mode="floor") if k > 0 else sorted_to_flat
    x_sorted = x.index_select(0, rows)
    return x_sorted, group_offsets, sorted_to_flat


@implements("moe_combine", "reference")
def moe_combine(y: torch.Tensor, weights: torch.Tensor, sorted_to_flat: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's ``k`` expert outputs.

    y ``[T*k, D]`` float (rows in dispatch order), weights fp32 ``[T, k]``, sorted_to_flat int64
    ``[T*k]`` (a permutation, from moe_dispatch). Returns ``[T, D]`` in y's dtype with
    ``out[t] = sum_j weights[t, j] * y[row of (t, j)]``: fp32 products, accumulated from 0 in slot
    order j = 0..k-1 (one rounding per multiply and per add), one cast at the end.
    """
    t, k = weights.shape
    n = t * k
    flat_to_sorted = torch.empty_like(sorted_to_flat)
    flat_to_sorted[sorted_to_flat] = torch.arange(n, dtype=torch.int64, device=y.device)
    rows = y.index_select(0, flat_to_sorted).view(t, k, y.shape[1])
    out = torch.zeros(t, y.shape[1], dtype=torch.float32, device=y.device)
    for j in range(k):  # k is the small, fixed slot count; the loop fixes the summation order
        out = out + weights[:, j:j + 1] * rows[:, j].float()
    return out.to(y.dtype)
