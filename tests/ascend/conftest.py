"""Fixtures of the Ascend contract tests: stand-in torch_npu / _C_ascend / custom ops for one chip,
the Ascend implementations registered for CPU tensors (explicit-only), cleanup afterwards."""
from __future__ import annotations

from typing import Iterator

import pytest

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
