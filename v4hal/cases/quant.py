"""Cases of the quantizers and dequantizers."""
from __future__ import annotations

from ._core import REQUIRED, Gen, OpCase, Shape, dtype_of, reference, register_case, tokens


def _act_quant(g: Gen, s: Shape) -> list:
    return [g.randn(s["m"], s["k"], dtype=s["dtype"]), 128, s["fmt"], dtype_of(s["scale_dtype"])]


def _act_quant_shapes(c, mode):
    return [("act" if mode == "quick" else "x", {"m": tokens(mode), "k": c.dim, "fmt": "ue8m0"})]


def _fp4_act_quant(g: Gen, s: Shape) -> list:
    return [g.randn(s["m"], s["k"], dtype=s["dtype"]), 32]


def _index_q_shapes(c, mode):
    return [("index_q", {"m": tokens(mode) * c.index_n_heads, "k": c.index_head_dim})]


def _dequant_fp8(g: Gen, s: Shape) -> list:
    y, sc = reference("act_quant", g.randn(s["m"], s["k"]), 128, None, dtype_of("fp32"))
    return [y, sc, 128, dtype_of(s["out_dtype"])]


def _dequant_fp4(g: Gen, s: Shape) -> list:
    y, sc = reference("fp4_act_quant", g.randn(s["m"], s["k"]), 32)
    return [y, sc, 32, dtype_of(s["out_dtype"])]


def _quant_weight_fp8(g: Gen, s: Shape) -> list:
    return [g.randn(s["n"], s["k"], dtype="bf16", scale=0.05), 128, s["fmt"]]


def _quant_weight_fp4(g: Gen, s: Shape) -> list:
    return [g.randn(s["n"], s["k"], dtype="bf16", scale=0.05), 32]


def _weights_in_prefill(label, rows, cols):
    """Weights are quantized once (at load), so their quantizers appear in ``prefill`` and ``quick`` only."""
    def shapes(c, mode):
        return [] if mode == "decode" else [(label, {"n": rows(c), "k": cols(c)})]
    return shapes


register_case(OpCase(
    "act_quant", _act_quant, {"m": REQUIRED, "k": REQUIRED, "dtype": "bf16", "fmt": None, "scale_dtype": "fp32"},
    tiny=[{"m": 3, "k": 256}, {"m": 5, "k": 128, "fmt": "ue8m0"}, {"m": 2, "k": 128, "scale_dtype": "e8m0"}],
    shapes=_act_quant_shapes, flops=lambda s: 3 * s["m"] * s["k"]))

register_case(OpCase(
    "fp4_act_quant", _fp4_act_quant, {"m": REQUIRED, "k": REQUIRED, "dtype": "bf16"},
    tiny=[{"m": 3, "k": 96}], shapes=_index_q_shapes, flops=lambda s: 3 * s["m"] * s["k"]))

register_case(OpCase(
    "dequant_fp8", _dequant_fp8, {"m": REQUIRED, "k": REQUIRED, "out_dtype": "fp32"},
    tiny=[{"m": 3, "k": 256}],
    shapes=lambda c, mode: [("x", {"m": tokens(mode), "k": c.dim, "out_dtype": "bf16"})],
    flops=lambda s: s["m"] * s["k"]))

register_case(OpCase(
    "dequant_fp4", _dequant_fp4, {"m": REQUIRED, "k": REQUIRED, "out_dtype": "fp32"},
    tiny=[{"m": 3, "k": 64}],
    shapes=lambda c, mode: [("expert_w1", {"m": c.moe_inter_dim, "k": c.dim, "out_dtype": "bf16"})],
    flops=lambda s: s["m"] * s["k"]))

register_case(OpCase(
    "quant_weight_fp8", _quant_weight_fp8, {"n": REQUIRED, "k": REQUIRED, "fmt": "ue8m0"},
    tiny=[{"n": 200, "k": 256}],
    shapes=_weights_in_prefill("wq_b", lambda c: c.n_heads * c.head_dim, lambda c: c.q_lora_rank),
    flops=lambda s: 3 * s["n"] * s["k"]))

register_case(OpCase(
    "quant_weight_fp4", _quant_weight_fp4, {"n": REQUIRED, "k": REQUIRED},
    tiny=[{"n": 7, "k": 64}],
    shapes=_weights_in_prefill("expert_w1", lambda c: c.moe_inter_dim, lambda c: c.dim),
    flops=lambda s: 3 * s["n"] * s["k"]))
