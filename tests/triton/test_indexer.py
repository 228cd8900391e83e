"""Triton lightning indexer (index_scores, indexer_topk) against the reference backend.

Score outputs start poisoned (NaN). Top-k picks are compared as sets per query (tie order is
unspecified) and the picked scores must be the reference's top scores.
"""
from __future__ import annotations

import pytest
import torch

from tests.numerics import assert_close, poison_like
from v4hal.backends.reference import attention as ref
from v4hal.backends.triton import indexer as tri


def make_inputs(b: int, s: int, h: int, d: int, t: int, qdt: torch.dtype, kdt: torch.dtype, seed: int,
                wdt: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, d, generator=g).to(qdt)
    k = torch.randn(b, t, d, generator=g).to(kdt)
    w = (torch.randn(b, s, h, generator=g) * d ** -0.5).to(wdt)
    return q, k, w


@pytest.mark.parametrize("b,s,h,d,t,qdt,kdt", [
    (1, 1, 1, 32, 5, torch.float32, torch.float32),          # single query, one head, t < key block
    (2, 5, 3, 64, 37, torch.float32, torch.float32),         # odd sizes, H not a power of two
    (1, 9, 64, 128, 50, torch.float16, torch.float16),       # V4 indexer heads and dim
    (2, 3, 16, 100, 41, torch.bfloat16, torch.bfloat16),     # D not a power of two (masked D tail)
    (1, 4, 8, 48, 20, torch.bfloat16, torch.float32),        # mixed q/k dtypes -> fp32 MMA
])
def test_index_scores_matches_reference(b, s, h, d, t, qdt, kdt) -> None:
    q, k, w = make_inputs(b, s, h, d, t, qdt, kdt, seed=b + 10 * s + 100 * h)
    out = poison_like(torch.empty(b, s, t, dtype=torch.float32))
    assert tri.index_scores_into(out, q, k, w) is out
    exp = ref.index_scores(q, k, w)
    # fp32 output of 16-bit products: the reference rounds nothing, so fp32-level agreement scaled by |score|
    assert_close(out, exp, torch.float32, atol=1e-4 * float(exp.abs().max()), rtol=1e-4)


def test_index_scores_bf16_weights() -> None:
    q, k, w = make_inputs(1, 3, 4, 32, 17, torch.float32, torch.float32, seed=5, wdt=torch.bfloat16)
    assert_close(tri.index_scores(q, k, w), ref.index_scores(q, k, w), torch.float32)


@pytest.mark.parametrize("start_pos,ratio,offset", [(0, 4, 0), (0, 2, 7), (5, 4, 128), (13, 1, 3)])
def test_masked_scores_in_kernel(start_pos, ratio, offset) -> None:
    b, s, h, d, t = 2, 6, 3, 32, 9
    q, k, w = make_inputs(b, s, h, d, t, torch.float32, torch.float32, seed=start_pos + ratio)
    got = tri.masked_index_scores(q, k, w, start_pos, ratio)
    limit = (torch.arange(start_pos, start_pos + s) + 1) // ratio
    hidden = torch.arange(t).view(1, 1, t) >= limit.view(1, s, 1)
    assert torch.isneginf(got[hidden.expand(b, s, t)]).all()
    assert_close(got.masked_fill(hidden, 0.0), ref.index_scores(q, k, w).masked_fill(hidden, 0.0), torch.float32)


@pytest.mark.parametrize("b,s,h,d,t,topk,start_pos,ratio,offset,dt", [
    (2, 8, 3, 32, 6, 4, 0, 4, 0, torch.float32),       # prefill: early queries see nothing -> -1
    (1, 5, 64, 128, 40, 13, 0, 2, 128, torch.float16),  # topk not a power of two, window offset
    (2, 3, 4, 64, 30, 64, 100, 4, 5, torch.float32),   # topk > t: width = t; decode-like start_pos
    (1, 2, 16, 64, 20, 7, 77, 4, 0, torch.bfloat16),
])
def test_indexer_topk_matches_reference(b, s, h, d, t, topk, start_pos, ratio, offset, dt) -> None:
    q, k, w = make_inputs(b, s, h, d, t, dt, dt, seed=t + topk)
    got = tri.indexer_topk(q, k, w, topk, start_pos, ratio, offset)
    exp = ref.indexer_topk(q, k, w, topk, start_pos, ratio, offset)
    assert got.dtype == torch.int32 and got.shape == exp.shape == (b, s, min(topk, t))
    assert torch.equal(got.sort(-1).values, exp.sort(-1).values)
    # descending order of the valid picks, by the reference's scores
    scores = ref.index_scores(q, k, w)
    valid = got >= 0
    picked = torch.where(valid, scores.gather(-1, (got - offset).clamp_min(0).long()), torch.tensor(float("-inf")))
    assert (picked[..., :-1] >= picked[..., 1:]).all()
    limit = (torch.arange(start_pos, start_pos + s) + 1) // ratio
    assert (valid.sum(-1) == limit.clamp(max=min(topk, t)).view(1, s)).all()
