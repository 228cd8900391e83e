"""Concurrent calls from several threads: the Triton interpreter is not thread-safe, so every
implementation registered for interpreted tensors runs under one process-wide lock; compiled
(CUDA) registrations do not take it."""
from __future__ import annotations

import os
import threading

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import v4hal
from v4hal.hal import registry

THREADS = 4
CALLS = 25


def _hammer(fn, expected: torch.Tensor) -> list[str]:
    """Run ``fn`` CALLS times in each of THREADS threads (started together); returns the failures."""
    failures: list[str] = []
    start = threading.Barrier(THREADS)

    def work() -> None:
        start.wait()
        for i in range(CALLS):
            try:
                got = fn()
            except Exception as exc:          # noqa: BLE001  (collected and reported below)
                failures.append(f"call {i}: {type(exc).__name__}: {exc}")
                continue
            if not torch.equal(got, expected):
                failures.append(f"call {i}: wrong result")

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    return failures


def test_triton_rms_norm_from_four_threads() -> None:
    """4 threads x 25 rms_norm calls under use_backend("triton") on CPU tensors: every call correct."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, generator=g)
    w = torch.rand(256, generator=g) + 0.5
    with v4hal.use_backend("triton"):
        expected = v4hal.rms_norm(x, w)

    def call() -> torch.Tensor:
        with v4hal.use_backend("triton"):
            return v4hal.rms_norm(x, w)

    failures = _hammer(call, expected)
    assert not failures, f"{len(failures)} of {THREADS * CALLS} calls failed: {failures[:3]}"


def test_triton_quantizer_from_four_threads() -> None:
    """Another family (and a kernel of a different module) under the same lock."""
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    with v4hal.use_backend("triton"):
        expected = v4hal.act_quant(x, 128, "ue8m0")[0].view(torch.uint8)

    def call() -> torch.Tensor:
        with v4hal.use_backend("triton"):
            return v4hal.act_quant(x, 128, "ue8m0")[0].view(torch.uint8)

    failures = _hammer(call, expected)
    assert not failures, f"{len(failures)} of {THREADS * CALLS} calls failed: {failures[:3]}"


def test_only_interpreted_registrations_take_the_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU registrations are serialized; CUDA ones are the kernels themselves unless the interpreter
    also serves CUDA tensors (TRITON_INTERPRET=1)."""
    from v4hal.backends import triton as tri_backend
    from v4hal.backends.triton import small

    assert registry.ensure_loaded("triton") is None

    def triton_impl(op: str, device: str):
        return next(i for i in registry.implementations(op, device) if i.backend == "triton")

    try:
        monkeypatch.setattr(tri_backend, "triton_interpreter_on", lambda: False)   # as on a GPU machine
        tri_backend.load()
        for op in ("rms_norm", "act_quant", "sparse_attn", "moe_experts"):
            cpu, cuda = triton_impl(op, "cpu"), triton_impl(op, "cuda")
            assert getattr(cpu.fn, "__wrapped__", None) is not None and getattr(cpu.fn, "_v4hal_serialized", False)
            assert not getattr(cuda.fn, "_v4hal_serialized", False)
        assert triton_impl("rms_norm", "cuda").fn is small.rms_norm
        assert triton_impl("rms_norm", "cpu").fn.__wrapped__ is small.rms_norm
        monkeypatch.setattr(tri_backend, "triton_interpreter_on", lambda: True)
        tri_backend.load()
        assert getattr(triton_impl("rms_norm", "cuda").fn, "_v4hal_serialized", False)
    finally:
        monkeypatch.undo()
        tri_backend.load()          # the registrations of this process again


def test_lock_is_reentrant_and_released_on_error() -> None:
    """An implementation that raises releases the lock; a nested serialized call does not deadlock."""
    from v4hal.backends.triton import INTERPRETER_LOCK, serialized

    def boom() -> None:
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        serialized(boom)()
    free: list[bool] = []

    def probe() -> None:            # another thread: the RLock is free again
        free.append(INTERPRETER_LOCK.acquire(blocking=False))
        if free[-1]:
            INTERPRETER_LOCK.release()

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    assert free == [True]
    outer = serialized(lambda: serialized(lambda: 3)())
    assert outer() == 3
    assert serialized(outer) is outer
