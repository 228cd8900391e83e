"""v4hal: DeepSeek-V4 operators behind one device-neutral API.

Every op is a function here and a ``torch.ops.v4hal.<op>`` custom op; the implementation is chosen
per call from the tensors' device, ``use_backend`` overrides, the environment and priorities.
Importing v4hal imports neither triton, torch_npu nor cupy, and initialises no device.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .hal.dispatch import use_backend
from .hal.errors import (BackendUnavailableError, DeviceError, DTypeError, RangeError, ShapeError,
                         V4HalError)
from .hal.info import available_backends, info
from .ops import OPS, PUBLIC_OPS
from .ops.attention import compress_kv, index_scores, indexer_topk, sparse_attn
from .ops.gemm import fp4_gemm, fp8_gemm, grouped_gemm
from .ops.mhc import hc_head, hc_post, hc_pre, hc_split_sinkhorn
from .ops.moe import MoEHandle, moe_combine, moe_dispatch, moe_experts, moe_gate
from .ops.quant import (act_quant, dequant_fp4, dequant_fp8, fp4_act_quant, quant_weight_fp4,
                        quant_weight_fp8)
from .ops.small import hadamard_transform, rms_norm, rotary_emb

__all__ = [
    "__version__", "use_backend", "available_backends", "info", "OPS", "PUBLIC_OPS", "MoEHandle",
    "V4HalError", "ShapeError", "DTypeError", "DeviceError", "RangeError", "BackendUnavailableError",
    *PUBLIC_OPS,
]
