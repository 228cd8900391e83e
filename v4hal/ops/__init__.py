"""Op declarations: one per op (schema, checks, fake impl, public wrapper). Importing this package
defines every ``torch.ops.v4hal.<op>``."""
from ._define import OPS, OpDef  # noqa: F401
from . import quant, gemm, attention, moe, mhc, small  # noqa: F401  (defines the ops)

PUBLIC_OPS = (
    "act_quant", "fp4_act_quant", "dequant_fp8", "dequant_fp4", "quant_weight_fp8", "quant_weight_fp4",
    "fp8_gemm", "fp4_gemm", "grouped_gemm",
    "sparse_attn", "index_scores", "indexer_topk", "compress_kv",
    "moe_gate", "moe_dispatch", "moe_combine", "moe_experts",
    "hc_split_sinkhorn", "hc_pre", "hc_post", "hc_head",
    "rms_norm", "rotary_emb", "hadamard_transform",
)
