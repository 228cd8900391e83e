"""The whole v4-mini graph with its routed experts sharded over 2 gloo ranks gives the single-process logits."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from tests.numerics import calc_diff
from v4hal.parallel import spawn

from . import workers as W


@pytest.mark.parametrize("experts_fp8,preslice", [(True, False), (False, False), (True, True)],
                         ids=["fused-fp8-experts", "fp4-experts", "fused-fp8-local-load"])
def test_v4_mini_ep2_logits(mini_ckpt: Path, experts_fp8: bool, preslice: bool) -> None:
    """Rows split over 2 ranks (data-parallel attention, expert-parallel MoE): prefill + 2 decode steps.

    ``experts_fp8``: FP4 experts re-encoded as FP8 and the shared expert fused into the routed call
    (EP keeps the shared slot local and adds it before the single final cast), or FP4 experts with
    the shared expert as its own call. ``preslice``: the model holds only the rank's experts before
    sharding (what a loader reading only those leaves behind).
    """
    from v4hal.model import V4Model

    ids = torch.randint(0, 512, (3, 20), generator=torch.Generator().manual_seed(3))
    res = spawn(W.rank_model, 2, str(mini_ckpt), ids, experts_fp8, preslice, start_method="fork", threads=1,
                timeout_s=60, join_timeout_s=300)
    ref_model = V4Model.from_pretrained(mini_ckpt, experts_fp8=experts_fp8)
    assert [r["rows"].tolist() for r in res] == [[0, 1], [2]]
    for r in res:
        assert r["transport"] == "all_to_all" and r["fused"] == experts_fp8 and r["local_experts"] == 4
        ref = [ref_model(ids[r["rows"]], 0)]
        for step in range(2):
            ref.append(ref_model(ref[-1].argmax(dim=-1, keepdim=True), ids.shape[1] + step))
        for got, want in zip(r["logits"], ref):
            assert got.shape == want.shape and got.dtype == torch.float32
            torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
            assert calc_diff(got, want) < 1e-8


def test_run_ep_matches_single_process_run(mini_ckpt: Path) -> None:
    """`run_ep` (the `v4hal run --ep N` path) generates the tokens of `v4hal run`."""
    from v4hal.apps.run import run
    from v4hal.apps.run_ep import run_ep

    args = argparse.Namespace(model=None, checkpoint=str(mini_ckpt), backend=None, device="cpu", prompt_len=12,
                              max_new_tokens=3, batch=3, seed=1, threads=1, experts="auto", json=None,
                              no_progress=True)
    single = run(args)
    ep = run_ep(args, 2, start_method="fork", timeout_s=60)
    assert ep["tokens"] == single["tokens"]
    assert ep["ep"] == 2 and ep["attention"] == "data-parallel" and ep["transport"] == "all_to_all"
    assert ep["logits_finite"] and ep["prefill_tok_s"] > 0
    assert ep["prefill_bytes_sent"]["dispatch_bytes_remote"] > 0
    assert set(single) <= set(ep)
