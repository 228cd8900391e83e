"""V4.1's cache layouts (FlashMLA's 528-byte window and 288-byte compressed formats) on the reference
backend, against an independent oracle written from the format definitions:

* ``v41_window_fp8``: per token 512 (``D``) e4m3 bytes in dim order, then 16 ue8m0 bytes, one per 32
  values, ``scale = 2**ceil(log2(max(amax / 448, 1e-4)))``, ``code = e4m3(x / scale)``;
* ``v41_compressed_fp4``: per token 256 (``D / 2``) bytes of e2m1 codes (element ``i`` in byte ``i // 2``,
  even elements in the low nibble, sign in bit 3), then 32 e4m3 bytes, one per 16 values,
  ``scale = e4m3(clamp(amax / 6, 2**-9, 448))``, ``code = e2m1(x / scale)`` to nearest, ties to even,
  saturating at 6;
* pages: ``[block_size x codes][block_size x scales]``, padded to a multiple of the codes' bytes.

The oracle decodes every e4m3 / e2m1 / ue8m0 byte by scalar formulas (not torch's casts) and rounds by
searching the whole grid for the nearest value, so it shares no code with the backends.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import v4hal
from v4hal.hal import formats as F
from v4hal.ops.paged import PAGED_LAYOUTS, new_paged_cache

V41 = ["v41_window_fp8", "v41_compressed_fp4"]
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


# ------------------------------------------------------------------ the oracle: scalar formulas
def e4m3_value(b: int) -> float:
    """e4m3fn byte -> value: sign bit 7, exponent bits 6..3 (bias 7), mantissa bits 2..0; 0x7F / 0xFF NaN."""
    sign = -1.0 if b & 0x80 else 1.0
    e, m = (b >> 3) & 0xF, b & 7
    if e == 15 and m == 7:
        return math.nan
    if e == 0:
        return sign * m * 2.0 ** -9
    return sign * (1 + m / 8) * 2.0 ** (e - 7)


def ue8m0_value(b: int) -> float:
    return math.nan if b == 255 else 2.0 ** (b - 127)


def e2m1_value(c: int) -> float:
    return (-1.0 if c & 8 else 1.0) * E2M1[c & 7]


def f32(v: float) -> float:
    return float(np.float32(v))


def nearest_code(v: float, values: list[float]) -> int:
    """Index of the nearest of ``values`` (non-negative, ascending) to ``|v|``, ties to the even index,
    saturating at the last."""
    a = abs(v)
    if a >= values[-1]:
        return len(values) - 1
    hi = next(i for i, w in enumerate(values) if w >= a)
    lo = max(hi - 1, 0)
    if values[hi] - a < a - values[lo]:
        return hi
    if values[hi] - a > a - values[lo]:
        return lo
    return lo if lo % 2 == 0 else hi


E4M3_POS = [e4m3_value(b) for b in range(0x7F)]          # bytes 0x00..0x7E, ascending


def window_oracle(row: list[float]) -> tuple[list[int], list[int]]:
    """(e4m3 bytes, ue8m0 bytes) of one row for v41_window_fp8."""
    codes, scales = [], []
    for k in range(0, len(row), 32):
        blk = row[k:k + 32]
        q = max(f32(np.float32(max(abs(v) for v in blk)) / np.float32(448.0)), f32(1e-4))
        e = math.ceil(math.log2(q))
        if 2.0 ** (e - 1) >= q:     # log2 rounding guard
            e -= 1
        scales.append(e + 127)
        for v in blk:
            c = nearest_code(v / 2.0 ** e, E4M3_POS)
            codes.append(c | (0x80 if math.copysign(1.0, v) < 0 else 0))
    return codes, scales


def compressed_oracle(row: list[float]) -> tuple[list[int], list[int]]:
    """(e2m1 codes, e4m3 scale bytes) of one row for v41_compressed_fp4."""
    codes, scales = [], []
    for k in range(0, len(row), 16):
        blk = row[k:k + 16]
        q = min(max(f32(np.float32(max(abs(v) for v in blk)) / np.float32(6.0)), 2.0 ** -9), 448.0)
        sb = nearest_code(q, E4M3_POS)
        s = e4m3_value(sb)
        scales.append(sb)
        for v in blk:
            quot = f32(np.float32(v) / np.float32(s))
            codes.append(nearest_code(quot, E2M1) | (8 if math.copysign(1.0, quot) < 0 else 0))
    return codes, scales


def decode_page_token(page: torch.Tensor, layout: str, bs: int, off: int, dim: int = 512) -> list[float]:
    """A token's values decoded by hand from the page's bytes (byte offsets of the format)."""
    p = page.tolist()
    if layout == "v41_window_fp8":
        data = p[off * dim: (off + 1) * dim]
        sc = p[bs * dim + off * (dim // 32): bs * dim + (off + 1) * (dim // 32)]
        return [e4m3_value(data[i]) * ue8m0_value(sc[i // 32]) for i in range(dim)]
    half = dim // 2
    data = p[off * half: (off + 1) * half]
    sc = p[bs * half + off * (dim // 16): bs * half + (off + 1) * (dim // 16)]
    out = []
    for i in range(dim):
        c = data[i // 2] & 0xF if i % 2 == 0 else data[i // 2] >> 4
        out.append(e2m1_value(c) * e4m3_value(sc[i // 16]))
    return out


def _bf16(vals: list[float]) -> torch.Tensor:
    return torch.tensor(vals, dtype=torch.float32).to(torch.bfloat16)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def _page(cache: torch.Tensor, blk: int) -> torch.Tensor:
    u8 = cache.view(torch.uint8) if cache.dtype != torch.uint8 else cache
    return u8.as_strided((cache.stride(0),), (1,), u8.storage_offset() + blk * cache.stride(0))


def _rows(t: int, dim: int, seed: int) -> torch.Tensor:
    """bf16 rows, every 16 values at their own magnitude (2**-20 .. 2**10), a zero block, a -0.0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, dim // 16, 16, generator=g) * 2.0 ** torch.randint(-20, 11, (t, dim // 16, 1), generator=g)
    x = x.reshape(t, dim)
    x[0, :32] = 0.0
    x[-1, 40] = -0.0
    return x.to(torch.bfloat16)


# ------------------------------------------------------------------ layouts
def test_widths_and_pages() -> None:
    w, c = PAGED_LAYOUTS["v41_window_fp8"], PAGED_LAYOUTS["v41_compressed_fp4"]
    assert (w.width(), w.token_bytes(), c.width(), c.token_bytes()) == (528, 528, 288, 288)
    # pages: block_size records, padded to a multiple of 512 (window) / 256 (compressed) bytes
    assert [w.page_bytes(None, bs) for bs in (1, 3, 64)] == [1024, 2048, 33792]
    assert [c.page_bytes(None, bs) for bs in (1, 3, 64)] == [512, 1024, 18432]
    assert (w.width(64), c.width(64), w.page_bytes(64, 3), c.page_bytes(64, 3)) == (66, 36, 256, 128)
    cache = new_paged_cache(2, 3, "v41_window_fp8")
    assert cache.shape == (2, 3, 1, 528) and cache.stride()[:2] == (2048, 528)


@pytest.mark.parametrize("layout", V41)
@pytest.mark.parametrize("bs", [3, 64])
def test_page_bytes_by_hand(layout: str, bs: int) -> None:
    """The bytes a write leaves are the oracle's, at the format's offsets; a hand decode of the page is
    the read; nothing else in the pages is written."""
    cache = new_paged_cache(2, bs, layout)
    x = _rows(3, 512, seed=bs)
    slots = [bs + 2, 1, 2 * bs - 2]
    v4hal.paged_cache_write(cache, x, torch.tensor(slots), layout)
    got = v4hal.paged_cache_read(cache, torch.tensor(slots), layout)
    per = 512 if layout == "v41_window_fp8" else 256
    nsc = 16 if layout == "v41_window_fp8" else 32
    touched = torch.zeros(2, cache.stride(0), dtype=torch.bool)
    for row, slot in enumerate(slots):
        blk, off = divmod(slot, bs)
        page = _page(cache, blk)
        oracle = window_oracle if layout == "v41_window_fp8" else compressed_oracle
        codes, scales = oracle(x[row].float().tolist())
        if layout == "v41_compressed_fp4":
            codes = [codes[2 * j] | (codes[2 * j + 1] << 4) for j in range(256)]
        assert page[off * per: (off + 1) * per].tolist() == codes
        assert page[bs * per + off * nsc: bs * per + (off + 1) * nsc].tolist() == scales
        assert torch.equal(_bits(_bf16(decode_page_token(page, layout, bs, off))), _bits(got[row]))
        touched[blk, off * per: (off + 1) * per] = True
        touched[blk, bs * per + off * nsc: bs * per + (off + 1) * nsc] = True
    assert not torch.stack([_page(cache, 0), _page(cache, 1)])[~touched].any()


@pytest.mark.parametrize("layout,dim", [("v41_window_fp8", 512), ("v41_compressed_fp4", 512),
                                        ("v41_window_fp8", 64), ("v41_compressed_fp4", 48)])
def test_write_then_read_is_the_round_trip(layout: str, dim: int) -> None:
    g = torch.Generator().manual_seed(dim)
    cache = new_paged_cache(3, 5, layout, dim=dim)
    x = (torch.randn(9, dim, generator=g) * 3).to(torch.bfloat16)
    slots = torch.randperm(15, generator=g)[:9]
    slots[4] = -1
    v4hal.paged_cache_write(cache, x, slots, layout)
    got = v4hal.paged_cache_read(cache, slots, layout)
    if layout == "v41_window_fp8":
        y, s = F.fp8_cache_block_quant(x)
        want = F.fp8_block_dequant(y, s).to(torch.bfloat16)
    else:
        want = F.fp4_e4m3_round_trip(x).to(torch.bfloat16)
    want[4] = 0
    assert torch.equal(_bits(got), _bits(want))


# ------------------------------------------------------------------ every byte pattern
def test_every_e4m3_code_written_and_every_ue8m0_byte_read() -> None:
    """A block of amax 448 has scale 1 (byte 127: 448 / 448 is exactly 1; V4's reciprocal multiply would
    not floor at the same place): every e4m3 value is written as its own byte. Reads decode all 256
    e4m3 bytes against all 256 ue8m0 bytes."""
    vals = [e4m3_value(b) for b in range(256) if not math.isnan(e4m3_value(b))]     # 254 values
    vals += [448.0, -448.0]
    row = torch.tensor(vals, dtype=torch.float32).view(8, 32)
    row[:, 0] = 448.0                                     # every block's amax 448
    x = row.reshape(1, 256).to(torch.bfloat16)
    cache = new_paged_cache(1, 1, "v41_window_fp8", dim=256)
    v4hal.paged_cache_write(cache, x, torch.tensor([0]), "v41_window_fp8")
    page = _page(cache, 0)
    assert page[256:264].tolist() == [127] * 8
    want = [b for b in range(256) if not math.isnan(e4m3_value(b))] + [0x7E, 0xFE]
    want = torch.tensor(want).view(8, 32)
    want[:, 0] = 0x7E
    assert page[:256].tolist() == want.flatten().tolist()
    # reads: byte patterns poked into a 32-token cache of 256-wide entries, scale byte t for token t
    cache = new_paged_cache(1, 32, "v41_window_fp8", dim=256)
    page = _page(cache, 0)
    page[:32 * 256] = torch.arange(256, dtype=torch.uint8).repeat(32)
    page[32 * 256:] = torch.arange(256, dtype=torch.uint8)
    got = v4hal.paged_cache_read(cache, torch.arange(32), "v41_window_fp8")
    oracle = _bf16([e4m3_value(c) * ue8m0_value(t * 8 + c // 32) for t in range(32) for c in range(256)])
    assert torch.equal(got.isnan(), oracle.view(32, 256).isnan())
    assert torch.equal(_bits(got.nan_to_num()), _bits(oracle.view(32, 256).nan_to_num()))


def test_every_e2m1_code_and_e4m3_scale_byte() -> None:
    """Writes: blocks of amax ``6 v`` for every positive e4m3 value ``v`` have scale ``v`` (its own byte);
    each block holds every e2m1 magnitude with both signs. Reads: every packed byte against every e4m3
    scale byte (NaN included)."""
    pos = list(range(1, 0x7F))                                            # 126 finite positive scale bytes
    blocks = []
    for b in pos:
        v = e4m3_value(b)
        blk = [m * v for m in (6.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)] + [-m * v for m in E2M1]
        blocks.append(blk)
    x = torch.tensor(blocks, dtype=torch.float32).reshape(1, -1).to(torch.bfloat16)
    assert torch.equal(x.float(), torch.tensor(blocks).reshape(1, -1))  # exact in bf16
    cache = new_paged_cache(1, 1, "v41_compressed_fp4", dim=16 * len(pos))
    v4hal.paged_cache_write(cache, x, torch.tensor([0]), "v41_compressed_fp4")
    page = _page(cache, 0)
    n = 8 * len(pos)
    assert page[n:n + len(pos)].tolist() == pos
    codes = [7, 0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15]
    assert page[:n].tolist() == [codes[2 * j] | (codes[2 * j + 1] << 4) for j in range(8)] * len(pos)
    # reads: 256 packed bytes x 256 scale bytes
    cache = new_paged_cache(1, 16, "v41_compressed_fp4", dim=512)
    page = _page(cache, 0)
    page[:16 * 256] = torch.arange(256, dtype=torch.uint8).repeat(16)
    page[16 * 256:16 * 288] = torch.arange(256, dtype=torch.uint8).repeat(2)
    got = v4hal.paged_cache_read(cache, torch.arange(16), "v41_compressed_fp4")
    oracle = _bf16([v for t in range(16) for v in decode_page_token(page, "v41_compressed_fp4", 16, t)])
    assert torch.equal(got.isnan(), oracle.view(16, 512).isnan())
    assert torch.equal(_bits(got.nan_to_num()), _bits(oracle.view(16, 512).nan_to_num()))


# ------------------------------------------------------------------ rounding rules
TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
TIES_EVEN = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]          # HF / FlashMLA (and v4hal)
TIES_DOWN = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]          # DeepGEMM's Python quantizer


@pytest.mark.parametrize("layout", ["indexer_fp4", "v41_compressed_fp4"])
def test_e2m1_ties_round_to_even(layout: str) -> None:
    """Both FP4 layouts round e2m1 ties to the even code (0.75 -> 1, 1.75 -> 2, 3.5 -> 4), not down as
    DeepGEMM's Python quantizer does (0.75 -> 0.5, 1.75 -> 1.5, 3.5 -> 3). A block of amax 6 has scale 1
    in both (ue8m0 2**ceil(log2(6 / 6)); e4m3(6 / 6))."""
    block = 32 if layout == "indexer_fp4" else 16
    row = torch.zeros(block)
    row[0] = 6.0
    row[1:1 + 2 * len(TIES)] = torch.tensor(TIES + [-t for t in TIES])
    row[15] = -0.125                                      # rounds to zero: the sign is kept (-0.0, code 8)
    x = row.view(1, -1).to(torch.bfloat16)
    cache = new_paged_cache(1, 1, layout, dim=block)
    v4hal.paged_cache_write(cache, x, torch.tensor([0]), layout)
    got = v4hal.paged_cache_read(cache, torch.tensor([0]), layout)[0].float()
    want = torch.tensor(TIES_EVEN + [-t for t in TIES_EVEN])
    assert torch.equal(got[1:1 + 2 * len(TIES)], want)
    assert got[15] == 0 and torch.signbit(got[15])
    assert not torch.equal(want[:len(TIES)], torch.tensor(TIES_DOWN))


def test_scale_rules_at_the_edges() -> None:
    """Window: the 1e-4 floor applies to amax / 448 (tiny blocks get 2**-13, byte 114), amax 448 * 2**k
    gives 2**k exactly, one ulp more the next power. Compressed: a zero block gets 2**-9 (byte 0x01),
    an amax over 6 * 448 saturates the scale at 448 (0x7E) and its values at 6."""
    amax = torch.tensor([0.0, 1e-3, 448.0, 448.0 * 2 ** -10, 448.0 * 2 ** 5, np.nextafter(np.float32(448), 1e9)])
    got = F.block_scale_to_e8m0(F.fp8_cache_scale(amax.float())).view(torch.uint8).tolist()
    assert got == [114, 114, 127, 117, 132, 128]
    x = torch.zeros(1, 32)
    x[0, 16:] = 3000.0
    x[0, 17] = -3000.0
    cache = new_paged_cache(1, 1, "v41_compressed_fp4", dim=32)
    v4hal.paged_cache_write(cache, x.to(torch.bfloat16), torch.tensor([0]), "v41_compressed_fp4")
    page = _page(cache, 0)
    assert page[16:18].tolist() == [0x01, 0x7E]
    assert page[8:16].tolist() == [0xF7] + [0x77] * 7      # codes 7 / 15: +-6 (saturated)


def test_e4m3_scale_ties_round_to_even() -> None:
    """Blocks whose ``amax / 6`` falls exactly halfway between two e4m3 values (exact in bf16 and in the
    fp32 division) take the value with the even mantissa; every pair of neighbours is tried."""
    mids = [(E4M3_POS[b] + E4M3_POS[b + 1]) / 2 for b in range(1, 0x7E)]
    rows = torch.zeros(len(mids), 16)
    rows[:, 0] = torch.tensor(mids) * 6
    rows[:, 1] = -torch.tensor(mids)                     # a value that is not the amax
    x = rows.reshape(1, -1).to(torch.bfloat16)
    assert torch.equal(x.float().view(-1, 16)[:, 0], torch.tensor(mids) * 6)
    cache = new_paged_cache(1, 1, "v41_compressed_fp4", dim=x.shape[1])
    v4hal.paged_cache_write(cache, x, torch.tensor([0]), "v41_compressed_fp4")
    page = _page(cache, 0)
    n = x.shape[1] // 2
    want = [b if b % 2 == 0 else b + 1 for b in range(1, 0x7E)]
    assert page[n:n + len(mids)].tolist() == want
    codes, scales = compressed_oracle(x[0].float().tolist())
    assert scales == want
    assert page[:n].tolist() == [codes[2 * j] | (codes[2 * j + 1] << 4) for j in range(n)]


@pytest.mark.parametrize("layout", V41)
def test_non_finite_blocks_with_checks_off(layout: str, monkeypatch) -> None:
    """With value checks off, a block holding an inf or a NaN gets a NaN scale (window: ue8m0 0xFF and
    payload 0x7F; compressed: e4m3 0x7F and code 0) and reads back NaN; the other blocks are the finite
    round trip bit for bit. With the checks on, the write is refused before anything is written."""
    from v4hal.hal import dispatch
    from v4hal.hal.errors import RangeError

    x = _rows(2, 512, seed=11)
    x[0, 3] = float("nan")
    x[0, 100] = float("inf")
    x[1, 511] = -float("inf")
    cache = new_paged_cache(1, 2, layout)
    with pytest.raises(RangeError, match="x"):
        v4hal.paged_cache_write(cache, x, torch.tensor([0, 1]), layout)
    assert not cache.any()
    monkeypatch.setenv("V4HAL_CHECK_VALUES", "0")
    dispatch.refresh()
    v4hal.paged_cache_write(cache, x, torch.tensor([0, 1]), layout)
    got = v4hal.paged_cache_read(cache, torch.tensor([0, 1]), layout)
    page = _page(cache, 0)
    block = 32 if layout == "v41_window_fp8" else 16
    bad = {(0, 3 // block), (0, 100 // block), (1, 511 // block)}
    per, nsc = (512, 16) if layout == "v41_window_fp8" else (256, 32)
    finite = x.clone()
    for t, b in bad:
        finite[t, b * block:(b + 1) * block] = 1.0
        assert got[t, b * block:(b + 1) * block].isnan().all()
        assert page[2 * per + t * nsc + b] == (0xFF if layout == "v41_window_fp8" else 0x7F)
        rec = page[t * per + b * block * per // 512: t * per + (b + 1) * block * per // 512]
        assert rec.tolist() == ([0x7F] * block if layout == "v41_window_fp8" else [0] * (block // 2))
    if layout == "v41_window_fp8":
        want = F.fp8_block_dequant(*F.fp8_cache_block_quant(finite)).to(torch.bfloat16)
    else:
        want = F.fp4_e4m3_round_trip(finite).to(torch.bfloat16)
    mask = ~got.isnan()
    assert mask.sum() == 2 * 512 - 3 * block
    assert torch.equal(_bits(got[mask]), _bits(want[mask]))


def test_public_fp4_e4m3_round_trip_on_fp32_input() -> None:
    """``formats.fp4_e4m3_round_trip`` (the compressor's FP4 round trip) on fp32 rows, which carry more
    bits than bf16 (so ``amax / 6`` and ``x / s`` really round): the oracle's codes and scales, values
    ``e2m1 * s``; a width that is not a multiple of the block is refused."""
    from v4hal.hal.errors import ShapeError

    g = torch.Generator().manual_seed(5)
    mag = 2.0 ** torch.randint(-12, 12, (4, 4, 1), generator=g).float()
    x = (torch.randn(4, 4, 16, generator=g) * mag).view(4, 64)
    got = F.fp4_e4m3_round_trip(x)
    codes, s = F.fp4_e4m3_block_codes(x)
    for row in range(4):
        want_codes, want_scales = compressed_oracle(x[row].tolist())
        assert codes[row].tolist() == want_codes and s[row].view(torch.uint8).tolist() == want_scales
        want = [e2m1_value(c) * e4m3_value(want_scales[i // 16]) for i, c in enumerate(want_codes)]
        assert torch.equal(got[row], torch.tensor(want, dtype=torch.float32))
    with pytest.raises(ShapeError, match="multiple of 16"):
        F.fp4_e4m3_round_trip(torch.zeros(2, 24))
