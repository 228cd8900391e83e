"""The paged lightning indexer on the reference backend: logits against a per-position formula over
keys decoded by hand from the page bytes, top-k against today's ``indexer_topk`` over the same keys
laid out contiguously (V4's ratio-4 decode and MTP rows), ``paged_slots``, and the input checks."""
from __future__ import annotations

import pytest
import torch

import v4hal
from v4hal import compare
from v4hal.backends.reference import paged_indexer as ref
from v4hal.hal import formats as F
from v4hal.hal.errors import RangeError, ShapeError
from v4hal.ops.paged import PAGED_LAYOUTS, new_paged_cache

BS = 4


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def paged(layout: str, nb: int, g: torch.Generator, dim: int = 128) -> torch.Tensor:
    cache = new_paged_cache(nb, BS, layout, dim=dim)
    x = torch.randn(nb * BS, dim, generator=g).bfloat16()
    v4hal.paged_cache_write(cache, x, torch.arange(nb * BS, dtype=torch.int32), layout)
    return cache


def key_by_hand(cache: torch.Tensor, layout: str, slot: int) -> torch.Tensor:
    """fp32 ``[D]``: the key at ``slot`` decoded from the byte offsets of the layout (D = 128 or 64)."""
    blk, off = divmod(slot, BS)
    w = cache.shape[-1]
    d = {"indexer_fp4": {68: 128, 36: 64}, "indexer_fp8": {132: 128, 68: 64}}[layout][w]
    page = cache.view(torch.uint8).reshape(-1)[blk * PAGED_LAYOUTS[layout].page_bytes(d, BS):]
    if layout == "indexer_fp4":             # D / 2 packed bytes, then 4 scale bytes (D / 32 used)
        h = d // 2
        codes = F.unpack_fp4(page[off * h:off * h + h].clone())
        scales = F.e8m0_to_float(page[BS * h + off * 4:BS * h + off * 4 + d // 32].clone())
        return F.e2m1_decode(codes) * scales.repeat_interleave(32)
    y = page[off * d:off * d + d].clone().view(F.FP8_DTYPE).float()
    return y * page[BS * d + off * 4:BS * d + off * 4 + 4].clone().view(torch.float32)


def table(b: int, mb: int, nb: int, lens: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Distinct random blocks per request, -1 past each request's longest row."""
    t = torch.randperm(nb, generator=g)[:b * mb].view(b, mb).to(torch.int32)
    need = (lens.view(b, -1).amax(1) + BS - 1) // BS
    return torch.where(torch.arange(mb).view(1, mb) < need.view(b, 1), t, torch.full_like(t, -1))


def logits_by_hand(q, cache, w, lens, bt, width, layout):
    b, n = q.shape[:2]
    out = torch.full((b * n, width), float("-inf"))
    for r in range(b):
        for i in range(n):
            limit = int(lens[r, i]) if lens.dim() == 2 else int(lens[r]) - n + 1 + i
            for t in range(max(limit, 0)):
                k = key_by_hand(cache, layout, int(bt[r, t // BS]) * BS + t % BS)
                out[r * n + i, t] = (w[r * n + i] * (q[r, i].float() @ k).relu()).sum()
    return out


@pytest.mark.parametrize("layout", ["indexer_fp4", "indexer_fp8"])
@pytest.mark.parametrize("two_d,d", [(False, 128), (True, 128), (False, 64)])
def test_logits_match_the_per_position_formula(layout, two_d, d, monkeypatch):
    g = gen(1)
    b, n, h, mb, nb = 3, 2, 5, 3, 11
    cache = paged(layout, nb, g, d)
    lens = torch.tensor([12, 7, 1], dtype=torch.int32)
    if two_d:
        lens = torch.tensor([[9, 12], [0, 7], [1, 1]], dtype=torch.int32)
    bt = table(b, mb, nb, lens, g)
    q = torch.randn(b, n, h, d, generator=g).bfloat16()
    w = torch.randn(b * n, h, generator=g)
    width = mb * BS + 3                                    # columns past the block table stay -inf
    want = logits_by_hand(q, cache, w, lens, bt, width, layout)
    got = v4hal.indexer_logits_paged(q, cache, w, lens, bt, width, layout=layout)
    assert torch.equal(got.isneginf(), want.isneginf())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(ref, "_CHUNK_ELEMS", 128 * 8)     # chunks of one request and two blocks
    torch.testing.assert_close(v4hal.indexer_logits_paged(q, cache, w, lens, bt, width, layout=layout), got,
                               rtol=1e-6, atol=1e-6)
    assert compare.passed(compare.compare_outputs("indexer_logits_paged", got, want))
    one_sided = got.clone()
    one_sided[0, 0] = float("-inf")
    assert not compare.passed(compare.compare_outputs("indexer_logits_paged", one_sided, want))


@pytest.mark.parametrize("d", [128, 64])
def test_fp4_keys_are_paged_cache_read_exactly(d):
    cache = paged("indexer_fp4", 5, gen(2), d)
    blocks = torch.tensor([[3, 0]])
    keys = ref.dequant_pages(cache, "indexer_fp4", blocks).reshape(-1, d)
    slots = (blocks.view(-1, 1) * BS + torch.arange(BS)).reshape(-1).to(torch.int32)
    assert torch.equal(keys, v4hal.paged_cache_read(cache, slots, "indexer_fp4").float())


@pytest.mark.parametrize("layout,d", [("indexer_fp4", 128), ("indexer_fp8", 128), ("indexer_fp4", 64)])
def test_topk_equals_indexer_topk_on_contiguous_keys(layout, d):
    """V4 ratio 4: a decode step at position p sees (p + 1) // 4 compressed entries; MTP rows at p - 1, p
    take per-row lengths. The picks are today's indexer_topk over the same keys laid out contiguously."""
    g = gen(3)
    h, topk, ratio, offset, nb, mb = 4, 5, 4, 128, 17, 4
    positions = [57, 30, 9, 2]
    b = len(positions)
    cache = paged(layout, nb, g, d)
    for n in (1, 2):
        rows = torch.tensor([[p - n + 1 + i for i in range(n)] for p in positions])
        lens2d = ((rows + 1) // ratio).to(torch.int32)
        lens = lens2d[:, -1].contiguous() if n == 1 else lens2d
        bt = table(b, mb, nb, lens2d, g)
        q = torch.randn(b, n, h, d, generator=g).bfloat16()
        w = torch.randn(b * n, h, generator=g) / 16
        got = v4hal.indexer_topk_paged(q, cache, w, lens, bt, topk, layout=layout, offset=offset)
        assert got.shape == (b, n, topk) and got.dtype == torch.int32
        for r, p in enumerate(positions):
            t = int(lens2d[r, -1])
            slots = (bt[r, torch.arange(t) // BS].long() * BS + torch.arange(t) % BS).tolist()
            k = torch.stack([key_by_hand(cache, layout, s) for s in slots]) if t else torch.zeros(0, d)
            want = v4hal.indexer_topk(q[r:r + 1], k[None], w.view(b, n, h)[r:r + 1], topk, start_pos=p - n + 1,
                                      ratio=ratio, offset=offset)[0]
            width = want.shape[-1]
            assert torch.equal(got[r, :, :width].sort(-1).values, want.sort(-1).values), (n, r)
            assert bool((got[r, :, width:] == -1).all())
            # the picks through paged_slots read the very keys indexer_topk picked
            picks = torch.where(got[r] >= 0, got[r] - offset, -1)
            slots_got = v4hal.paged_slots(picks.unsqueeze(0), bt[r:r + 1], BS)[0]
            for i in range(n):
                for j, s in zip(picks[i].tolist(), slots_got[i].tolist()):
                    assert (j < 0 and s == -1) or s == slots[j]


def test_topk_pads_with_minus_one_and_offsets():
    g = gen(4)
    cache = paged("indexer_fp4", 6, g)
    lens = torch.tensor([3, 0], dtype=torch.int32)
    bt = torch.tensor([[4, -1], [-1, -1]], dtype=torch.int32)
    q, w = torch.randn(2, 1, 2, 128, generator=g).bfloat16(), torch.randn(2, 2, generator=g)
    got = v4hal.indexer_topk_paged(q, cache, w, lens, bt, 10, offset=5)
    assert got.shape == (2, 1, 10)
    assert sorted(got[0, 0, :3].tolist()) == [5, 6, 7] and bool((got[0, 0, 3:] == -1).all())
    assert bool((got[1] == -1).all())


def test_paged_slots():
    bt = torch.tensor([[7, 2, -1], [0, 5, 9]], dtype=torch.int32)
    pos = torch.tensor([[[0, 5], [-1, 7]], [[11, 3], [4, -1]]])
    got = v4hal.paged_slots(pos, bt, BS)
    assert got.dtype == torch.int32 and got.shape == pos.shape
    assert got.tolist() == [[[28, 9], [-1, 11]], [[39, 3], [20, -1]]]
    with pytest.raises(RangeError, match="block_table rows are shorter"):
        v4hal.paged_slots(torch.tensor([[12]]), bt[:1], BS)
    with pytest.raises(RangeError, match="block_table holds no block"):
        v4hal.paged_slots(torch.tensor([[8]]), bt[:1], BS)
    with pytest.raises(RangeError, match="positions values must be >= -1"):
        v4hal.paged_slots(torch.tensor([[-2]]), bt[:1], BS)
    with pytest.raises(ShapeError, match="block_table"):
        v4hal.paged_slots(pos, bt[:1], BS)


def test_paged_slots_with_req_index_reads_each_rows_request_in_place():
    """Rows of a step reading their request's table row through ``req_index`` get the slots of a table copied
    per row; bad indices name ``req_index``."""
    bt = torch.tensor([[7, 2, -1], [0, 5, 9]], dtype=torch.int32)
    req = torch.tensor([1, 1, 0, 1, 0], dtype=torch.int32)
    pos = torch.tensor([[0, 11], [5, -1], [4, 3], [8, 9], [-1, 7]], dtype=torch.int32)
    for idx in (req, req.long()):
        got = v4hal.paged_slots(pos, bt, BS, req_index=idx)
        assert got.dtype == torch.int32 and torch.equal(got, v4hal.paged_slots(pos, bt[req.long()], BS))
    assert got.tolist() == [[0, 39], [21, -1], [8, 31], [36, 37], [-1, 11]]
    with pytest.raises(ShapeError, match=r"req_index must be \[n\] = \[5\]"):
        v4hal.paged_slots(pos, bt, BS, req_index=req[:4])
    with pytest.raises(RangeError, match=r"req_index values must lie in \[0, block_table rows = 2\)"):
        v4hal.paged_slots(pos, bt, BS, req_index=req + 1)
    with pytest.raises(RangeError, match="block_table holds no block"):
        v4hal.paged_slots(torch.tensor([[9]]), bt, BS, req_index=torch.tensor([0]))


def test_bad_inputs_name_the_argument():
    g = gen(5)
    cache = paged("indexer_fp4", 4, g)
    q, w = torch.randn(2, 1, 3, 128, generator=g).bfloat16(), torch.randn(2, 3, generator=g)
    lens = torch.tensor([5, 2], dtype=torch.int32)
    bt = torch.tensor([[0, 1], [2, -1]], dtype=torch.int32)
    call = v4hal.indexer_logits_paged
    assert call(q, cache, w, lens, bt, 8).shape == (2, 8)
    with pytest.raises(RangeError, match="layout must be one of"):
        call(q, cache, w, lens, bt, 8, layout="model1_fp8")
    with pytest.raises(ShapeError, match=r"kv_cache must be .*W a width of layout 'indexer_fp4'.*a W no D gives"):
        call(q, new_paged_cache(4, BS, "indexer_fp8"), w, lens, bt, 8)     # W = 132: no FP4 key width gives it
    with pytest.raises(ShapeError, match=r"q must be \[b, N, H, 64\], 64 the key width D of kv_cache uint8 "
                                         r"\[4, 4, 1, 36\]"):
        call(q, new_paged_cache(4, BS, "indexer_fp4", dim=64), w, lens, bt, 8)
    with pytest.raises(RangeError, match="block_table rows are shorter than a context needs"):
        call(q, cache, w, torch.tensor([9, 2], dtype=torch.int32), bt, 9)
    with pytest.raises(RangeError, match="max_context_len must be >= every context length"):
        call(q, cache, w, lens, bt, 4)
    with pytest.raises(RangeError, match="block_table holds no block"):
        call(q, cache, w, torch.tensor([5, 6], dtype=torch.int32), bt, 8)
    with pytest.raises(RangeError, match="block_table values"):
        call(q, cache, w, lens, torch.tensor([[0, 1], [4, -1]], dtype=torch.int32), 8)
    with pytest.raises(RangeError, match="context_lens values must be >= 0"):
        call(q, cache, w, torch.tensor([5, -1], dtype=torch.int32), bt, 8)
    with pytest.raises(ShapeError, match="weights"):
        call(q, cache, w[:1], lens, bt, 8)
    with pytest.raises(ShapeError, match="context_lens"):
        call(q, cache, w, lens[:1], bt, 8)
    with pytest.raises(RangeError, match="topk"):
        v4hal.indexer_topk_paged(q, cache, w, lens, bt, 0)
