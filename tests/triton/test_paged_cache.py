"""Triton paged caches against the reference backend, under the Triton interpreter.

* Writes: the same rows written by both backends into two caches holding the same bytes (zeroed, or
  random bytes) leave the two caches' whole buffers equal byte for byte: the records, the scales, the
  model1_fp8 pad byte and page padding, and every slot not written (-1 holes skipped). Every layout,
  block sizes that pad the model1_fp8 page (3, 64) and that do not (72), int32 and int64 slots, e4m3
  caches, rows of many magnitudes (e4m3 subnormals, all-zero blocks, signed zeros), non-finite rows with
  value checks off, strided ``x`` and ``slots``; entry widths other than V4's (a V4-shaped config's 128 / 64,
  and widths whose tiles pad: nope groups, scale bytes or values short of a power of two).
* Reads: bit for bit the reference's bf16 values (repeated slots, -1 reading zeros) into a poisoned
  output buffer, so an element the kernel never writes fails.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import v4hal
from tests.numerics import poisoned_empty  # noqa: F401  (fixture)
from v4hal.hal import dispatch
from v4hal.hal import formats as F
from v4hal.ops.paged import PAGED_LAYOUTS, new_paged_cache

pytestmark = pytest.mark.usefixtures("poisoned_empty")

LAYOUT_BLOCKS = [("model1_fp8", 3), ("model1_fp8", 64), ("model1_fp8", 72), ("bf16", 3), ("bf16", 72),
                 ("indexer_fp4", 3), ("indexer_fp4", 64), ("indexer_fp8", 5), ("indexer_fp8", 72),
                 ("v41_window_fp8", 3), ("v41_window_fp8", 64), ("v41_compressed_fp4", 3), ("v41_compressed_fp4", 64)]


def _flat(cache: torch.Tensor) -> torch.Tensor:
    """The cache's whole buffer (every page, padding included) as uint8."""
    u8 = cache.view(torch.uint8) if cache.dtype != torch.uint8 else cache
    n = cache.shape[0] * _page_bytes(cache)
    return u8.as_strided((n,), (1,), u8.storage_offset())


def _page_bytes(cache: torch.Tensor) -> int:
    """Bytes of one page of ``cache`` (its dim-0 stride in bytes)."""
    return cache.stride(0) * cache.element_size()


def _rows(t: int, dim: int, seed: int) -> torch.Tensor:
    """bf16 ``[t, dim]``: every 32 values at their own magnitude (2**-24 .. 2**12), one all-zero block
    and a -0.0."""
    g = torch.Generator().manual_seed(seed)
    n = -(-dim // 32)
    x = torch.randn(t, n * 32, generator=g)
    mag = 2.0 ** torch.randint(-24, 13, (t, n, 1), generator=g).float()
    x = (x.view(t, n, 32) * mag).view(t, n * 32)[:, :dim].contiguous()
    x[0, :64] = 0.0
    x[-1, 5] = -0.0
    return x.to(torch.bfloat16)


def _slots(n: int, t: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """``t`` distinct slots in ``[0, n)`` with -1 holes at rows 1 and 3."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randperm(n, generator=g)[:t].to(dtype)
    s[1] = -1
    if t > 3:
        s[3] = -1
    return s


def _cache_pair(blocks: int, block_size: int, layout: str, fill: bool, fp8: bool,
                dim: int | None = None) -> list[torch.Tensor]:
    """Two caches of the same bytes: zeroed, or random bytes when ``fill``; e4m3 dtype when ``fp8``."""
    out = []
    for _ in range(2):
        c = new_paged_cache(blocks, block_size, layout, dim=dim)
        if fill:
            flat = _flat(c)
            flat.copy_(torch.randint(0, 256, flat.shape, generator=torch.Generator().manual_seed(7),
                                     dtype=torch.uint8))
        out.append(c.view(F.FP8_DTYPE) if fp8 else c)
    return out


def _write_both(layout: str, block_size: int, x: torch.Tensor, slots: torch.Tensor, blocks: int = 3,
                fill: bool = False, fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    ref, tri = _cache_pair(blocks, block_size, layout, fill, fp8, dim=x.shape[1])
    with v4hal.use_backend("reference"):
        v4hal.paged_cache_write(ref, x, slots, layout)
    with v4hal.use_backend("triton"):
        v4hal.paged_cache_write(tri, x, slots, layout)
    return ref, tri


def _assert_same_bytes(ref: torch.Tensor, tri: torch.Tensor) -> None:
    a, b = _flat(ref), _flat(tri)
    bad = (a != b).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} bytes differ, first at byte offsets {bad[:8].tolist()} " \
                             f"(page {_page_bytes(ref)} bytes): {a[bad[:8]].tolist()} vs {b[bad[:8]].tolist()}"


@pytest.mark.parametrize("layout,block_size", LAYOUT_BLOCKS)
def test_write_bytes_and_read_match_reference(layout: str, block_size: int) -> None:
    blocks, t = 3, 6
    x = _rows(t, PAGED_LAYOUTS[layout].dim, seed=block_size)
    slots = _slots(blocks * block_size, t, seed=block_size, dtype=torch.int32)
    ref, tri = _write_both(layout, block_size, x, slots, blocks)
    _assert_same_bytes(ref, tri)
    assert _flat(ref).any()              # something was written
    # read: the written slots, repeats, -1 and never-written slots
    n = blocks * block_size
    read_slots = torch.cat([slots, slots[:2], torch.tensor([-1, 0, n - 1], dtype=torch.int32)])
    with v4hal.use_backend("reference"):
        want = v4hal.paged_cache_read(ref, read_slots, layout)
    with v4hal.use_backend("triton"):
        got = v4hal.paged_cache_read(ref, read_slots, layout)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert not got[read_slots == -1].view(torch.int16).any()      # -1 reads +0.0


NARROW = [("model1_fp8", 3, 128), ("model1_fp8", 24, 192), ("model1_fp8", 2, 640), ("indexer_fp4", 3, 64),
          ("indexer_fp4", 2, 160), ("indexer_fp8", 3, 64), ("indexer_fp8", 3, 7), ("bf16", 3, 128), ("bf16", 2, 96),
          ("v41_window_fp8", 3, 64), ("v41_window_fp8", 2, 96), ("v41_compressed_fp4", 3, 48),
          ("v41_compressed_fp4", 2, 16), ("v41_compressed_fp4", 2, 64)]


@pytest.mark.parametrize("layout,block_size,dim", NARROW)
def test_other_entry_widths_write_the_reference_bytes(layout: str, block_size: int, dim: int) -> None:
    """Widths other than V4's over a cache of random bytes: the same bytes as the reference (scale pad
    bytes, page padding, other slots), and reads bit for bit."""
    x = _rows(4, dim, seed=dim)
    slots = _slots(2 * block_size, 4, seed=dim, dtype=torch.int32)
    ref, tri = _write_both(layout, block_size, x, slots, blocks=2, fill=True)
    _assert_same_bytes(ref, tri)
    read_slots = torch.cat([slots, slots[:1]])          # the written slots (the others hold random bytes), -1s
    with v4hal.use_backend("reference"):
        want = v4hal.paged_cache_read(ref, read_slots, layout)
    with v4hal.use_backend("triton"):
        got = v4hal.paged_cache_read(ref, read_slots, layout)
    assert got.shape == (5, dim) and torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert not got[read_slots == -1].view(torch.int16).any()


def test_entries_wider_than_a_tile_fall_back() -> None:
    """The Triton cache ops hold one entry per program: wider entries are not theirs to serve."""
    from v4hal.backends.triton import paged_cache as tri_paged
    from v4hal.hal.errors import BackendUnavailableError

    wide = tri_paged.MAX_ENTRY + 1
    cache = new_paged_cache(1, 1, "indexer_fp8", dim=wide)
    expected = f"entry width D must be <= {tri_paged.MAX_ENTRY}, got {wide}"
    with v4hal.use_backend("triton"), pytest.raises(BackendUnavailableError, match=expected):
        v4hal.paged_cache_read(cache, torch.zeros(1, dtype=torch.int32), "indexer_fp8")


@pytest.mark.parametrize("layout,block_size", [("model1_fp8", 3), ("indexer_fp4", 4), ("indexer_fp8", 3),
                                               ("bf16", 3), ("v41_window_fp8", 3), ("v41_compressed_fp4", 5)])
def test_write_over_random_bytes_int64_slots(layout: str, block_size: int) -> None:
    """Pad bytes and page padding are what the reference leaves (the model1_fp8 pad byte is rewritten as 0),
    and bytes of other slots are untouched, over a cache full of random bytes."""
    x = _rows(5, PAGED_LAYOUTS[layout].dim, seed=3)
    slots = _slots(2 * block_size, 5, seed=4, dtype=torch.int64)
    ref, tri = _write_both(layout, block_size, x, slots, blocks=2, fill=True,
                           fp8=layout in ("model1_fp8", "indexer_fp8", "v41_window_fp8"))
    _assert_same_bytes(ref, tri)


@pytest.mark.parametrize("layout", ["model1_fp8", "indexer_fp4", "indexer_fp8", "bf16", "v41_window_fp8",
                                    "v41_compressed_fp4"])
def test_strided_inputs_and_empty_calls(layout: str) -> None:
    dim = PAGED_LAYOUTS[layout].dim
    wide = _rows(4, 2 * dim, seed=5)
    x = wide[:, dim // 2: dim // 2 + dim]                  # row stride 2 * dim
    slots = torch.tensor([7, 0, -1, 2, -1, 9, 4, 1], dtype=torch.int32)[::2]   # [7, -1, -1, 4], stride 2
    ref, tri = _write_both(layout, 3, x, slots, blocks=4)
    _assert_same_bytes(ref, tri)
    with v4hal.use_backend("triton"):
        v4hal.paged_cache_write(tri, x[:0], slots[:0], layout)
        v4hal.paged_cache_write(tri, x[:2], torch.tensor([-1, -1]), layout)
        empty = v4hal.paged_cache_read(tri, slots[:0], layout)
        got = v4hal.paged_cache_read(tri, slots, layout)
    _assert_same_bytes(ref, tri)
    assert empty.shape == (0, dim)
    with v4hal.use_backend("reference"):
        want = v4hal.paged_cache_read(ref, slots, layout)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # NumPy, under the interpreter
@pytest.mark.parametrize("layout", ["model1_fp8", "indexer_fp4", "indexer_fp8", "v41_window_fp8", "v41_compressed_fp4"])
def test_non_finite_rows_with_checks_off(layout: str, monkeypatch) -> None:
    """With value checks off a block holding an inf or a NaN gets the reference's NaN scale and payload."""
    monkeypatch.setenv("V4HAL_CHECK_VALUES", "0")
    dispatch.refresh()
    dim = PAGED_LAYOUTS[layout].dim
    x = _rows(3, dim, seed=6)
    x[0, 3] = float("nan")
    x[1, 70] = float("inf")
    x[2, 100] = -float("inf")
    slots = torch.tensor([4, 0, 2])
    ref, tri = _write_both(layout, 3, x, slots, blocks=2)
    _assert_same_bytes(ref, tri)
    with v4hal.use_backend("reference"):
        want = v4hal.paged_cache_read(ref, slots, layout)
    with v4hal.use_backend("triton"):
        got = v4hal.paged_cache_read(ref, slots, layout)
    assert torch.equal(got.isnan(), want.isnan()) and want.isnan().any()
    assert torch.equal(got.nan_to_num().view(torch.int16), want.nan_to_num().view(torch.int16))


def test_bench_verifies_the_bytes_a_write_wrote() -> None:
    """``v4hal bench`` verifies an in-place op by the cache it wrote: the Triton write passes (padded
    model1_fp8 pages, copied with their strides), a write that leaves the cache alone or corrupts one byte
    is reported "check-failed" and not timed."""
    from v4hal.backends.reference import paged as ref_paged
    from v4hal.bench import cases as casemod
    from v4hal.bench import runner
    from v4hal.hal import registry

    case = casemod.bench_case("paged_cache_write", {"layout": "model1_fp8", "blocks": 2, "block_size": 3, "t": 3},
                              "padded pages")
    rows = runner.run_cases([case], ["reference", "triton"], "cpu", repeats=1, warmup=0, max_case_s=0.1,
                            progress=False)
    tri = next(r for r in rows if r.backend == "triton")
    assert tri.status == "ok" and tri.verified == "vs reference" and tri.check["mismatches"] == 0, tri
    ref_out = runner.outputs_of(case, case.make("cpu", 0))
    assert len(ref_out) == 1 and ref_out[0].stride() == case.make("cpu", 0)[0].stride()

    def writes_nothing(cache, x, slots, layout):
        return None

    def one_wrong_pad_byte(cache, x, slots, layout):
        ref_paged.paged_cache_write(cache, x, slots, layout)
        cache[1, 2, 0, 583] = 1                     # the pad byte after the scales of slot 5

    for wrong in (writes_nothing, one_wrong_pad_byte):
        registry.register_impl("paged_cache_write", "cuda", wrong, devices=("cpu",), auto=False)
        try:
            rows = runner.run_cases([case], ["cuda"], "cpu", repeats=1, warmup=0, progress=False)
        finally:
            registry.unregister_backend("cuda", devices=("cpu",))
        assert rows[0].status == "check-failed" and rows[0].time_s is None, (wrong.__name__, rows[0])
