"""Lazy torch_npu probing and the chip family (A2 / A3 / 950) of the Ascend backend.

Nothing here imports torch_npu at module import time. ``torch_npu_module()`` imports it the first
time something asks (``v4hal info``, a call on ``npu`` tensors), behind ``importlib.util.find_spec``
and a broad ``except``: on a machine without CANN the import fails (``libhccl.so`` missing), and
torch_npu 2.14 also refuses to load next to a CUDA accelerator. Those failures become the reason
the backend is unavailable, never a crash of v4hal.

Autoload caveat: the torch_npu wheel registers a ``torch.backends`` entry point, so a plain
``import torch`` already imports torch_npu (and fails without CANN) unless the environment sets
``TORCH_DEVICE_BACKEND_AUTOLOAD=0``. v4hal cannot prevent that (it happens before v4hal is
imported); the probe reports it, and ``docs/ascend.md`` tells CPU/CUDA users to set the variable or
keep torch_npu out of those environments.

Chip families come from ``torch_npu.npu.get_soc_version()`` (vllm-ascend ``device/hardware.py``):
220-225 -> A2 (910B), 250-255 -> A3 (910_93), 260 -> 950 (Ascend 950PR/DT, "A5").
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from types import ModuleType

CHIPS: tuple[str, ...] = ("A2", "A3", "950")

#: SoC version ranges (inclusive) of each chip family.
SOC_RANGES: dict[str, tuple[int, int]] = {"A2": (220, 225), "A3": (250, 255), "950": (260, 260)}

#: torch_npu dtype codes (torch_npu 2.14 meta registrations); passed where torch has no dtype.
DTYPE_CODES: dict[str, int] = {
    "int4": 285, "hifloat8": 290, "float8_e5m2": 291, "float8_e4m3fn": 292, "float8_e8m0fnu": 293,
    "float4_e2m1fn_x2": 296, "float4_e1m2fn_x2": 297,
}

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def reset() -> None:
    """Forget every cached probe (tests that install or remove stand-in packages call this)."""
    with _LOCK:
        _STATE.clear()
    from . import binding  # local: binding imports nothing heavy either

    binding.reset()


def _import_torch_npu() -> tuple[ModuleType | None, str | None]:
    """(module, None) when torch_npu imports, else (None, reason)."""
    mod = sys.modules.get("torch_npu")
    if mod is not None:
        return mod, None
    try:
        spec = importlib.util.find_spec("torch_npu")
    except (ImportError, ValueError) as exc:
        return None, f"torch_npu cannot be located: {type(exc).__name__}: {exc}"
    if spec is None:
        return None, "torch_npu not installed"
    try:
        mod = importlib.import_module("torch_npu")
    except Exception as exc:  # ImportError (libhccl.so), RuntimeError (two accelerators), ...
        hint = ""
        if os.environ.get("TORCH_DEVICE_BACKEND_AUTOLOAD", "1") != "0":
            hint = " (CANN missing? on CPU/CUDA machines set TORCH_DEVICE_BACKEND_AUTOLOAD=0 or uninstall torch_npu)"
        return None, f"torch_npu failed to import: {type(exc).__name__}: {exc}{hint}"
    return mod, None


def torch_npu_module() -> ModuleType | None:
    """The imported torch_npu module, or None (see :func:`probe_reason`)."""
    with _LOCK:
        if "module" not in _STATE:
            mod, reason = _import_torch_npu()
            _STATE["module"], _STATE["import_reason"] = mod, reason
        return _STATE["module"]  # type: ignore[return-value]


def probe_reason() -> str | None:
    """None when the Ascend backend can run here, else why not (one line, for ``v4hal info``). Cached."""
    with _LOCK:
        if "probe" in _STATE:
            return _STATE["probe"]  # type: ignore[return-value]
    reason = _probe()
    with _LOCK:
        _STATE["probe"] = reason
    return reason


def _probe() -> str | None:
    mod = torch_npu_module()
    if mod is None:
        return str(_STATE.get("import_reason"))
    try:
        import torch

        npu = getattr(torch, "npu", None) or getattr(mod, "npu", None)
        if npu is None or not npu.is_available():
            return "torch_npu imported but no NPU device is visible (npu.is_available() is False)"
    except Exception as exc:
        return f"torch_npu imported but the NPU query failed: {type(exc).__name__}: {exc}"
    chip, why = chip_family()
    if chip is None:
        return why
    return None


def soc_version() -> int | None:
    """``torch_npu.npu.get_soc_version()`` or None when unknown."""
    mod = torch_npu_module()
    if mod is None:
        return None
    try:
        return int(mod.npu.get_soc_version())
    except Exception:
        return None


def chip_family() -> tuple[str | None, str | None]:
    """(chip, None) with chip in :data:`CHIPS`, or (None, reason). Cached until :func:`reset`."""
    with _LOCK:
        cached = _STATE.get("chip")
    if cached is not None:
        return cached  # type: ignore[return-value]
    soc = soc_version()
    if soc is None:
        result: tuple[str | None, str | None] = (None, "SoC version unknown (torch_npu.npu.get_soc_version failed)")
    else:
        result = (None, f"SoC version {soc} is not an A2 (220-225), A3 (250-255) or 950 (260) chip")
        for name, (lo, hi) in SOC_RANGES.items():
            if lo <= soc <= hi:
                result = (name, None)
                break
    with _LOCK:
        _STATE["chip"] = result
    return result


def chip() -> str | None:
    """The chip family of this machine ('A2', 'A3', '950') or None."""
    return chip_family()[0]


def dtype_code(name: str) -> object:
    """torch_npu's value for a dtype torch lacks (e.g. ``torch_npu.float4_e2m1fn_x2``): the module's
    own attribute when it defines one (what vllm-ascend passes), else the documented int code."""
    mod = torch_npu_module()
    value = getattr(mod, name, None) if mod is not None else None
    return value if value is not None else DTYPE_CODES[name]
