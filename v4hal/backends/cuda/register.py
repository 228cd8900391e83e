"""Registration of the CUDA-only paths: ``fp8_gemm`` on cuBLASLt block scaling (``torch._scaled_mm``).

Priority 20: above the Triton kernels (10) and the reference (0) wherever its requirements hold
(Hopper, CUDA >= 12.9, K % 512 == 0, N % 16 == 0, and a passing probe); elsewhere the automatic
choice skips it and ``v4hal info`` prints why.
"""
from __future__ import annotations

from v4hal.hal.registry import register_impl

PRIORITY = 20


def load() -> None:
    """Register ``fp8_gemm`` for cuda tensors."""
    from . import scaled_mm

    register_impl("fp8_gemm", "cuda", scaled_mm.fp8_gemm, devices=("cuda",), priority=PRIORITY,
                  requires=scaled_mm.REQUIREMENTS, auto=True)
