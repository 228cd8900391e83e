"""Dispatch: override precedence, strict explicit requests, requirements that explain themselves,
cached selections and the eager fast path."""
import sys

import pytest
import torch

import v4hal
from v4hal.hal import dispatch, registry
from v4hal.hal.dispatch import requested_backend
from v4hal.hal.errors import BackendUnavailableError, RangeError
from v4hal.hal.registry import Requirement, register_impl


@pytest.fixture
def fake_impls(monkeypatch):
    """rms_norm on CPU gets a 'cuda' impl (auto, priority 50) and a 'triton' impl (explicit only);
    each tags its output so the test sees who ran. The registry is restored afterwards."""
    registry.ensure_device_backends("cpu")
    saved = {k: list(v) for k, v in registry._IMPLS.items()}
    monkeypatch.delenv("V4HAL_BACKEND", raising=False)
    monkeypatch.delenv("V4HAL_OP_BACKENDS", raising=False)
    dispatch.refresh()

    def tagged(value):
        def fn(x, weight, eps):
            return torch.full_like(x, value)
        return fn

    register_impl("rms_norm", "cuda", tagged(1.0), devices=("cpu",), priority=50)
    register_impl("rms_norm", "triton", tagged(2.0), devices=("cpu",), priority=60, auto=False)
    yield
    registry._IMPLS.clear()
    registry._IMPLS.update(saved)


def who(x=None):
    x = torch.ones(2, 8) if x is None else x
    out = v4hal.rms_norm(x, torch.ones(x.shape[-1]))
    return {1.0: "cuda", 2.0: "triton"}.get(float(out[0, 0]), "reference")


def test_priority_picks_highest_auto_candidate(fake_impls):
    assert who() == "cuda"  # triton has higher priority but is explicit-only


def test_precedence_context_over_env(fake_impls, monkeypatch):
    monkeypatch.setenv("V4HAL_BACKEND", "reference")
    assert who() == "cuda"  # the environment is read once ...
    dispatch.refresh()
    assert who() == "reference"  # ... and again by refresh()
    monkeypatch.setenv("V4HAL_OP_BACKENDS", "rms_norm=triton")
    dispatch.refresh()
    assert who() == "triton"  # per-op env beats global env
    with v4hal.use_backend("cuda"):
        assert who() == "cuda"  # context beats per-op env
        with v4hal.use_backend(rms_norm="reference"):
            assert who() == "reference"  # per-op context beats the context's global name
        assert who() == "cuda"
    assert who() == "triton"


def test_nested_global_context_replaces_outer(fake_impls):
    with v4hal.use_backend(rms_norm="triton"):
        assert who() == "triton"
        with v4hal.use_backend("reference"):
            assert who() == "reference"
        with v4hal.use_backend():
            assert who() == "cuda"  # cleared: back to priorities


def test_explicit_request_is_strict(fake_impls):
    with v4hal.use_backend("ascend"):
        with pytest.raises(BackendUnavailableError, match="rms_norm: backend 'ascend'.*unavailable"):
            who()


def test_unmet_requirement_explains_itself(fake_impls):
    need_wide = Requirement("D >= 16", lambda a: None if a["x"].shape[-1] >= 16 else f"D={a['x'].shape[-1]} < 16")
    register_impl("rms_norm", "cuda", lambda x, w, eps: torch.full_like(x, 1.0), devices=("cpu",), priority=50,
                  requires=(need_wide,))
    assert who(torch.ones(2, 8)) == "reference"  # automatic choice skips it
    assert who(torch.ones(2, 16)) == "cuda"
    with v4hal.use_backend("cuda"):
        with pytest.raises(BackendUnavailableError, match="D=8 < 16"):
            who(torch.ones(2, 8))


def test_kernel_failure_is_not_retried(fake_impls):
    def broken(x, weight, eps):
        raise RuntimeError("kernel exploded")
    register_impl("rms_norm", "cuda", broken, devices=("cpu",), priority=50)
    with pytest.raises(RuntimeError, match="kernel exploded"):
        who()


def test_bad_override_names(fake_impls, monkeypatch):
    with pytest.raises(RangeError, match="backend must be one of"):
        with v4hal.use_backend("tpu"):
            pass
    with pytest.raises(RangeError, match="not a v4hal op"):
        with v4hal.use_backend(no_such_op="reference"):
            pass
    monkeypatch.setenv("V4HAL_OP_BACKENDS", "rms_norm")
    dispatch.refresh()
    with pytest.raises(RangeError, match="op=backend"):
        requested_backend("rms_norm")


@pytest.mark.parametrize("value, match", [
    ("rms_nrom=triton", "'rms_nrom' in entry 'rms_nrom=triton' is not a v4hal op"),
    ("=reference", "op=backend, got '=reference'"),
    (" RMS_NORM=reference", "'RMS_NORM' in entry 'RMS_NORM=reference' is not a v4hal op"),
    ("rms_norm=reference,sparse_attn=tpu", r"V4HAL_OP_BACKENDS \(sparse_attn\): backend must be one of"),
])
def test_op_env_entries_that_name_nothing_raise(monkeypatch, value, match):
    """A typo in V4HAL_OP_BACKENDS is an error naming the entry at the first dispatch, for any op."""
    monkeypatch.setenv("V4HAL_OP_BACKENDS", value)
    dispatch.refresh()
    with pytest.raises(RangeError, match=match):
        v4hal.rms_norm(torch.ones(2, 8), torch.ones(8))


def test_available_backends_and_info():
    assert "reference" in v4hal.available_backends("cpu")
    data = v4hal.info(["cpu"])
    assert set(v4hal.PUBLIC_OPS) <= set(data["ops"])
    ref_rows = [r for r in data["ops"]["sparse_attn"]["cpu"] if r["backend"] == "reference"]
    assert ref_rows[0]["status"] == "yes"
    asc = [r for r in data["ops"]["sparse_attn"]["cpu"] if r["backend"] == "ascend"][0]
    assert asc["status"] == "unavailable" and asc["reason"]


def test_cli_info_prints_matrix(capsys):
    from v4hal.apps.main import cli
    assert cli(["info", "--devices", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "ops on cpu" in out and "sparse_attn" in out and "unavailable" in out


def counting(description, reason_fn):
    """A requirement that counts how often it is evaluated."""
    calls = []

    def check(args):
        calls.append(tuple(args["x"].shape))
        return reason_fn(args)
    return Requirement(description, check), calls


def test_selection_is_cached_per_signature_until_the_registry_changes(fake_impls):
    need_wide, calls = counting("D >= 16", lambda a: None if a["x"].shape[-1] >= 16 else "D < 16")
    register_impl("rms_norm", "cuda", lambda x, w, eps: torch.full_like(x, 1.0), devices=("cpu",), priority=50,
                  requires=(need_wide,))
    assert [who(torch.ones(2, 16)) for _ in range(3)] == ["cuda"] * 3
    assert calls == [(2, 16)]                          # evaluated once for this signature
    assert [who(torch.ones(2, 8)) for _ in range(2)] == ["reference"] * 2   # a new shape: selected again
    assert who(torch.ones(2, 16)) == "cuda" and calls == [(2, 16), (2, 8)]
    with v4hal.use_backend(rms_norm="triton"):         # an override is part of the key
        assert who(torch.ones(2, 16)) == "triton"
    assert who(torch.ones(2, 16)) == "cuda"
    register_impl("rms_norm", "triton", lambda x, w, eps: torch.full_like(x, 2.0), devices=("cpu",), priority=90)
    assert who(torch.ones(2, 16)) == "triton"          # registering dropped the cached selection


def test_failing_calls_are_never_cached(fake_impls):
    x = torch.ones(2, 8)
    assert who(x) == "cuda"
    for _ in range(2):
        with pytest.raises(v4hal.ShapeError, match="weight must be"):
            v4hal.rms_norm(x, torch.ones(4))
    with v4hal.use_backend("ascend"):
        for _ in range(2):
            with pytest.raises(BackendUnavailableError):
                who(x)


def test_same_overrides_share_a_cache_key():
    with v4hal.use_backend("reference"):
        first = dispatch.override_key()
    with v4hal.use_backend("reference"):
        assert dispatch.override_key() == first != 0
        with v4hal.use_backend():
            assert dispatch.override_key() == 0


def test_value_checks_default_on_cpu_off_on_accelerators(monkeypatch):
    monkeypatch.delenv("V4HAL_CHECK_VALUES", raising=False)
    dispatch.refresh()
    assert dispatch.value_checks_on("cpu") and not dispatch.value_checks_on("cuda")
    assert not dispatch.value_checks_on("npu")
    monkeypatch.setenv("V4HAL_CHECK_VALUES", "1")
    dispatch.refresh()
    assert dispatch.value_checks_on("cuda") and dispatch.value_checks_on("cpu")
    monkeypatch.setenv("V4HAL_CHECK_VALUES", "0")
    dispatch.refresh()
    assert not dispatch.value_checks_on("cpu")
    x, bad = torch.randn(3, 16), torch.tensor([[0, 9]] * 3, dtype=torch.int32)   # expert 9 of 4
    with pytest.raises(Exception) as off:
        v4hal.moe_dispatch(x, bad, 4)
    assert not isinstance(off.value, RangeError)        # not v4hal's check: the kernel's own failure
    monkeypatch.delenv("V4HAL_CHECK_VALUES")
    dispatch.refresh()
    with pytest.raises(RangeError, match=r"indices values must be in \[0, 4\)"):
        v4hal.moe_dispatch(x, bad, 4)


def test_devices_are_registered_and_every_op_has_their_kernels():
    from v4hal.hal import devices
    from v4hal.ops import _define

    registered = devices.registered_devices()
    assert list(registered)[:3] == ["cpu", "cuda", "npu"]
    assert registry.DEVICES == tuple(registered)
    assert _define.DISPATCH_KEYS == tuple(d.dispatch_key for d in registered.values())
    assert {"CPU", "CUDA", "PrivateUse1"} <= set(_define.DISPATCH_KEYS)
    for op in v4hal.OPS:
        for key in _define.DISPATCH_KEYS:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"v4hal::{op}", key), (op, key)
    assert devices.devices_here()[0] == "cpu" and devices.device_reason("cuda")
    assert "unknown device type" in devices.device_reason("tpu")


@pytest.fixture
def spy(fake_impls):
    """rms_norm's CPU implementation records, per call, whether torch's dispatcher called it (True:
    through ``torch.ops``' kernel; False: directly from the public op's eager fast path)."""
    seen = []

    def fn(x, weight, eps):
        seen.append(sys._getframe(1).f_code.co_name != "eager")
        return x * weight
    register_impl("rms_norm", "cuda", fn, devices=("cpu",), priority=50)
    return seen


def test_eager_calls_skip_the_dispatcher_once_the_signature_is_known(spy):
    x, w = torch.ones(2, 8), torch.ones(8)
    for _ in range(3):
        v4hal.rms_norm(x, w)
    assert spy == [True, False, False]          # first call through torch.ops, then direct
    v4hal.rms_norm(torch.ones(3, 8), w)
    assert spy[-1] is True                      # a new signature goes through torch.ops first
    torch.ops.v4hal.rms_norm(x, w)
    assert spy[-1] is True                      # torch.ops.v4hal.<op> always dispatches


def test_eager_fast_path_steps_aside_for_autograd_modes_and_subclasses(spy):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x, w = torch.ones(2, 8), torch.ones(8)
    v4hal.rms_norm(x, w)
    wg = torch.ones(8, requires_grad=True)
    for _ in range(2):
        v4hal.rms_norm(x, wg)
    assert spy[-2:] == [True, True]             # grad on and a tensor requires grad: torch's autograd path
    with torch.no_grad():
        v4hal.rms_norm(x, wg)
    assert spy[-1] is False
    with Seen() as mode:
        v4hal.rms_norm(x, w)
    assert mode.ops == ["v4hal.rms_norm.default"] and spy[-1] is True
    with torch.autocast("cpu"):
        v4hal.rms_norm(x, w)
    assert spy[-1] is True
    p = torch.nn.Parameter(torch.ones(8), requires_grad=False)
    v4hal.rms_norm(x, p)
    v4hal.rms_norm(x, p)
    assert spy[-2:] == [True, False]            # a Parameter is its own signature, then direct


def test_ops_trace_under_torch_compile(fake_impls):
    compiled = torch.compile(lambda x, w: v4hal.rms_norm(x, w) + 1, backend="eager", fullgraph=True)
    x = torch.ones(2, 8)
    assert torch.equal(compiled(x, torch.ones(8)), torch.full_like(x, 2.0))    # the 'cuda' impl: ones


def test_the_selection_cache_is_bounded(fake_impls, monkeypatch):
    from v4hal.ops import _define

    monkeypatch.setattr(_define, "MAX_CACHED_SIGNATURES", 3)
    for rows in range(1, 8):
        assert who(torch.ones(rows, 8)) == "cuda"
        assert 1 <= len(v4hal.OPS["rms_norm"].selections) <= 3
