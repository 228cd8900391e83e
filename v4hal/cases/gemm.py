"""Cases of the FP8 / FP4 / grouped GEMMs."""
from __future__ import annotations

from v4hal.bench import peers

from ._core import EXPERT_PARALLEL, REQUIRED, Gen, OpCase, Shape, dtype_of, reference, register_case, tokens


def _fp8_act(g: Gen, m: int, k: int) -> tuple:
    return reference("act_quant", g.randn(m, k), 128, "ue8m0", dtype_of("fp32"))


def _fp8_gemm(g: Gen, s: Shape) -> list:
    a, a_s = _fp8_act(g, s["m"], s["k"])
    b, b_s = reference("quant_weight_fp8", g.randn(s["n"], s["k"], scale=s["k"] ** -0.5), 128, "ue8m0")
    return [a, a_s, b, b_s, dtype_of("fp32"), dtype_of("bf16")]


def _fp4_gemm(g: Gen, s: Shape) -> list:
    a, a_s = _fp8_act(g, s["m"], s["k"])
    b, b_s = reference("quant_weight_fp4", g.randn(s["n"], s["k"], scale=s["k"] ** -0.5), 32)
    return [a, a_s, b, b_s, dtype_of("fp32"), dtype_of("bf16")]


def group_offsets(g: Gen, rows: int, experts: int):
    """int64 ``[experts + 1]``: random group sizes summing to ``rows``; the last expert gets no rows."""
    import torch

    ids = g.randint(experts, (rows,))
    if experts > 1:
        ids = torch.where(ids == experts - 1, 0, ids)
    counts = torch.zeros(experts, dtype=torch.int64, device=ids.device).index_add_(0, ids, torch.ones_like(ids))
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


FLOAT_FORMATS = ("bf16", "fp16", "fp32")


def _grouped_gemm(g: Gen, s: Shape) -> list:
    m, n, k, e, fmt = s["m"], s["n"], s["k"], s["e"], s["fmt"]
    offsets = group_offsets(g, m, e)
    x = g.randn(m, k)
    w = g.randn(e, n, k, scale=k ** -0.5)
    if fmt in FLOAT_FORMATS:
        return [x.to(dtype_of(fmt)), w.to(dtype_of(fmt)), offsets, None, None, dtype_of("bf16")]
    xq, xs = reference("act_quant", x, 128, "ue8m0", dtype_of("fp32"))
    wq, ws = (reference("quant_weight_fp8", w, 128, "ue8m0") if fmt == "fp8" else
              reference("quant_weight_fp4", w, 32))
    return [xq, wq, offsets, xs, ws, dtype_of("bf16")]


def _projection_shapes(c, mode):
    t, d, hd, h = tokens(mode), c.dim, c.head_dim, c.n_heads
    if mode == "quick":
        return [("wq_b", {"m": t, "n": h * hd, "k": c.q_lora_rank})]
    return [("wq_a", {"m": t, "n": c.q_lora_rank, "k": d}), ("wq_b", {"m": t, "n": h * hd, "k": c.q_lora_rank}),
            ("wkv", {"m": t, "n": hd, "k": d}), ("wo_b", {"m": t, "n": d, "k": c.o_groups * c.o_lora_rank}),
            ("shared_w1", {"m": t, "n": c.moe_inter_dim, "k": d}),
            ("shared_w2", {"m": t, "n": d, "k": c.moe_inter_dim})]


def _expert_shapes(c, mode):
    t, d, inter = tokens(mode), c.dim, c.moe_inter_dim
    out = [("expert_w1", {"m": t, "n": inter, "k": d})]
    return out if mode == "quick" else out + [("expert_w2", {"m": t, "n": d, "k": inter})]


def _grouped_shapes(c, mode):
    t, inter, d = tokens(mode), c.moe_inter_dim, c.dim
    if mode == "quick":
        return [("experts_w1", {"m": t * c.n_activated_experts, "n": inter, "k": d, "e": c.n_routed_experts,
                                "fmt": "fp8"})]
    rows = t * c.n_activated_experts // EXPERT_PARALLEL
    e_local = c.n_routed_experts // EXPERT_PARALLEL
    return [(f"ep{EXPERT_PARALLEL}_w1_{fmt}", {"m": rows, "n": inter, "k": d, "e": e_local, "fmt": fmt})
            for fmt in ("fp8", "fp4")]


def _mnk_flops(s: Shape) -> float:
    return 2 * s["m"] * s["n"] * s["k"]


register_case(OpCase(
    "fp8_gemm", _fp8_gemm, {"m": REQUIRED, "n": REQUIRED, "k": REQUIRED},
    tiny=[{"m": 5, "n": 200, "k": 256}], shapes=_projection_shapes, flops=_mnk_flops, bound="matmul",
    compute_dtype="fp8", peers=(peers.scaled_mm_blockwise, peers.bf16_dequant_matmul)))

register_case(OpCase(
    "fp4_gemm", _fp4_gemm, {"m": REQUIRED, "n": REQUIRED, "k": REQUIRED},
    tiny=[{"m": 3, "n": 64, "k": 256}], shapes=_expert_shapes, flops=_mnk_flops, bound="matmul",
    compute_dtype="fp8", peers=(peers.bf16_dequant_matmul,)))

register_case(OpCase(
    "grouped_gemm", _grouped_gemm, {"m": REQUIRED, "n": REQUIRED, "k": REQUIRED, "e": REQUIRED, "fmt": "bf16"},
    tiny=[{"m": 33, "n": 64, "k": 128, "e": 4, "fmt": "fp32"}, {"m": 33, "n": 128, "k": 256, "e": 3, "fmt": "fp8"},
          {"m": 17, "n": 64, "k": 128, "e": 3, "fmt": "fp4"}],
    shapes=_grouped_shapes, flops=_mnk_flops, bound="matmul",
    compute_dtype=lambda s: s["fmt"] if s["fmt"] in FLOAT_FORMATS else "fp8", peers=(peers.torch_grouped_mm,)))
