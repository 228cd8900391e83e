"""v4hal: DeepSeek-V4 operators behind one device-neutral API.

Every op is a function here and a ``torch.ops.v4hal.<op>`` custom op; the implementation is chosen
per call from the tensors' device, ``use_backend`` overrides, the environment and priorities.
Importing v4hal imports neither triton nor torch_npu, and initialises no device.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .hal.dispatch import use_backend
from .hal.errors import BackendUnavailableError, DeviceError, DTypeError, RangeError, ShapeError, V4HalError
from .hal.info import available_backends, info
from .ops import OPS, PUBLIC_OPS, public_ops

# The op wrappers are exported through ``*PUBLIC_OPS`` in ``__all__``, which a linter cannot read.
from .ops.attention import compress_kv, index_scores, indexer_topk, sparse_attn  # noqa: F401
from .ops.gemm import fp4_gemm, fp8_gemm, grouped_gemm  # noqa: F401
from .ops.mhc import hc_collapse, hc_head, hc_mix, hc_post, hc_pre, hc_split_sinkhorn  # noqa: F401
from .ops.moe import MoEHandle, moe_combine, moe_dispatch, moe_experts, moe_gate  # noqa: F401
from .ops.paged import PAGED_LAYOUTS, new_paged_cache, paged_cache_read, paged_cache_write  # noqa: F401
from .ops.quant import act_quant, dequant_fp4, dequant_fp8, fp4_act_quant, quant_weight_fp4, quant_weight_fp8  # noqa: F401
from .ops.small import hadamard_transform, rms_norm, rotary_emb  # noqa: F401

__all__ = [
    "__version__", "use_backend", "available_backends", "info", "OPS", "PUBLIC_OPS", "public_ops", "MoEHandle",
    "new_paged_cache", "PAGED_LAYOUTS",
    "V4HalError", "ShapeError", "DTypeError", "DeviceError", "RangeError", "BackendUnavailableError",
    *PUBLIC_OPS,
]


def __getattr__(name: str):
    """``v4hal.<op>`` for any declared public op, including ops declared after import (plugins)."""
    opdef = OPS.get(name)
    wrapper = opdef.wrapper if opdef is not None else None
    if wrapper is None:
        raise AttributeError(f"module 'v4hal' has no attribute {name!r}")
    return wrapper
