"""Timers that fit the device (its `v4hal.hal.platform.Platform`): CUDA events, NPU events, a monotonic
clock on the CPU.

`time_fn(fn, device, ...)` calls ``fn(i)`` for i = 0, 1, 2, ... (the caller rotates its
inputs with ``i``), warms up, then times ``repeats`` calls one by one and returns the median
with the spread. On a GPU each call is bracketed by events recorded on the current stream
(no host sync between calls, one at the end); on the CPU by ``time.perf_counter_ns``.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from v4hal.hal.platform import platform_of

__all__ = ["Timing", "time_fn", "synchronize", "timer_name", "value_checks_off", "value_checks_forced"]


@dataclass
class Timing:
    """Seconds per call: median, 10th / 90th percentile, number of timed calls, timer used."""

    median: float
    p10: float
    p90: float
    n: int
    timer: str

    def to_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "p10_s": self.p10, "p90_s": self.p90, "n": self.n, "timer": self.timer}


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (`v4hal.hal.platform.Platform.synchronize`)."""
    platform_of(device).synchronize()


def timer_name(device: str | torch.device) -> str:
    """The timer `time_fn` uses on ``device`` (`Platform.timer`)."""
    return platform_of(device).timer


def value_checks_off() -> contextlib.AbstractContextManager[None]:
    """Turn the ops' value checks off (they read tensors back to the host, a sync per call)."""
    return value_checks_forced(False)


@contextlib.contextmanager
def value_checks_forced(on: bool) -> Iterator[None]:
    """``V4HAL_CHECK_VALUES=1`` (``on``) or ``0`` inside the block; the environment is restored and
    re-read after it."""
    from v4hal.hal.dispatch import refresh

    old = os.environ.get("V4HAL_CHECK_VALUES")
    os.environ["V4HAL_CHECK_VALUES"] = "1" if on else "0"
    refresh()
    try:
        yield
    finally:
        if old is None:
            del os.environ["V4HAL_CHECK_VALUES"]
        else:
            os.environ["V4HAL_CHECK_VALUES"] = old
        refresh()


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_fn(fn: Callable[[int], Any], device: str, *, warmup: int = 3, repeats: int = 20,
            min_warmup_s: float = 0.0, max_time_s: float | None = None) -> Timing:
    """Median seconds of ``fn(i)``; ``i`` counts calls so the caller can rotate its inputs.

    ``warmup`` calls first (and more until ``min_warmup_s`` has passed), then ``repeats`` timed
    calls; with ``max_time_s`` the timed loop stops early once that much time was spent (at
    least 3 calls are kept).
    """
    if repeats < 1:
        raise ValueError(f"time_fn: repeats must be >= 1, got {repeats}")
    i = 0
    t0 = time.perf_counter()
    while i < warmup or time.perf_counter() - t0 < min_warmup_s:
        fn(i)
        i += 1
    plat = platform_of(device)
    plat.synchronize()
    times: list[float] = []
    start_loop = time.perf_counter()
    if plat.has_events:
        pairs = []
        for r in range(repeats):
            a, b = plat.event(), plat.event()
            a.record()
            fn(i)
            b.record()
            pairs.append((a, b))
            i += 1
            if max_time_s is not None and r >= 2 and r % 4 == 3:
                b.synchronize()
                if time.perf_counter() - start_loop > max_time_s:
                    break
        plat.synchronize()
        times = [a.elapsed_time(b) / 1e3 for a, b in pairs]
    else:
        for r in range(repeats):
            s = time.perf_counter_ns()
            fn(i)
            times.append((time.perf_counter_ns() - s) / 1e9)
            i += 1
            if max_time_s is not None and r >= 2 and time.perf_counter() - start_loop > max_time_s:
                break
    return Timing(statistics.median(times), _quantile(times, 0.1), _quantile(times, 0.9), len(times),
                  plat.timer)
