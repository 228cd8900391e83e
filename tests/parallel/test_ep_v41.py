"""DeepSeek-V4.1 under expert parallelism: v41-mini (CSA2 attention, candidate indexer, Engram, lagged mHC; its
router with ``gate_temp`` and no hash layers; FP4 routed experts with a scale per 16, FP8 shared experts in
32x32 tiles) with its routed experts sharded over 2 gloo ranks gives the single-process logits and tokens, on
the contiguous path (`v4hal run --ep`) and through the lockstep engines (`v4hal run --requests --ep`)."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from tests.numerics import calc_diff
from v4hal.parallel import spawn

from . import workers as W

pytest.importorskip("tokenizers")          # the Engram vocabulary map of a V4.1 checkpoint


@pytest.fixture(scope="module")
def v41_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random v41-mini checkpoint as the release stores it, with a router temperature that is not 1."""
    from v4hal.model import ModelConfig, write_random_checkpoint

    cfg = ModelConfig.preset("v41-mini").replace(gate_temp=0.5, max_seq_len=256)
    return write_random_checkpoint(cfg, tmp_path_factory.mktemp("ep_v41"), seed=1)


@pytest.mark.parametrize("experts_fp8,preslice", [(True, False), (False, False), (False, True)],
                         ids=["fused-fp8-experts", "fp4-experts", "fp4-local-load"])
def test_v41_mini_ep2_logits(v41_ckpt: Path, experts_fp8: bool, preslice: bool) -> None:
    """Rows split over 2 ranks: prefill + 2 decode steps equal the unsharded model's logits. ``experts_fp8``: FP4
    experts re-encoded (losslessly) as FP8 in 32x32 tiles and the shared expert fused (kept local by
    `EPExperts`), or FP4 experts with their per-16 scales and the FP8 shared expert as its own call."""
    from v4hal.model import V4Model

    ids = torch.randint(0, 512, (3, 21), generator=torch.Generator().manual_seed(4))
    res = spawn(W.rank_model, 2, str(v41_ckpt), ids, experts_fp8, preslice, start_method="fork", threads=1,
                timeout_s=60, join_timeout_s=300)
    ref_model = V4Model.from_pretrained(v41_ckpt, experts_fp8=experts_fp8)
    cfg = ref_model.config
    assert cfg.is_v41 and cfg.n_hash_layers == 0 and cfg.n_mtp_layers == 0
    assert [r["rows"].tolist() for r in res] == [[0, 1], [2]]
    for r in res:
        assert r["transport"] == "all_to_all" and r["fused"] == experts_fp8 and r["local_experts"] == 4
        assert r["gate_temp"] == 0.5 and r["hash_gates"] == 0
        inter, dim = cfg.moe_inter_dim, cfg.dim
        routed = ((torch.float8_e4m3fn, [4, inter // 32, dim // 32]) if experts_fp8 else
                  (torch.uint8, [4, inter, dim // 16]))
        assert r["routed"] == routed and r["shared_scale"] == [inter // 32, dim // 32]
        ref = [ref_model(ids[r["rows"]], 0)]
        for step in range(2):
            ref.append(ref_model(ref[-1].argmax(dim=-1, keepdim=True), ids.shape[1] + step))
        for got, want in zip(r["logits"], ref):
            assert got.shape == want.shape and got.dtype == torch.float32
            torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
            assert calc_diff(got, want) < 1e-8


@pytest.mark.parametrize("experts", ["auto", "checkpoint"])
def test_run_ep_v41_matches_single_process_run(v41_ckpt: Path, experts: str) -> None:
    """`run_ep` (``v4hal run --ep 2``) on the V4.1 checkpoint generates the tokens of ``v4hal run``."""
    from v4hal.apps.run import run
    from v4hal.apps.run_ep import run_ep

    args = argparse.Namespace(model=None, checkpoint=str(v41_ckpt), backend=None, device="cpu", prompt_len=13,
                              max_new_tokens=3, batch=3, seed=2, threads=1, experts=experts, json=None,
                              no_progress=True)
    single = run(args)
    ep = run_ep(args, 2, start_method="fork", timeout_s=60)
    assert ep["tokens"] == single["tokens"] and ep["experts"] == single["experts"]
    assert ep["experts"] == ("fp8" if experts == "auto" else "fp4")
    assert ep["ep"] == 2 and ep["attention"] == "data-parallel" and ep["logits_finite"]
    assert ep["prefill_bytes_sent"]["dispatch_bytes_remote"] > 0


def test_run_requests_ep2_v41_matches_one_process(v41_ckpt: Path) -> None:
    """``v4hal run --requests --ep 2`` on V4.1: requests sharing a 17-token prefix, chunks of 5 and pages of 5
    (partial ratio-2 groups across steps and at the reused prefix's end), dealt over 2 lockstep ranks, each get
    the tokens of the one-process run; each rank reuses the prefix in its own pool."""
    from v4hal.apps.serve import run_requests_ep
    from v4hal.model import V4Model
    from v4hal.serve.driver import run_requests

    work = dict(requests=5, prompt_len=6, max_new_tokens=3, chunk=5, arrival=2, shared_prefix=17, block_size=5,
                baseline=False)
    one = run_requests(V4Model.from_pretrained(v41_ckpt, experts_fp8=True), progress=False, **work)
    ep = run_requests_ep(str(v41_ckpt), 2, experts_fp8=True, start_method="fork", timeout_s=60, progress=False,
                         **work)
    assert one["all_finished"] and ep["all_finished"] and ep["logits_finite"]
    assert ep["tokens"] == one["tokens"]
    assert ep["ep"] == 2 and ep["rank_requests"] == [3, 2] and ep["experts"] == "fp8"
    assert ep["prefix_hits"] >= 2 and ep["prefix_tokens_saved"] >= 2 * 15
    assert ep["prefill_tokens"] == sum(ep["prompt_lengths"]) - ep["prefix_tokens_saved"]
    assert ep["v4_counterpart"] == one["v4_counterpart"] and ep["v4_counterpart"]["model"] == "v4-mini"
    assert ep["pages_after_evict"] == dict.fromkeys(ep["peak_pages"], 0)
