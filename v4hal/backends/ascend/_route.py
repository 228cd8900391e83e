"""The one routing step every Ascend implementation starts with: requirements, then binding, else fallback."""
from __future__ import annotations

from typing import Any, Callable, Sequence

from v4hal.ops import OPS

from . import binding, limits, runtime


def schema_args(op: str, values: Sequence[Any]) -> dict[str, Any]:
    """The call's arguments by schema name (``values`` in schema order, as the op layer passes them)."""
    return dict(zip(OPS[op].arg_names, values))


def route(op: str, candidates: Sequence[tuple[str, str]],
          *values: Any) -> tuple[str | None, binding.Bound | None, str | None]:
    """(chip, bound op, None) when the call goes to a CANN op, else (chip, None, reason).

    ``values`` are the op's arguments in schema order. The requirements ``op`` was declared with
    are checked first (cheap, no probing of extension modules); then the candidates are looked up
    tier by tier. A missing op is a fallback reason like any unmet requirement.
    """
    chip = runtime.chip()
    reason = limits.violation(op, chip, schema_args(op, values))
    if reason is not None:
        return chip, None, reason
    bound = binding.lookup(candidates)
    if bound is None:
        return chip, None, f"CANN op not installed ({binding.describe(candidates)})"
    limits.record(op, chip, f"native:{bound.tier}.{bound.name}")
    return chip, bound, None


def always_reference(op: str, fn: Callable[..., Any], *values: Any) -> Any:
    """Run the reference ``fn`` for an op the backend never sends to CANN (its requirement says why)."""
    chip = runtime.chip()
    return limits.fallback(op, chip, limits.violation(op, chip, schema_args(op, values)) or "reference", fn,
                           *values)
