"""The Triton backend: kernels written once, compiled on CUDA, interpreted on the CPU.

On CPU tensors it serves only under the Triton interpreter (``TRITON_INTERPRET=1`` set before
the kernels are imported) and only when asked for (``use_backend("triton")``): interpreter runs
check correctness, they say nothing about speed.
"""
from __future__ import annotations

from v4hal.hal.devices import cuda_reason, package_reason, triton_interpreter_on


def probe() -> str | None:
    """None when triton imports."""
    return package_reason("triton")


def device_reason(device: str) -> str | None:
    """CUDA needs a visible GPU; the CPU needs the interpreter."""
    if device == "cuda":
        return cuda_reason()
    if device == "cpu" and not triton_interpreter_on():
        return "on CPU tensors Triton runs only under its interpreter: set TRITON_INTERPRET=1 before importing v4hal"
    return None


def load() -> None:
    """Register every Triton kernel."""
    from . import register_attn, register_moe_compress, register_quant_gemm

    register_quant_gemm.load()
    register_attn.load()
    register_moe_compress.load()
