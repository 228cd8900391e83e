"""Paged caches on the reference backend: write then read is V4's quantize-then-dequantize round trip
bit for bit (at V4's entry widths and at the smaller ones of a V4-shaped config), the page bytes sit
where the layouts say, the layouts' widths, -1 slots, and bad input."""
from __future__ import annotations

import pytest
import torch

import v4hal
from v4hal.hal import formats as F
from v4hal.hal.errors import DTypeError, RangeError, ShapeError
from v4hal.ops.paged import PAGED_LAYOUTS, new_paged_cache


def _round_trip(x: torch.Tensor, layout: str) -> torch.Tensor:
    """V4's own quantize-then-dequantize of bf16 rows ``x [T, D]``, by layout."""
    y = x.clone()
    d = x.shape[1]
    if layout == "model1_fp8":
        nope = y[:, :d - 64].contiguous()
        v4hal.act_quant(nope, 64, "ue8m0", inplace=True)
        y[:, :d - 64] = nope
    elif layout == "indexer_fp4":
        v4hal.fp4_act_quant(y, 32, inplace=True)
    elif layout == "indexer_fp8":
        v4hal.act_quant(y, d, inplace=True)
    return y


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


@pytest.mark.parametrize("layout,block_size,dim", [
    ("model1_fp8", 64, None), ("model1_fp8", 72, None), ("bf16", 5, None), ("indexer_fp4", 64, None),
    ("indexer_fp8", 7, None), ("model1_fp8", 5, 128), ("model1_fp8", 4, 640), ("bf16", 3, 128),
    ("indexer_fp4", 3, 64), ("indexer_fp4", 5, 160), ("indexer_fp8", 5, 64), ("indexer_fp8", 3, 7)])
def test_write_then_read_is_the_round_trip(layout: str, block_size: int, dim: int | None) -> None:
    g = torch.Generator().manual_seed(0)
    blocks, t = 3, 9
    lay = PAGED_LAYOUTS[layout]
    cache = new_paged_cache(blocks, block_size, layout, dim=dim)
    assert cache.shape == (blocks, block_size, 1, lay.width(dim))
    assert cache.stride(0) * cache.element_size() == lay.page_bytes(dim, block_size)
    x = (torch.randn(t, lay.dim if dim is None else dim, generator=g) * 3).to(torch.bfloat16)
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


def test_model1_fp8_page_bytes_by_hand_at_d128() -> None:
    """D = 128 (nope 64): 192-byte records (64 e4m3 bytes, 64 bf16 values), then 8 scale bytes per token
    (one ue8m0 scale and 7 zero pad bytes); pages padded to a multiple of 192 bytes."""
    bs = 5
    cache = new_paged_cache(2, bs, "model1_fp8", dim=128)
    page = (bs * 200 + 191) // 192 * 192
    assert cache.shape == (2, bs, 1, 200) and cache.stride(0) == page == 1152
    x = (torch.randn(2, 128, generator=torch.Generator().manual_seed(4)) * 5).to(torch.bfloat16)
    v4hal.paged_cache_write(cache, x, torch.tensor([bs + 4, 1], dtype=torch.int32), "model1_fp8")
    flat = cache.as_strided((2 * page,), (1,), cache.storage_offset())
    touched = torch.zeros(2 * page, dtype=torch.bool)
    for row, (blk, off) in enumerate([(1, 4), (0, 1)]):
        rec0, sc0 = blk * page + off * 192, blk * page + bs * 192 + off * 8
        rec, sc = flat[rec0:rec0 + 192], flat[sc0:sc0 + 8]
        assert not sc[1:].any()                                              # the 7 pad bytes
        nope = rec[:64].view(torch.float8_e4m3fn).float() * 2.0 ** (sc[0].float() - 127)
        want = _round_trip(x, "model1_fp8")[row]
        assert torch.equal(_bits(nope.to(torch.bfloat16)), _bits(want[:64]))
        assert torch.equal(_bits(rec[64:].view(torch.bfloat16)), _bits(x[row, 64:]))
        touched[rec0:rec0 + 192] = True
        touched[sc0:sc0 + 8] = True
    assert not flat[~touched].any()


def test_indexer_fp4_page_bytes_by_hand_at_d64() -> None:
    """D = 64: 32 packed bytes, then 2 ue8m0 scales and 2 zero pad bytes per token (W = 36)."""
    bs = 3
    cache = new_paged_cache(2, bs, "indexer_fp4", dim=64)
    assert cache.shape == (2, bs, 1, 36) and cache.stride(0) == bs * 36
    x = (torch.randn(1, 64, generator=torch.Generator().manual_seed(5)) * 2).to(torch.bfloat16)
    v4hal.paged_cache_write(cache, x, torch.tensor([bs + 1]), "indexer_fp4")
    page = cache[1].reshape(-1)
    packed = page[32:64]
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten()
    sc = page[bs * 32 + 4: bs * 32 + 8]
    assert not sc[2:].any()
    got = (torch.tensor(F.E2M1_VALUES)[codes.long()].view(2, 32) * 2.0 ** (sc[:2].float() - 127)[:, None])
    assert torch.equal(_bits(got.flatten().to(torch.bfloat16)), _bits(_round_trip(x, "indexer_fp4")[0]))
    assert not cache[0].any() and not page[:32].any() and not page[64:bs * 32].any()


@pytest.mark.parametrize("layout", list(PAGED_LAYOUTS))
def test_layout_widths(layout: str) -> None:
    """V4's widths stay the vendor kernels'; W grows strictly with D and gives D back; W no D gives is refused."""
    lay = PAGED_LAYOUTS[layout]
    v4 = {"model1_fp8": (512, 584, 37440), "bf16": (512, 512, 65536), "indexer_fp4": (128, 68, 4352),
          "indexer_fp8": (128, 132, 8448), "v41_window_fp8": (512, 528, 33792),
          "v41_compressed_fp4": (512, 288, 18432)}[layout]
    assert (lay.dim, lay.width(), lay.page_bytes(None, 64)) == v4
    dims = [lay.dim_at(k) for k in range(1, 40)]
    widths = [lay.width(d) for d in dims]
    assert all(a < b for a, b in zip(widths, widths[1:]))
    assert [lay.dim_of_width(w) for w in widths] == dims
    for w in set(range(1, widths[-1])) - set(widths):
        with pytest.raises(ShapeError, match=f"no entry width gives W = {w} "):
            lay.dim_of_width(w)
    small = {"model1_fp8": (128, 200, 192 * 4), "bf16": (128, 128, 768), "indexer_fp4": (64, 36, 36 * 3),
             "indexer_fp8": (64, 68, 68 * 3), "v41_window_fp8": (64, 66, 256),
             "v41_compressed_fp4": (64, 36, 128)}[layout]
    d, w, page3 = small
    assert lay.width(d) == w and lay.page_bytes(d, 3) == page3


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
    with pytest.raises(ShapeError, match=r"x must be \[T, 64\], the entry width D of cache .*need a cache of "
                                         "last dim 132"):    # W = 68: 64-wide indexer_fp8 entries
        v4hal.paged_cache_write(cache, x, ok, "indexer_fp8")
    with pytest.raises(ShapeError, match=r"cache must be \[blocks, block size, 1, W\] with W a width of layout "
                                         r"'indexer_fp4' .*, got uint8 \[2, 4, 1, 70\] .*, a W no D gives"):
        v4hal.paged_cache_read(torch.zeros(2, 4, 1, 70, dtype=torch.uint8), ok, "indexer_fp4")
    with pytest.raises(ShapeError, match=r"W no D gives"):     # 585: between D = 512 (584) and D = 576 (648)
        v4hal.paged_cache_read(torch.zeros(2, 4, 1, 585, dtype=torch.uint8), ok, "model1_fp8")
    with pytest.raises(ShapeError, match=r"new_paged_cache: dim must be an entry width of layout 'model1_fp8' "
                                         r"\(D = nope \+ 64 with nope a positive multiple of 64\), got 100"):
        new_paged_cache(2, 4, "model1_fp8", dim=100)
    with pytest.raises(ShapeError, match=r"dim must be .*'indexer_fp4' \(D = a positive multiple of 32\), got 48"):
        new_paged_cache(2, 4, "indexer_fp4", dim=48)
    with pytest.raises(ShapeError, match="got 0"):
        new_paged_cache(2, 4, "bf16", dim=0)
    with pytest.raises(ShapeError, match="cache strides"):
        v4hal.paged_cache_read(torch.zeros(2, 4, 1, 70, dtype=torch.uint8)[..., :68], ok, "indexer_fp4")
    padded = new_paged_cache(2, 64, "model1_fp8")
    with pytest.raises(ShapeError, match="37440-byte pages"):          # an unpadded copy of a padded cache
        v4hal.paged_cache_read(padded.contiguous(), ok, "model1_fp8")
    with pytest.raises(ShapeError, match=r"x must be \[T, 128\]"):
        v4hal.paged_cache_write(cache, torch.randn(3, 512).to(torch.bfloat16), ok, "indexer_fp4")
    small = new_paged_cache(2, 4, "model1_fp8", dim=128)
    with pytest.raises(ShapeError, match=r"x must be \[T, 128\], the entry width D of cache uint8 \[2, 4, 1, 200\]"
                                         r".*; 512-wide rows need a cache of last dim 584, got"):
        v4hal.paged_cache_write(small, torch.randn(3, 512).to(torch.bfloat16), ok, "model1_fp8")
