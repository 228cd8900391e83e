"""Every op's tiny cases (`v4hal.cases`) on every backend available here, against the reference
backend, by the numerics table (`v4hal.compare`); in-place variants with their op.

The backends are found, not listed: every backend other than the reference that serves some op on
the CPU (Triton under its interpreter here), plus the Ascend backend through the stand-ins of
torch_npu of ``tests/ascend`` (chips A2 and 950). A new backend or a new op with a case is covered
with no new test code.
"""
from __future__ import annotations

from typing import Any

import pytest

from v4hal import cases
from v4hal.parity import check_case, parity_backends

try:  # the Ascend code path on CPU tensors, through stand-ins of torch_npu / CANN (one per chip)
    from tests.ascend.conftest import npu_950, npu_a2  # noqa: F401  (fixtures)
    EMULATED = {"ascend[A2]": "npu_a2", "ascend[950]": "npu_950"}
except ImportError:  # the Ascend tests are not shipped with this tree
    EMULATED = {}


def backends_here() -> list[str]:
    """Backend names to check on the CPU (emulated ones as ``name[chip]``)."""
    return parity_backends("cpu") + list(EMULATED)


def backend_rows(op: str, shape: dict[str, Any], backend: str, seed: int = 0) -> list[dict[str, Any]]:
    """The generic check: ``op`` at ``shape`` (and its variants) on ``backend`` against the reference.

    Fails when an output breaks its rule or the backend raises; returns the rows ("pass" or
    "skipped" with the backend's reasons)."""
    rows = check_case(op, shape, [backend.split("[")[0]], seed=seed)[1:]
    failed = [f"{r['op']}: {r.get('reason') or r['rule']} (max abs {r['max_abs']:.3g}, calc_diff {r['diff']:.3g}, "
              f"{r['mismatches']} mismatches)" for r in rows if r["status"] == "FAIL"]
    assert not failed, f"{backend} vs reference at {cases.describe_shape(shape)}: " + "; ".join(failed)
    return rows


def _ids(pairs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for op, _ in pairs:
        seen[op] = seen.get(op, -1) + 1
        out.append(f"{op}-{seen[op]}")
    return out


TINY = cases.tiny_cases()


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """The backend under test; an emulated one has its stand-ins installed for the test."""
    name = request.param
    if name in EMULATED:
        request.getfixturevalue(EMULATED[name])
    return name


@pytest.mark.parametrize("backend", backends_here(), indirect=True)
@pytest.mark.parametrize("op,shape", TINY, ids=_ids(TINY))
def test_matches_reference(op: str, shape: dict[str, Any], backend: str) -> None:
    rows = backend_rows(op, shape, backend)
    if all(r["status"] == "skipped" for r in rows):
        pytest.skip(f"{backend} does not serve this call: {rows[0]['reason'][:200]}")
