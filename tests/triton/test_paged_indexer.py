"""Triton paged lightning indexer (logits read from the FP4 / FP8 cache bytes in the kernel, top-k,
slots) against the reference backend, under the interpreter at tiny shapes.

Logit outputs start poisoned (NaN), so a position the kernel never writes shows up; -inf positions
must match exactly, and top-k picks as sets per row.
"""
from __future__ import annotations

import pytest
import torch

from tests.numerics import poison_like
from v4hal.backends.reference import paged as ref_paged
from v4hal.backends.reference import paged_indexer as ref
from v4hal.backends.triton import paged_indexer as tri
from v4hal.ops.paged import new_paged_cache


def make(layout: str, b: int, n: int, h: int, bs: int, mb: int, two_d: bool, seed: int, d: int = 128):
    g = torch.Generator().manual_seed(seed)
    nb = b * mb + 2
    cache = new_paged_cache(nb, bs, layout, dim=d)
    x = (torch.randn(nb * bs, d, generator=g) * 3).bfloat16()
    ref_paged.paged_cache_write(cache, x, torch.arange(nb * bs, dtype=torch.int32), layout)
    lens = torch.randint(0, mb * bs + 1, (b,), generator=g, dtype=torch.int32)
    lens[0] = mb * bs
    if two_d:
        lens = (lens.view(b, 1) * torch.rand(b, n, generator=g)).to(torch.int32)
        lens[0, -1] = mb * bs
    need = (lens.view(b, -1).amax(1) + bs - 1) // bs
    bt = torch.randperm(nb, generator=g)[:b * mb].view(b, mb).to(torch.int32)
    bt = torch.where(torch.arange(mb).view(1, mb) < need.view(b, 1), bt, torch.full_like(bt, -1))
    q = torch.randn(b, n, h, d, generator=g).bfloat16()
    w = torch.randn(b * n, h, generator=g) / 8
    return q, cache, w, lens, bt


@pytest.mark.parametrize("layout,b,n,h,bs,mb,two_d,d", [
    ("indexer_fp4", 2, 1, 5, 16, 3, False, 128),      # 48 positions: two key tiles, H not a power of two
    ("indexer_fp4", 3, 2, 16, 5, 4, False, 128),      # next_n = 2 causal rows, odd block size
    ("indexer_fp4", 2, 3, 3, 8, 3, True, 128),        # per-row context lengths
    ("indexer_fp8", 2, 2, 4, 6, 3, False, 128),
    ("indexer_fp8", 1, 2, 20, 4, 5, True, 128),
    ("indexer_fp4", 2, 2, 3, 5, 3, False, 64),        # a V4-shaped config's 64-wide keys
    ("indexer_fp8", 2, 1, 4, 4, 3, True, 64),
    ("indexer_fp4", 1, 2, 3, 4, 2, False, 96),        # halves of 48: a 64-wide tile, 16 dims masked
    ("indexer_fp8", 1, 1, 2, 3, 2, False, 37),        # odd D: the last odd dim masked, unaligned scales
])
def test_logits_match_reference(layout, b, n, h, bs, mb, two_d, d) -> None:
    q, cache, w, lens, bt = make(layout, b, n, h, bs, mb, two_d, seed=b + 10 * n + 100 * h, d=d)
    width = mb * bs + 7                                        # positions past the block table
    out = poison_like(torch.empty(b * n, width, dtype=torch.float32))
    assert tri.logits_into(out, q, cache, w, lens, bt, layout) is out
    exp = ref.indexer_logits_paged(q, cache, w, lens, bt, width, layout)
    assert torch.equal(out.isneginf(), exp.isneginf()) and not bool(out.isnan().any())
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout,d", [("indexer_fp4", 128), ("indexer_fp8", 128), ("indexer_fp4", 64)])
def test_topk_and_slots_match_reference(layout, d) -> None:
    q, cache, w, lens, bt = make(layout, 3, 2, 6, 8, 3, False, seed=7, d=d)
    got = tri.indexer_topk_paged(q, cache, w, lens, bt, 9, layout, 100)
    exp = ref.indexer_topk_paged(q, cache, w, lens, bt, 9, layout, 100)
    assert got.dtype == torch.int32 and got.shape == exp.shape == (3, 2, 9)
    assert torch.equal(got.sort(-1).values, exp.sort(-1).values)
    pos = torch.where(got >= 0, got - 100, -1)
    assert torch.equal(tri.paged_slots(pos, bt, 8), ref.paged_slots(pos, bt, 8))


def test_keys_wider_than_128_run_on_the_reference() -> None:
    import v4hal
    from v4hal.hal import dispatch

    q, cache, w, lens, bt = make("indexer_fp4", 1, 1, 2, 4, 2, False, seed=3, d=160)
    args = dict(q=q, kv_cache=cache, weights=w, context_lens=lens, block_table=bt, max_context_len=8,
                layout="indexer_fp4")
    row = next(r for r in dispatch.explain("indexer_logits_paged", "cpu", args) if r["backend"] == "triton")
    assert row["status"] == "no" and "indexer key width D must be <= 128, got 160" in row["reason"]
    exp = ref.indexer_logits_paged(q, cache, w, lens, bt, 8, "indexer_fp4")
    assert torch.equal(v4hal.indexer_logits_paged(q, cache, w, lens, bt, 8), exp)
