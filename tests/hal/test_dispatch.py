"""Dispatch: override precedence, strict explicit requests, requirements that explain themselves."""
import pytest
import torch

import v4hal
from v4hal.hal import registry
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
    assert who() == "reference"
    monkeypatch.setenv("V4HAL_OP_BACKENDS", "rms_norm=triton")
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
    with pytest.raises(RangeError, match="op=backend"):
        requested_backend("rms_norm")


def test_available_backends_and_info():
    assert "reference" in v4hal.available_backends("cpu")
    data = v4hal.info(["cpu"])
    assert set(v4hal.PUBLIC_OPS) <= set(data["ops"])
    ref_rows = [r for r in data["ops"]["sparse_attn"]["cpu"] if r["backend"] == "reference"]
    assert ref_rows[0]["status"] == "yes"
    asc = [r for r in data["ops"]["sparse_attn"]["cpu"] if r["backend"] == "ascend"][0]
    assert asc["status"] == "unavailable" and asc["reason"]


def test_cli_info_prints_matrix(capsys):
    from v4hal.cli import cli
    assert cli(["info", "--devices", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "ops on cpu" in out and "sparse_attn" in out and "unavailable" in out
