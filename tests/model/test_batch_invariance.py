"""Batch invariance of the whole graph on the reference backend: one request gets bit-identical logits and the
same tokens whatever the engine's chunk budget and whichever requests share its steps (its prompt is cut into
different chunks, its tokens sit at different rows of batches of different sizes and contents).

The request is queued first, so in the mixed schedules its tokens are the first rows of steps that also carry
other requests' prefill chunks: the rows an element-wise kernel computes with its vector path, while alone
(chunk 1) every row of it is computed by itself."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from v4hal.model import V4Model
from v4hal.serve import CachePool
from v4hal.serve.engine import Engine

PROMPT_LEN, NEW = 40, 8
#: Requests queued after the one under test: (prompt length, new tokens) each.
MIXES = {
    "alone": [],
    "one": [(60, 3)],
    "three": [(60, 3), (45, 4), (70, 2)],
}
SCHEDULES = [(4, "alone"), (7, "alone"), (8, "alone"), (64, "alone"), (7, "one"), (8, "three"), (64, "three")]


@pytest.fixture(scope="module")
def model(mini_fp8: Path) -> V4Model:
    return V4Model.from_pretrained(mini_fp8)


def _run(model: V4Model, chunk: int, others: list[tuple[int, int]]) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the logits rows they were chosen from, for request "r" queued before ``others``."""
    g = torch.Generator().manual_seed(7)
    vocab = model.config.vocab_size
    engine = Engine(model, CachePool(model.config, block_size=16), chunk=chunk, keep_logits=True)
    engine.add("r", torch.randint(0, vocab, (PROMPT_LEN,), generator=g).tolist(), NEW)
    for i, (n, new) in enumerate(others):
        engine.add(i, torch.randint(0, vocab, (n,), generator=g).tolist(), new)
    done = engine.run()["r"]
    return done.output, done.logits


def test_a_request_gets_the_same_bits_in_every_schedule(model: V4Model) -> None:
    """Chunks 1 (the baseline: every step holds one token), 4, 7, 8 and 64 alone and beside other requests:
    the same tokens and ``torch.equal`` logits."""
    want_tokens, want_logits = _run(model, 1, [])
    assert len(want_logits) == NEW
    bad = []
    for chunk, mix in SCHEDULES:
        tokens, logits = _run(model, chunk, MIXES[mix])
        if tokens != want_tokens or not all(torch.equal(a, b) for a, b in zip(logits, want_logits)):
            worst = max(float((a - b).abs().max()) for a, b in zip(logits, want_logits))
            bad.append(f"chunk {chunk}, {mix}: tokens {tokens} vs {want_tokens}, largest logit difference {worst:.3g}")
    assert not bad, "\n".join(bad)
