"""The paged lightning indexer on the Ascend backend through the stand-in CANN ops: top-k routed to
``npu_lightning_indexer`` (FP4 keys dequantized to bf16 pages) where its masks and limits express the
call, the reference on the NPU tensors elsewhere (with the recorded reason); logits and slots always
run the reference."""
from __future__ import annotations

import pytest
import torch

import v4hal
from v4hal.backends.reference import paged as ref_paged
from v4hal.ops.paged import new_paged_cache

from .conftest import both, fell_back, native, same_sets

BS = 16


def inputs(layout: str = "indexer_fp4", b: int = 3, n: int = 1, h: int = 8, mb: int = 3, lens=None, seed: int = 0,
           d: int = 128):
    g = torch.Generator().manual_seed(seed)
    nb = b * mb + 1
    cache = new_paged_cache(nb, BS, layout, dim=d)
    x = torch.randn(nb * BS, d, generator=g).bfloat16()
    ref_paged.paged_cache_write(cache, x, torch.arange(nb * BS, dtype=torch.int32), layout)
    lens = torch.tensor(lens if lens is not None else [mb * BS, 21, 2][:b], dtype=torch.int32)
    need = (lens.view(b, -1).amax(1) + BS - 1) // BS
    bt = torch.randperm(nb, generator=g)[:b * mb].view(b, mb).to(torch.int32)
    bt = torch.where(torch.arange(mb).view(1, mb) < need.view(b, 1), bt, torch.full_like(bt, -1))
    q = torch.randn(b, n, h, d, generator=g).bfloat16()
    w = torch.randn(b * n, h, generator=g) / 16
    return q, cache, w, lens, bt


@pytest.mark.parametrize("n", [1, 2])
def test_fp4_topk_routes_to_the_lightning_indexer(npu, n):
    q, cache, w, lens, bt = inputs(n=n)
    got, want = both(v4hal.indexer_topk_paged, q, cache, w, lens, bt, 12, offset=64)
    if npu.chip == "950":
        assert fell_back("indexer_topk_paged", "fp32 weights") and not npu.called("npu_lightning_indexer")
        assert torch.equal(got, want)
    else:
        assert native("indexer_topk_paged") and npu.called("npu_lightning_indexer")
        same_sets(got, want)
        assert int((got[2] >= 0).sum()) == sum(2 - n + 1 + i for i in range(n))    # request 2: 2 keys, causal rows
        assert torch.equal(got == -1, want == -1)


def test_topk_wider_than_the_block_table_pads(npu_a2):
    q, cache, w, lens, bt = inputs(b=2, mb=2, lens=[32, 5])
    got, want = both(v4hal.indexer_topk_paged, q, cache, w, lens, bt, 40)
    assert native("indexer_topk_paged")
    same_sets(got, want)
    assert int((got[0] >= 0).sum()) == 32 and int((got[1] >= 0).sum()) == 5


@pytest.mark.parametrize("case,reason", [
    ("fp8", "indexer_fp8 cache"),
    ("rows2d", "context_lens per query row"),
    ("empty_row", "a query row of a multi-row request sees no key"),
    ("heads", "more than 64 indexer heads"),
    ("d64", "indexer head dim D != 128"),
])
def test_inexpressible_calls_run_the_reference(npu_a2, case, reason):
    kw: dict = {}
    if case == "fp8":
        kw = dict(layout="indexer_fp8")
    elif case == "empty_row":
        kw = dict(lens=[48, 0, 2])
    elif case == "heads":
        kw = dict(h=72)
    elif case == "d64":
        kw = dict(d=64)             # a V4-shaped config's 64-wide FP4 keys: the CANN indexer takes 128
    q, cache, w, lens, bt = inputs(n=2 if case in ("rows2d", "empty_row") else 1, **kw)
    if case == "rows2d":
        lens = torch.stack([lens - 1, lens], dim=1).clamp_min(0).to(torch.int32)
    layout = kw.get("layout", "indexer_fp4")
    got, want = both(v4hal.indexer_topk_paged, q, cache, w, lens, bt, 8, layout=layout)
    assert fell_back("indexer_topk_paged", reason) and not npu_a2.called("npu_lightning_indexer")
    assert torch.equal(got, want)


def test_logits_and_slots_run_the_reference(npu):
    q, cache, w, lens, bt = inputs()
    got, want = both(v4hal.indexer_logits_paged, q, cache, w, lens, bt, 50)
    assert torch.equal(got, want) and fell_back("indexer_logits_paged", "not the logits")
    pos = torch.tensor([[0, 47, -1], [20, 3, -1], [1, 0, -1]])
    got, want = both(v4hal.paged_slots, pos, bt, BS)
    assert torch.equal(got, want) and fell_back("paged_slots", "gather")


@pytest.mark.parametrize("layout", ["indexer_fp4", "bf16"])
def test_bf16_weights_and_a_request_without_keys_go_native_on_every_chip(npu, layout):
    """V4's head weights are bf16: 950 takes them too. A one-row request that sees no key yet gets -1
    everywhere (the op is given one key and the row is masked); bf16 pages go in as they are."""
    q, cache, w, lens, bt = inputs(layout=layout, lens=[48, 0, 2])
    w = w.to(torch.bfloat16)
    got, want = both(v4hal.indexer_topk_paged, q, cache, w, lens, bt, 12, layout=layout)
    assert native("indexer_topk_paged") and npu.called("npu_lightning_indexer")
    same_sets(got, want)
    assert bool((got[1] == -1).all()) and torch.equal(got == -1, want == -1)
    with v4hal.use_backend("reference"):                                     # the same values in fp32
        got32 = v4hal.indexer_topk_paged(q, cache, w.float(), lens, bt, 12, layout=layout)
    assert torch.equal(got32, want)
