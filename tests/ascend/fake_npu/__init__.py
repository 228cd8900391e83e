"""Test-only stand-ins for torch_npu, ``torch.ops._C_ascend`` and ``torch.ops.custom``.

Never installed as a package: :func:`install` puts a fake ``torch_npu`` module into ``sys.modules``
and fake op namespaces onto ``torch.ops`` for the duration of a test; :func:`uninstall` restores
what was there. Every stand-in op checks its call against the documented schema (see
:mod:`.contract`) and computes the documented result in plain torch (:mod:`.kernels`).
"""
from __future__ import annotations

import contextlib
import importlib.machinery
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from . import c_ascend_ops, custom_ops, torch_npu_ops
from .contract import SOC, STATE, ContractViolation

__all__ = ["install", "uninstall", "fake_npu", "FakeNPU", "ContractViolation", "STATE", "TIERS"]

TIERS = ("torch_npu", "_C_ascend", "custom")
DTYPE_CODES = {"int4": 285, "hifloat8": 290, "float8_e5m2": 291, "float8_e4m3fn": 292, "float8_e8m0fnu": 293,
               "float4_e2m1fn_x2": 296, "float4_e1m2fn_x2": 297}
_MISSING = object()


class FakeNamespace:
    """A ``torch.ops.<tier>`` stand-in: the listed ops, AttributeError for anything else."""

    def __init__(self, tier: str, ops: dict[str, Callable[..., Any]]) -> None:
        self._tier = tier
        for name, fn in ops.items():
            setattr(self, name, fn)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"'_OpNamespace' '{self._tier}' object has no attribute '{name}'")


@dataclass
class FakeNPU:
    """Handle of an installed set of stand-ins."""

    chip: str
    tiers: tuple[str, ...]
    dropped: frozenset[str]
    saved: dict[str, Any] = field(default_factory=dict)

    @property
    def calls(self) -> list[tuple[str, str]]:
        """(tier, op) of every stand-in call so far."""
        return STATE.calls

    def set_chip(self, chip: str) -> None:
        """Pretend to be another chip (callers must also reset v4hal's cached probes)."""
        self.chip = STATE.chip = chip

    def called(self, name: str) -> list[str]:
        """Tiers through which op ``name`` was called."""
        return [tier for tier, op in STATE.calls if op == name]


def _module(tiers: Iterable[str], dropped: frozenset[str]) -> types.ModuleType:
    mod = types.ModuleType("torch_npu")
    mod.__spec__ = importlib.machinery.ModuleSpec("torch_npu", loader=None)
    mod.__file__ = __file__
    mod.npu = types.SimpleNamespace(get_soc_version=lambda: STATE.soc, is_available=lambda: True,
                                    device_count=lambda: 1)
    for name, code in DTYPE_CODES.items():
        setattr(mod, name, code)
    if "torch_npu" in tiers:
        for name, fn in torch_npu_ops.OPS.items():
            if f"torch_npu.{name}" not in dropped:
                setattr(mod, name, fn)
    return mod


def install(chip: str = "A2", tiers: Iterable[str] = TIERS, drop: Iterable[str] = ()) -> FakeNPU:
    """Install the stand-ins for ``chip`` ('A2', 'A3', '950') with the given tiers; ``drop`` removes
    single ops ("_C_ascend.npu_hc_post"). Also resets v4hal's cached Ascend probes."""
    if chip not in SOC:
        raise ValueError(f"chip must be one of {sorted(SOC)}, got {chip!r}")
    tiers, dropped = tuple(tiers), frozenset(drop)
    handle = FakeNPU(chip, tiers, dropped)
    handle.saved["sys.torch_npu"] = sys.modules.get("torch_npu", _MISSING)
    sys.modules["torch_npu"] = _module(tiers, dropped)
    for tier, ops in (("_C_ascend", c_ascend_ops.OPS), ("custom", custom_ops.OPS)):
        handle.saved[tier] = torch.ops.__dict__.get(tier, _MISSING)
        chosen = {n: f for n, f in ops.items() if tier in tiers and f"{tier}.{n}" not in dropped}
        setattr(torch.ops, tier, FakeNamespace(tier, chosen))
    STATE.chip = chip
    STATE.calls.clear()
    _reset_v4hal()
    return handle


def uninstall(handle: FakeNPU) -> None:
    """Remove the stand-ins and restore what was there before :func:`install`."""
    saved = handle.saved.get("sys.torch_npu", _MISSING)
    if saved is _MISSING:
        sys.modules.pop("torch_npu", None)
    else:
        sys.modules["torch_npu"] = saved
    for tier in ("_C_ascend", "custom"):
        prev = handle.saved.get(tier, _MISSING)
        if prev is _MISSING:
            torch.ops.__dict__.pop(tier, None)
        else:
            setattr(torch.ops, tier, prev)
    STATE.calls.clear()
    _reset_v4hal()


def _reset_v4hal() -> None:
    from v4hal.backends.ascend import runtime

    runtime.reset()


@contextlib.contextmanager
def fake_npu(chip: str = "A2", tiers: Iterable[str] = TIERS, drop: Iterable[str] = ()) -> Iterator[FakeNPU]:
    """``with fake_npu("950"):`` -- install, yield the handle, uninstall."""
    handle = install(chip, tiers, drop)
    try:
        yield handle
    finally:
        uninstall(handle)
