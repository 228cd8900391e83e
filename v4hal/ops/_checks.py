"""Input checks shared by the op declarations. Each raises a v4hal error whose message names
the op, the argument, what was expected and what came."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from v4hal.hal.errors import DeviceError, DTypeError, NonFiniteError, RangeError, ShapeError

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
FP8 = torch.float8_e4m3fn
E8M0 = torch.float8_e8m0fnu
SCALE_DTYPES = (torch.float32, E8M0)
INTS = (torch.int32, torch.int64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_names(allowed: Iterable[torch.dtype]) -> str:
    """``uint8 or float8_e4m3fn``."""
    return " or ".join(_dtype_name(d) for d in allowed)


def describe(t: torch.Tensor) -> str:
    """``bfloat16 [2, 3, 4] on cpu``."""
    return f"{_dtype_name(t.dtype)} {list(t.shape)} on {t.device}"


def dtype(op: str, name: str, t: torch.Tensor, allowed: Iterable[torch.dtype]) -> None:
    allowed = tuple(allowed)
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        raise DTypeError(f"{op}: {name} must be {dtype_names(allowed)}, got {describe(t)}")


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


# ---- bounds of scalar arguments: far outside what a V4 call uses, inside what every kernel handles ----

#: Largest int32: positions and picks that an op computes or returns as int32 stay at or below it.
INT32_MAX = 2**31 - 1
#: Quantization block sizes (``block_size``, ``block``); V4 uses 128 (FP8) and 32 (FP4).
MAX_QUANT_BLOCK = 2**13
#: Side of the square weight tiles of ``quant_weight_fp8`` (``block``); V4 uses 128.
MAX_WEIGHT_BLOCK = 2**10
#: Routed experts (``num_experts``); V4 has 256 (Flash) and 384 (Pro).
MAX_EXPERTS = 2**16
#: Picks per query (``topk`` of ``indexer_topk``); V4 picks 512 or 1024.
MAX_TOPK = 2**16
#: KV compression ratio (``ratio``); V4 uses 4 and 128.
MAX_RATIO = 2**16
#: mHC residual copies (``hc_mult``); V4 uses 4.
MAX_HC_MULT = 2**8
#: Sinkhorn normalisations (``sinkhorn_iters``); V4 uses 20.
MAX_SINKHORN_ITERS = 1000
#: Epsilons (``eps``, ``norm_eps``, ``hc_eps``) lie in (0, MAX_EPS); V4 uses 1e-6.
MAX_EPS = 1.0
#: Magnitude of float multipliers and limits (``softmax_scale``, ``route_scale``, ``swiglu_limit``,
#: ``scale``); V4 uses values below 100. Every kernel takes them as fp32.
MAX_FLOAT_ARG = 1e6


def show(value: int | float) -> str:
    """A bound as messages and docs print it: ``2**16``, ``2**31 - 1``, ``1e+06``, ``0``."""
    if isinstance(value, int) and value >= 1024:
        if value & (value - 1) == 0:
            return f"2**{value.bit_length() - 1}"
        if (value + 1) & value == 0:
            return f"2**{value.bit_length()} - 1"
    return f"{value:g}" if isinstance(value, float) else str(value)


def interval(lo: int | float, hi: int | float, *, open_low: bool = False, open_high: bool = False) -> str:
    """``[1, 2**13]``, ``(0, 1)``."""
    return f"{'(' if open_low else '['}{show(lo)}, {show(hi)}{')' if open_high else ']'}"


def in_range(op: str, name: str, value: int | float, lo: int | float, hi: int | float, *,
             open_low: bool = False, open_high: bool = False, note: str = "") -> None:
    """A scalar argument within ``[lo, hi]`` (ends excluded with ``open_low`` / ``open_high``); NaN is
    outside every range. ``note`` follows the interval in the message (what a shape-dependent end is)."""
    ok = (lo < value if open_low else lo <= value) and (value < hi if open_high else value <= hi)
    if not ok:
        raise RangeError(f"{op}: {name} must be in {interval(lo, hi, open_low=open_low, open_high=open_high)}"
                         f"{note}, got {value}")


def ranges_doc(**ranges: str) -> str:
    """The contract line of an op's scalar ranges: ``ranges_doc(block=interval(1, MAX_WEIGHT_BLOCK))``."""
    return "Scalar arguments: " + ", ".join(f"`{name}` in {r}" for name, r in ranges.items()) + \
        "; a value outside its range raises `RangeError`."


EPS_RANGE = interval(0.0, MAX_EPS, open_low=True, open_high=True)
FLOAT_ARG_RANGE = interval(-MAX_FLOAT_ARG, MAX_FLOAT_ARG)


def eps_arg(op: str, name: str, value: float) -> None:
    """An epsilon: in ``(0, MAX_EPS)``."""
    in_range(op, name, value, 0.0, MAX_EPS, open_low=True, open_high=True)


def float_arg(op: str, name: str, value: float, lo: float = -MAX_FLOAT_ARG) -> None:
    """A float multiplier or limit: finite, in ``[lo, MAX_FLOAT_ARG]``."""
    in_range(op, name, value, lo, MAX_FLOAT_ARG)


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


def contents_key(t: torch.Tensor) -> tuple | None:
    """What identifies a tensor's contents while it lives: version counter (bumped by every in-place change),
    storage, view, dtype, device. None for an inference tensor (it has no version counter)."""
    if t.is_inference():
        return None
    return (t._version, t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)


#: tensors found finite, with what identified their contents then (version counter, storage, view): weights and
#: their scales are checked on their first call only, again after any in-place change (which bumps the version)
_FINITE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def finite(op: str, name: str, t: torch.Tensor | None) -> None:
    """No NaN/Inf (e8m0 scales: no NaN byte 0xFF). A tensor that passed once and has not changed since (same
    version counter, storage and view: a weight, a weight scale) is not read again; inference tensors (the
    activations of an inference-mode step) carry no version counter and are read every time."""
    if t is None or t.numel() == 0:
        return
    key = contents_key(t)
    if key is not None and _FINITE.get(t) == key:
        return
    if t.dtype == E8M0:
        bad = bool((t.view(torch.uint8) == 255).any())
    else:
        bad = not bool(torch.isfinite(t).all())
    if bad:
        raise NonFiniteError(f"{op}: {name} must be finite, got a NaN or Inf in {describe(t)}")
    if key is not None:
        _FINITE[t] = key


def permutation(op: str, name: str, t: torch.Tensor) -> None:
    """``t`` (int, 1-D) holds every value of ``[0, t.numel())`` exactly once."""
    n = t.numel()
    if n == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= n or not bool((torch.bincount(t.reshape(-1), minlength=n) == 1).all()):
        raise RangeError(f"{op}: {name} must be a permutation of [0, {n}), got min {lo}, max {hi}"
                         + ("" if lo < 0 or hi >= n else " with a repeated value"))

