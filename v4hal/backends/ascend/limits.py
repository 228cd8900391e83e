"""The limits of the CANN ops as requirements, the fallback to the reference backend, and its bookkeeping.

Each Ascend implementation is declared with ``@implements(op, "ascend", requires=...)``: its
requirements (:class:`v4hal.hal.requirements.Requirement`, written against the op's schema
arguments) say when a *valid* call is outside what the CANN op accepts on a chip (head dim, head
count, top-k, dtype, an op the chip lacks). They all carry a fallback: ``"reference"`` (the
reference implementation runs on the same NPU tensors) or, for the GEMMs on 950, the dequant path
(:data:`DEQUANT`). The description of an Ascend requirement is the condition under which the call
falls back, and its ``chips`` are the chips where it applies.

The same requirement objects are

- registered with the implementation (:func:`v4hal.hal.registry.register_declared`), so dispatch
  and ``v4hal info`` read them from the registry;
- evaluated by :func:`unmet` in the adapter's routing step, before any CANN op is called;
- listed per op and chip by the package's ``fallback_table()`` (``docs/ascend.md``) and ``info_notes()``.

:func:`record` counts which path served each call, per op and chip; tests use it to prove a call
went native or fell back.
"""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from v4hal.hal import requirements as R
from v4hal.hal.registry import declarations
from v4hal.hal.requirements import Requirement

from .runtime import CHIPS
from .runtime import chip as current_chip

ALL = CHIPS
REFERENCE = "reference"
#: The fallback of the FP8/FP4 GEMMs on 950 outside the MX path: A2/A3's exact dequant path.
DEQUANT = "dequant to bf16/fp32 + NPU matmul"
UNKNOWN_CHIP = "unknown Ascend chip"

Args = Mapping[str, Any]


def _on_chips(chips: Sequence[str], test: Callable[[Args], bool]) -> Callable[[Args], bool]:
    """``test``, evaluated only on ``chips`` (so ``Implementation.fallback_reasons`` is right on any chip)."""
    if set(chips) >= set(ALL):
        return test
    return lambda args: current_chip() in chips and test(args)


def fallback_when(condition: str, test: Callable[[Args], bool], chips: Sequence[str] = ALL,
                  runs: str = REFERENCE) -> Requirement:
    """A requirement that sends a call to ``runs`` on ``chips`` when ``test(args)`` is True.

    ``condition`` describes the fallback case ("head dim d != 512") and is the recorded reason."""
    applies_here = _on_chips(chips, test)
    return R.when(condition, lambda args: condition if applies_here(args) else None, fallback=runs, chips=chips)


def always(condition: str, chips: Sequence[str] = ALL) -> Requirement:
    """A requirement that sends every call on ``chips`` to the reference (no CANN op for it there)."""
    return fallback_when(condition, lambda _args: True, chips)


@dataclass(frozen=True)
class OpPlan:
    """The CANN path of one op per chip (chips absent from ``native`` always fall back)."""

    op: str
    native: dict[str, str]
    note: str = ""


PLANS: dict[str, OpPlan] = {}
_LOCK = threading.Lock()
_STATS: Counter[tuple[str, str, str]] = Counter()
_REQUIRES: dict[str, tuple[Requirement, ...]] = {}


def plan(op: str, native: Mapping[str, str], note: str = "") -> OpPlan:
    """Declare (or replace) the native path per chip of ``op``."""
    p = OpPlan(op, dict(native), note)
    PLANS[op] = p
    return p


def requirements(op: str) -> tuple[Requirement, ...]:
    """The requirements ``op`` was declared with (``@implements(op, "ascend", requires=...)``)."""
    reqs = _REQUIRES.get(op)
    if reqs is None:
        reqs = _REQUIRES[op] = declarations("ascend")[op].requires
    return reqs


def applies(req: Requirement, chip: str) -> bool:
    """True when ``req`` is a fallback requirement that applies on ``chip``."""
    return req.fallback is not None and (not req.chips or chip in req.chips)


def unmet(op: str, chip: str | None, args: Args) -> tuple[str, str] | None:
    """(fallback, reason) of the first requirement of ``op`` this call breaks on ``chip``; None: native."""
    if chip is None:
        return REFERENCE, UNKNOWN_CHIP
    for req in requirements(op):
        if applies(req, chip):
            reason = req.reason(args)
            if reason is not None:
                return req.fallback or REFERENCE, reason
    if chip not in PLANS[op].native:
        return REFERENCE, f"no CANN op for {op} on {chip}"
    return None


def violation(op: str, chip: str | None, args: Args) -> str | None:
    """The reason of :func:`unmet` (None: the call goes native)."""
    found = unmet(op, chip, args)
    return None if found is None else found[1]


def record(op: str, chip: str | None, path: str) -> None:
    """Count one call of ``op`` on ``chip`` served by ``path`` ('native:<tier>.<name>' or 'reference: ...')."""
    with _LOCK:
        _STATS[(op, chip or "?", path)] += 1


def stats() -> dict[tuple[str, str, str], int]:
    """Calls served so far: (op, chip, path) -> count."""
    with _LOCK:
        return dict(_STATS)


def reset_stats() -> None:
    """Forget the counts of :func:`record`."""
    with _LOCK:
        _STATS.clear()


def fallback(op: str, chip: str | None, reason: str, ref: Callable[..., Any], *args: Any) -> Any:
    """Run the reference implementation ``ref(*args)`` for ``op`` and record why."""
    record(op, chip, f"reference: {reason}")
    return ref(*args)
