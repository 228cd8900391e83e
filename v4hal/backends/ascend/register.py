"""Registration of the Ascend implementations, the CPU emulation for contract tests, and the
Triton-on-NPU allowlist.

Each op module declares its implementations next to the adapters with
``@implements(op, "ascend", requires=...)``; :func:`load` imports them and registers them for ``npu``
tensors with one more requirement every call needs (a usable NPU)."""
from __future__ import annotations

from typing import Any, Callable

from v4hal.hal import requirements as R
from v4hal.hal.devices import npu_reason
from v4hal.hal.packages import import_modules
from v4hal.hal.registry import declarations, register_declared, register_impl, unregister_backend

from .limits import reset_stats
from .runtime import reset as reset_runtime

PRIORITY = 20

#: Ops whose Triton kernels passed ``v4hal parity`` on an NPU through triton-ascend. Only these are
#: registered as Triton implementations for ``npu`` tensors. Empty: no NPU has run the parity gate
#: yet (triton-ascend 3.2 needs CANN 8.5 and cannot coexist with community Triton). Add an op here
#: only together with the parity record (command, chip, numbers) in docs/ascend.md.
TRITON_NPU_ALLOWLIST: frozenset[str] = frozenset()

#: What every Ascend implementation needs on ``npu`` tensors (not a fallback: without it, no call).
USABLE = R.when("torch_npu with CANN and an A2/A3/950 NPU", lambda _args: npu_reason())


def import_op_modules() -> None:
    """Import every public module of the package, sorted by name: each op family's module declares its
    implementations and limits on import (the others, helpers like this one, declare nothing)."""
    import_modules(__package__)


def implementations() -> dict[str, Callable[..., Any]]:
    """Contract op -> the Ascend implementation function."""
    import_op_modules()
    return {op: decl.fn for op, decl in declarations("ascend").items()}


def load() -> None:
    """Register every Ascend implementation for ``npu`` tensors (priority 20) and mirror the
    allowlisted Triton kernels onto ``npu``."""
    import_op_modules()
    register_declared("ascend", devices={"npu": (USABLE,)}, priority=PRIORITY)
    mirror_triton(TRITON_NPU_ALLOWLIST)


def mirror_triton(ops: frozenset[str] | set[str], ensure: Callable[[str], str | None] | None = None) -> list[str]:
    """Register the Triton backend's CUDA implementation of each op in ``ops`` for ``npu`` tensors
    (triton-ascend compiles the same kernels for the NPU). Returns the ops mirrored."""
    if not ops:
        return []
    from v4hal.hal import registry

    reason = (ensure or registry.ensure_loaded)("triton")
    if reason is not None:
        return []
    done = []
    for op in sorted(ops):
        impl = next((i for i in registry.implementations(op, "cuda") if i.backend == "triton"), None)
        if impl is not None:
            register_impl(op, "triton", impl.fn, devices=("npu",), priority=impl.priority, requires=impl.requires)
            done.append(op)
    return done


def enable_cpu_emulation() -> None:
    """Register the same implementations for ``cpu`` tensors, explicit-only, so that
    ``with v4hal.use_backend("ascend"):`` runs the Ascend code path on CPU tensors against the
    test stand-ins of torch_npu / ``_C_ascend`` / ``custom``. Called only by the test fixture."""
    reset_runtime()
    reset_stats()
    import_op_modules()
    register_declared("ascend", devices={"cpu": ()}, priority=PRIORITY, explicit_only=("cpu",))


def disable_cpu_emulation() -> None:
    """Undo :func:`enable_cpu_emulation`."""
    unregister_backend("ascend", devices=("cpu",))
    reset_runtime()
