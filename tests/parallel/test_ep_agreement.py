"""Ranks that disagree on a dispatch or combine argument all raise one error naming the field and the ranks,
before any row moves and without waiting for a timeout; agreeing ranks are unaffected."""
from __future__ import annotations

import pytest
import torch

from v4hal.parallel import spawn

from . import workers as W

#: case -> (error type on every rank, words of the message)
EXPECTED = {
    "dtype": ("DTypeError", "ep_dispatch: ranks disagree on the payload dtype: rank 0 has bfloat16, "
                            "rank 1 has float16"),
    "dtype_same_bytes": ("DTypeError", "the payload dtype: rank 0 has bfloat16, rank 1 has float32; on the hidden "
                                       "size D: rank 0 has 256, rank 1 has 128"),
    "dim": ("ShapeError", "ep_dispatch: ranks disagree on the hidden size D: rank 0 has 256, rank 1 has 512"),
    "topk": ("ShapeError", "ep_dispatch: ranks disagree on k (experts per token): rank 0 has 3, rank 1 has 2"),
    "num_experts": ("ShapeError", "ep_dispatch: ranks disagree on num_experts (E): rank 0 has 8, rank 1 has 16"),
    "fp8": ("RangeError", "ep_dispatch: ranks disagree on the FP8 payload (fp8): rank 0 has fp8=False, "
                          "rank 1 has fp8=True ("),
    "scale_fmt": ("RangeError", "ep_dispatch: ranks disagree on the FP8 scale format (scale_fmt): rank 0 has fp32 "
                                "scales (None), rank 1 has 'ue8m0'"),
    "transport": ("RangeError", "ep_dispatch: ranks disagree on the transport: rank 0 has 'recorder', "
                                "rank 1 has 'all_to_all'"),
    "combine_dtype": ("DTypeError", "ep_combine: ranks disagree on the payload dtype: rank 0 has bfloat16, "
                                    "rank 1 has float16"),
    "combine_partial_sums": ("RangeError", "ep_combine: ranks disagree on partial_sums: rank 0 has "
                                           "partial_sums=False, rank 1 has partial_sums=True"),
    "call_order": ("EPGroupError", "are in different calls: rank 0 is in ep_combine, rank 1 is in ep_dispatch"),
}


@pytest.fixture(scope="module")
def res() -> list[dict]:
    """Every case on one 2-rank group (fork), one after the other."""
    return spawn(W.rank_disagree, 2, start_method="fork", threads=1, timeout_s=30, join_timeout_s=120)


@pytest.mark.parametrize("case", list(EXPECTED))
def test_disagreeing_ranks_raise_one_error(res: list[dict], case: str) -> None:
    kind, words = EXPECTED[case]
    for rank in range(2):
        got = res[rank][case]
        assert got.startswith(kind + ":") and words in got, (rank, case, got)
        assert "\n" not in got, got
        assert kind == "EPGroupError" or "must agree across the group" in got, got
        assert res[rank][f"{case}/seconds"] < 10, (rank, case, res[rank][f"{case}/seconds"])  # no timeout (20 s)
    assert res[0][case][res[0][case].index(":"):].replace("ep_combine", "ep_dispatch") == \
        res[1][case][res[1][case].index(":"):].replace("ep_combine", "ep_dispatch"), "one message on every rank"


def test_no_transport_runs_before_the_ranks_agree(res: list[dict]) -> None:
    """The agreement sits in ep_dispatch, before any transport: the recording transport was never called
    by a disagreeing case, only by the agreeing call at the end (with the largest T of the group)."""
    for rank in range(2):
        assert all(res[rank][f"{case}/transport_calls"] == 0 for case in W.DISAGREE), res[rank]
        assert res[rank]["recorder/calls"] == [{"op": "dispatch", "max_tokens": max(W.TOKENS[2])}]
        assert res[rank]["recorder"] == "recorder: moves nothing"


def test_a_refusing_rank_is_named_by_the_others(res: list[dict]) -> None:
    assert res[1]["refused"].startswith("RangeError: ep_dispatch: indices must lie in [0, num_experts=8)")
    assert res[0]["refused"].startswith("EPGroupError: ep_dispatch: rank 1 refused its arguments")
    assert max(res[r]["refused/seconds"] for r in range(2)) < 10


def test_agreeing_ranks_after_the_errors(res: list[dict]) -> None:
    """The group stays usable; out_dtype is each rank's own cast and may differ."""
    for rank in range(2):
        x, _, idx = W.make_tokens(rank, 2, "all")
        got = res[rank]["identity"]
        assert got.dtype == (torch.float32 if rank else torch.bfloat16)
        torch.testing.assert_close(got, (x.float() * idx.shape[1]).to(got.dtype), rtol=0, atol=0)
