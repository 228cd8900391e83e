"""Device and package probes: lazy, cached, and never initialising a device on import.

Each probe returns ``None`` when the thing is usable, else a one-line reason that
``v4hal info`` prints ("why not").
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

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


# ---- the device registry -----------------------------------------------------------------------
#
# Devices are registered, not listed: the op layer registers its kernel for every registered
# device's dispatch key (also for devices registered after the ops were declared), the backend
# registry offers every registered device, and ``v4hal info`` lists the devices whose probe says
# they are here. A third-party backend for a new device type registers it (``register_device``)
# when its module is imported.

@dataclass(frozen=True)
class Device:
    """A device type v4hal dispatches on.

    ``name``: torch's device type (``tensor.device.type``: "cpu", "cuda", "npu"); ``dispatch_key``:
    the torch.library dispatch key its tensors carry ("CPU", "CUDA", "PrivateUse1");
    ``probe() -> None | reason``: None when such a device is usable on this machine, else why not.
    """

    name: str
    dispatch_key: str
    probe: Callable[[], str | None]


_DEVICES: dict[str, Device] = {}
_DEVICE_LISTENERS: list[Callable[[Device], None]] = []


def register_device(name: str, dispatch_key: str, probe: Callable[[], str | None]) -> Device:
    """Register (or replace) device type ``name``; every declared op gets a kernel for its dispatch key."""
    if not name or not name.isidentifier():
        raise ValueError(f"register_device: name must be a torch device type such as 'xpu', got {name!r}")
    device = Device(name, dispatch_key, probe)
    _DEVICES[name] = device
    for listener in list(_DEVICE_LISTENERS):
        listener(device)
    return device


def on_device_registered(listener: Callable[[Device], None]) -> None:
    """Call ``listener(device)`` for every device registered so far and every one registered later."""
    _DEVICE_LISTENERS.append(listener)
    for device in list(_DEVICES.values()):
        listener(device)


def registered_devices() -> dict[str, Device]:
    """name -> :class:`Device`, in registration order (cpu, cuda, npu, then any added ones)."""
    return dict(_DEVICES)


def device_reason(name: str) -> str | None:
    """None when a device of type ``name`` is usable here, else why not (unknown, or its probe's reason)."""
    device = _DEVICES.get(name)
    if device is None:
        return f"unknown device type {name!r} (registered: {', '.join(_DEVICES)})"
    try:
        return device.probe()
    except Exception as exc:  # a failing probe is a reason, not a crash of v4hal
        return f"the {name} probe failed: {type(exc).__name__}: {exc}"


def devices_here() -> list[str]:
    """The registered device types usable on this machine (the CPU always)."""
    return [name for name in _DEVICES if device_reason(name) is None]


register_device("cpu", "CPU", lambda: None)
register_device("cuda", "CUDA", lambda: cuda_reason())
register_device("npu", "PrivateUse1", lambda: npu_reason())


# ---- Ascend NPUs: torch_npu, imported on first ask, never at v4hal import ----------------------
#
# torch_npu imports only when a probe below runs (``v4hal info``, a call on ``npu`` tensors), behind
# ``find_spec`` and a broad ``except``: without CANN the import fails (``libhccl.so`` missing), and
# torch_npu also refuses to load next to a CUDA accelerator. Those failures become the reason the
# Ascend backend is unavailable. The torch_npu wheel registers a ``torch.backends`` entry point, so
# a plain ``import torch`` already imports it unless ``TORCH_DEVICE_BACKEND_AUTOLOAD=0``; that
# happens before v4hal is imported, and the import reason below says so.

#: Ascend chip families v4hal knows, by ``torch_npu.npu.get_soc_version()`` (inclusive ranges):
#: 220-225 A2 (910B), 250-255 A3 (910_93), 260 950 (950PR/DT).
NPU_CHIPS: tuple[str, ...] = ("A2", "A3", "950")
NPU_SOC_RANGES: dict[str, tuple[int, int]] = {"A2": (220, 225), "A3": (250, 255), "950": (260, 260)}

_NPU_LOCK = threading.Lock()
_NPU_STATE: dict[str, object] = {}


def reset_npu_probes() -> None:
    """Forget the cached NPU probes (tests that install or remove a stand-in torch_npu call this)."""
    with _NPU_LOCK:
        _NPU_STATE.clear()


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
    """The imported torch_npu module, or None (:func:`npu_reason` says why). Cached."""
    with _NPU_LOCK:
        if "module" not in _NPU_STATE:
            _NPU_STATE["module"], _NPU_STATE["import_reason"] = _import_torch_npu()
        return _NPU_STATE["module"]  # type: ignore[return-value]


def npu_soc_version() -> int | None:
    """``torch_npu.npu.get_soc_version()``, or None when torch_npu is missing or the query fails."""
    mod = torch_npu_module()
    if mod is None:
        return None
    try:
        return int(mod.npu.get_soc_version())
    except Exception:
        return None


def npu_chip_family() -> tuple[str | None, str | None]:
    """(chip, None) with chip in :data:`NPU_CHIPS`, or (None, reason). Cached."""
    with _NPU_LOCK:
        cached = _NPU_STATE.get("chip")
    if cached is not None:
        return cached  # type: ignore[return-value]
    soc = npu_soc_version()
    if soc is None:
        result: tuple[str | None, str | None] = (None, "SoC version unknown (torch_npu.npu.get_soc_version failed)")
    else:
        result = (None, f"SoC version {soc} is not an A2 (220-225), A3 (250-255) or 950 (260) chip")
        for name, (lo, hi) in NPU_SOC_RANGES.items():
            if lo <= soc <= hi:
                result = (name, None)
                break
    with _NPU_LOCK:
        _NPU_STATE["chip"] = result
    return result


def npu_chip() -> str | None:
    """The chip family of this machine's NPU ('A2', 'A3', '950'), or None."""
    return npu_chip_family()[0]


def npu_reason() -> str | None:
    """None when torch_npu imports, an NPU is visible and its chip is known; else why not. Cached."""
    with _NPU_LOCK:
        if "reason" in _NPU_STATE:
            return _NPU_STATE["reason"]  # type: ignore[return-value]
    reason = _npu_probe()
    with _NPU_LOCK:
        _NPU_STATE["reason"] = reason
    return reason


def _npu_probe() -> str | None:
    mod = torch_npu_module()
    if mod is None:
        return str(_NPU_STATE.get("import_reason"))
    try:
        npu = getattr(torch, "npu", None) or getattr(mod, "npu", None)
        if npu is None or not npu.is_available():
            return "torch_npu imported but no NPU device is visible (npu.is_available() is False)"
    except Exception as exc:
        return f"torch_npu imported but the NPU query failed: {type(exc).__name__}: {exc}"
    return npu_chip_family()[1]
