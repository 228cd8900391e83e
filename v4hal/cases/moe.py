"""Cases of the MoE ops: gate (V4's routing, and V4.1's router with ``v41``: gate temperature, image
bias on a random image mask, eps 1e-20 on the sum), dispatch, combine, experts."""
from __future__ import annotations

import torch

from ._core import EXPERT_PARALLEL, REQUIRED, Gen, OpCase, Shape, reference, register_case, tokens
from .gemm import V41_FLASH, WEIGHT_FORMATS, is_v4_flash

V41_GATE_TEMP = 0.75      # a non-trivial temperature (the released config's is 1.0)
V41_NORM_EPS = 1e-20


def routing(g: Gen, t: int, e: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 weights ``[t, k]`` summing to 1 per token, int32 distinct expert ids ``[t, k]``); the last
    expert gets no token when there is room."""
    ids = g.distinct(t, e - 1 if e > k else e, k)
    w = g.rand(t, k) + 0.1
    return w / w.sum(-1, keepdim=True), ids


def _moe_gate(g: Gen, s: Shape) -> list:
    t, d, e, k = s["t"], s["d"], s["e"], s["topk"]
    x = g.randn(t, d, dtype="bf16")
    w = g.randn(e, d, dtype="bf16", scale=d ** -0.5)
    v4_router = [1.0, None, None, 0.0]          # gate_temp, image_bias, image_mask, norm_eps
    if s["hash"]:
        tid2eid = g.distinct(s["vocab"], e, k)
        return [x, w, k, None, "sqrtsoftplus", 1.5, tid2eid, g.randint(s["vocab"], (t,)), *v4_router]
    if s["v41"]:
        image_mask = g.rand(t) < 0.5
        return [x, w, k, g.randn(e, scale=0.1), "sqrtsoftplus", 1.5, None, None, V41_GATE_TEMP,
                g.randn(e, scale=0.1), image_mask, V41_NORM_EPS]
    return [x, w, k, g.randn(e, scale=0.1), "sqrtsoftplus", 1.5, None, None, *v4_router]


def _gate_shapes(c, mode):
    t = tokens(mode)
    out = [("score" if mode == "quick" else "gate", {"t": t, "d": c.dim, "e": c.n_routed_experts,
                                                     "topk": c.n_activated_experts})]
    if mode == "quick":
        out.append(("v41_router", {**out[0][1], "v41": True}))
    elif is_v4_flash(c):
        v = V41_FLASH
        out.append(("v41_router", {"t": t, "d": v["dim"], "e": v["experts"], "topk": v["topk"], "v41": True}))
    return out


def _moe_dispatch(g: Gen, s: Shape) -> list:
    _, ids = routing(g, s["t"], s["e"], s["topk"])
    return [g.randn(s["t"], s["d"], dtype="bf16"), ids, s["e"]]


def _moe_combine(g: Gen, s: Shape) -> list:
    t, k = s["t"], s["topk"]
    w, ids = routing(g, t, s["e"], k)
    _, _, sorted_to_flat = reference("moe_dispatch", g.randn(t, 8), ids, s["e"])
    return [g.randn(t * k, s["d"], dtype="bf16"), w, sorted_to_flat]


def _moe_experts(g: Gen, s: Shape) -> list:
    t, d, inter, e, k, fmt = s["t"], s["d"], s["inter"], s["e"], s["topk"], s["fmt"]
    w, ids = routing(g, t, e, k)
    x = g.randn(t, d, dtype="bf16")
    ws = [g.randn(e, inter, d, scale=d ** -0.5), g.randn(e, d, inter, scale=inter ** -0.5),
          g.randn(e, inter, d, scale=d ** -0.5)]
    if fmt == "bf16":
        return [x, w, ids, *[wi.to(torch.bfloat16) for wi in ws], None, None, None, 10.0]
    kind, block = WEIGHT_FORMATS[fmt]
    q = [reference("quant_weight_fp8", wi, block, "ue8m0") if kind == "fp8" else
         reference("quant_weight_fp4", wi, block) for wi in ws]
    return [x, w, ids, q[0][0], q[1][0], q[2][0], q[0][1], q[1][1], q[2][1], 10.0]


def _moe_experts_bytes(s: Shape) -> float:
    """Activations in and out, the weights of the experts that get tokens, the routing."""
    per_weight = {"bf16": 2.0, "fp8": 1.0, "fp8_32": 1.0 + 1 / 1024, "fp4": 0.5 + 1 / 32,
                  "fp4_16": 0.5 + 1 / 16}[s["fmt"]]
    used = min(s["e"], s["t"] * s["topk"])
    return 4 * s["t"] * s["d"] + per_weight * used * 3 * s["d"] * s["inter"] + 8 * s["t"] * s["topk"]


def _routed(label):
    def shapes(c, mode):
        return [(label, {"t": tokens(mode), "d": c.dim, "e": c.n_routed_experts, "topk": c.n_activated_experts})]
    return shapes


def _experts_shapes(c, mode):
    e = c.n_routed_experts if mode == "quick" else c.n_routed_experts // EXPERT_PARALLEL
    label = "fp4" if mode == "quick" else f"ep{EXPERT_PARALLEL}_fp4"
    out = [(label, {"t": tokens(mode), "d": c.dim, "inter": c.moe_inter_dim, "e": e,
                    "topk": c.n_activated_experts, "fmt": "fp4"})]
    if mode != "quick" and is_v4_flash(c):   # V4.1-Flash routed experts: FP4 with a scale per 16
        v = V41_FLASH
        out.append((f"v41_ep{EXPERT_PARALLEL}_fp4_16", {"t": tokens(mode), "d": v["dim"], "inter": v["moe_inter"],
                                                          "e": v["experts"] // EXPERT_PARALLEL, "topk": v["topk"],
                                                          "fmt": "fp4_16"}))
    return out


ROUTED = {"t": REQUIRED, "d": REQUIRED, "e": REQUIRED, "topk": REQUIRED}

register_case(OpCase(
    "moe_gate", _moe_gate, {**ROUTED, "hash": False, "vocab": 64, "v41": False},
    tiny=[{"t": 7, "d": 64, "e": 16, "topk": 3}, {"t": 5, "d": 64, "e": 16, "topk": 2, "hash": True},
          {"t": 9, "d": 64, "e": 24, "topk": 6, "v41": True}],
    shapes=_gate_shapes,
    flops=lambda s: 2 * s["t"] * s["d"] * s["e"] + 4 * s["t"] * s["e"], bound="matmul", compute_dtype="bf16"))

register_case(OpCase(
    "moe_dispatch", _moe_dispatch, dict(ROUTED), tiny=[{"t": 9, "d": 32, "e": 6, "topk": 2}],
    shapes=_routed("dispatch")))

register_case(OpCase(
    "moe_combine", _moe_combine, dict(ROUTED), tiny=[{"t": 9, "d": 32, "e": 6, "topk": 2}],
    shapes=_routed("combine"), flops=lambda s: 2 * s["t"] * s["topk"] * s["d"]))

register_case(OpCase(
    "moe_experts", _moe_experts, {**ROUTED, "inter": REQUIRED, "fmt": "bf16"},
    tiny=[{"t": 9, "d": 128, "inter": 128, "e": 4, "topk": 2, "fmt": "bf16"},
          {"t": 5, "d": 128, "inter": 256, "e": 4, "topk": 2, "fmt": "fp8"},
          {"t": 5, "d": 128, "inter": 128, "e": 4, "topk": 2, "fmt": "fp4"},
          {"t": 5, "d": 128, "inter": 128, "e": 4, "topk": 2, "fmt": "fp8_32"},
          {"t": 5, "d": 128, "inter": 128, "e": 4, "topk": 2, "fmt": "fp4_16"}],
    shapes=_experts_shapes,
    flops=lambda s: s["t"] * s["topk"] * (6 * s["d"] * s["inter"] + 5 * s["inter"] + 2 * s["d"]),
    bytes=_moe_experts_bytes, bound="matmul", compute_dtype=lambda s: "bf16" if s["fmt"] == "bf16" else "fp8"))
