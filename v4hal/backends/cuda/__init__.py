"""CUDA-only implementations (no Triton): ``torch._scaled_mm`` blockwise FP8 where torch, CUDA and the
GPU support it.

``fp8_gemm`` on cuBLASLt block scaling is declared in :mod:`.scaled_mm` at priority 20, above the
Triton kernels (10) and the reference (0), wherever its requirements hold (Hopper, CUDA >= 12.9,
K % 512 == 0, N % 16 == 0, and a passing probe); elsewhere the automatic choice skips it and
``v4hal info`` prints why.
"""
from __future__ import annotations

from v4hal.hal.devices import cuda_reason


def probe() -> str | None:
    """None when a CUDA device is visible."""
    return cuda_reason()


def load() -> None:
    """Register the CUDA-only paths declared in the modules of this package (cuda tensors)."""
    from v4hal.hal.registry import register_declared

    from . import scaled_mm

    register_declared("cuda", devices={"cuda": ()}, priority=scaled_mm.PRIORITY)
