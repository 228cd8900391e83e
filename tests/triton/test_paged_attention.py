"""Triton sparse_attn_paged under the interpreter vs the reference: the tiny cases, raw model1_fp8 bytes
(every e4m3 and e8m0 pattern the layout can hold, subnormals included), no sink, all-invalid rows."""
from __future__ import annotations

import pytest
import torch

import v4hal
from v4hal import cases
from v4hal.compare import compare_outputs, passed
from v4hal.ops.paged import new_paged_cache

OP = torch.ops.v4hal.sparse_attn_paged


def _both(args):
    with v4hal.use_backend("reference"):
        ref = OP(*args)
    with v4hal.use_backend("triton"):
        out = OP(*args)
    return out, ref


def _check(args):
    out, ref = _both(args)
    results = compare_outputs("sparse_attn_paged", out, ref, args)
    assert passed(results), results
    assert torch.equal(torch.isposinf(out[1]), torch.isposinf(ref[1]))
    return out, ref


@pytest.mark.parametrize("shape", [s for _, s in cases.tiny_cases("sparse_attn_paged")],
                         ids=cases.describe_shape)
def test_tiny_cases_match_the_reference(shape):
    _check(cases.make_case("sparse_attn_paged", shape, seed=11))


def test_raw_model1_bytes_decode_like_the_reference():
    """Random page bytes: e4m3 codes of every kind (subnormals included, no NaN code), e8m0 scales around
    2**0 plus 2**-127 (an fp32 subnormal) and 2**13, bf16 rope values; slots over the pages of both caches."""
    g = torch.Generator().manual_seed(0)
    caches = []
    for blocks in (3, 2):
        cache = new_paged_cache(blocks, 72, "model1_fp8")
        u8 = cache.view(torch.uint8)
        page = u8.as_strided((blocks, 72 * 584), (u8.stride(0), 1))
        page.copy_(torch.randint(0, 256, page.shape, generator=g, dtype=torch.uint8))
        data = page[:, :72 * 576].reshape(blocks, 72, 576)
        nope = data[..., :448]
        nope[(nope & 0x7F) == 0x7F] = 0x11                      # no e4m3 NaN code
        rope = data[..., 448:].contiguous().view(torch.bfloat16)
        data[..., 448:] = torch.randn(rope.shape, generator=g).bfloat16().view(torch.uint8).view(blocks, 72, 128)
        scales = page[:, 72 * 576:].reshape(blocks, 72, 8)
        e = torch.randint(117, 131, scales.shape, generator=g, dtype=torch.uint8)
        e[0, 0, :] = 0                                          # 2**-127, subnormal in fp32
        e[0, 1, :] = 140                                        # 2**13: values up to 448 * 2**13
        scales.copy_(e)
        caches.append(cache)
    q = (torch.randn(1, 2, 3, 512, generator=g) * 0.05).bfloat16()
    idx = torch.randint(0, 3 * 72, (1, 2, 20), generator=g, dtype=torch.int32)
    idx[0, 0, :2] = torch.tensor([0, 1], dtype=torch.int32)    # the extreme-scale entries
    idx[0, 1, 0] = 1
    idx[0, 1, 3] = -1
    xidx = torch.randint(0, 2 * 72, (1, 2, 7), generator=g, dtype=torch.int32)
    args = [q, caches[0], idx, torch.randn(3), 0.04, None, caches[1], xidx, None, "model1_fp8"]
    _check(args)


def test_no_sink_and_all_invalid_rows():
    shape = cases.tiny_cases("sparse_attn_paged")[2][1]
    args = cases.make_case("sparse_attn_paged", shape, seed=4)
    args[3] = torch.full_like(args[3], float("-inf"))
    args[2][1, 1] = -1
    args[7][1, 1] = -1
    out, ref = _check(args)
    assert not bool(out[0][1, 1].any()) and bool(torch.isposinf(out[1][1, :, 1]).all())
    args[5] = torch.tensor([0, 0], dtype=torch.int32)
    args[8] = torch.tensor([0, 0], dtype=torch.int32)
    out, _ = _check(args)
    assert not bool(out[0].any()) and bool(torch.isposinf(out[1]).all())


@pytest.mark.parametrize("layout,d,bs", [("model1_fp8", 192, 3), ("bf16", 96, 4), ("bf16", 8, 5)])
def test_entry_widths_short_of_a_power_of_two(layout, d, bs):
    """Widths whose tile pads (192 -> 256 with an empty 64-value group, 96 -> 128, 8 -> 16): the padded
    columns read nothing and are not stored."""
    shape = {"layout": layout, "d": d, "b": 2, "s": 1, "h": 3, "block_size": bs, "ctx": 10, "topk": 6,
             "extra_ctx": 7, "extra_topk": 4, "holes": 0.2, "uneven": True}
    out, _ = _check(cases.make_case("sparse_attn_paged", shape, seed=2))
    assert out[0].shape == (2, 1, 3, d)


def test_entries_wider_than_512_run_on_the_reference():
    from v4hal.hal import dispatch
    shape = {"layout": "bf16", "d": 576, "b": 1, "s": 1, "h": 2, "block_size": 4, "ctx": 8, "topk": 4}
    args = cases.make_case("sparse_attn_paged", shape, seed=1)
    names = ["q", "kv_cache", "indices", "attn_sink", "softmax_scale", "topk_length", "extra_kv_cache",
             "extra_indices", "extra_topk_length", "layout"]
    assert dispatch.select("sparse_attn_paged", "cpu", dict(zip(names, args))).backend != "triton"
    row = next(r for r in dispatch.explain("sparse_attn_paged", "cpu", dict(zip(names, args)))
               if r["backend"] == "triton")
    assert row["status"] == "no" and "head dim D must be <= 512, got 576" in row["reason"]


@pytest.mark.parametrize("layout", ["bf16", "model1_fp8", "v41_window_fp8+v41_compressed_fp4", "v41_compressed_fp4",
                                    "model1_fp8+v41_compressed_fp4"])
def test_band_window_and_entry_indices_match_the_reference(layout):
    """The position form (band window, entry indices with a ratio): Triton equals the reference, and returns
    the output alone unless return_lse."""
    from tests.reference.test_paged_attention import _two_forms

    band, _ = _two_forms(layout, seed=5)
    q, cache, sink, scale = band.pop("q"), band.pop("kv_cache"), band.pop("attn_sink"), band.pop("softmax_scale")
    indices = band.pop("indices")
    with v4hal.use_backend("reference"):
        ref = v4hal.sparse_attn_paged(q, cache, indices, sink, scale, **band)
    with v4hal.use_backend("triton"):
        out = v4hal.sparse_attn_paged(q, cache, indices, sink, scale, **band)
        alone = v4hal.sparse_attn_paged(q, cache, indices, sink, scale, **dict(band, return_lse=False))
    assert passed(compare_outputs("sparse_attn_paged", out, ref, [q])), (out, ref)
    assert isinstance(alone, torch.Tensor) and torch.equal(alone, out[0])


def _v41_raw_cache(blocks: int, bs: int, layout: str, g: torch.Generator) -> torch.Tensor:
    """A V4.1 cache of 512-wide entries holding random bytes: window: every e4m3 code but NaN (subnormals
    included), ue8m0 scales around 2**0 plus 2**-127 (token 0, an fp32 subnormal) and 2**10 (token 1);
    compressed: every e2m1 code (both zeros included), e4m3 scales of every finite positive code below 1,
    subnormals included, plus the extreme 448 (token 1)."""
    cache = new_paged_cache(blocks, bs, layout)
    u8 = cache.view(torch.uint8)
    page = u8.as_strided((blocks, u8.stride(0)), (u8.stride(0), 1))
    data_bytes = 512 if layout == "v41_window_fp8" else 256
    data = page[:, :bs * data_bytes].reshape(blocks, bs, data_bytes)
    scales = page[:, bs * data_bytes:bs * (data_bytes + 512 // (32 if layout == "v41_window_fp8" else 16))]
    scales = scales.reshape(blocks, bs, -1)
    data.copy_(torch.randint(0, 256, data.shape, generator=g, dtype=torch.uint8))
    if layout == "v41_window_fp8":
        data[(data & 0x7F) == 0x7F] = 0x22                                  # no e4m3 NaN code
        e = torch.randint(120, 130, scales.shape, generator=g, dtype=torch.uint8)
        e[0, 0], e[0, 1] = 0, 137
    else:
        e = torch.randint(0, 0x38, scales.shape, generator=g, dtype=torch.uint8)   # e4m3 codes 0 .. 0.875
        e[0, 1] = 0x7E                                                      # 448
    scales.copy_(e)
    return cache


@pytest.mark.parametrize("layout,extra_layout", [("v41_window_fp8", "v41_compressed_fp4"),
                                                 ("v41_compressed_fp4", "v41_window_fp8")])
def test_raw_v41_bytes_decode_like_the_reference(layout, extra_layout):
    """Random page bytes of both V4.1 layouts (64-token pages, as V4.1 pages them): the kernel's in-kernel
    decode of the e4m3 / e2m1 codes and their ue8m0 / e4m3 scales gives the reference's result."""
    g = torch.Generator().manual_seed(1)
    window, extra = _v41_raw_cache(3, 64, layout, g), _v41_raw_cache(2, 64, extra_layout, g)
    q = (torch.randn(1, 2, 3, 512, generator=g) * 0.05).bfloat16()
    idx = torch.randint(0, 3 * 64, (1, 2, 20), generator=g, dtype=torch.int32)
    idx[0, 0, :2] = torch.tensor([0, 1], dtype=torch.int32)    # the extreme-scale entries
    idx[0, 1, 3] = -1
    xidx = torch.randint(0, 2 * 64, (1, 2, 9), generator=g, dtype=torch.int32)
    xidx[0, 1, :2] = torch.tensor([0, 1], dtype=torch.int32)
    args = [q, window, idx, torch.randn(3), 0.04, None, extra, xidx, None, layout, None, None, 0, None, 0, True,
            extra_layout]
    _check(args)


@pytest.mark.parametrize("layout", ["v41_window_fp8", "v41_compressed_fp4"])
@pytest.mark.parametrize("which", ["window", "extra"])
def test_one_pick_without_a_sink_returns_the_entry_decoded_bit_for_bit(layout, which):
    """One valid pick and no sink: out is the picked entry itself (weight exactly 1), so the kernel's decode of
    each raw byte pattern (every e4m3 / e2m1 code, the scales of `_v41_raw_cache`) must equal
    paged_cache_read's exactly; each query row picks a different slot of a 64-token page."""
    from v4hal.backends.reference.paged import paged_cache_read

    g = torch.Generator().manual_seed(2)
    other = "v41_compressed_fp4" if layout == "v41_window_fp8" else "v41_window_fp8"
    cache, spare = _v41_raw_cache(1, 64, layout, g), _v41_raw_cache(1, 64, other, g)
    rows = torch.arange(64, dtype=torch.int32).view(1, 64, 1)
    none = torch.full((1, 64, 1), -1, dtype=torch.int32)
    q = torch.zeros(1, 64, 1, 512).bfloat16()
    sink = torch.full((1,), float("-inf"))
    if which == "window":
        args = [q, cache, rows, sink, 1.0, None, spare, none, None, layout, None, None, 0, None, 0, False, other]
    else:
        args = [q, spare, none, sink, 1.0, None, cache, rows, None, other, None, None, 0, None, 0, False, layout]
    with v4hal.use_backend("triton"):
        out, _ = OP(*args)
    want = paged_cache_read(cache, torch.arange(64), layout)
    assert not want.isnan().any() and bool((want != 0).any())
    assert torch.equal(out[0, :, 0], want)       # exact (a -0.0 entry comes out +0.0: the sum starts at 0)
