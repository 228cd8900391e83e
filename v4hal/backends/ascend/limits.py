"""Hard limits of the CANN ops as data, the fallback to the reference backend, and its bookkeeping.

Every Ascend implementation checks the call against its op's :class:`Rule` list *before* calling a
CANN op. When a rule says the call is outside what the op accepts on this chip (head dim, head
count, top-k, dtype, chip-only op, ...), the reference implementation runs on the same (NPU)
tensors instead. The same rules produce :func:`fallback_table` for ``v4hal info`` and
``docs/ascend.md``, so the table and the behaviour cannot drift apart.

:func:`record` counts which path served each call, per op and chip; tests use it to prove a call
went native or fell back, and ``v4hal parity`` can print it.
"""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .runtime import CHIPS

ALL = CHIPS


@dataclass(frozen=True)
class Rule:
    """A condition under which a call does not go to the CANN op.

    ``test(args)`` is True when the call falls outside the op's limits; ``None`` means the rule
    always applies on ``chips`` (the chip has no CANN op for this contract).
    """

    condition: str
    chips: tuple[str, ...] = ALL
    test: Callable[[Mapping[str, Any]], bool] | None = None
    runs: str = "reference backend on the NPU tensors"


@dataclass
class OpPlan:
    """How the Ascend backend serves one contract op: native path per chip and the fallback rules."""

    op: str
    native: dict[str, str]
    rules: list[Rule] = field(default_factory=list)
    note: str = ""


PLANS: dict[str, OpPlan] = {}
_LOCK = threading.Lock()
_STATS: Counter[tuple[str, str, str]] = Counter()


def plan(op: str, native: Mapping[str, str], rules: list[Rule] | None = None, note: str = "") -> OpPlan:
    """Declare (or replace) the plan of ``op``."""
    p = OpPlan(op, dict(native), list(rules or []), note)
    PLANS[op] = p
    return p


def violation(op: str, chip: str | None, args: Mapping[str, Any]) -> str | None:
    """The condition text of the first rule of ``op`` that this call breaks on ``chip`` (None: native)."""
    if chip is None:
        return "unknown Ascend chip"
    p = PLANS[op]
    if chip not in p.native:
        for rule in p.rules:
            if chip in rule.chips and rule.test is None:
                return rule.condition
        return f"no CANN op for {op} on {chip}"
    for rule in p.rules:
        if chip in rule.chips and (rule.test is None or rule.test(args)):
            return rule.condition
    return None


def record(op: str, chip: str | None, path: str) -> None:
    """Count one call of ``op`` on ``chip`` served by ``path`` ('native:<tier>.<name>' or 'reference: ...')."""
    with _LOCK:
        _STATS[(op, chip or "?", path)] += 1


def stats() -> dict[tuple[str, str, str], int]:
    """Calls served so far: (op, chip, path) -> count."""
    with _LOCK:
        return dict(_STATS)


def reset_stats() -> None:
    with _LOCK:
        _STATS.clear()


def fallback(op: str, chip: str | None, reason: str, ref: Callable[..., Any], *args: Any) -> Any:
    """Run the reference implementation ``ref(*args)`` for ``op`` and record why."""
    record(op, chip, f"reference: {reason}")
    return ref(*args)


def fallback_table() -> list[dict[str, str]]:
    """Every (op, chip, condition, what runs) under which the Ascend backend uses the reference."""
    from . import register

    register.import_op_modules()
    rows: list[dict[str, str]] = []
    for op in sorted(PLANS):
        p = PLANS[op]
        for chip in CHIPS:
            if chip not in p.native:
                always = [r for r in p.rules if chip in r.chips and r.test is None]
                cond = always[0].condition if always else f"no CANN op for {op} on {chip}"
                rows.append({"op": op, "chip": chip, "condition": "always: " + cond,
                             "runs": always[0].runs if always else "reference backend on the NPU tensors"})
                continue
            for rule in p.rules:
                if chip in rule.chips:
                    rows.append({"op": op, "chip": chip, "condition": rule.condition, "runs": rule.runs})
    return rows


def native_table() -> list[dict[str, str]]:
    """Every (op, chip, native path) the Ascend backend uses when the call is within the limits."""
    from . import register

    register.import_op_modules()
    return [{"op": op, "chip": chip, "native": PLANS[op].native[chip]}
            for op in sorted(PLANS) for chip in CHIPS if chip in PLANS[op].native]


# ------------------------------------------------------------------------------ common tests
def one_of(key: str, allowed: tuple[Any, ...]) -> Callable[[Mapping[str, Any]], bool]:
    """Rule test: ``args[key]`` is not in ``allowed``."""
    return lambda a: a[key] not in allowed


def not_in_range(key: str, lo: int, hi: int) -> Callable[[Mapping[str, Any]], bool]:
    """Rule test: ``args[key]`` outside ``[lo, hi]``."""
    return lambda a: not (lo <= a[key] <= hi)
