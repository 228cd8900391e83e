"""The one routing step every Ascend implementation starts with: limits, then binding, else fallback."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from . import binding, limits, runtime


def route(op: str, args: Mapping[str, Any],
          candidates: Sequence[tuple[str, str]]) -> tuple[str | None, binding.Bound | None, str | None]:
    """(chip, bound op, None) when the call goes to a CANN op, else (chip, None, reason).

    The limits of ``op`` are checked first (cheap, no probing of extension modules); then the
    candidates are looked up tier by tier. A missing op is a fallback reason like any limit.
    """
    chip = runtime.chip()
    reason = limits.violation(op, chip, args)
    if reason is not None:
        return chip, None, reason
    bound = binding.lookup(candidates)
    if bound is None:
        return chip, None, f"CANN op not installed ({binding.describe(candidates)})"
    limits.record(op, chip, f"native:{bound.tier}.{bound.name}")
    return chip, bound, None


def always_reference(op: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run the reference ``fn`` for an op the backend never sends to CANN (its plan says why)."""
    chip = runtime.chip()
    return limits.fallback(op, chip, limits.violation(op, chip, {}) or "reference", fn, *args)


def desc(t: Any) -> str:
    """'bfloat16 [2, 3]' for error messages."""
    return f"{str(t.dtype).replace('torch.', '')} {list(t.shape)}"
