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
"""
from __future__ import annotations

import contextlib
import functools
import os
from contextvars import ContextVar
from typing import Any, Iterator, Mapping

from . import registry
from .errors import BackendUnavailableError, RangeError

_GLOBAL = "*"
_OVERRIDES: ContextVar[Mapping[str, str]] = ContextVar("v4hal_backend_overrides", default={})


def _check_backend_name(name: str, where: str) -> None:
    if name not in registry.BACKENDS:
        raise RangeError(f"{where}: backend must be one of {sorted(registry.BACKENDS)}, got {name!r}")


@contextlib.contextmanager
def use_backend(name: str | None = None, **per_op: str) -> Iterator[None]:
    """Force a backend inside the ``with`` block: for every op (``name``) and/or per op (``fp8_gemm="triton"``).

    Nested blocks layer: the inner block's entries win, the outer ones stay for other ops.
    ``use_backend(None)`` with no per-op entries clears the overrides inside the block.
    """
    from v4hal.ops import OPS

    if name is not None:
        _check_backend_name(name, "use_backend(name)")
    for op, backend in per_op.items():
        if op not in OPS:
            raise RangeError(f"use_backend: {op!r} is not a v4hal op (known: {', '.join(sorted(OPS))})")
        _check_backend_name(backend, f"use_backend({op}=...)")
    if name is None and not per_op:
        new: dict[str, str] = {}
    else:
        new = dict(_OVERRIDES.get())
        if name is not None:
            # a new global name replaces the outer global *and* the outer per-op entries
            new = {_GLOBAL: name}
        new.update(per_op)
    token = _OVERRIDES.set(new)
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


@functools.lru_cache(maxsize=16)
def _parse_op_env(value: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        op, sep, backend = item.partition("=")
        if not sep:
            raise RangeError(f"V4HAL_OP_BACKENDS: entries must look like op=backend, got {item!r}")
        _check_backend_name(backend.strip(), f"V4HAL_OP_BACKENDS ({op.strip()})")
        out[op.strip()] = backend.strip()
    return out


def requested_backend(op: str) -> tuple[str | None, str]:
    """The backend explicitly requested for ``op`` and where the request came from."""
    ctx = _OVERRIDES.get()
    if op in ctx:
        return ctx[op], f"use_backend({op}={ctx[op]!r})"
    if _GLOBAL in ctx:
        return ctx[_GLOBAL], f"use_backend({ctx[_GLOBAL]!r})"
    per_op = _parse_op_env(os.environ.get("V4HAL_OP_BACKENDS", ""))
    if op in per_op:
        return per_op[op], f"V4HAL_OP_BACKENDS {op}={per_op[op]}"
    env = os.environ.get("V4HAL_BACKEND", "").strip()
    if env:
        _check_backend_name(env, "V4HAL_BACKEND")
        return env, f"V4HAL_BACKEND={env}"
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
        notes = [r.description for r in impl.requires]
        reasons = impl.why_not(args) if args is not None else []
        status = "no" if reasons else ("explicit only" if not impl.auto else "yes")
        rows.append({"backend": name, "status": status, "priority": impl.priority,
                     "reason": "; ".join(reasons) or "; ".join(notes)})
    return rows
