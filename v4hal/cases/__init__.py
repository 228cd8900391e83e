"""The case catalogue: one `OpCase` per op, read by ``v4hal parity``, ``v4hal bench``, the GPU script,
opcheck and the tests.

An `OpCase` holds the op's seeded input builder (any device), its shape sets (``tiny``: CPU-sized
cases with odd sizes, -1 indices and empty experts; ``quick``: v4-mini dims; ``v4-flash`` /
``v4-pro`` decode and prefill: the ops of one V4 layer), its FLOP and byte counts, the bound
("matmul" or "memory") and its peers. Its pass rule is the numerics table's (`v4hal.compare`).
Quantized operands are produced by the reference quantizers, so every backend sees valid data.

- ``make_case(op, shape, seed=0, device="cpu") -> list``: the op's schema-ordered arguments;
- ``tiny_cases(op=None) -> [(op, shape)]``: the CPU-sized cases (every public op with a case);
- ``register_case(OpCase(...))``: add a case (a plugin's or a test's op).
"""
from __future__ import annotations

from v4hal.hal.packages import import_modules

from ._core import (
    CASES,
    DTYPES,
    MODES,
    PRESETS,
    REQUIRED,
    SHAPE_SETS,
    Gen,
    OpCase,
    Shape,
    case_ops,
    describe_shape,
    dtype_of,
    get_case,
    make_case,
    reference,
    register_case,
    short_dtype,
    tiny_cases,
    unregister_case,
    variant_args,
    variants,
    written_args,
)

# Importing the case modules (every public module here, sorted by name) registers the cases, in that order.
import_modules(__name__)

__all__ = ["OpCase", "Gen", "Shape", "REQUIRED", "CASES", "SHAPE_SETS", "PRESETS", "MODES", "DTYPES",
           "make_case", "tiny_cases", "register_case", "unregister_case", "get_case", "case_ops", "describe_shape",
           "dtype_of", "short_dtype", "reference", "variant_args", "variants", "written_args", "SMALL_SHAPES"]


def __getattr__(name: str):
    """``SMALL_SHAPES``: the tiny cases as a list of (op, shape), read live (same as ``tiny_cases()``)."""
    if name == "SMALL_SHAPES":
        return tiny_cases()
    raise AttributeError(f"module 'v4hal.cases' has no attribute {name!r}")
