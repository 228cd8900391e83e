"""`v4hal.hal.platform`: one record of facts per device type, read by every layer that used to branch on the
device type itself (timers, syncs, distributed backends, default cache layouts, pool budgets, bench sizes)."""
from __future__ import annotations

import pytest
import torch

from v4hal.bench import cases as bench_cases
from v4hal.bench import runner, timing
from v4hal.hal import platform as P
from v4hal.model import ModelConfig
from v4hal.parallel import comm
from v4hal.serve import cache_layouts, sizing

MINI = ModelConfig.preset("v4-mini")


def test_records_per_device_type() -> None:
    cpu, cuda, npu = (P.platform_of(d) for d in ("cpu", "cuda:1", "npu:0"))
    assert (cpu.name, cuda.name, npu.name) == ("cpu", "cuda", "npu")
    assert (cpu.dist_backend, cuda.dist_backend, npu.dist_backend) == ("gloo", "nccl", "hccl")
    assert (cpu.timer, cuda.timer, npu.timer) == ("perf_counter", "cuda-events", "npu-events")
    assert not cpu.has_events and cuda.has_events and npu.has_events
    assert npu.cache_layouts == ("bf16", "bf16") and cuda.cache_layouts == cpu.cache_layouts
    assert P.platform_of(None) is cpu and P.platform_of(torch.device("cpu")) is cpu
    assert cuda.bench.fp8_matmul and not npu.bench.fp8_matmul and not cpu.bench.gpu_like
    meta = P.platform_of("meta")                      # a type without a record: the CPU's facts, its own name
    assert meta.name == "meta" and meta.dist_backend == "gloo" and meta.timer == "perf_counter"
    with pytest.raises(RuntimeError):
        P.platform_of("not-a-device")
    assert P.platform_of_dist_backend("NCCL") is cuda and P.platform_of_dist_backend("mpi") is None


def test_the_layers_read_the_record(monkeypatch: pytest.MonkeyPatch) -> None:
    """Changing a record changes what the timers, the bench, the pool defaults and the EP plumbing do."""
    case = max(bench_cases.quick_cases(), key=lambda c: runner.rotation_count(c, "cpu"))
    assert runner.rotation_count(case, "cpu") > 3
    fake = P.replace(P.PLATFORMS["cpu"], timer="fake-clock", pool_memory_share=0.25,
                     cache_layouts=("bf16", "bf16"), bench=P.replace(P.PLATFORMS["cpu"].bench, max_sets=3))
    monkeypatch.setitem(P.PLATFORMS, "cpu", fake)
    monkeypatch.setattr(P, "cpu_available_memory", lambda: 1 << 30)
    assert timing.timer_name("cpu") == "fake-clock"
    assert timing.time_fn(lambda i: None, "cpu", warmup=0, repeats=1).timer == "fake-clock"
    assert cache_layouts("cpu", MINI) == ("bf16", "bf16") and sizing.default_layout("cpu", MINI) == "bf16"
    assert sizing.default_pool_memory("cpu") == 1 << 28
    assert runner.rotation_count(case, "cpu") == 3


def test_cache_layouts_keep_the_model_rule() -> None:
    """The device prefers ``model1_fp8``; a model whose KV scales are not powers of two gets bf16 attention
    pages instead (the pages must hold what the model computed)."""
    amax = MINI.replace(scale_fmt=None, scale_dtype="fp32")
    assert cache_layouts("cpu", MINI) == ("model1_fp8", "indexer_fp4")
    assert cache_layouts("cpu", amax) == ("bf16", "indexer_fp4")
    assert cache_layouts("npu", amax) == ("bf16", "bf16")


def test_ep_plumbing_follows_the_backend_record(monkeypatch: pytest.MonkeyPatch) -> None:
    """The device an EP group exchanges comes from the record whose ``dist_backend`` the group runs."""
    import torch.distributed as dist

    group = object()
    monkeypatch.setattr(dist, "get_backend", lambda g: "nccl")
    assert comm.exchange_device(group).type == "cuda"
    with pytest.raises(comm.EPGroupError, match="runs nccl, which exchanges cuda tensors"):
        comm.device_fits_group("op", group, torch.device("cpu"))
    monkeypatch.setattr(dist, "get_backend", lambda g: "gloo")
    assert comm.exchange_device(group).type == "cpu"
    comm.device_fits_group("op", group, torch.device("cpu"))
