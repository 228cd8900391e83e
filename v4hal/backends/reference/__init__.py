"""The reference backend: vectorized PyTorch with fp32 math, for every op on every device.

It is the CPU default and the oracle that every other backend is compared with.
"""
from __future__ import annotations


def probe() -> str | None:
    """Always available: it needs nothing but torch."""
    return None


def load() -> None:
    """Register every reference implementation for cpu, cuda and npu tensors (priority 0)."""
    from v4hal.hal.registry import register_impl
    from . import attention, gemm, mhc, moe, moe_experts, quant, small

    table = {
        quant: ("act_quant", "act_quant_inplace", "fp4_act_quant", "fp4_act_quant_inplace", "dequant_fp8",
                "dequant_fp4", "quant_weight_fp8", "quant_weight_fp4"),
        gemm: ("fp8_gemm", "fp4_gemm", "grouped_gemm"),
        attention: ("sparse_attn", "index_scores", "indexer_topk", "compress_kv"),
        moe: ("moe_gate", "moe_dispatch", "moe_combine"),
        moe_experts: ("moe_experts",),
        mhc: ("hc_split_sinkhorn", "hc_pre", "hc_post", "hc_head"),
        small: ("rms_norm", "rotary_emb", "hadamard_transform"),
    }
    for module, ops in table.items():
        for op in ops:
            register_impl(op, "reference", getattr(module, op), devices=("cpu", "cuda", "npu"), priority=0)
