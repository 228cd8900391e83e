"""Import safety, the probe and its reasons, chip detection, tier binding, registration and the tables."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import v4hal
from v4hal.backends import ascend
from v4hal.backends.ascend import attention, binding, limits, register, runtime
from v4hal.hal import registry

from .fake_npu import fake_npu

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, extra_path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, str(ROOT), env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=240)


def test_import_never_imports_torch_npu():
    """Importing v4hal, running ops on the CPU and asking v4hal info import no torch_npu; the probe says why."""
    res = _run("""
        import sys, torch, v4hal
        x = torch.randn(2, 8)
        v4hal.rms_norm(x, torch.ones(8))
        from v4hal.backends import ascend
        info = v4hal.info()
        assert "torch_npu" not in sys.modules, "torch_npu imported"
        print("REASON:", ascend.probe())
        print("INFO:", info["backends"]["ascend"])
    """)
    assert res.returncode == 0, res.stderr
    assert "REASON: torch_npu not installed" in res.stdout
    assert "INFO: torch_npu not installed" in res.stdout


def test_broken_torch_npu_is_a_reason_not_a_crash(tmp_path):
    """A torch_npu that fails to import (no CANN: libhccl.so) makes the backend unavailable with that reason."""
    pkg = tmp_path / "torch_npu"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "raise ImportError('libhccl.so: cannot open shared object file: No such file or directory')\n")
    res = _run("""
        import sys, torch, v4hal
        from v4hal.backends import ascend
        y = v4hal.rms_norm(torch.ones(2, 4), torch.ones(4))
        print("REASON:", ascend.probe())
    """, extra_path=str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "REASON: torch_npu failed to import: ImportError: libhccl.so: cannot open shared object file" in res.stdout


def test_probe_with_stand_ins_and_chip_ranges():
    for chip in ("A2", "A3", "950"):
        with fake_npu(chip) as handle:
            assert ascend.probe() is None
            assert runtime.chip() == chip
            assert runtime.soc_version() == {"A2": 223, "A3": 253, "950": 260}[chip]
            del handle
    with fake_npu("A2") as handle:
        import torch_npu

        torch_npu.npu.get_soc_version = lambda: 200   # an older SoC
        runtime.reset()
        assert runtime.chip() is None
        assert "SoC version 200 is not an A2 (220-225), A3 (250-255) or 950 (260)" in ascend.probe()
        del handle
    runtime.reset()
    assert ascend.probe() == "torch_npu not installed"


def test_device_reason():
    assert "serves npu tensors" in ascend.device_reason("cpu")
    runtime.reset()
    assert ascend.device_reason("npu") == "torch_npu not installed"


def test_binding_prefers_tiers_in_order_and_caches():
    sfa = attention.SFA
    with fake_npu("A3"):
        first = binding.lookup(sfa)
        assert first is not None and first.tier == "torch_npu"
        assert binding.lookup(sfa) is first                       # cached
    with fake_npu("A3", drop=("torch_npu.npu_sparse_flash_attention",)):
        assert binding.lookup(sfa).tier == "_C_ascend"
    with fake_npu("A3", tiers=("torch_npu",), drop=("torch_npu.npu_sparse_flash_attention",)):
        assert binding.lookup(sfa) is None
        reasons = binding.module_reasons()
        assert reasons.get("vllm_ascend.vllm_ascend_C") == "vllm_ascend not installed"


def test_missing_op_falls_back_with_reason(monkeypatch):
    registry.ensure_device_backends("cpu")
    with fake_npu("A2", drop=("torch_npu.npu_rms_norm",)) as handle:
        register.enable_cpu_emulation()
        try:
            x = torch.randn(3, 16)
            with v4hal.use_backend("ascend"):
                got = v4hal.rms_norm(x, torch.ones(16))
            with v4hal.use_backend("reference"):
                want = v4hal.rms_norm(x, torch.ones(16))
            assert torch.equal(got, want) and not handle.called("npu_rms_norm")
            assert ("rms_norm", "A2", "reference: CANN op not installed (torch_npu.npu_rms_norm)") in limits.stats()
        finally:
            register.disable_cpu_emulation()


def test_cpu_emulation_is_explicit_only():
    registry.ensure_device_backends("cpu")
    with fake_npu("A2") as handle:
        register.enable_cpu_emulation()
        try:
            v4hal.rms_norm(torch.randn(2, 8), torch.ones(8))            # automatic choice: the reference
            assert not handle.calls
            impl = next(i for i in registry.implementations("rms_norm", "cpu") if i.backend == "ascend")
            assert impl.auto is False and impl.priority == register.PRIORITY
        finally:
            register.disable_cpu_emulation()
    assert not any(i.backend == "ascend" for i in registry.implementations("rms_norm", "cpu"))


def test_load_registers_npu_with_probe_requirement():
    saved = {k: list(v) for k, v in registry._IMPLS.items()}
    try:
        register.load()
        for op in v4hal.OPS:
            impl = next(i for i in registry.implementations(op, "npu") if i.backend == "ascend")
            assert impl.priority == 20 and impl.auto
        runtime.reset()
        impl = next(i for i in registry.implementations("sparse_attn", "npu") if i.backend == "ascend")
        assert impl.why_not({}) == ["torch_npu not installed"]
        with fake_npu("950"):
            assert impl.why_not({}) == []
    finally:
        registry._IMPLS.clear()
        registry._IMPLS.update(saved)
        runtime.reset()


def test_triton_allowlist_is_data_and_mirrors_kernels():
    assert register.TRITON_NPU_ALLOWLIST == frozenset()          # nothing has passed parity on an NPU yet
    assert register.mirror_triton(register.TRITON_NPU_ALLOWLIST) == []
    saved = {k: list(v) for k, v in registry._IMPLS.items()}
    try:
        def kernel(x, weight, eps=1e-6):
            return x
        registry._IMPLS.clear()                                    # only the kernel registered here
        registry.register_impl("rms_norm", "triton", kernel, devices=("cuda",), priority=10)
        assert register.mirror_triton({"rms_norm", "hc_head"}, ensure=lambda name: None) == ["rms_norm"]
        impl = next(i for i in registry.implementations("rms_norm", "npu") if i.backend == "triton")
        assert impl.fn is kernel and impl.priority == 10
        assert register.mirror_triton({"rms_norm"}, ensure=lambda name: "triton is not installed") == []
    finally:
        registry._IMPLS.clear()
        registry._IMPLS.update(saved)


def test_fallback_table_covers_every_op_and_chip():
    rows = ascend.fallback_table()
    assert rows and all(set(r) == {"op", "chip", "condition", "runs"} for r in rows)
    ops = {r["op"] for r in rows} | {r["op"] for r in ascend.native_table()}
    assert set(v4hal.OPS) <= ops
    conds = {(r["op"], r["chip"], r["condition"]) for r in rows}
    assert ("sparse_attn", "A2", "heads not in {1,2,4,...,128} (A2/A3 N1 limit)") in conds
    assert ("sparse_attn", "950", "heads not in 1..128 (950 N1 limit)") in conds
    assert ("hc_pre", "A3", "dim not 4096 or 7168") in conds
    assert ("fp4_act_quant", "A2", "always: no MX quantizer on A2/A3") in conds
    assert any(op == "compress_kv" and c.startswith("always:") for op, _chip, c in conds)
    assert ("fp8_gemm", "950", "a_s or b_s not e8m0 (MX needs power-of-two scales)") in conds
    native = {(r["op"], r["chip"]): r["native"] for r in ascend.native_table()}
    assert native[("fp4_act_quant", "950")].startswith("torch_npu.npu_dynamic_mx_quant")
    assert ("fp4_act_quant", "A2") not in native


@pytest.mark.parametrize("chip", ["A2", "950"])
def test_unknown_chip_falls_back_everywhere(chip):
    registry.ensure_device_backends("cpu")
    with fake_npu(chip) as handle:
        import torch_npu

        torch_npu.npu.get_soc_version = lambda: 100
        register.enable_cpu_emulation()
        try:
            x = torch.randn(2, 8)
            with v4hal.use_backend("ascend"):
                v4hal.rms_norm(x, torch.ones(8))
            assert not handle.calls
            assert ("rms_norm", "?", "reference: unknown Ascend chip") in limits.stats()
        finally:
            register.disable_cpu_emulation()


def test_npu_probes_live_in_hal_devices():
    """The backend's probes are the ones in v4hal.hal.devices (one cache, reset by runtime.reset)."""
    from v4hal.hal import devices

    runtime.reset()
    assert devices.npu_reason() == "torch_npu not installed" and devices.npu_chip() is None
    with fake_npu("950"):
        assert devices.npu_chip() == runtime.chip() == "950" and devices.npu_reason() is None
    assert devices.npu_chip() is None                     # uninstall reset the shared cache


def test_one_requirement_table_registered_routed_and_shown():
    """The requirements the adapter routes on are the registered ones; fallbacks are per chip, never
    reasons to skip the backend, and v4hal info prints them from the backend's notes hook."""
    registry.ensure_device_backends("cpu")
    with fake_npu("A2") as handle:
        register.enable_cpu_emulation()
        try:
            impl = next(i for i in registry.implementations("sparse_attn", "cpu") if i.backend == "ascend")
            routed = limits.requirements("sparse_attn")
            assert routed and all(any(r is q for q in impl.requires) for r in routed)
            assert all(r.fallback == "reference" and r.chips for r in routed)
            g = torch.Generator().manual_seed(0)
            q = torch.randn(1, 2, 3, 512, generator=g).to(torch.bfloat16)          # 3 heads: not a power of 2
            args = {"q": q, "kv": torch.randn(1, 8, 512, generator=g).to(torch.bfloat16),
                    "attn_sink": torch.zeros(3), "topk_idxs": torch.zeros(1, 2, 4, dtype=torch.int32),
                    "softmax_scale": 0.1}
            assert impl.why_not(args) == []
            assert impl.fallback_reasons(args) == ["heads not in {1,2,4,...,128} (A2/A3 N1 limit)"]
            handle.set_chip("950")
            runtime.reset()
            assert impl.fallback_reasons(args) == []
        finally:
            register.disable_cpu_emulation()
    notes = v4hal.info(["cpu"])["notes"]["ascend"]
    assert {"op": "sparse_attn", "note": "falls back to reference: heads not in 1..128 (950 N1 limit) (950)"} in notes
    assert {"op": "fp8_gemm",
            "note": "falls back to dequant to bf16/fp32 + NPU matmul: out_dtype not bf16/fp16 (950)"} in notes
    assert {r["op"] for r in notes} == set(v4hal.OPS)
    from v4hal.hal.info import format_info

    text = format_info(v4hal.info(["cpu"]))
    assert ("notes from the ascend backend:" in text
            and "falls back to reference: no MX quantizer on A2/A3 (A2/A3)" in text)
