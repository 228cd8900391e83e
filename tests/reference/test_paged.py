"""Paged caches on the reference backend: write then read is V4's quantize-then-dequantize round trip
bit for bit, the page bytes sit where the layouts say, -1 slots, and bad input."""
from __future__ import annotations

import pytest
import torch

import v4hal
from v4hal.hal import formats as F
from v4hal.hal.errors import DTypeError, RangeError, ShapeError
from v4hal.ops.paged import PAGED_LAYOUTS, new_paged_cache


def _round_trip(x: torch.Tensor, layout: str) -> torch.Tensor:
    """V4's own quantize-then-dequantize of bf16 rows ``x``, by layout."""
    y = x.clone()
    if layout == "model1_fp8":
        nope = y[:, :448].contiguous()
        v4hal.act_quant(nope, 64, "ue8m0", inplace=True)
        y[:, :448] = nope
    elif layout == "indexer_fp4":
        v4hal.fp4_act_quant(y, 32, inplace=True)
    elif layout == "indexer_fp8":
        v4hal.act_quant(y, 128, inplace=True)
    return y


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


@pytest.mark.parametrize("layout,block_size", [("model1_fp8", 64), ("model1_fp8", 72), ("bf16", 5),
                                               ("indexer_fp4", 64), ("indexer_fp8", 7)])
def test_write_then_read_is_the_round_trip(layout: str, block_size: int) -> None:
    g = torch.Generator().manual_seed(0)
    blocks, t = 3, 9
    cache = new_paged_cache(blocks, block_size, layout)
    assert cache.shape == (blocks, block_size, 1, PAGED_LAYOUTS[layout].width)
    assert cache.stride(0) * cache.element_size() == PAGED_LAYOUTS[layout].page_bytes(block_size)
    x = (torch.randn(t, PAGED_LAYOUTS[layout].dim, generator=g) * 3).to(torch.bfloat16)
    slots = torch.randperm(blocks * block_size, generator=g)[:t]
    slots[4] = -1
    v4hal.paged_cache_write(cache, x, slots, layout)
    got = v4hal.paged_cache_read(cache, slots, layout)
    want = _round_trip(x, layout)
    want[4] = 0
    assert torch.equal(_bits(got), _bits(want))
    # the -1 row wrote nothing: every slot not written reads zeros
    rest = torch.tensor(sorted(set(range(blocks * block_size)) - set(slots.tolist())), dtype=torch.int32)
    assert not v4hal.paged_cache_read(cache, rest, layout).any()


def test_model1_fp8_page_bytes_by_hand() -> None:
    bs = 64
    cache = new_paged_cache(2, bs, "model1_fp8")
    page = (bs * 584 + 575) // 576 * 576
    assert cache.stride(0) == page == 37440
    x = (torch.randn(2, 512, generator=torch.Generator().manual_seed(1)) * 5).to(torch.bfloat16)
    v4hal.paged_cache_write(cache, x, torch.tensor([bs + 3, 10]), "model1_fp8")
    flat = cache.as_strided((2 * page,), (1,), cache.storage_offset())
    for row, (blk, off) in enumerate([(1, 3), (0, 10)]):
        base = blk * page
        rec = flat[base + off * 576: base + off * 576 + 576]
        sc = flat[base + bs * 576 + off * 8: base + bs * 576 + off * 8 + 8]
        assert sc[7] == 0                                                     # the pad byte
        scales = 2.0 ** (sc[:7].to(torch.float32) - 127)                      # ue8m0
        nope = rec[:448].view(torch.float8_e4m3fn).float().view(7, 64) * scales[:, None]
        rope = rec[448:].view(torch.bfloat16)
        want = _round_trip(x, "model1_fp8")[row]
        assert torch.equal(_bits(nope.flatten().to(torch.bfloat16)), _bits(want[:448]))
        assert torch.equal(_bits(rope), _bits(x[row, 448:]))
    # nothing else in the pages was written
    touched = torch.zeros(2 * page, dtype=torch.bool)
    for blk, off in [(1, 3), (0, 10)]:
        touched[blk * page + off * 576: blk * page + off * 576 + 576] = True
        touched[blk * page + bs * 576 + off * 8: blk * page + bs * 576 + off * 8 + 8] = True
    assert not flat[~touched].any()


def test_indexer_fp4_page_bytes_by_hand() -> None:
    bs = 4
    cache = new_paged_cache(2, bs, "indexer_fp4")
    assert cache.stride(1) == 68 and cache.stride(0) == bs * 68
    x = (torch.randn(1, 128, generator=torch.Generator().manual_seed(2)) * 2).to(torch.bfloat16)
    v4hal.paged_cache_write(cache, x, torch.tensor([bs + 2], dtype=torch.int32), "indexer_fp4")
    page = cache[1].reshape(-1)
    packed = page[2 * 64: 3 * 64]
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten()        # low nibble = even element
    values = torch.tensor(F.E2M1_VALUES)[codes.long()]
    scales = 2.0 ** (page[bs * 64 + 2 * 4: bs * 64 + 3 * 4].to(torch.float32) - 127)
    got = (values.view(4, 32) * scales[:, None]).flatten().to(torch.bfloat16)
    assert torch.equal(_bits(got), _bits(_round_trip(x, "indexer_fp4")[0]))
    assert not cache[0].any()


def test_all_holes_and_empty() -> None:
    cache = new_paged_cache(1, 4, "indexer_fp8")
    x = torch.randn(3, 128).to(torch.bfloat16)
    v4hal.paged_cache_write(cache, x, torch.full((3,), -1), "indexer_fp8")
    assert not cache.any()
    assert v4hal.paged_cache_read(cache, torch.zeros(0, dtype=torch.int32), "indexer_fp8").shape == (0, 128)


def test_bad_input() -> None:
    cache = new_paged_cache(2, 4, "indexer_fp4")
    x = torch.randn(3, 128).to(torch.bfloat16)
    ok = torch.tensor([0, 1, 2])
    with pytest.raises(RangeError, match="paged_cache_write: layout"):
        v4hal.paged_cache_write(cache, x, ok, "fp4")
    with pytest.raises(RangeError, match="new_paged_cache: layout"):
        new_paged_cache(2, 4, "nope")
    with pytest.raises(RangeError, match="new_paged_cache: block_size"):
        new_paged_cache(2, 0, "bf16")
    with pytest.raises(RangeError, match=r"paged_cache_write: slots values must be in \[-1, 8\)"):
        v4hal.paged_cache_write(cache, x, torch.tensor([0, 8, 1]), "indexer_fp4")
    with pytest.raises(RangeError, match="paged_cache_read: slots"):
        v4hal.paged_cache_read(cache, torch.tensor([-2]), "indexer_fp4")
    with pytest.raises(RangeError, match="slots must not repeat"):
        v4hal.paged_cache_write(cache, x, torch.tensor([5, -1, 5]), "indexer_fp4")
    with pytest.raises(DTypeError, match="slots must be int32 or int64"):
        v4hal.paged_cache_read(cache, ok.float(), "indexer_fp4")
    with pytest.raises(ShapeError, match="cache must be .*68"):       # wrong byte width for the layout
        v4hal.paged_cache_write(cache, x, ok, "indexer_fp8")
    with pytest.raises(ShapeError, match="cache strides"):
        v4hal.paged_cache_read(torch.zeros(2, 4, 1, 70, dtype=torch.uint8)[..., :68], ok, "indexer_fp4")
    padded = new_paged_cache(2, 64, "model1_fp8")
    with pytest.raises(ShapeError, match="37440-byte pages"):          # an unpadded copy of a padded cache
        v4hal.paged_cache_read(padded.contiguous(), ok, "model1_fp8")
    with pytest.raises(ShapeError, match=r"x must be \[T, 128\]"):
        v4hal.paged_cache_write(cache, torch.randn(3, 512).to(torch.bfloat16), ok, "indexer_fp4")
