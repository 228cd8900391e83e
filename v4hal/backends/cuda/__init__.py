"""CUDA-only implementations (no Triton): ``torch._scaled_mm`` blockwise FP8 where torch, CUDA and the
GPU support it."""
from __future__ import annotations

from v4hal.hal.devices import cuda_reason


def probe() -> str | None:
    """None when a CUDA device is visible."""
    return cuda_reason()


def load() -> None:
    """Register the CUDA-only paths."""
    from . import register

    register.load()
