"""The device's ceilings, measured once at the start of a benchmark run.

- copy bandwidth: ``dst.copy_(src)`` of a buffer much larger than the last-level cache,
  counted as read + write bytes;
- dense matmul rate per dtype: a square ``torch.matmul`` (fp32, bf16, fp16) and, on CUDA
  GPUs that support it, FP8 through ``torch._scaled_mm`` with per-tensor scales.

Sizes come from the device's `v4hal.hal.platform.Platform` (CPU: 256 MiB copy / 1024^3 matmul; GPU:
2 GiB copy / 8192^3).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from v4hal.hal.platform import platform_of

from .timing import time_fn

__all__ = ["Ceilings", "measure_ceilings"]


@dataclass
class Ceilings:
    """Measured ceilings: bytes/s of a copy, FLOP/s of a dense matmul per dtype name."""

    device: str
    device_name: str
    copy_bytes_per_s: float
    matmul_flops_per_s: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def matmul(self, dtype: str) -> float | None:
        """FLOP/s for ``dtype`` ("fp8", "bf16", "fp16", "fp32"); FP8 and FP4 fall back to bf16 when unmeasured."""
        if dtype in self.matmul_flops_per_s:
            return self.matmul_flops_per_s[dtype]
        if dtype in ("fp8", "fp4"):
            return self.matmul_flops_per_s.get("bf16") or self.matmul_flops_per_s.get("fp32")
        return self.matmul_flops_per_s.get("fp32")

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "device_name": self.device_name,
                "copy_GBps": self.copy_bytes_per_s / 1e9,
                "matmul_TFLOPs": {k: v / 1e12 for k, v in self.matmul_flops_per_s.items()},
                "notes": dict(self.notes)}


def device_name(device: str) -> str:
    """A readable name of ``device`` (`Platform.device_name`)."""
    return platform_of(device).device_name()


def _scaled_mm_fp8(n: int, dev: torch.device) -> Callable[[int], Any] | None:
    if not hasattr(torch, "_scaled_mm"):
        return None
    a = torch.randn(n, n, device=dev).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=dev).to(torch.float8_e4m3fn).t()  # column-major second operand
    one = torch.ones((), device=dev)
    try:
        torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    except Exception:
        return None
    return lambda i: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)


def _copy_rate(dev: torch.device, nbytes: int, gpu: bool) -> float:
    """Bytes/s (read + write) of ``dst.copy_(src)`` over ``nbytes``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda i: dst.copy_(src), dev.type, warmup=2 if gpu else 1, repeats=20 if gpu else 5)
    return 2 * nbytes / t.median


def _matmul_rate(dev: torch.device, n: int, dtype: torch.dtype, gpu: bool) -> float:
    """FLOP/s of an ``n``-cubed ``torch.matmul`` in ``dtype``."""
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    t = time_fn(lambda i: torch.matmul(a, b), dev.type, warmup=2, repeats=10 if gpu else 3)
    return 2 * n ** 3 / t.median


def measure_ceilings(device: str = "cpu", *, quick: bool = False) -> Ceilings:
    """Measure copy bandwidth and matmul rates on ``device`` (a few seconds; ``quick`` shrinks the CPU sizes)."""
    dev = torch.device(device)
    sizes = platform_of(device).bench
    gpu = sizes.gpu_like
    copy_bytes = sizes.quick_copy_bytes if quick else sizes.copy_bytes
    ceil = Ceilings(device, device_name(device), _copy_rate(dev, copy_bytes, gpu))
    n = sizes.quick_matmul_n if quick else sizes.matmul_n
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if not gpu:
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for name, dt in dtypes.items():
        ceil.matmul_flops_per_s[name] = _matmul_rate(dev, n, dt, gpu)
    if sizes.fp8_matmul:
        fn = _scaled_mm_fp8(n, dev)
        if fn is None:
            ceil.notes["fp8"] = "torch._scaled_mm FP8 is not supported on this GPU / torch build"
        else:
            t = time_fn(fn, device, warmup=2, repeats=10)
            ceil.matmul_flops_per_s["fp8"] = 2 * n ** 3 / t.median
    else:
        ceil.notes["fp8"] = f"no FP8 matmul on {device}; FP8/FP4 cases are held to the bf16 rate"
    return ceil
