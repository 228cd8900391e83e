"""Fixtures of the Ascend contract tests: stand-in torch_npu / _C_ascend / custom ops for one chip,
the Ascend implementations registered for CPU tensors (explicit-only), cleanup afterwards."""
from __future__ import annotations

from typing import Iterator

import pytest
import torch

import v4hal
from v4hal.backends.ascend import limits, register
from v4hal.hal import registry

from .fake_npu import FakeNPU, install, uninstall

CHIPS = ("A2", "A3", "950")


@pytest.fixture(params=CHIPS)
def npu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeNPU]:
    """Stand-ins for chip A2, A3 and 950 in turn; ``use_backend("ascend")`` runs the Ascend code path."""
    yield from _session(request.param, monkeypatch)


@pytest.fixture
def npu_a2(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeNPU]:
    yield from _session("A2", monkeypatch)


@pytest.fixture
def npu_950(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeNPU]:
    yield from _session("950", monkeypatch)


def _session(chip: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeNPU]:
    monkeypatch.delenv("V4HAL_BACKEND", raising=False)
    monkeypatch.delenv("V4HAL_OP_BACKENDS", raising=False)
    v4hal.hal.dispatch.refresh()
    registry.ensure_device_backends("cpu")          # the reference backend, as in any CPU session
    handle = install(chip)
    register.enable_cpu_emulation()
    try:
        yield handle
    finally:
        register.disable_cpu_emulation()
        uninstall(handle)
        limits.reset_stats()


def paths(op: str) -> list[str]:
    """The paths (``native:...`` / ``reference: ...`` / ``dequant: ...``) that served ``op`` so far."""
    return [path for (name, _chip, path), _n in limits.stats().items() if name == op]


def ascend(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with every op on the Ascend backend."""
    with v4hal.use_backend("ascend"):
        return fn(*args, **kwargs)


def reference(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with every op on the reference backend."""
    with v4hal.use_backend("reference"):
        return fn(*args, **kwargs)


def both(fn, *args, **kwargs):
    """(Ascend result, reference result) of one call."""
    return ascend(fn, *args, **kwargs), reference(fn, *args, **kwargs)


def native(op: str) -> bool:
    """Whether a CANN op served ``op`` so far."""
    return any(p.startswith("native:") for p in paths(op))


def fell_back(op: str, text: str) -> bool:
    """Whether ``op`` fell back to the reference with a reason containing ``text``."""
    return any(p.startswith("reference: ") and text in p for p in paths(op))


def same_sets(a, b) -> None:
    """Index lists equal as sets per row (tie order is unspecified)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a.sort(-1).values, b.sort(-1).values)
