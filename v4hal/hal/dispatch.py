"""Choosing an implementation for one call.

Overrides, strongest first:
1. ``with v4hal.use_backend(name, op=name, ...)``: a context variable; per-op entries beat the
   context's global name.
2. ``V4HAL_OP_BACKENDS="fp8_gemm=triton,sparse_attn=reference"`` (per-op environment).
3. ``V4HAL_BACKEND=triton`` (global environment).
4. Priorities of the registered implementations that can serve the call.

An explicit request (1-3) is strict: when the named backend cannot serve the call, a
``BackendUnavailableError`` lists the reasons. Automatic choice (4) skips implementations
whose requirements are unmet, and never retries another backend after a kernel raised.

The environment (``V4HAL_BACKEND``, ``V4HAL_OP_BACKENDS``, ``V4HAL_CHECK_VALUES``) is read once,
at the first call; :func:`refresh` reads it again (after changing ``os.environ`` at run time).
The op layer caches each call's selection per call signature (see ``registry.selection_cache``)
until an override, the registry or the environment changes.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterator, Mapping

from . import registry
from .errors import BackendUnavailableError, RangeError
from .optable import OPS

_GLOBAL = "*"
_NO_OVERRIDES: Mapping[str, str] = MappingProxyType({})

#: (key, overrides): ``key`` is the same small integer for equal override contents, so cached
#: selections are shared by every ``use_backend`` block that asks for the same thing.
_OVERRIDES: ContextVar[tuple[int, Mapping[str, str]]] = ContextVar(
    "v4hal_backend_overrides", default=(0, _NO_OVERRIDES))
_OVERRIDE_KEYS: dict[frozenset[tuple[str, str]], int] = {frozenset(): 0}
_OVERRIDE_LOCK = threading.Lock()


@dataclass(frozen=True)
class Settings:
    """The environment as read by :func:`refresh`.

    ``backend``: ``V4HAL_BACKEND`` (stripped; empty when unset); ``op_backends``: the raw
    ``V4HAL_OP_BACKENDS`` (parsed, and checked, when a call reads it); ``check_values``:
    ``V4HAL_CHECK_VALUES`` -- True (forced on: any value but 0), False (``0``) or None (unset or
    ``auto``: on for CPU tensors, off for accelerator tensors).
    """

    backend: str
    op_backends: str
    check_values: bool | None


_SETTINGS: Settings | None = None


def _read_environment() -> Settings:
    raw = os.environ.get("V4HAL_CHECK_VALUES", "").strip().lower()
    check_values = None if raw in ("", "auto") else raw != "0"
    return Settings(os.environ.get("V4HAL_BACKEND", "").strip(), os.environ.get("V4HAL_OP_BACKENDS", ""),
                    check_values)


def refresh() -> Settings:
    """Read ``V4HAL_BACKEND``, ``V4HAL_OP_BACKENDS`` and ``V4HAL_CHECK_VALUES`` again and drop
    every cached selection. Call it after changing these variables in ``os.environ``."""
    global _SETTINGS
    _SETTINGS = _read_environment()
    registry.invalidate()
    return _SETTINGS


def settings() -> Settings:
    """The environment settings in force (read at the first call, then by :func:`refresh`)."""
    current = _SETTINGS
    return current if current is not None else refresh()


def value_checks_on(device: str) -> bool:
    """Whether value checks run for tensors on ``device``: ``V4HAL_CHECK_VALUES=1``/``0`` forces
    them on/off; unset, they run on the CPU and not on accelerators (they would sync the host)."""
    forced = settings().check_values
    return device == "cpu" if forced is None else forced


def _check_backend_name(name: str, where: str) -> None:
    if name not in registry.BACKENDS:
        raise RangeError(f"{where}: backend must be one of {sorted(registry.BACKENDS)}, got {name!r}")


def _override_key(entries: Mapping[str, str]) -> int:
    frozen = frozenset(entries.items())
    key = _OVERRIDE_KEYS.get(frozen)
    if key is None:
        with _OVERRIDE_LOCK:
            key = _OVERRIDE_KEYS.setdefault(frozen, len(_OVERRIDE_KEYS))
    return key


def override_key() -> int:
    """A small integer naming the ``use_backend`` overrides in force (0: none); part of the
    selection cache key."""
    return _OVERRIDES.get()[0]


@contextlib.contextmanager
def use_backend(name: str | None = None, **per_op: str) -> Iterator[None]:
    """Force a backend inside the ``with`` block: for every op (``name``) and/or per op (``fp8_gemm="triton"``).

    Nested blocks layer: the inner block's entries win, the outer ones stay for other ops.
    ``use_backend(None)`` with no per-op entries clears the overrides inside the block.
    """
    if name is not None:
        _check_backend_name(name, "use_backend(name)")
    for op, backend in per_op.items():
        if op not in OPS:
            raise RangeError(f"use_backend: {op!r} is not a v4hal op (known: {', '.join(sorted(OPS))})")
        _check_backend_name(backend, f"use_backend({op}=...)")
    if name is None and not per_op:
        new: dict[str, str] = {}
    else:
        new = dict(_OVERRIDES.get()[1])
        if name is not None:
            # a new global name replaces the outer global *and* the outer per-op entries
            new = {_GLOBAL: name}
        new.update(per_op)
    token = _OVERRIDES.set((_override_key(new), MappingProxyType(new)))
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


@functools.lru_cache(maxsize=16)
def _parse_op_env(value: str) -> dict[str, str]:
    """``V4HAL_OP_BACKENDS`` as {op: backend}; a malformed entry, an unknown op or backend raises
    a RangeError naming the entry (at the first call that reads it)."""
    out: dict[str, str] = {}
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        op, sep, backend = (part.strip() for part in item.partition("="))
        if not sep or not op:
            raise RangeError(f"V4HAL_OP_BACKENDS: entries must look like op=backend, got {item!r}")
        if op not in OPS:
            raise RangeError(f"V4HAL_OP_BACKENDS: {op!r} in entry {item!r} is not a v4hal op "
                             f"(known: {', '.join(sorted(OPS))})")
        _check_backend_name(backend, f"V4HAL_OP_BACKENDS ({op})")
        out[op] = backend
    return out


def requested_backend(op: str) -> tuple[str | None, str]:
    """The backend explicitly requested for ``op`` and where the request came from."""
    ctx = _OVERRIDES.get()[1]
    if op in ctx:
        return ctx[op], f"use_backend({op}={ctx[op]!r})"
    if _GLOBAL in ctx:
        return ctx[_GLOBAL], f"use_backend({ctx[_GLOBAL]!r})"
    env = settings()
    per_op = _parse_op_env(env.op_backends)
    if op in per_op:
        return per_op[op], f"V4HAL_OP_BACKENDS {op}={per_op[op]}"
    if env.backend:
        _check_backend_name(env.backend, "V4HAL_BACKEND")
        return env.backend, f"V4HAL_BACKEND={env.backend}"
    return None, "priority"


def select(op: str, device: str, args: Mapping[str, Any]) -> registry.Implementation:
    """The implementation that serves this call of ``op`` on ``device`` with schema arguments ``args``."""
    states = registry.ensure_device_backends(device)
    wanted, source = requested_backend(op)
    candidates = registry.implementations(op, device)
    if wanted is None and candidates and candidates[0].auto and not candidates[0].requires:
        return candidates[0]    # the usual case: the top-priority implementation takes every call
    if wanted is not None:
        for impl in candidates:
            if impl.backend == wanted:
                reasons = impl.why_not(args)
                if reasons:
                    raise BackendUnavailableError(
                        f"{op}: backend {wanted!r} (requested by {source}) cannot serve this call on {device}: "
                        + "; ".join(reasons))
                return impl
        reason = states.get(wanted) or registry.device_reason(wanted, device) \
            or f"backend {wanted!r} has no implementation of {op} for {device} tensors"
        raise BackendUnavailableError(f"{op}: backend {wanted!r} (requested by {source}) is unavailable: {reason}")
    skipped: list[str] = []
    for impl in candidates:
        if not impl.auto:
            continue
        reasons = impl.why_not(args)
        if not reasons:
            return impl
        skipped.append(f"{impl.backend}: {'; '.join(reasons)}")
    raise BackendUnavailableError(
        f"{op}: no backend can serve this call on {device} tensors"
        + (f" ({' | '.join(skipped)})" if skipped else ""))


def serving_backend(op: str, device: str) -> str | None:
    """The backend that serves calls of ``op`` on ``device`` unless a call's own arguments rule it out: the
    requested one (`requested_backend`), else the first automatic implementation by priority; None if none."""
    registry.ensure_device_backends(device)
    wanted, _ = requested_backend(op)
    if wanted is not None:
        return wanted
    return next((impl.backend for impl in registry.implementations(op, device) if impl.auto), None)


def explain(op: str, device: str, args: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """For ``v4hal info``: every backend's status for ``op`` on ``device`` (and, with ``args``, this call)."""
    states = registry.ensure_device_backends(device)
    impls = {i.backend: i for i in registry.implementations(op, device)}
    rows = []
    for name in registry.BACKENDS:
        impl = impls.get(name)
        if impl is None:
            reason = states.get(name) or registry.device_reason(name, device) or "no implementation of this op"
            rows.append({"backend": name, "status": "unavailable", "reason": reason})
            continue
        notes = [r.summary() for r in impl.requires]
        reasons = impl.why_not(args) if args is not None else []
        status = "no" if reasons else ("explicit only" if not impl.auto else "yes")
        rows.append({"backend": name, "status": status, "priority": impl.priority,
                     "reason": "; ".join(reasons) or "; ".join(notes)})
    return rows
