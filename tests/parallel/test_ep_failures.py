"""Dead, absent and failing ranks end in clear errors within the timeout; bad calls raise v4hal errors."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from v4hal.hal.errors import BackendUnavailableError, RangeError, V4HalError
from v4hal.parallel import (
    EPGroupError,
    EPRankError,
    EPTimeoutError,
    ExpertParallelMoE,
    ep_dispatch,
    expert_range,
    select_transport,
    spawn,
    transport_reasons,
)

from . import workers as W

SLACK_S = 3.0       # scheduling on a busy 2-core machine


def test_rank_that_dies_makes_the_others_raise_timeout() -> None:
    timeout = 4.0
    with pytest.raises(EPRankError) as info:
        spawn(W.rank_dies, 2, timeout, start_method="fork", threads=1, timeout_s=30, join_timeout_s=120)
    err = info.value
    assert set(err.failures) == {1} and "exited with code 3" in str(err.failures[1])
    r0 = err.results[0]
    assert r0["error"] == "EPTimeoutError" and r0["is_timeout_error"]
    assert r0["elapsed"] < timeout + SLACK_S
    assert "rank 0 of 2" in r0["message"] and "ep_dispatch" in r0["message"]


def test_rank_that_never_joins_makes_the_others_time_out() -> None:
    timeout, sleep = 1.5, 6.0
    res = spawn(W.rank_never_joins, 4, timeout, sleep, start_method="fork", threads=1, timeout_s=30,
                join_timeout_s=120)
    assert res[3] == {"error": None, "slept": sleep}
    for r in range(3):
        assert res[r]["error"] == "EPTimeoutError", res[r]
        assert timeout - 0.5 < res[r]["elapsed"] < timeout + SLACK_S, res[r]
        assert f"within {timeout:g} s" in res[r]["message"]


def test_spawn_reports_the_failing_rank_first() -> None:
    with pytest.raises(EPRankError) as info:
        spawn(W.rank_raises, 2, start_method="fork", threads=1, timeout_s=20, join_timeout_s=120)
    err = info.value
    assert isinstance(err, V4HalError)
    assert isinstance(err.failures[1], ValueError) and isinstance(err.failures[0], EPTimeoutError)
    text = str(err)
    assert text.index("rank 1: ValueError: rank 1 gave up") < text.index("rank 0: EPTimeoutError")
    assert isinstance(err.__cause__, (ValueError, EPTimeoutError))


def test_spawn_join_timeout_bounds_a_hung_rank() -> None:
    import time

    t0 = time.monotonic()
    with pytest.raises(EPTimeoutError, match="join_timeout_s=2 s"):
        spawn(W.rank_sleeps, 2, 60.0, start_method="fork", threads=1, timeout_s=30, join_timeout_s=2)
    assert time.monotonic() - t0 < 2 + 10


def test_spawn_default_start_method() -> None:
    """The default (fresh interpreters, what `v4hal run --ep` uses): ranks see their group."""
    assert spawn(W.rank_identity, 2, timeout_s=60, join_timeout_s=240) == [(0, 2, "gloo"), (1, 2, "gloo")]


def test_bad_calls_on_a_live_group() -> None:
    res = spawn(W.rank_errors, 2, start_method="fork", threads=1, timeout_s=30, join_timeout_s=120)
    expected = {"indivisible": ("RangeError", "multiple of the EP group size 2"),
                "wrong_local": ("ShapeError", "E/W = 8/2 = 4"),
                "index_range": ("RangeError", "[0, num_experts=8)"), "weights_dtype": ("ShapeError", "float32"),
                "fp8_dim": ("ShapeError", "divisible by 128"), "transport": ("BackendUnavailableError", "CUDA"),
                "mismatch": ("ShapeError", "must agree across the group"),
                "shape_mismatch": ("ShapeError", "same way")}
    for rank in range(2):
        for case, (kind, words) in expected.items():
            got = res[rank][case]
            assert got.startswith(kind + ":") and words in got, (rank, case, got)


@pytest.mark.skipif(dist.is_initialized(), reason="needs a process without a default group")
def test_no_process_group() -> None:
    x, w, idx = W.make_tokens(0, 2, "all")
    with pytest.raises(EPGroupError, match="not initialized"):
        ep_dispatch(x, w, idx, num_experts=W.E)
    with pytest.raises(EPGroupError):
        ExpertParallelMoE.from_weights(*W.local(W.make_weights("bf16"), 0, 2)[:3], num_experts=W.E)


def test_transport_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("V4HAL_EP_TRANSPORT", raising=False)
    assert select_transport(None, "cpu") == "all_to_all"
    assert select_transport("all_to_all", "cpu") == "all_to_all"
    reasons = transport_reasons("cpu")
    assert reasons["all_to_all"] is None and "CUDA" in reasons["deepep"] and "NPU" in reasons["ascend"]
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        select_transport("deepep", "cpu")
    with pytest.raises(BackendUnavailableError, match="NPU"):
        select_transport("ascend", torch.device("cpu"))
    with pytest.raises(BackendUnavailableError, match="one of"):
        select_transport("nvshmem", "cpu")
    monkeypatch.setenv("V4HAL_EP_TRANSPORT", "deepep")
    with pytest.raises(BackendUnavailableError, match="requested"):
        select_transport(None, "cpu")


def test_expert_range() -> None:
    assert expert_range(256, 4, 3) == (192, 256)
    with pytest.raises(RangeError, match="multiple of the EP group size 3"):
        expert_range(256, 3, 0)
    assert issubclass(EPTimeoutError, TimeoutError) and issubclass(EPTimeoutError, V4HalError)


def test_transport_adapters_against_stand_ins() -> None:
    """DeepEP and Ascend MC2 adapters, run against one-rank stand-ins with the documented signatures: the
    calls are well formed and the results equal `moe_experts` within bf16 tolerance (DeepEP: one bf16
    partial sum per rank; MC2: gate weight applied in the combine, after w2)."""
    from tests.numerics import assert_close

    res = spawn(W.rank_adapters, 1, start_method="fork", threads=1, timeout_s=30, join_timeout_s=120)[0]
    ref = res["reference"]
    assert_close(res["deepep"], ref, torch.bfloat16)
    assert_close(res["deepep/fp8"], res["fp8_reference"], torch.bfloat16)
    assert res["deepep/calls"] == ["init", "dispatch", "combine", "dispatch", "combine"]
    assert res["deepep/weights_returned"] and not res["deepep/weights_at_combine"]
    for chip in ("A2", "A3"):
        assert_close(res[f"ascend/{chip}"], ref, torch.bfloat16)
        assert res[f"ascend/{chip}/calls"] == ["dispatch", "combine"]
        assert res[f"ascend/{chip}/global_bs"] == 9
        assert res[f"ascend/{chip}/fp8"] == "BackendUnavailableError"
    assert res["ascend/weights_at_combine"] and not res["ascend/weights_returned"]
