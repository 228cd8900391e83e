"""The Triton backend: kernels written once, compiled on CUDA, interpreted on the CPU.

On CPU tensors it serves only under the Triton interpreter (``TRITON_INTERPRET=1`` set before
the kernels are imported) and only when asked for (``use_backend("triton")``): interpreter runs
check correctness, they say nothing about speed.

Each public module of the package (one per op family; private ``_`` modules hold shared helpers)
declares its public entry points next to the kernels with
``@implements(op, "triton", requires=...)``: the limits a valid call can still exceed (a head dim
above the tile, a GPU without the MMA a dtype needs). :func:`load` registers them all: on CUDA
tensors automatic candidates at priority 10 (above the reference's 0), on CPU tensors only when
asked for and only under the interpreter.

The Triton interpreter is not thread-safe (it patches ``triton.language`` while a kernel runs), so
every implementation registered for interpreted tensors (the CPU; CUDA too when
``TRITON_INTERPRET=1``) runs under one process-wide lock, :data:`INTERPRETER_LOCK`: concurrent
calls from several threads are served one at a time. Compiled launches take no lock.
"""
from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Mapping

from v4hal.hal import requirements as R
from v4hal.hal.devices import cuda_reason, package_reason, triton_interpreter_on

PRIORITY = 10   # above the reference (0), below the CUDA-only paths (20)

#: Serializes interpreted Triton calls (re-entrant: an implementation may call another one).
INTERPRETER_LOCK = threading.RLock()


def _interpreter(_args: Mapping[str, Any]) -> str | None:
    if triton_interpreter_on():
        return None
    return "Triton on CPU tensors needs the interpreter: set TRITON_INTERPRET=1 before importing triton/v4hal"


INTERPRETER = R.when("Triton interpreter on (TRITON_INTERPRET=1 before triton is imported)", _interpreter)


def probe() -> str | None:
    """None when triton imports."""
    return package_reason("triton")


def device_reason(device: str) -> str | None:
    """CUDA needs a visible GPU; the CPU needs the interpreter."""
    if device == "cuda":
        return cuda_reason()
    if device == "cpu" and not triton_interpreter_on():
        return "on CPU tensors Triton runs only under its interpreter: set TRITON_INTERPRET=1 before importing v4hal"
    return None


def load() -> None:
    """Register every Triton kernel declared in the family modules (cuda: automatic; cpu: explicit,
    interpreter only); the implementations for interpreted tensors are :func:`serialized`."""
    from v4hal.hal.packages import import_modules
    from v4hal.hal.registry import implementations, register_declared, register_impl

    import_modules(__name__)   # each family module declares its kernels
    ops = register_declared("triton", devices={"cuda": (), "cpu": (INTERPRETER,)}, priority=PRIORITY,
                            explicit_only=("cpu",), interpreted=("cpu",))
    for device in ("cpu", "cuda") if triton_interpreter_on() else ("cpu",):
        for op in ops:
            for impl in implementations(op, device):
                if impl.backend == "triton":
                    register_impl(op, "triton", serialized(impl.fn), devices=(device,), priority=impl.priority,
                                  requires=impl.requires, auto=impl.auto)


def serialized(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run under :data:`INTERPRETER_LOCK` (``__wrapped__`` is ``fn``)."""
    if getattr(fn, "_v4hal_serialized", False):
        return fn

    @functools.wraps(fn)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with INTERPRETER_LOCK:
            return fn(*args, **kwargs)

    locked._v4hal_serialized = True  # type: ignore[attr-defined]
    return locked
