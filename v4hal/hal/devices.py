"""Device and package probes: lazy, cached, and never initialising a device on import.

Each probe returns ``None`` when the thing is usable, else a one-line reason that
``v4hal info`` prints ("why not").
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch


def triton_interpreter_on() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def package_reason(module: str) -> str | None:
    """None when ``module`` can be imported, else why not (not installed / import error)."""
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    try:
        importlib.import_module(module)
    except Exception as exc:  # a broken install is a reason, not a crash of v4hal
        return f"{module} failed to import: {type(exc).__name__}: {exc}"
    return None


def cuda_reason() -> str | None:
    """None when a CUDA device is visible to torch."""
    if torch.version.cuda is None:
        return "torch is a CPU-only build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def cuda_capability(device: torch.device | None = None) -> tuple[int, int] | None:
    """Compute capability of a CUDA device, or None without CUDA."""
    if cuda_reason() is not None:
        return None
    return torch.cuda.get_device_capability(device)


def device_type(tensor: torch.Tensor) -> str:
    """The dispatch device name of a tensor: 'cpu', 'cuda', 'npu', or torch's type string."""
    return tensor.device.type
