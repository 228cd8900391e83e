"""What v4hal needs to know about a device type, in one record per type (`Platform`).

A `Platform` holds the facts that differ between the CPU, CUDA GPUs and Ascend NPUs and that several
layers read: how to wait for queued work and how to time it, the torch.distributed backend that exchanges
its tensors, the paged cache layouts its attention kernels read, the share of its free memory a cache pool
takes by default, and the sizes the benchmarks use on it. `platform_of(device)` returns the record of a
device (a ``torch.device``, a name such as ``"cuda:1"``, or None for the CPU); a device type without its own
record gets the CPU's facts under its own name (no timer events, no sync).

Nothing here imports torch's device modules at import time: ``torch.cuda`` / ``torch.npu`` are reached only
when a method runs.
"""
from __future__ import annotations

import contextlib
import os
import platform as _host
from dataclasses import dataclass, replace
from typing import Any

import torch

__all__ = ["Platform", "BenchSizes", "platform_of", "platform_of_dist_backend", "PLATFORMS", "cpu_available_memory"]


@dataclass(frozen=True)
class BenchSizes:
    """Sizes the benchmarks use on a device: ``rotate_bytes`` the bytes the rotating input sets of a case
    should span, ``rotate_budget`` the most memory they may take, ``max_sets`` the most sets,
    ``make_budget_s`` the seconds building them may take; ``copy_bytes`` / ``matmul_n`` the copy buffer and
    the square matmul of the ceilings (``quick_*``: with ``--quick``); ``gpu_like``: warm up and repeat as on
    an accelerator; ``repeats``: timed calls per case by default; ``fp8_matmul``: the ceilings probe an FP8
    matmul (``torch._scaled_mm``)."""

    rotate_bytes: int
    rotate_budget: int
    max_sets: int
    make_budget_s: float
    copy_bytes: int
    matmul_n: int
    quick_copy_bytes: int
    quick_matmul_n: int
    gpu_like: bool
    repeats: int
    fp8_matmul: bool = False


@dataclass(frozen=True)
class Platform:
    """The facts of one device type.

    ``name``: the torch device type. ``timer``: the name of the timer `v4hal.bench.timing` uses (device
    events or ``perf_counter``). ``dist_backend``: the torch.distributed backend that exchanges tensors of
    this device. ``cache_layouts``: the (attention, indexer) paged cache layouts its kernels read, before
    the model's own constraints (`v4hal.model.caches.cache_layouts` keeps those). ``pool_memory_share``: the share
    of the free memory (`free_memory`) a cache pool takes by default. ``bench``: `BenchSizes`.
    """

    name: str
    timer: str
    dist_backend: str
    cache_layouts: tuple[str, str]
    pool_memory_share: float
    bench: BenchSizes
    has_events: bool = False

    def module(self) -> Any:
        """``torch.<name>`` (``torch.cuda``, ``torch.npu`` once torch_npu is imported), or None."""
        return None if self.name == "cpu" else getattr(torch, self.name, None)

    def synchronize(self) -> None:
        """Wait for the work queued on the device (nothing to wait for on the CPU)."""
        mod = self.module()
        if mod is not None and hasattr(mod, "synchronize"):
            mod.synchronize()

    def event(self) -> Any:
        """A timing event of the device (``Event(enable_timing=True)``); only when ``has_events``."""
        return self.module().Event(enable_timing=True)

    def empty_cache(self) -> None:
        """Return the caching allocator's free blocks to the device (no-op without one)."""
        mod = self.module()
        if mod is not None and hasattr(mod, "empty_cache"):
            mod.empty_cache()

    def device_name(self) -> str:
        """A readable name of the device (the GPU's model; the host processor and threads on the CPU)."""
        mod = self.module()
        if mod is not None and hasattr(mod, "get_device_name"):
            return str(mod.get_device_name())
        return f"{_host.processor() or _host.machine()} ({torch.get_num_threads()} threads)"

    def free_memory(self, device: torch.device | str | None = None) -> int | None:
        """Bytes this process could still take on the device: `cpu_available_memory` on the CPU,
        ``torch.<type>.mem_get_info`` elsewhere; None when the device module does not say."""
        if self.name == "cpu":
            return cpu_available_memory()
        info = getattr(self.module(), "mem_get_info", None)
        if info is None:
            return None
        dev = torch.device(self.name) if device is None else torch.device(device)
        return int(info(dev)[0])


def cpu_available_memory() -> int:
    """Bytes of RAM this process could still take: MemAvailable of /proc/meminfo (else the physical RAM),
    bounded by a cgroup v2 memory limit when one is set."""
    avail = None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    if avail is None:
        try:
            avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            avail = 8 << 30
    with contextlib.suppress(OSError, ValueError):
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
                avail = min(avail, max(0, int(limit) - int(f.read().strip())))
    return avail


_CPU_BENCH = BenchSizes(rotate_bytes=64 << 20, rotate_budget=512 << 20, max_sets=16, make_budget_s=0.5,
                        copy_bytes=256 << 20, matmul_n=1024, quick_copy_bytes=64 << 20, quick_matmul_n=512,
                        gpu_like=False, repeats=7)
_GPU_BENCH = BenchSizes(rotate_bytes=512 << 20, rotate_budget=8 << 30, max_sets=64, make_budget_s=10.0,
                        copy_bytes=2 << 30, matmul_n=8192, quick_copy_bytes=2 << 30, quick_matmul_n=8192,
                        gpu_like=True, repeats=20)

#: the record of each known device type
PLATFORMS: dict[str, Platform] = {
    # the CPU: quantized caches (what the reference and Triton-interpreter kernels decode), gloo
    "cpu": Platform("cpu", "perf_counter", "gloo", ("model1_fp8", "indexer_fp4"), 0.125, _CPU_BENCH),
    # CUDA: FlashMLA's and DeepGEMM's paged layouts, NCCL
    "cuda": Platform("cuda", "cuda-events", "nccl", ("model1_fp8", "indexer_fp4"), 0.5,
                     replace(_GPU_BENCH, fp8_matmul=True), has_events=True),
    # Ascend: CANN's attention and indexer read bf16 paged caches (A2/A3), HCCL
    "npu": Platform("npu", "npu-events", "hccl", ("bf16", "bf16"), 0.5, _GPU_BENCH, has_events=True),
}


def platform_of(device: torch.device | str | None) -> Platform:
    """The `Platform` of ``device`` (a torch device, a device name or type such as ``"cuda:0"``; None: the
    CPU). A device type without a record gets the CPU's facts under its own name."""
    if device is None:
        kind = "cpu"
    elif isinstance(device, str) and device.split(":")[0] in PLATFORMS:
        kind = device.split(":")[0]             # "npu" names a device type before torch_npu is imported
    else:
        kind = torch.device(device).type        # refuses what is no device
    known = PLATFORMS.get(kind)
    return known if known is not None else replace(PLATFORMS["cpu"], name=kind, timer="perf_counter")


def platform_of_dist_backend(backend: str) -> Platform | None:
    """The `Platform` whose tensors the torch.distributed ``backend`` exchanges (gloo: the CPU, NCCL: CUDA,
    HCCL: the NPU), or None for a backend no record names."""
    name = str(backend).lower()
    return next((p for p in PLATFORMS.values() if p.dist_backend == name), None)
