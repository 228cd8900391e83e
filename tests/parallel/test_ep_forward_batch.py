"""Expert parallelism under `V4Model.forward_batch`: each rank serves its own requests from its own paged
`CachePool` (attention data-parallel, requests never move), the MoE layers move tokens between the ranks.

Two gloo ranks step their engines in lockstep (`run_engine_ep`); a rank with nothing to run in a step
(before its request arrives, after its requests finish) runs `idle_step` and still computes the tokens the
other rank sends to its experts. Every logits row (main and MTP) of every request must equal the same
requests served by the unsharded model in one process, and each request run alone through the
contiguous path.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.numerics import calc_diff
from v4hal.parallel import spawn

from . import workers as W

#: EP logits against the unsharded model on the same schedule (test_ep_model.py accepts < 1e-8 too)
MAX_DIFF = 1e-8
#: against each request alone through the contiguous path (what forward_batch promises in one process)
MAX_DIFF_ALONE = 1e-6
CHUNK = 16


def _plans(vocab: int) -> list[dict[int, list[tuple[int, list[int], int]]]]:
    """Rank 0: a 37-token prompt at step 0 and a 9-token one at step 1; rank 1: a 20-token prompt at step 2.
    With a 16-token budget rank 1 idles in steps 0, 1 and 5 while rank 0 runs."""
    g = torch.Generator().manual_seed(7)
    p = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (37, 9, 20)]
    return [{0: [(0, p[0], 3)], 1: [(1, p[1], 4)]}, {2: [(2, p[2], 2)]}]


def _alone(model, prompt: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """Logits rows of one request through the contiguous path, fed the tokens it generated."""
    rows = [model(torch.tensor([prompt]), 0)[0].float()]
    for k, tok in enumerate(tokens[:-1]):
        rows.append(model(torch.tensor([[tok]]), len(prompt) + k)[0].float())
    return rows


@pytest.mark.parametrize("experts_fp8", [True, False], ids=["fused-fp8-experts", "fp4-experts"])
def test_ep2_forward_batch_equals_one_process(mini_ckpt: Path, experts_fp8: bool) -> None:
    """``experts_fp8``: FP8 experts with the shared expert fused (kept local by `EPExperts`), or FP4 experts
    with the shared expert as its own call. Measured: every row bitwise equal to both references."""
    from v4hal.model import V4Model

    ref = V4Model.from_pretrained(mini_ckpt, experts_fp8=experts_fp8)
    plans = _plans(ref.config.vocab_size)
    res = spawn(W.rank_forward_batch, 2, str(mini_ckpt), plans, CHUNK, experts_fp8, [True, True],
                start_method="fork", threads=1, timeout_s=60, join_timeout_s=240)
    assert [r["fused"] for r in res] == [experts_fp8] * 2
    # lockstep: both ranks took the same steps; rank 1 idled in steps 0, 1 and 5 while its experts computed
    # the copies of rank 0's tokens routed to them
    assert res[0]["steps"] == [16, 16, 14, 2, 2, 1] and res[1]["steps"] == [0, 0, 16, 4, 1, 0]
    assert all(res[1]["received"][s] > 0 for s in (0, 1, 5))
    top_k = ref.config.n_activated_experts
    for s in range(6):      # every copy of every token was computed on exactly one rank
        assert res[0]["received"][s] + res[1]["received"][s] == top_k * (res[0]["steps"][s] + res[1]["steps"][s])
    rows = 0
    for rank, r in enumerate(res):
        one = W.serve_requests(ref, plans[rank], CHUNK, mtp=True)
        assert sorted(r["requests"]) == sorted(one)
        for rid, got in r["requests"].items():
            want = one[rid]
            assert got["output"] == want.output
            pairs = [*zip(got["logits"], want.logits), *zip(got["drafts"], want.draft_logits)]
            assert len(pairs) == 2 * len(want.output)
            for a, b in pairs:
                assert a.shape == b.shape == (ref.config.vocab_size,) and a.dtype == torch.float32
                assert calc_diff(a, b) <= MAX_DIFF, (rank, rid)
                rows += 1
            prompt = next(p for reqs in plans[rank].values() for i, p, _ in reqs if i == rid)
            for a, b in zip(got["logits"], _alone(ref, prompt, got["output"]), strict=True):
                assert calc_diff(a, b) <= MAX_DIFF_ALONE, (rank, rid)
    assert rows == 2 * (3 + 4 + 2)


def test_ep2_engines_must_agree_on_mtp(mini_ckpt: Path) -> None:
    """Ranks whose engines differ on MTP would run different exchanges: both refuse at the first step."""
    from v4hal.parallel import EPRankError

    plans = _plans(512)
    with pytest.raises(EPRankError) as info:
        spawn(W.rank_forward_batch, 2, str(mini_ckpt), plans, CHUNK, False, [True, False], start_method="fork",
              threads=1, timeout_s=60, join_timeout_s=240)
    fails = info.value.failures
    assert sorted(fails) == [0, 1]
    assert all("disagree on mtp" in str(f) and "ranks [0]" in str(f) for f in fails.values())


def test_idle_step_needs_sharded_experts(mini_ckpt: Path) -> None:
    """`idle_step` on a model whose experts are not sharded refuses before any exchange."""
    from v4hal.hal.errors import RangeError
    from v4hal.model import V4Model
    from v4hal.parallel import idle_step

    with pytest.raises(RangeError, match="sharded first"):
        idle_step(V4Model.from_pretrained(mini_ckpt))
