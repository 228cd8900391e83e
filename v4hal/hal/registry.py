"""The implementation registry: which backend implements which op on which device.

An implementation is a plain function taking the op's schema arguments in order
(``docs/op_contract.md``); one declared with :func:`implements` must name them as the schema does
(:func:`signature_mismatch`, checked when its backend registers). Its requirements are data that explain themselves, so
``v4hal info`` and strict ``use_backend`` errors can say *why not*. Requirements read the call's
metadata only (shapes, dtypes, devices, scalar arguments) and the machine, never tensor data:
the op layer caches each call's selection per call signature (:func:`selection_cache`), and
every change here (:func:`register_impl`, :func:`unregister_backend`, a backend loading,
:func:`forget_device_state`) drops those caches.

Backends are loaded lazily: ``ensure_loaded(name)`` imports the backend's module and calls its
``load()`` only when a call needs it and its ``probe()`` says it can run here.

The backend set is open. :data:`BACKENDS` holds the four built-in backends (reference, triton,
cuda, ascend) and, discovered at its first use (not at ``import v4hal``), every entry point of
the group ``v4hal.backends`` that installed packages declare::

    # pyproject.toml of a third-party package
    [project.entry-points."v4hal.backends"]
    mybackend = "v4hal_mybackend"            # a module with a BACKEND attribute
    # or: mybackend = "v4hal_mybackend:SPEC"  # a BackendSpec object

An entry point loads to a :class:`BackendSpec`, or to a module whose ``BACKEND`` attribute is
one. The spec's ``name`` is the backend's name (the entry point's name should match it); its
``module`` names a module with ``probe() -> None | reason`` (optional: None means it can run
here) and ``load()``, which registers the implementations (``@implements`` declarations and
:func:`register_declared`, or :func:`register_impl`); ``device_reason(device)`` is optional.
Its ``devices`` are device types registered in ``v4hal.hal.devices`` (a package for a new
device type calls ``devices.register_device`` when imported). A built-in name cannot be
replaced; an entry point that fails to load appears as an unavailable backend with the reason.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import threading
import warnings
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from . import devices as _devices
from .errors import RangeError
from .optable import OPS
from .requirements import Requirement

ENTRY_POINT_GROUP = "v4hal.backends"

# ---- cached selections (filled by the op layer, dropped on every registry change) --------------

_SELECTION_CACHES: list[dict[Any, Any]] = []
_GENERATION = [0]


def selection_cache() -> dict[Any, Any]:
    """A new dict the op layer fills with per-call-signature selections; emptied by :func:`invalidate`."""
    cache: dict[Any, Any] = {}
    _SELECTION_CACHES.append(cache)
    return cache


def generation() -> int:
    """Counts :func:`invalidate` calls: a selection computed while it changed is not cached."""
    return _GENERATION[0]


def invalidate() -> None:
    """Drop every cached selection (the registry, the overrides' meaning or the environment changed)."""
    _GENERATION[0] += 1
    for cache in _SELECTION_CACHES:
        cache.clear()


def __getattr__(name: str) -> Any:
    if name == "DEVICES":   # the registered device types, as a tuple (live: see v4hal.hal.devices)
        return tuple(_devices.registered_devices())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        """Reasons this implementation cannot serve a call with ``args`` (empty: it can).

        Requirements with a ``fallback`` are not reasons: the implementation serves those calls
        through its fallback (see :meth:`fallback_reasons`)."""
        return [r for r in (req.reason(args) for req in self.requires if req.fallback is None) if r]

    def fallback_reasons(self, args: Mapping[str, Any]) -> list[str]:
        """Reasons this call will be served by the implementation's fallback (empty: natively)."""
        return [r for r in (req.reason(args) for req in self.requires if req.fallback is not None) if r]


@dataclass
class BackendSpec:
    """A backend: ``module`` has ``probe() -> str | None`` (optional) and ``load()``.

    ``devices``: the device types it may serve; ``description``: one line for ``v4hal info``;
    ``distribution``: the installed package that declared it (None for the built-ins).
    """

    name: str
    module: str
    devices: tuple[str, ...]
    description: str
    loaded: bool = False
    load_error: str | None = None
    distribution: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


BUILTIN_BACKENDS: tuple[BackendSpec, ...] = (
    BackendSpec("reference", "v4hal.backends.reference", ("cpu", "cuda", "npu"),
                "pure PyTorch, fp32 math; the CPU default and the parity oracle"),
    BackendSpec("triton", "v4hal.backends.triton", ("cuda", "cpu"),
                "Triton kernels: compiled on CUDA, interpreted on the CPU (TRITON_INTERPRET=1)"),
    BackendSpec("cuda", "v4hal.backends.cuda", ("cuda",),
                "CUDA-only paths (torch._scaled_mm blockwise FP8)"),
    BackendSpec("ascend", "v4hal.backends.ascend", ("npu",),
                "torch_npu / CANN fused ops on Ascend NPUs"),
)


class _BackendTable(MutableMapping[str, BackendSpec]):
    """name -> :class:`BackendSpec`: the built-ins, then the entry points of ``v4hal.backends``
    (read at the first lookup of a name that is not built in, or the first iteration)."""

    def __init__(self, builtins: Sequence[BackendSpec]) -> None:
        self._specs: dict[str, BackendSpec] = {spec.name: spec for spec in builtins}
        self._builtin = frozenset(self._specs)
        self._discovered = False
        self._lock = threading.RLock()

    def _ensure(self) -> None:
        if not self._discovered:
            discover_backends()

    def __getitem__(self, name: str) -> BackendSpec:
        if name not in self._builtin:
            self._ensure()
        return self._specs[name]

    def __contains__(self, name: object) -> bool:
        if name in self._builtin:
            return True
        self._ensure()
        return name in self._specs

    def __iter__(self) -> Iterator[str]:
        self._ensure()
        return iter(list(self._specs))

    def __len__(self) -> int:
        self._ensure()
        return len(self._specs)

    def __setitem__(self, name: str, spec: BackendSpec) -> None:
        if name in self._builtin:
            raise RangeError(f"BACKENDS: the built-in backend {name!r} cannot be replaced")
        self._specs[name] = spec
        _DEVICE_STATE.clear()
        invalidate()

    def __delitem__(self, name: str) -> None:
        if name in self._builtin:
            raise RangeError(f"BACKENDS: the built-in backend {name!r} cannot be removed")
        del self._specs[name]
        _DEVICE_STATE.clear()
        invalidate()

    def __repr__(self) -> str:
        return f"BACKENDS({list(self._specs)})"


BACKENDS: MutableMapping[str, BackendSpec] = _BackendTable(BUILTIN_BACKENDS)


def _spec_from_entry_point(ep: importlib.metadata.EntryPoint) -> BackendSpec:
    dist = getattr(getattr(ep, "dist", None), "name", None)
    try:
        loaded = ep.load()
    except Exception as exc:
        return BackendSpec(ep.name, ep.value, (), f"third-party backend (entry point {ep.value})",
                           load_error=f"entry point {ep.name} = {ep.value} failed to load: "
                                      f"{type(exc).__name__}: {exc}", distribution=dist)
    spec = loaded if isinstance(loaded, BackendSpec) else getattr(loaded, "BACKEND", None)
    if not isinstance(spec, BackendSpec):
        return BackendSpec(ep.name, ep.value, (), f"third-party backend (entry point {ep.value})",
                           load_error=f"entry point {ep.name} = {ep.value} is neither a BackendSpec nor a module "
                                      f"with a BACKEND attribute holding one (got {type(loaded).__name__})",
                           distribution=dist)
    if spec.distribution is None:
        spec.distribution = dist
    if spec.name != ep.name:
        warnings.warn(f"v4hal: entry point {ep.name!r} ({ep.value}) declares the backend {spec.name!r}; "
                      f"it is registered as {spec.name!r}", RuntimeWarning, stacklevel=2)
    return spec


def discover_backends() -> list[str]:
    """Read the ``v4hal.backends`` entry points of the installed packages (again) and add the
    backends not known yet; returns the names added. :data:`BACKENDS` calls it at its first use."""
    table: _BackendTable = BACKENDS  # type: ignore[assignment]
    added: list[str] = []
    with table._lock:
        table._discovered = True
        try:
            entry_points = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
        except Exception as exc:  # a broken installed distribution must not break v4hal
            warnings.warn(f"v4hal: reading the {ENTRY_POINT_GROUP!r} entry points failed: {exc}", RuntimeWarning,
                          stacklevel=2)
            return added
        for ep in entry_points:
            if ep.name in table._specs:
                if ep.name in table._builtin:
                    warnings.warn(f"v4hal: entry point {ep.name} = {ep.value} ignored: {ep.name!r} is a built-in "
                                  "backend", RuntimeWarning, stacklevel=2)
                continue
            spec = _spec_from_entry_point(ep)
            if spec.name in table._builtin or spec.name in table._specs:
                warnings.warn(f"v4hal: entry point {ep.name} = {ep.value} ignored: backend {spec.name!r} is already "
                              "registered", RuntimeWarning, stacklevel=2)
                continue
            table._specs[spec.name] = spec
            added.append(spec.name)
    if added:
        _DEVICE_STATE.clear()
        invalidate()
    return added


class _ImplTable(dict):
    """(op, device) -> implementations; every change drops the cached selections."""

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        invalidate()

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        invalidate()

    def clear(self) -> None:
        super().clear()
        invalidate()

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        invalidate()

    def pop(self, *args: Any) -> Any:
        out = super().pop(*args)
        invalidate()
        return out

    def popitem(self) -> Any:
        out = super().popitem()
        invalidate()
        return out

    def setdefault(self, key: Any, default: Any = None) -> Any:
        out = super().setdefault(key, default)
        invalidate()
        return out


_IMPLS: dict[tuple[str, str], list[Implementation]] = _ImplTable()
_REGISTRY_LOCK = threading.Lock()


def register_impl(op: str, backend: str, fn: Callable[..., Any], *, devices: Sequence[str] | None = None,
                  priority: int = 0, requires: Sequence[Requirement] = (), auto: bool = True) -> None:
    """Register ``fn`` as ``backend``'s implementation of ``op`` for each device type in ``devices``
    (default: every registered device type).

    Registering the same (op, backend, device) again replaces the earlier entry.
    """
    if op not in OPS:
        raise RangeError(f"register_impl: op must be one of the declared v4hal ops, got {op!r}")
    if backend not in BACKENDS:
        raise RangeError(f"register_impl: backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    for device in tuple(_devices.registered_devices()) if devices is None else devices:
        impl = Implementation(op, backend, fn, device, priority, tuple(requires), auto)
        with _REGISTRY_LOCK:
            entries = [i for i in _IMPLS.get((op, device), []) if i.backend != backend]
            entries.append(impl)
            entries.sort(key=lambda i: -i.priority)
            _IMPLS[(op, device)] = entries


@dataclass(frozen=True)
class Declaration:
    """An implementation declared next to its kernel with :func:`implements`; registered by
    :func:`register_declared` when its backend loads."""

    op: str
    backend: str
    fn: Callable[..., Any]
    requires: tuple[Requirement, ...] = ()
    interpreter_ok: bool = True
    devices: tuple[str, ...] | None = None
    priority: int | None = None
    auto: bool | None = None


_DECLARED: dict[str, dict[str, Declaration]] = {}

NOT_INTERPRETED = Requirement(
    "compiled only: this kernel does not run under the Triton interpreter",
    lambda _args: "this kernel does not run under the Triton interpreter (it needs a GPU)")


def implements(op: str, backend: str, *, requires: Sequence[Requirement] = (), interpreter_ok: bool = True,
               devices: Sequence[str] | None = None, priority: int | None = None,
               auto: bool | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: declare the function as ``backend``'s implementation of ``op``.

    ``requires``: what the kernel needs beyond a valid call; ``interpreter_ok=False``: the kernel
    is not served on the backend's interpreted devices; ``devices``/``priority``/``auto``
    override the backend's policy given to :func:`register_declared`. Declaring registers
    nothing: the backend's ``load()`` imports its modules and calls :func:`register_declared`.
    """
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        _DECLARED.setdefault(backend, {})[op] = Declaration(
            op, backend, fn, tuple(requires), interpreter_ok, None if devices is None else tuple(devices),
            priority, auto)
        return fn
    return decorate


def declarations(backend: str) -> dict[str, Declaration]:
    """op -> declaration of ``backend``'s implementations declared so far (modules imported)."""
    return dict(_DECLARED.get(backend, {}))


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def signature_mismatch(op: str, fn: Callable[..., Any]) -> str | None:
    """None when ``fn`` takes exactly the declared arguments of ``op`` (``OPS[op].arg_names``), by
    name and in order, as positional parameters, with any default it gives equal to the schema's;
    else what differs. The op layer calls an implementation with the schema's arguments in order."""
    opdef = OPS[op]
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        return f"its signature cannot be read ({exc})"
    params = list(signature.parameters.values())
    if tuple(p.name for p in params) != opdef.arg_names or any(p.kind not in _POSITIONAL for p in params):
        return f"it takes {signature}, the schema's arguments are ({', '.join(opdef.arg_names)})"
    for p in params:
        if p.default is inspect.Parameter.empty:
            continue
        if p.name not in opdef.defaults:
            return f"it gives {p.name} the default {p.default!r}, the schema none (a required argument)"
        if not _same_default(p.default, opdef.defaults[p.name]):
            return f"it gives {p.name} the default {p.default!r}, the schema {opdef.defaults[p.name]!r}"
    return None


def _same_default(a: Any, b: Any) -> bool:
    """Equal values of the same type (an int and a float count as one type: numbers)."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return a == b and (type(a) is type(b) or (number(a) and number(b)))


def register_declared(backend: str, *, devices: Mapping[str, Sequence[Requirement]], priority: int,
                      explicit_only: Sequence[str] = (), interpreted: Sequence[str] = ()) -> list[str]:
    """Register every declared implementation of ``backend``; returns the ops registered.

    ``devices``: device -> requirements every implementation needs there (e.g. the Triton
    interpreter on the CPU); ``explicit_only``: devices where the backend serves only when asked
    for; ``interpreted``: devices where kernels declared ``interpreter_ok=False`` are not served.
    An implementation whose parameters are not its op's declared arguments
    (:func:`signature_mismatch`) raises ``RangeError`` before anything is registered.
    """
    for decl in _DECLARED.get(backend, {}).values():
        if decl.op not in OPS:
            raise RangeError(f"@implements({decl.op!r}, {backend!r}): {decl.op!r} is not a declared v4hal op")
        wrong = signature_mismatch(decl.op, decl.fn)
        if wrong is not None:
            raise RangeError(f"@implements({decl.op!r}, {backend!r}) on {decl.fn.__module__}.{decl.fn.__qualname__}: "
                             f"{wrong}")
    for decl in _DECLARED.get(backend, {}).values():
        for device in decl.devices or tuple(devices):
            reqs = tuple(devices.get(device, ()))
            if device in interpreted and not decl.interpreter_ok:
                reqs += (NOT_INTERPRETED,)
            auto = decl.auto if decl.auto is not None else device not in explicit_only
            register_impl(decl.op, backend, decl.fn, devices=(device,),
                          priority=priority if decl.priority is None else decl.priority,
                          requires=reqs + decl.requires, auto=auto)
    return sorted(_DECLARED.get(backend, {}))


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
    if spec.load_error:
        return spec.load_error
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
    """Drop the cached per-device probe results and selections (tests that install stand-in
    packages call this)."""
    _DEVICE_STATE.clear()
    invalidate()
