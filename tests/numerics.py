"""Numerics helpers shared by every test: distances, tolerances, poisoning.

The pass rules are the library's numerics table (`v4hal.compare`): ``TOLERANCES`` is its
(atol, rtol) per floating dtype, ``assert_close`` applies them (or an explicit atol/rtol), and
``assert_op_matches`` applies an op's whole rule (bitwise, set per row, cosine distance, ...).
"""
from __future__ import annotations

from typing import Any, Sequence

import pytest
import torch

from v4hal import compare
from v4hal.compare import calc_diff  # noqa: F401  (one definition, re-exported for the tests)

# (atol, rtol) per output dtype: the error budget of one rounding to that dtype plus fp32 accumulation.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    dtype: (rule.atol, rule.rtol) for dtype, rule in compare.DTYPE_RULES.items() if rule.kind == "close"
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 atol: float | None = None, rtol: float | None = None, msg: str = "") -> None:
    """torch.testing.assert_close with the tolerance of ``dtype`` (default: actual's dtype)."""
    d_atol, d_rtol = TOLERANCES.get(dtype or actual.dtype, TOLERANCES[torch.float32])
    torch.testing.assert_close(actual.double(), expected.double(),
                               atol=d_atol if atol is None else atol,
                               rtol=d_rtol if rtol is None else rtol, equal_nan=False, msg=msg or None)


def assert_op_matches(op: str, actual: Any, expected: Any, args: Sequence[Any] | None = None,
                      msg: str = "") -> None:
    """Every output of ``op`` passes its rule in the numerics table against the reference's ``expected``."""
    results = compare.compare_outputs(op, actual, expected, args)
    bad = [f"output {i}: {r.rule}: max abs {r.max_abs:.3g}, calc_diff {r.diff:.3g}, {r.mismatches} mismatches"
           for i, r in enumerate(results) if not r.passed]
    assert not bad, f"{op}{' ' + msg if msg else ''}: " + "; ".join(bad)


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``t`` filled with NaN (floats) or the dtype's max (ints): output buffers
    start poisoned so an unwritten element fails the comparison."""
    out = torch.empty_like(t)
    if out.is_floating_point():
        out.fill_(float("nan"))
    else:
        out.fill_(torch.iinfo(out.dtype).max if out.dtype != torch.bool else True)
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """Same-size integer view of ``t``, for bitwise comparisons (NaN == NaN, -0.0 != 0.0)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every ``torch.empty`` of the test returns a poisoned buffer (NaN / integer max), so an output
    element a kernel never writes fails the comparison. Use with ``pytest.mark.usefixtures``."""
    original = torch.empty

    def empty(*args, **kwargs):
        return poison_like(original(*args, **kwargs))

    monkeypatch.setattr(torch, "empty", empty)
