"""Cases of the FP8 / FP4 / grouped GEMMs, with V4's weight formats (128x128 FP8 tiles, FP4 per 32)
and V4.1's (``wb``: 32x32 FP8 tiles, FP4 per 16; grouped ``fmt`` "fp8_32" / "fp4_16").

V4.1-Flash shapes (hidden 5120, expert intermediate 2304, 384 experts, top-6: the released
``configuration_deepseek_v41.py``) ride on the v4-flash shape sets, labelled ``v41_*``, until a
V4.1 model preset exists."""
from __future__ import annotations

from v4hal.bench import peers

from ._core import EXPERT_PARALLEL, REQUIRED, Gen, OpCase, Shape, dtype_of, reference, register_case, tokens


def _fp8_act(g: Gen, m: int, k: int) -> tuple:
    return reference("act_quant", g.randn(m, k), 128, "ue8m0", dtype_of("fp32"))


#: V4.1-Flash dimensions of the GEMM and MoE cases (configuration_deepseek_v41.py defaults)
V41_FLASH = {"dim": 5120, "moe_inter": 2304, "experts": 384, "topk": 6, "q_lora_rank": 1280}


def is_v4_flash(c) -> bool:
    """Whether model config ``c`` is the v4-flash preset (whose shape sets also carry V4.1-Flash's)."""
    from v4hal.model.config import ModelConfig

    return c == ModelConfig.preset("v4-flash")


def _fp8_gemm(g: Gen, s: Shape) -> list:
    a, a_s = _fp8_act(g, s["m"], s["k"])
    b, b_s = reference("quant_weight_fp8", g.randn(s["n"], s["k"], scale=s["k"] ** -0.5), s["wb"], "ue8m0")
    return [a, a_s, b, b_s, dtype_of("fp32"), dtype_of("bf16")]


def _fp4_gemm(g: Gen, s: Shape) -> list:
    a, a_s = _fp8_act(g, s["m"], s["k"])
    b, b_s = reference("quant_weight_fp4", g.randn(s["n"], s["k"], scale=s["k"] ** -0.5), s["wb"])
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
#: quantized grouped formats: FP8 tiles 128 / 32, FP4 K blocks 32 / 16
WEIGHT_FORMATS = {"fp8": ("fp8", 128), "fp8_32": ("fp8", 32), "fp4": ("fp4", 32), "fp4_16": ("fp4", 16)}


def _grouped_gemm(g: Gen, s: Shape) -> list:
    m, n, k, e, fmt = s["m"], s["n"], s["k"], s["e"], s["fmt"]
    offsets = group_offsets(g, m, e)
    x = g.randn(m, k)
    w = g.randn(e, n, k, scale=k ** -0.5)
    if fmt in FLOAT_FORMATS:
        return [x.to(dtype_of(fmt)), w.to(dtype_of(fmt)), offsets, None, None, dtype_of("bf16")]
    xq, xs = reference("act_quant", x, 128, "ue8m0", dtype_of("fp32"))
    kind, block = WEIGHT_FORMATS[fmt]
    wq, ws = (reference("quant_weight_fp8", w, block, "ue8m0") if kind == "fp8" else
              reference("quant_weight_fp4", w, block))
    return [xq, wq, offsets, xs, ws, dtype_of("bf16")]


def _projection_shapes(c, mode):
    t, d, hd, h = tokens(mode), c.dim, c.head_dim, c.n_heads
    if mode == "quick":
        return [("wq_b", {"m": t, "n": h * hd, "k": c.q_lora_rank, "wb": 128}),
                ("wq_b_32x32", {"m": t, "n": h * hd, "k": c.q_lora_rank, "wb": 32})]
    out = [("wq_a", {"m": t, "n": c.q_lora_rank, "k": d}), ("wq_b", {"m": t, "n": h * hd, "k": c.q_lora_rank}),
           ("wkv", {"m": t, "n": hd, "k": d}), ("wo_b", {"m": t, "n": d, "k": c.o_groups * c.o_lora_rank}),
           ("shared_w1", {"m": t, "n": c.moe_inter_dim, "k": d}),
           ("shared_w2", {"m": t, "n": d, "k": c.moe_inter_dim})]
    out = [(label, {**s, "wb": 128}) for label, s in out]
    if is_v4_flash(c):   # V4.1-Flash's 32x32-tiled projections: shared experts and wq_a
        v = V41_FLASH
        out += [("v41_wq_a", {"m": t, "n": v["q_lora_rank"], "k": v["dim"], "wb": 32}),
                ("v41_shared_w1", {"m": t, "n": v["moe_inter"], "k": v["dim"], "wb": 32}),
                ("v41_shared_w2", {"m": t, "n": v["dim"], "k": v["moe_inter"], "wb": 32})]
    return out


def _expert_shapes(c, mode):
    t, d, inter = tokens(mode), c.dim, c.moe_inter_dim
    out = [("expert_w1", {"m": t, "n": inter, "k": d, "wb": 32})]
    if mode == "quick":
        return out + [("expert_w1_per16", {"m": t, "n": inter, "k": d, "wb": 16})]
    out.append(("expert_w2", {"m": t, "n": d, "k": inter, "wb": 32}))
    if is_v4_flash(c):
        v = V41_FLASH
        out += [("v41_expert_w1_per16", {"m": t, "n": v["moe_inter"], "k": v["dim"], "wb": 16}),
                ("v41_expert_w2_per16", {"m": t, "n": v["dim"], "k": v["moe_inter"], "wb": 16})]
    return out


def _grouped_shapes(c, mode):
    t, inter, d = tokens(mode), c.moe_inter_dim, c.dim
    if mode == "quick":
        return [("experts_w1", {"m": t * c.n_activated_experts, "n": inter, "k": d, "e": c.n_routed_experts,
                                "fmt": "fp8"}),
                ("experts_w1_fp4_16", {"m": t * c.n_activated_experts, "n": inter, "k": d, "e": c.n_routed_experts,
                                       "fmt": "fp4_16"})]
    rows = t * c.n_activated_experts // EXPERT_PARALLEL
    e_local = c.n_routed_experts // EXPERT_PARALLEL
    out = [(f"ep{EXPERT_PARALLEL}_w1_{fmt}", {"m": rows, "n": inter, "k": d, "e": e_local, "fmt": fmt})
           for fmt in ("fp8", "fp4")]
    if is_v4_flash(c):
        v = V41_FLASH
        out.append((f"v41_ep{EXPERT_PARALLEL}_w1_fp4_16",
                    {"m": t * v["topk"] // EXPERT_PARALLEL, "n": v["moe_inter"], "k": v["dim"],
                     "e": v["experts"] // EXPERT_PARALLEL, "fmt": "fp4_16"}))
    return out


def _mnk_flops(s: Shape) -> float:
    return 2 * s["m"] * s["n"] * s["k"]


register_case(OpCase(
    "fp8_gemm", _fp8_gemm, {"m": REQUIRED, "n": REQUIRED, "k": REQUIRED, "wb": 128},
    tiny=[{"m": 5, "n": 200, "k": 256}, {"m": 5, "n": 200, "k": 256, "wb": 32}],
    shapes=_projection_shapes, flops=_mnk_flops, bound="matmul",
    compute_dtype="fp8", peers=(peers.scaled_mm_blockwise, peers.bf16_dequant_matmul)))

register_case(OpCase(
    "fp4_gemm", _fp4_gemm, {"m": REQUIRED, "n": REQUIRED, "k": REQUIRED, "wb": 32},
    tiny=[{"m": 3, "n": 64, "k": 256}, {"m": 3, "n": 64, "k": 256, "wb": 16}],
    shapes=_expert_shapes, flops=_mnk_flops, bound="matmul",
    compute_dtype="fp8", peers=(peers.bf16_dequant_matmul,)))

register_case(OpCase(
    "grouped_gemm", _grouped_gemm, {"m": REQUIRED, "n": REQUIRED, "k": REQUIRED, "e": REQUIRED, "fmt": "bf16"},
    tiny=[{"m": 33, "n": 64, "k": 128, "e": 4, "fmt": "fp32"}, {"m": 33, "n": 128, "k": 256, "e": 3, "fmt": "fp8"},
          {"m": 17, "n": 64, "k": 128, "e": 3, "fmt": "fp4"}, {"m": 33, "n": 128, "k": 256, "e": 3, "fmt": "fp8_32"},
          {"m": 17, "n": 64, "k": 128, "e": 3, "fmt": "fp4_16"}],
    shapes=_grouped_shapes, flops=_mnk_flops, bound="matmul",
    compute_dtype=lambda s: s["fmt"] if s["fmt"] in FLOAT_FORMATS else "fp8", peers=(peers.torch_grouped_mm,)))
