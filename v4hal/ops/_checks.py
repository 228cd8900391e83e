"""Input checks shared by the op declarations. Each raises a v4hal error whose message names
the op, the argument, what was expected and what came."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from v4hal.hal.errors import DeviceError, DTypeError, RangeError, ShapeError

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
FP8 = torch.float8_e4m3fn
E8M0 = torch.float8_e8m0fnu
SCALE_DTYPES = (torch.float32, E8M0)
INTS = (torch.int32, torch.int64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def describe(t: torch.Tensor) -> str:
    """``bfloat16 [2, 3, 4] on cpu``."""
    return f"{_dtype_name(t.dtype)} {list(t.shape)} on {t.device}"


def dtype(op: str, name: str, t: torch.Tensor, allowed: Iterable[torch.dtype]) -> None:
    allowed = tuple(allowed)
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        names = " or ".join(_dtype_name(d) for d in allowed)
        raise DTypeError(f"{op}: {name} must be {names}, got {describe(t)}")


def rank(op: str, name: str, t: torch.Tensor, ranks: Iterable[int], layout: str) -> None:
    ranks = tuple(ranks)
    if t.dim() not in ranks:
        raise ShapeError(f"{op}: {name} must be {layout} ({' or '.join(map(str, ranks))}-D), got {describe(t)}")


def min_rank(op: str, name: str, t: torch.Tensor, least: int, layout: str) -> None:
    if t.dim() < least:
        raise ShapeError(f"{op}: {name} must be {layout} (at least {least}-D), got {describe(t)}")


def shape(op: str, name: str, t: torch.Tensor, expected: Sequence[int], layout: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ShapeError(f"{op}: {name} must be {layout} = {list(expected)}, got {describe(t)}")


def divisible(op: str, name: str, value: int, by: int, what: str) -> None:
    if by <= 0 or value % by:
        raise ShapeError(f"{op}: {name} ({value}) must be divisible by {what} ({by})")


def positive(op: str, name: str, value: int | float) -> None:
    if not value > 0:
        raise RangeError(f"{op}: {name} must be > 0, got {value}")


def dtype_arg(op: str, name: str, value: torch.dtype, allowed: Iterable[torch.dtype]) -> None:
    """A dtype passed as an argument (``scale_dtype``): a DTypeError when it is not allowed."""
    allowed = tuple(allowed)
    if value not in allowed:
        names = " or ".join(_dtype_name(d) for d in allowed)
        raise DTypeError(f"{op}: {name} must be {names}, got {value}")


def one_of(op: str, name: str, value: object, allowed: Iterable[object]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise RangeError(f"{op}: {name} must be one of {list(allowed)}, got {value!r}")


def power_of_two(op: str, name: str, value: int) -> None:
    if value <= 0 or value & (value - 1):
        raise ShapeError(f"{op}: {name} ({value}) must be a power of two")


def same_device(op: str, **tensors: torch.Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise DeviceError(f"{op}: all tensors must be on one device, got {listing}")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---- value checks (read tensor data: a host sync on accelerators; switchable) ----

def value_checks_enabled(device: str = "cpu") -> bool:
    """Whether value checks (index ranges, finite scales) run for tensors on ``device``.

    By default on for CPU tensors and off for accelerator tensors (they read data back to the
    host, which would sync the device and break CUDA-graph capture); ``V4HAL_CHECK_VALUES=1``
    or ``0`` forces them on or off everywhere. The environment is read once
    (``v4hal.hal.dispatch.refresh()`` reads it again)."""
    from v4hal.hal.dispatch import value_checks_on

    return value_checks_on(device)


def index_range(op: str, name: str, t: torch.Tensor, low: int, high: int) -> None:
    """Every element in ``[low, high)``."""
    if t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < low or hi >= high:
        raise RangeError(f"{op}: {name} values must be in [{low}, {high}), got min {lo}, max {hi}")


def finite(op: str, name: str, t: torch.Tensor | None) -> None:
    """No NaN/Inf (e8m0 scales: no NaN byte 0xFF)."""
    if t is None or t.numel() == 0:
        return
    if t.dtype == E8M0:
        bad = bool((t.view(torch.uint8) == 255).any())
    else:
        bad = not bool(torch.isfinite(t).all())
    if bad:
        raise RangeError(f"{op}: {name} must be finite, got a NaN or Inf in {describe(t)}")


def permutation(op: str, name: str, t: torch.Tensor) -> None:
    """``t`` (int, 1-D) holds every value of ``[0, t.numel())`` exactly once."""
    n = t.numel()
    if n == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= n or not bool((torch.bincount(t.reshape(-1), minlength=n) == 1).all()):
        raise RangeError(f"{op}: {name} must be a permutation of [0, {n}), got min {lo}, max {hi}"
                         + ("" if lo < 0 or hi >= n else " with a repeated value"))


def finite_scalar(op: str, name: str, value: float) -> None:
    if not math.isfinite(value):
        raise RangeError(f"{op}: {name} must be finite, got {value}")
