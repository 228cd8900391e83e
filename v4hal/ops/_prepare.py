"""Weight preparation ahead of an op's calls: a backend may register, per op, a preparer that turns weights
into the form its implementation consumes (once, after a model loads) and keeps it keyed on the weight
tensors; the op's later calls with those very tensors use it. Numerics are unchanged: a preparation is
only a cache of what the calls would compute from the weights."""
from __future__ import annotations

from typing import Callable

import torch

from v4hal.hal import dispatch

#: (op, backend) -> preparer ``fn(*weights) -> bool`` (whether it kept anything)
_PREPARERS: dict[tuple[str, str], Callable[..., bool]] = {}


def register_preparer(op: str, backend: str, fn: Callable[..., bool]) -> None:
    """Let ``backend`` prepare weights ahead of its calls of ``op``; ``fn`` takes the weight arguments that
    the op's ``prepare_*`` function documents and returns whether it kept a preparation."""
    _PREPARERS[(op, backend)] = fn


def prepare_for(op: str, device: torch.device, *weights: object) -> bool:
    """Hand ``weights`` to the preparer of the backend that serves ``op`` on ``device`` (the requested one, else
    the first by priority); False where that backend registered none."""
    fn = _PREPARERS.get((op, dispatch.serving_backend(op, device.type) or ""))
    return bool(fn(*weights)) if fn is not None else False
