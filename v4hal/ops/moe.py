"""MoE ops: the gate (sqrtsoftplus / softmax / sigmoid scores, or hash routing; V4.1's router adds a
gate temperature, a separate bias for image tokens and an eps on the normalising sum), the
permutation of token copies to experts and back, and the whole routed-expert path."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _checks as C
from ._checks import FLOATS, FP8
from ._define import call, define_op
from ._prepare import prepare_for
from .gemm import BLOCK, WEIGHT_DTYPES, weight_kind

SCORE_FUNCS = ("sqrtsoftplus", "softmax", "sigmoid")


def _check_moe_gate(x, weight, topk, bias, score_func, route_scale, tid2eid, input_ids,
                    gate_temp=1.0, image_bias=None, image_mask=None, norm_eps=0.0):
    op = "moe_gate"
    C.dtype(op, "x", x, FLOATS)
    C.rank(op, "x", x, (2,), "[T, D]")
    C.dtype(op, "weight", weight, FLOATS)
    C.rank(op, "weight", weight, (2,), "[E, D]")
    if weight.shape[1] != x.shape[1]:
        raise C.ShapeError(f"{op}: weight must be [E, D] with D = {x.shape[1]}, got {C.describe(weight)}")
    e = weight.shape[0]
    C.in_range(op, "topk", topk, 1, e, note=" (E = weight.shape[0])")
    if bias is not None:
        C.dtype(op, "bias", bias, (torch.float32,))
        C.shape(op, "bias", bias, (e,), "[E]")
    C.one_of(op, "score_func", score_func, SCORE_FUNCS)
    C.float_arg(op, "route_scale", route_scale)
    if (tid2eid is None) != (input_ids is None):
        raise C.ShapeError(f"{op}: hash routing needs both tid2eid and input_ids, got only "
                           f"{'tid2eid' if input_ids is None else 'input_ids'}")
    if tid2eid is not None:
        C.dtype(op, "tid2eid", tid2eid, C.INTS)
        C.rank(op, "tid2eid", tid2eid, (2,), "[vocab, topk]")
        if tid2eid.shape[1] != topk:
            raise C.ShapeError(f"{op}: tid2eid must be [vocab, topk={topk}], got {C.describe(tid2eid)}")
        C.dtype(op, "input_ids", input_ids, C.INTS)
        C.shape(op, "input_ids", input_ids, (x.shape[0],), "[T]")
    C.in_range(op, "gate_temp", gate_temp, 0.0, C.MAX_FLOAT_ARG, open_low=True, note=" (the logits are divided by it)")
    if (image_bias is None) != (image_mask is None):
        raise C.ShapeError(f"{op}: image routing needs both image_bias and image_mask, got only "
                           f"{'image_bias' if image_mask is None else 'image_mask'}")
    if image_bias is not None:
        if bias is None:
            raise C.ShapeError(f"{op}: image_bias replaces bias on image tokens, so it needs bias, got bias None")
        if tid2eid is not None:
            raise C.ShapeError(f"{op}: image_bias steers the top-k choice, which hash routing (tid2eid) replaces")
        C.dtype(op, "image_bias", image_bias, (torch.float32,))
        C.shape(op, "image_bias", image_bias, (e,), "[E]")
        C.dtype(op, "image_mask", image_mask, (torch.bool,))
        C.shape(op, "image_mask", image_mask, (x.shape[0],), "[T]")
    C.in_range(op, "norm_eps", norm_eps, 0.0, 1.0)
    C.same_device(op, x=x, weight=weight, bias=bias, tid2eid=tid2eid, input_ids=input_ids,
                  image_bias=image_bias, image_mask=image_mask)


def _values_moe_gate(x, weight, topk, bias, score_func, route_scale, tid2eid, input_ids, *_v41):
    if tid2eid is not None:
        C.index_range("moe_gate", "tid2eid", tid2eid, 0, weight.shape[0])
        C.index_range("moe_gate", "input_ids", input_ids, 0, tid2eid.shape[0])


def _fake_moe_gate(x, weight, topk, *rest):
    t = x.shape[0]
    return x.new_empty((t, topk), dtype=torch.float32), x.new_empty((t, topk), dtype=torch.int32)


define_op("moe_gate",
          "(Tensor x, Tensor weight, int topk, Tensor? bias=None, str score_func=\"sqrtsoftplus\", "
          "float route_scale=1.0, Tensor? tid2eid=None, Tensor? input_ids=None, float gate_temp=1.0, "
          "Tensor? image_bias=None, Tensor? image_mask=None, float norm_eps=0.0) -> (Tensor, Tensor)",
          check=_check_moe_gate, fake=_fake_moe_gate, value_check=_values_moe_gate,
          doc=C.ranges_doc(topk="[1, E]", route_scale=C.FLOAT_ARG_RANGE,
                           gate_temp=C.interval(0.0, C.MAX_FLOAT_ARG, open_low=True),
                           norm_eps=C.interval(0.0, 1.0)))


def moe_gate(x: torch.Tensor, weight: torch.Tensor, *, topk: int, bias: torch.Tensor | None = None,
             score_func: str = "sqrtsoftplus", route_scale: float = 1.0, tid2eid: torch.Tensor | None = None,
             input_ids: torch.Tensor | None = None, gate_temp: float = 1.0, image_bias: torch.Tensor | None = None,
             image_mask: torch.Tensor | None = None, norm_eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Route ``x [T, D]`` over ``E`` experts: (weights fp32 ``[T, topk]``, expert ids int32 ``[T, topk]``).

    Scores are ``score_func(fp32(x) @ fp32(weight)^T / gate_temp)``. ``bias`` only influences the choice
    (``image_bias`` fp32 ``[E]`` replaces it on the tokens where ``image_mask`` bool ``[T]`` is set); weights
    are the chosen unbiased scores divided by ``sum + norm_eps`` (sqrtsoftplus/sigmoid) times ``route_scale``.
    With ``tid2eid``/``input_ids`` the ids come from the table. V4.1's router: ``gate_temp`` of the
    checkpoint, ``norm_eps=1e-20``, ``route_scale=1.5``, sqrtsoftplus.
    """
    return call.moe_gate(x, weight, topk, bias, score_func, float(route_scale), tid2eid, input_ids,
                         float(gate_temp), image_bias, image_mask, float(norm_eps))


@dataclass(frozen=True)
class MoEHandle:
    """What ``moe_combine`` needs to undo ``moe_dispatch``: the flat (token, slot) index of each sorted row."""

    sorted_to_flat: torch.Tensor  # int64 [T*k]
    num_tokens: int
    topk: int


def _check_moe_dispatch(x, indices, num_experts):
    op = "moe_dispatch"
    C.dtype(op, "x", x, (*FLOATS, FP8))
    C.rank(op, "x", x, (2,), "[T, D]")
    C.dtype(op, "indices", indices, (torch.int32,))
    C.rank(op, "indices", indices, (2,), "[T, k]")
    if indices.shape[0] != x.shape[0]:
        raise C.ShapeError(f"{op}: indices must be [T={x.shape[0]}, k], got {C.describe(indices)}")
    C.in_range(op, "num_experts", num_experts, 1, C.MAX_EXPERTS)
    C.same_device(op, x=x, indices=indices)


def _fake_moe_dispatch(x, indices, num_experts):
    rows = indices.shape[0] * indices.shape[1]
    return (x.new_empty((rows, x.shape[1])), x.new_empty((num_experts + 1,), dtype=torch.int64),
            x.new_empty((rows,), dtype=torch.int64))


define_op("moe_dispatch", "(Tensor x, Tensor indices, int num_experts) -> (Tensor, Tensor, Tensor)",
          check=_check_moe_dispatch, fake=_fake_moe_dispatch,
          doc=C.ranges_doc(num_experts=C.interval(1, C.MAX_EXPERTS)),
          value_check=lambda x, idx, e: C.index_range("moe_dispatch", "indices", idx, 0, e))


def moe_dispatch(x: torch.Tensor, indices: torch.Tensor, num_experts: int
                 ) -> tuple[torch.Tensor, torch.Tensor, MoEHandle]:
    """Copy each token once per chosen expert, grouped by expert (stable: ascending ``t*k + j`` inside an
    expert): (x_sorted ``[T*k, D]``, group_offsets int64 ``[E+1]``, handle for ``moe_combine``)."""
    x_sorted, offsets, sorted_to_flat = call.moe_dispatch(x, indices, num_experts)
    return x_sorted, offsets, MoEHandle(sorted_to_flat, indices.shape[0], indices.shape[1])


def _check_moe_combine(y, weights, sorted_to_flat):
    op = "moe_combine"
    C.dtype(op, "y", y, FLOATS)
    C.rank(op, "y", y, (2,), "[T*k, D]")
    C.dtype(op, "weights", weights, (torch.float32,))
    C.rank(op, "weights", weights, (2,), "[T, k]")
    rows = weights.shape[0] * weights.shape[1]
    if y.shape[0] != rows:
        raise C.ShapeError(f"{op}: y must be [T*k = {rows}, D], got {C.describe(y)}")
    C.dtype(op, "sorted_to_flat", sorted_to_flat, (torch.int64,))
    C.shape(op, "sorted_to_flat", sorted_to_flat, (rows,), "[T*k]")
    C.same_device(op, y=y, weights=weights, sorted_to_flat=sorted_to_flat)


define_op("moe_combine", "(Tensor y, Tensor weights, Tensor sorted_to_flat) -> Tensor",
          check=_check_moe_combine,
          fake=lambda y, w, s: y.new_empty((w.shape[0], y.shape[1])),
          value_check=lambda y, w, s: C.permutation("moe_combine", "sorted_to_flat", s))


def moe_combine(y: torch.Tensor, weights: torch.Tensor, handle: MoEHandle) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * y[row of (t, j)]`` (fp32 sums) -> ``[T, D]`` in y's dtype."""
    if not isinstance(handle, MoEHandle):
        raise C.DTypeError(f"moe_combine: handle must be the MoEHandle from moe_dispatch, got {type(handle).__name__}")
    return call.moe_combine(y, weights, handle.sorted_to_flat)


def _check_moe_experts(x, weights, indices, w1, w2, w3, w1_scale, w2_scale, w3_scale, swiglu_limit):
    op = "moe_experts"
    C.dtype(op, "x", x, FLOATS)
    C.rank(op, "x", x, (2,), "[T, D]")
    t, d = x.shape
    C.dtype(op, "indices", indices, (torch.int32,))
    C.rank(op, "indices", indices, (2,), "[T, k]")
    if indices.shape[0] != t:
        raise C.ShapeError(f"{op}: indices must be [T={t}, k], got {C.describe(indices)}")
    C.dtype(op, "weights", weights, (torch.float32,))
    C.shape(op, "weights", weights, tuple(indices.shape), "[T, k] like indices")
    for name, w in (("w1", w1), ("w2", w2), ("w3", w3)):
        C.dtype(op, name, w, WEIGHT_DTYPES)
    if not w1.dtype == w2.dtype == w3.dtype:
        raise C.DTypeError(f"{op}: w1, w2, w3 must share one dtype, got {w1.dtype}, {w2.dtype}, {w3.dtype}")
    C.rank(op, "w1", w1, (3,), "[E, I, D] (FP4: [E, I, D/2])")
    scales = (w1_scale, w2_scale, w3_scale)
    if w1.dtype in FLOATS:
        if w1.dtype != x.dtype:
            raise C.DTypeError(f"{op}: float weights must have x's dtype {x.dtype}, got w1 {C.describe(w1)}")
    else:
        if any(s is None for s in scales):
            raise C.DTypeError(f"{op}: quantized weights need w1_scale, w2_scale and w3_scale, got "
                               + ", ".join("None" if s is None else C.describe(s) for s in scales))
        if len({s.dtype for s in scales}) != 1:
            raise C.DTypeError(f"{op}: w1_scale, w2_scale, w3_scale must share one dtype, got "
                               + ", ".join(C.describe(s) for s in scales))
        inter = w1.shape[1]
        if d % BLOCK or inter % BLOCK:
            raise C.ShapeError(f"{op}: quantized weights need D ({d}) and I ({inter}) divisible by {BLOCK} "
                               "(the activations are quantized in 128-blocks)")
    weight_kind(op, "w1", w1, w1_scale, d, "w1_scale")
    weight_kind(op, "w3", w3, w3_scale, d, "w3_scale")
    e, inter = w1.shape[0], w1.shape[1]
    if tuple(w3.shape) != tuple(w1.shape):
        raise C.ShapeError(f"{op}: w3 must have w1's shape {list(w1.shape)}, got {C.describe(w3)}")
    weight_kind(op, "w2", w2, w2_scale, inter, "w2_scale")
    if w2.shape[0] != e or w2.shape[1] != d:
        raise C.ShapeError(f"{op}: w2 must be [E={e}, D={d}, I={inter}], got {C.describe(w2)}")
    C.in_range(op, "swiglu_limit", swiglu_limit, 0.0, C.MAX_FLOAT_ARG, note=" (0 = no clamp)")
    C.same_device(op, x=x, weights=weights, indices=indices, w1=w1, w2=w2, w3=w3,
                  w1_scale=w1_scale, w2_scale=w2_scale, w3_scale=w3_scale)


def _values_moe_experts(x, weights, indices, w1, w2, w3, s1, s2, s3, swiglu_limit):
    C.index_range("moe_experts", "indices", indices, 0, w1.shape[0])
    if w1.dtype not in FLOATS:      # quantized weights: x goes through act_quant
        C.finite("moe_experts", "x", x)
    for name, s in (("w1_scale", s1), ("w2_scale", s2), ("w3_scale", s3)):
        C.finite("moe_experts", name, s)


define_op("moe_experts",
          "(Tensor x, Tensor weights, Tensor indices, Tensor w1, Tensor w2, Tensor w3, Tensor? w1_scale=None, "
          "Tensor? w2_scale=None, Tensor? w3_scale=None, float swiglu_limit=0.0) -> Tensor",
          check=_check_moe_experts, fake=lambda x, *a: torch.empty_like(x), value_check=_values_moe_experts,
          doc=C.ranges_doc(swiglu_limit=C.interval(0.0, C.MAX_FLOAT_ARG) + " (0: no clamp)"))


def moe_experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w1: torch.Tensor,
                w2: torch.Tensor, w3: torch.Tensor, *,
                w_scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                swiglu_limit: float = 0.0) -> torch.Tensor:
    """The routed experts: ``sum_j weights[t, j] * w2(silu(w1 x) * (w3 x))`` of expert ``indices[t, j]``.

    w1/w3 ``[E, I, D]``, w2 ``[E, D, I]`` in bf16/fp16/fp32, FP8 (``w_scales`` = 128x128 or 32x32 tile scales)
    or packed FP4 (``w_scales`` = ``[E, N, K/32]`` or ``[E, N, K/16]``); ``w_scales`` is
    ``(w1_scale, w2_scale, w3_scale)``.
    ``swiglu_limit > 0`` clamps ``w3 x`` to ``[-limit, limit]`` and ``w1 x`` to ``<= limit``. Out ``[T, D]``.
    """
    if w_scales is None:
        s1 = s2 = s3 = None
    else:
        if len(w_scales) != 3:
            raise C.ShapeError(f"moe_experts: w_scales must be (w1_scale, w2_scale, w3_scale), "
                               f"got {len(w_scales)} items")
        s1, s2, s3 = w_scales
    return call.moe_experts(x, weights, indices, w1, w2, w3, s1, s2, s3, float(swiglu_limit))


def prepare_moe_experts(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, *,
                        w_scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> bool:
    """Once after loading: let the backend that serves ``moe_experts`` on the weights' device prepare these
    stacks for its later calls with these very tensors (the reference backend decodes them to fp32 once
    instead of decoding the picked experts in every call; results unchanged, fp32 memory held while the
    weights live). Arguments as :func:`moe_experts`. Returns whether the backend kept a preparation (False
    where it has none to make). Its preparer takes ``(w1, w2, w3, w_scales)``."""
    op = "prepare_moe_experts"
    if w_scales is not None and len(w_scales) != 3:
        raise C.ShapeError(f"{op}: w_scales must be (w1_scale, w2_scale, w3_scale), got {len(w_scales)} items")
    s1, s2, s3 = (None, None, None) if w_scales is None else w_scales
    for name, w in (("w1", w1), ("w2", w2), ("w3", w3)):
        C.dtype(op, name, w, WEIGHT_DTYPES)
        C.rank(op, name, w, (3,), "[E, N, K] (FP4: [E, N, K/2])")
    weight_kind(op, "w1", w1, s1, w2.shape[1], "w1_scale")
    weight_kind(op, "w3", w3, s3, w2.shape[1], "w3_scale")
    weight_kind(op, "w2", w2, s2, w1.shape[1], "w2_scale")
    if tuple(w3.shape) != tuple(w1.shape):
        raise C.ShapeError(f"{op}: w3 must have w1's shape {list(w1.shape)}, got {C.describe(w3)}")
    C.same_device(op, w1=w1, w2=w2, w3=w3, w1_scale=s1, w2_scale=s2, w3_scale=s3)
    return prepare_for("moe_experts", w1.device, w1, w2, w3, w_scales)
