"""Requirements: what an implementation needs from a call, as data that explains itself.

Every backend states what it cannot serve with the same vocabulary; the op layer has already
validated the call (shapes, dtypes, ranges), so a requirement only says where a *valid* call
lies outside a kernel's reach (a head dim above its tile, a dtype its MMA lacks, a GPU too
old, an Ascend chip without the CANN op). ``v4hal info`` and strict ``use_backend`` errors
print ``description`` and the reason a check returns.

A requirement with ``fallback="reference"`` does not stop its implementation from being
chosen: the implementation serves the call by running the reference backend on the same
tensors (the Ascend backend's documented exception, listed per op and chip by ``v4hal info``).

Arguments are looked up by schema name in the mapping ``args``; a ``value`` may be an argument
name, or ``"name.shape[i]"``, or a function of ``args``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, Union

import torch

Args = Mapping[str, Any]
Value = Union[str, Callable[[Args], Any]]

_SHAPE_REF = re.compile(r"^(\w+)\.shape\[(-?\d+)\]$")


@dataclass(frozen=True)
class Requirement:
    """A condition an implementation needs. ``check(args)`` returns None when met, else the reason.

    ``fallback``: None, the implementation cannot serve an unmet call; ``"reference"``, the
    implementation serves it by running the reference backend (said in ``v4hal info``).
    ``chips``: for the Ascend backend, the chips the requirement applies to (empty: all).
    """

    description: str
    check: Callable[[Args], str | None]
    fallback: str | None = None
    chips: tuple[str, ...] = ()

    def reason(self, args: Args) -> str | None:
        """None when ``args`` meet the requirement, else why not."""
        return self.check(args)

    def summary(self) -> str:
        """One line for ``v4hal info``: the description, or for a fallback requirement
        ``falls back to <fallback>: <description> (<chips>)``."""
        if self.fallback is None:
            return self.description
        chips = f" ({'/'.join(self.chips)})" if self.chips else ""
        return f"falls back to {self.fallback}: {self.description}{chips}"


def value_of(value: Value, args: Args) -> Any:
    """Resolve ``value`` (an argument name, ``"name.shape[i]"``, or a function of ``args``)."""
    if callable(value):
        return value(args)
    m = _SHAPE_REF.match(value)
    if m:
        t = args[m.group(1)]
        return None if t is None else int(t.shape[int(m.group(2))])
    return args[value]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _why(why: str) -> str:
    """`` (why)`` for a description, or nothing."""
    return f" ({why})" if why else ""


def when(description: str, reason: Callable[[Args], str | None], *, fallback: str | None = None,
         chips: Sequence[str] = ()) -> Requirement:
    """A requirement from any function of the arguments that returns None (met) or a reason."""
    return Requirement(description, reason, fallback, tuple(chips))


def at_most(what: str, limit: int | float, value: Value | None = None, *, fallback: str | None = None,
            chips: Sequence[str] = (), why: str = "") -> Requirement:
    """``value`` (default: the argument named ``what``) must be <= ``limit``."""
    getter: Value = what if value is None else value

    def check(args: Args) -> str | None:
        v = value_of(getter, args)
        return None if v is None or v <= limit else f"{what} must be <= {limit}, got {v}"
    return Requirement(f"{what} <= {limit}" + _why(why), check, fallback, tuple(chips))


def at_least(what: str, limit: int | float, value: Value | None = None, *, fallback: str | None = None,
             chips: Sequence[str] = (), why: str = "") -> Requirement:
    """``value`` (default: the argument named ``what``) must be >= ``limit``."""
    getter: Value = what if value is None else value

    def check(args: Args) -> str | None:
        v = value_of(getter, args)
        return None if v is None or v >= limit else f"{what} must be >= {limit}, got {v}"
    return Requirement(f"{what} >= {limit}" + _why(why), check, fallback, tuple(chips))


def divisible(what: str, by: int, value: Value | None = None, *, fallback: str | None = None,
              chips: Sequence[str] = (), why: str = "") -> Requirement:
    """``value`` (default: the argument named ``what``) must be a multiple of ``by``."""
    getter: Value = what if value is None else value

    def check(args: Args) -> str | None:
        v = value_of(getter, args)
        return None if v is None or v % by == 0 else f"{what} must be a multiple of {by}, got {v}"
    return Requirement(f"{what} % {by} == 0" + _why(why), check, fallback, tuple(chips))


def one_of(what: str, allowed: Sequence[Any], value: Value | None = None, *, fallback: str | None = None,
           chips: Sequence[str] = (), why: str = "") -> Requirement:
    """``value`` (default: the argument named ``what``) must be one of ``allowed``."""
    getter: Value = what if value is None else value
    allowed = tuple(allowed)

    def check(args: Args) -> str | None:
        v = value_of(getter, args)
        return None if v in allowed else f"{what} must be one of {list(allowed)}, got {v!r}"
    return Requirement(f"{what} in {list(allowed)}" + _why(why), check, fallback, tuple(chips))


def power_of_two(what: str, value: Value | None = None, *, fallback: str | None = None,
                 chips: Sequence[str] = (), why: str = "") -> Requirement:
    """``value`` (default: the argument named ``what``) must be a power of two (1, 2, 4, ...)."""
    getter: Value = what if value is None else value

    def check(args: Args) -> str | None:
        v = value_of(getter, args)
        return None if v is None or (v > 0 and v & (v - 1) == 0) else f"{what} must be a power of two, got {v}"
    return Requirement(f"{what} a power of two" + _why(why), check, fallback, tuple(chips))


def dtypes(arg: str, *allowed: torch.dtype, fallback: str | None = None, chips: Sequence[str] = (),
           why: str = "") -> Requirement:
    """Tensor argument ``arg`` (when given) must have one of ``allowed`` dtypes."""
    names = " or ".join(_dtype_name(d) for d in allowed)

    def check(args: Args) -> str | None:
        t = args.get(arg)
        if not isinstance(t, torch.Tensor) or t.dtype in allowed:
            return None
        return f"{arg} must be {names}, got {_dtype_name(t.dtype)}"
    return Requirement(f"{arg} is {names}" + _why(why), check, fallback, tuple(chips))


def min_capability(major: int, minor: int, *, tensor: str | None = None,
                   only_for: Sequence[torch.dtype] = (), why: str = "") -> Requirement:
    """CUDA tensors need compute capability >= ``major.minor``.

    ``tensor``: the argument whose device (and dtype, with ``only_for``) is looked at; by default
    the first tensor argument. ``only_for``: apply only when that tensor has one of these dtypes
    (e.g. bf16 MMA needs sm80). ``why``: what needs it, for the description.
    """
    from .devices import cuda_capability

    dtype_note = f" for {'/'.join(_dtype_name(d) for d in only_for)} {tensor}" if only_for else ""
    description = f"compute capability >= {major}.{minor}{dtype_note}" + (f" ({why})" if why else "")

    def check(args: Args) -> str | None:
        t = args.get(tensor) if tensor else next((v for v in args.values() if isinstance(v, torch.Tensor)), None)
        if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
            return None
        if only_for and t.dtype not in only_for:
            return None
        cap = cuda_capability(t.device)
        if cap is not None and cap < (major, minor):
            return f"needs compute capability >= {major}.{minor}{dtype_note}, this GPU has {cap[0]}.{cap[1]}"
        return None
    return Requirement(description, check)


def package(module: str, why: str = "") -> Requirement:
    """Python package ``module`` must import (checked lazily, cached)."""
    from .devices import package_reason

    return Requirement(f"{module} installed" + (f" ({why})" if why else ""), lambda _args: package_reason(module))
