"""The reference backend: vectorized PyTorch with fp32 math, for every op on every device.

It is the CPU default and the oracle that every other backend is compared with. Each family
module declares its implementations with ``@implements(op, "reference")`` next to the code;
:func:`load` imports every public module of the package and registers what they declared.
"""
from __future__ import annotations


def probe() -> str | None:
    """Always available: it needs nothing but torch."""
    return None


def load() -> None:
    """Register every declared reference implementation for cpu, cuda and npu tensors (priority 0)."""
    from v4hal.hal.packages import import_modules
    from v4hal.hal.registry import register_declared

    import_modules(__name__)   # each module declares its implementations
    register_declared("reference", devices={"cpu": (), "cuda": (), "npu": ()}, priority=0)
