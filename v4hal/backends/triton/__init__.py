"""The Triton backend: kernels written once, compiled on CUDA, interpreted on the CPU.

On CPU tensors it serves only under the Triton interpreter (``TRITON_INTERPRET=1`` set before
the kernels are imported) and only when asked for (``use_backend("triton")``): interpreter runs
check correctness, they say nothing about speed.

Each family module (quant, gemm, grouped, moe_permute, attention, indexer, mhc, small, moe,
compress) declares its public entry points next to the kernels with
``@implements(op, "triton", requires=...)``: the limits a valid call can still exceed (a head dim
above the tile, a GPU without the MMA a dtype needs). :func:`load` registers them all: on CUDA
tensors automatic candidates at priority 10 (above the reference's 0), on CPU tensors only when
asked for and only under the interpreter.
"""
from __future__ import annotations

from typing import Any, Mapping

from v4hal.hal import requirements as R
from v4hal.hal.devices import cuda_reason, package_reason, triton_interpreter_on

PRIORITY = 10   # above the reference (0), below the CUDA-only paths (20)


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
    interpreter only)."""
    from v4hal.hal.registry import register_declared

    from . import attention, compress, gemm, grouped, indexer, mhc, moe, moe_permute, quant, small  # noqa: F401

    register_declared("triton", devices={"cuda": (), "cpu": (INTERPRETER,)}, priority=PRIORITY,
                      explicit_only=("cpu",), interpreted=("cpu",))
