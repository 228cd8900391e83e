"""The implementation registry: which backend implements which op on which device.

An implementation is a plain function taking the op's schema arguments in order
(``docs/op_contract.md``). Its requirements are data that explain themselves, so
``v4hal info`` and strict ``use_backend`` errors can say *why not*.

Backends are loaded lazily: ``ensure_loaded(name)`` imports ``v4hal.backends.<name>`` and
calls its ``load()`` only when a call needs it and its ``probe()`` says it can run here.
"""
from __future__ import annotations

import importlib
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from .errors import RangeError

DEVICES = ("cpu", "cuda", "npu")


@dataclass(frozen=True)
class Requirement:
    """A condition an implementation needs. ``check(args)`` returns None when met, else the reason."""

    description: str
    check: Callable[[Mapping[str, Any]], str | None]

    def reason(self, args: Mapping[str, Any]) -> str | None:
        return self.check(args)


@dataclass(frozen=True)
class Implementation:
    """One backend's function for one op on one device type."""

    op: str
    backend: str
    fn: Callable[..., Any]
    device: str
    priority: int = 0
    requires: tuple[Requirement, ...] = ()
    auto: bool = True  # False: served only when the backend is requested explicitly

    def why_not(self, args: Mapping[str, Any]) -> list[str]:
        """Reasons this implementation cannot serve a call with ``args`` (empty: it can)."""
        return [r for r in (req.reason(args) for req in self.requires) if r]


@dataclass
class BackendSpec:
    """A backend package: ``v4hal.backends.<name>`` with ``probe() -> str | None`` and ``load()``."""

    name: str
    module: str
    devices: tuple[str, ...]
    description: str
    loaded: bool = False
    load_error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec("reference", "v4hal.backends.reference", ("cpu", "cuda", "npu"),
                    "pure PyTorch, fp32 math; the CPU default and the parity oracle"),
        BackendSpec("triton", "v4hal.backends.triton", ("cuda", "cpu"),
                    "Triton kernels: compiled on CUDA, interpreted on the CPU (TRITON_INTERPRET=1)"),
        BackendSpec("cuda", "v4hal.backends.cuda", ("cuda",),
                    "CUDA-only paths (torch._scaled_mm blockwise FP8)"),
        BackendSpec("ascend", "v4hal.backends.ascend", ("npu",),
                    "torch_npu / CANN fused ops on Ascend NPUs"),
    )
}

_IMPLS: dict[tuple[str, str], list[Implementation]] = {}
_REGISTRY_LOCK = threading.Lock()


def register_impl(op: str, backend: str, fn: Callable[..., Any], *, devices: Sequence[str] = DEVICES,
                  priority: int = 0, requires: Sequence[Requirement] = (), auto: bool = True) -> None:
    """Register ``fn`` as ``backend``'s implementation of ``op`` for each device type in ``devices``.

    Registering the same (op, backend, device) again replaces the earlier entry.
    """
    from v4hal.ops import OPS  # the op declarations; imported late to avoid a cycle

    if op not in OPS:
        raise RangeError(f"register_impl: op must be one of the declared v4hal ops, got {op!r}")
    if backend not in BACKENDS:
        raise RangeError(f"register_impl: backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    for device in devices:
        impl = Implementation(op, backend, fn, device, priority, tuple(requires), auto)
        with _REGISTRY_LOCK:
            entries = [i for i in _IMPLS.get((op, device), []) if i.backend != backend]
            entries.append(impl)
            entries.sort(key=lambda i: -i.priority)
            _IMPLS[(op, device)] = entries


def unregister_backend(backend: str, devices: Sequence[str] | None = None) -> None:
    """Drop every implementation of ``backend`` (on ``devices``, default all). Used by test fixtures."""
    with _REGISTRY_LOCK:
        for key in list(_IMPLS):
            if devices is None or key[1] in devices:
                _IMPLS[key] = [i for i in _IMPLS[key] if i.backend != backend]


def implementations(op: str, device: str) -> list[Implementation]:
    """Registered implementations of ``op`` for ``device``, highest priority first."""
    return list(_IMPLS.get((op, device), ()))


def backend_reason(name: str) -> str | None:
    """None when backend ``name`` can run on this machine, else why not."""
    spec = BACKENDS.get(name)
    if spec is None:
        return f"unknown backend {name!r} (known: {', '.join(BACKENDS)})"
    if spec.load_error:
        return spec.load_error
    try:
        module = importlib.import_module(spec.module)
    except Exception as exc:
        return f"{spec.module} failed to import: {type(exc).__name__}: {exc}"
    probe = getattr(module, "probe", None)
    return probe() if probe is not None else None


def ensure_loaded(name: str) -> str | None:
    """Load backend ``name`` if it can run here. Returns None when loaded, else why it is not."""
    spec = BACKENDS[name]
    if spec.loaded:
        return None
    reason = backend_reason(name)
    if reason is not None:
        return reason
    with spec.lock:
        if not spec.loaded and spec.load_error is None:
            module = importlib.import_module(spec.module)
            try:
                module.load()
            except Exception as exc:  # recorded as the backend's reason, and said out loud once
                spec.load_error = f"{spec.module}.load() failed: {type(exc).__name__}: {exc}"
                warnings.warn(f"v4hal: backend {name!r} is unavailable: {spec.load_error}", RuntimeWarning,
                              stacklevel=3)
                return spec.load_error
            spec.loaded = True
    return None


def device_reason(name: str, device: str) -> str | None:
    """None when backend ``name`` may serve tensors of ``device`` here, else why not."""
    spec = BACKENDS[name]
    if device not in spec.devices:
        return f"backend {name!r} does not serve {device} tensors (serves: {', '.join(spec.devices)})"
    reason = backend_reason(name)
    if reason is not None:
        return reason
    module = importlib.import_module(spec.module)
    check = getattr(module, "device_reason", None)
    return check(device) if check is not None else None


_DEVICE_STATE: dict[str, dict[str, str | None]] = {}


def ensure_device_backends(device: str) -> dict[str, str | None]:
    """Load every backend that may serve ``device`` here; returns name -> reason (None = loaded).

    Cached per device after the first call (probes are not repeated on the hot path).
    """
    state = _DEVICE_STATE.get(device)
    if state is not None:
        return state
    out: dict[str, str | None] = {}
    for name, spec in BACKENDS.items():
        if spec.loaded and device in spec.devices:
            out[name] = None
            continue
        reason = device_reason(name, device)
        out[name] = reason if reason is not None else ensure_loaded(name)
    _DEVICE_STATE[device] = out
    return out


def forget_device_state() -> None:
    """Drop the cached per-device probe results (tests that install stand-in packages call this)."""
    _DEVICE_STATE.clear()
