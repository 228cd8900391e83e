"""With the value checks off (``V4HAL_CHECK_VALUES=0``, the accelerator default) every paged op bounds every
slot, block id and index itself: a value outside the cache behaves like -1 ("no slot"), nothing outside the
cache is read or written, nothing raises mid-step. And one rule for non-finite input (IEEE propagation: NaN in,
NaN out for the affected rows / positions; NaN logits rank first in the top-k).

The tests run on the backend the ``backend`` fixture names; ``tests/triton/test_paged_bounds.py`` imports
them and runs them again on the Triton backend (under the interpreter). Each compares a call holding
out-of-range values with the same call holding -1 (or the documented empty value) there, bit for bit, on the
same backend; the caches live inside a larger buffer whose guard bytes around them must stay untouched.
"""
from __future__ import annotations

import pytest
import torch

import v4hal
from v4hal.backends.reference import paged_indexer as ref_indexer
from v4hal.hal import dispatch
from v4hal.ops.paged import PAGED_LAYOUTS

INT32_MAX = 2**31 - 1
LAYOUTS = ["model1_fp8", "bf16", "indexer_fp4", "indexer_fp8", "v41_window_fp8", "v41_compressed_fp4"]
DIMS = {"model1_fp8": 128, "bf16": 64, "indexer_fp4": 64, "indexer_fp8": 64, "v41_window_fp8": 64,
        "v41_compressed_fp4": 64}


@pytest.fixture
def backend() -> str:
    return "reference"


@pytest.fixture(autouse=True)
def _checks_off(monkeypatch) -> None:
    monkeypatch.setenv("V4HAL_CHECK_VALUES", "0")
    dispatch.refresh()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def guarded_cache(blocks: int, block_size: int, layout: str, dim: int, seed: int = 0) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
    """(buffer, cache): a cache of ``layout`` full of random bytes viewing pages 1 .. blocks of a buffer of
    ``blocks + 2`` pages; the first and last page are guard bytes no op may touch."""
    lay = PAGED_LAYOUTS[layout]
    dtype = lay.dtypes[0]
    page = lay.page_bytes(dim, block_size) // dtype.itemsize
    raw = torch.randint(0, 256, ((blocks + 2) * page * dtype.itemsize,), dtype=torch.uint8, generator=_gen(seed))
    if layout == "bf16":     # random finite bf16 values (random bytes would hold NaNs)
        buf = torch.randn((blocks + 2) * page, generator=_gen(seed)).bfloat16()
    else:
        buf = raw
    cache = buf.as_strided((blocks, block_size, 1, lay.width(dim)), (page, lay.width(dim), lay.width(dim), 1), page)
    return buf, cache


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (NaNs included)."""
    return a.shape == b.shape and torch.equal(_bits(a.contiguous()), _bits(b.contiguous()))


def _bad_slots(n: int, dtype: torch.dtype) -> list[int]:
    """Values outside ``[-1, n)``: below -1, the capacity, just past it, int32's largest (and int64 ones)."""
    bad = [-2, n, n + 5, INT32_MAX]
    return bad + [-2**40, 2**40, 2**62] if dtype == torch.int64 else bad


# ---------------------------------------------------------------- paged_cache_write / paged_cache_read
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_write_skips_slots_outside_the_cache(backend, layout, dtype) -> None:
    blocks, bs, dim = 3, 4, DIMS[layout]
    n = blocks * bs
    bad = _bad_slots(n, dtype)
    good = [0, n - 1, 5]
    slots = torch.tensor(good + bad, dtype=dtype)
    x = torch.randn(slots.shape[0], dim, generator=_gen(1)).bfloat16()
    buf, cache = guarded_cache(blocks, bs, layout, dim)
    want_buf, want = guarded_cache(blocks, bs, layout, dim)
    with v4hal.use_backend(backend):
        v4hal.paged_cache_write(cache, x, slots, layout)
        v4hal.paged_cache_write(want, x, torch.tensor(good + [-1] * len(bad), dtype=dtype), layout)
    assert torch.equal(buf.view(torch.uint8), want_buf.view(torch.uint8))        # guards included
    assert not torch.equal(buf.view(torch.uint8), guarded_cache(blocks, bs, layout, dim)[0].view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_read_of_slots_outside_the_cache_gives_zeros(backend, layout, dtype) -> None:
    blocks, bs, dim = 3, 4, DIMS[layout]
    n = blocks * bs
    bad = _bad_slots(n, dtype)
    good = [0, n - 1, 5]
    _, cache = guarded_cache(blocks, bs, layout, dim, seed=2)
    with v4hal.use_backend(backend):
        got = v4hal.paged_cache_read(cache, torch.tensor(good + bad, dtype=dtype), layout)
        want = v4hal.paged_cache_read(cache, torch.tensor(good + [-1] * len(bad), dtype=dtype), layout)
    assert _same(got, want)
    assert not _bits(got[len(good):]).any()                                     # +0.0


# ---------------------------------------------------------------- sparse_attn_paged
#: the attention cases: one layout for both caches, or "window+extra" (V4.1's pair: extra_layout)
ATTN_LAYOUTS = ["model1_fp8", "bf16", "v41_window_fp8+v41_compressed_fp4", "v41_window_fp8"]


def attn_inputs(layout: str, seed: int = 3) -> dict:
    """A small sparse_attn_paged call over two caches of random entries (window: 3 blocks of 4, extra: 2 of
    3), picks with -1 holes and uneven lengths. ``layout``: both caches' layout, or ``"window+extra"``."""
    g = _gen(seed)
    window, _, extra = layout.partition("+")
    extra = extra or window
    dim = DIMS[window]
    b, s, h = 2, 3, 3

    def cache(blocks: int, bs: int, lay: str) -> torch.Tensor:
        c = v4hal.new_paged_cache(blocks, bs, lay, dim=dim)
        with v4hal.use_backend("reference"):
            v4hal.paged_cache_write(c, torch.randn(blocks * bs, dim, generator=g).bfloat16(),
                                    torch.arange(blocks * bs), lay)
        return c

    kv, xkv = cache(3, 4, window), cache(2, 3, extra)
    idx = torch.randint(0, 12, (b, s, 5), generator=g, dtype=torch.int32)
    idx[0, 1, 2] = -1
    xidx = torch.randint(0, 6, (b, s, 3), generator=g, dtype=torch.int32)
    return dict(q=torch.randn(b, s, h, dim, generator=g).bfloat16(), kv_cache=kv, indices=idx,
                attn_sink=torch.randn(h, generator=g), softmax_scale=dim ** -0.5,
                topk_length=torch.tensor([5, 4], dtype=torch.int32), extra_kv_cache=xkv, extra_indices=xidx,
                extra_topk_length=torch.tensor([3, 2], dtype=torch.int32), layout=window, extra_layout=extra)


def _attn(backend: str, a: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with v4hal.use_backend(backend):
        return v4hal.sparse_attn_paged(a["q"], a["kv_cache"], a["indices"], a["attn_sink"], a["softmax_scale"],
                                       topk_length=a["topk_length"], extra_kv_cache=a["extra_kv_cache"],
                                       extra_indices=a["extra_indices"], extra_topk_length=a["extra_topk_length"],
                                       layout=a["layout"], extra_layout=a["extra_layout"], return_lse=True)


@pytest.mark.parametrize("layout", ATTN_LAYOUTS)
def test_attention_ignores_picks_outside_the_cache(backend, layout) -> None:
    a = attn_inputs(layout)
    bad = dict(a, indices=a["indices"].clone(), extra_indices=a["extra_indices"].clone())
    none = dict(a, indices=a["indices"].clone(), extra_indices=a["extra_indices"].clone())
    for i, v in enumerate([-2, 12, 13, INT32_MAX, -2**31]):
        bad["indices"][i % 2, i % 3, i] = v
        none["indices"][i % 2, i % 3, i] = -1
    for i, v in enumerate([6, INT32_MAX, -7]):
        bad["extra_indices"][1, i, i] = v
        none["extra_indices"][1, i, i] = -1
    bad["extra_indices"][0] = INT32_MAX                      # a query row with only out-of-range extra picks
    none["extra_indices"][0] = -1
    out, lse = _attn(backend, bad)
    want_out, want_lse = _attn(backend, none)
    assert _same(out, want_out) and _same(lse, want_lse)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_attention_lengths_out_of_range(backend) -> None:
    """Negative lengths use no pick, lengths past topk all of them."""
    a = attn_inputs("bf16")
    out, lse = _attn(backend, dict(a, topk_length=torch.tensor([-2, INT32_MAX], dtype=torch.int32),
                                   extra_topk_length=torch.tensor([-2**31, 9], dtype=torch.int32)))
    want_out, want_lse = _attn(backend, dict(a, topk_length=torch.tensor([0, 5], dtype=torch.int32),
                                             extra_topk_length=torch.tensor([0, 3], dtype=torch.int32)))
    assert _same(out, want_out) and _same(lse, want_lse)
    assert not _bits(out[0]).any() and torch.isposinf(lse[0]).all()


def _picked(a: dict, cache: str, slot: int) -> torch.Tensor:
    """bool ``[b, s_q]``: the query rows whose valid picks (below the length) in ``cache`` include ``slot``."""
    idx, lens = (a["indices"], a["topk_length"]) if cache == "kv_cache" else (a["extra_indices"],
                                                                              a["extra_topk_length"])
    k = idx.shape[-1]
    live = torch.arange(k).view(1, 1, k) < lens.long().view(-1, 1, 1)
    return ((idx == slot) & live).any(-1)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # NumPy, under the interpreter
@pytest.mark.parametrize("layout", ATTN_LAYOUTS)
def test_attention_nan_rule(backend, layout) -> None:
    """NaN in q's row of one head: that (query, head)'s out and lse NaN, nothing else changes. A NaN in a
    picked entry: every head of the queries that pick it (below their length) NaN, the others unchanged.
    A NaN sink: that head's out NaN everywhere, lse unchanged. A +inf sink: that head's out 0."""
    a = attn_inputs(layout)
    out0, lse0 = _attn(backend, a)
    assert torch.isfinite(out0).all() and torch.isfinite(lse0).all()

    q = a["q"].clone()
    q[1, 2, 1, 5] = float("nan")
    out, lse = _attn(backend, dict(a, q=q))
    hit = torch.zeros_like(lse, dtype=torch.bool)
    hit[1, 1, 2] = True                                                        # lse is [b, h, s_q]
    assert out[1, 2, 1].isnan().all() and lse[1, 1, 2].isnan()
    assert _same(out.masked_fill(hit.transpose(1, 2).unsqueeze(-1), 0), out0.masked_fill(
        hit.transpose(1, 2).unsqueeze(-1), 0))
    assert _same(lse.masked_fill(hit, 0), lse0.masked_fill(hit, 0))

    # a NaN in the entry at extra slot 4 (block 1, offset 1; model1_fp8: its bf16 rope values; V4.1: an e4m3
    # NaN code, or in the fp4 layout a NaN e4m3 scale)
    xkv = attn_inputs(layout)["extra_kv_cache"]          # a copy (clone() would drop the padded page stride)
    xlay = a["extra_layout"]
    if xlay == "bf16":
        xkv[1, 1, 0, 3] = float("nan")
    else:
        u8 = xkv.view(torch.uint8)
        flat = u8.as_strided((u8.shape[0] * u8.stride(0),), (1,), u8.storage_offset())
        if xlay == "model1_fp8":     # its record's bf16 value 3 (after 64 e4m3 bytes)
            at = u8.stride(0) + 192 + 64 + 2 * 3
            flat[at:at + 2] = torch.tensor([float("nan")], dtype=torch.bfloat16).view(torch.uint8)
        elif xlay == "v41_window_fp8":      # value 3 of its 64 e4m3 bytes
            flat[u8.stride(0) + 64 + 3] = 0x7F
        else:                               # v41_compressed_fp4: the scale of its values 0..15 (after 3 x 32 bytes)
            flat[u8.stride(0) + 3 * 32 + 4] = 0x7F
    out, lse = _attn(backend, dict(a, extra_kv_cache=xkv))
    rows = _picked(a, "extra_kv_cache", 4)                                     # [b, s_q]
    assert rows.any() and not rows.all()
    assert out[rows].isnan().all() and lse.transpose(1, 2)[rows].isnan().all()
    assert _same(out[~rows], out0[~rows]) and _same(lse.transpose(1, 2)[~rows], lse0.transpose(1, 2)[~rows])

    sink = a["attn_sink"].clone()
    sink[0], sink[2] = float("nan"), float("inf")
    out, lse = _attn(backend, dict(a, attn_sink=sink))
    assert out[:, :, 0].isnan().all() and (out[:, :, 2] == 0).all()
    assert _same(out[:, :, 1], out0[:, :, 1]) and _same(lse, lse0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_attention_no_pick_stays_zero_and_inf_whatever_q_holds(backend) -> None:
    a = attn_inputs("bf16")
    q = a["q"].clone()
    q[0] = float("nan")
    out, lse = _attn(backend, dict(a, q=q, topk_length=torch.tensor([0, 5], dtype=torch.int32),
                                   extra_topk_length=torch.tensor([0, 2], dtype=torch.int32)))
    assert not _bits(out[0]).any() and torch.isposinf(lse[0]).all()


# ---------------------------------------------------------------- indexer_logits_paged / indexer_topk_paged
def indexer_inputs(layout: str, seed: int = 4) -> dict:
    """2 requests of 2 query rows, 3 heads, 64-wide keys in 5 blocks of 4; a block table of 3 columns."""
    g = _gen(seed)
    nb, bs, d = 5, 4, 64
    cache = v4hal.new_paged_cache(nb, bs, layout, dim=d)
    with v4hal.use_backend("reference"):
        v4hal.paged_cache_write(cache, torch.randn(nb * bs, d, generator=g).bfloat16(), torch.arange(nb * bs),
                                layout)
    return dict(q=torch.randn(2, 2, 3, d, generator=g).bfloat16(), kv_cache=cache,
                weights=torch.rand(4, 3, generator=g) + 0.1, context_lens=torch.tensor([12, 7], dtype=torch.int32),
                block_table=torch.tensor([[3, 0, 4], [1, 2, -1]], dtype=torch.int32), layout=layout)


def _logits(backend: str, a: dict, width: int = 14) -> torch.Tensor:
    with v4hal.use_backend(backend):
        return v4hal.indexer_logits_paged(a["q"], a["kv_cache"], a["weights"], a["context_lens"], a["block_table"],
                                          width, layout=a["layout"])


def _topk(backend: str, a: dict, topk: int = 16, offset: int = 3) -> torch.Tensor:
    with v4hal.use_backend(backend):
        return v4hal.indexer_topk_paged(a["q"], a["kv_cache"], a["weights"], a["context_lens"], a["block_table"],
                                        topk, layout=a["layout"], offset=offset)


@pytest.mark.parametrize("layout", ["indexer_fp4", "indexer_fp8"])
@pytest.mark.parametrize("bad", [-1, -2, 5, INT32_MAX, -2**31])
def test_indexer_block_ids_outside_the_cache_have_no_key(backend, layout, bad) -> None:
    """A block id outside ``[0, blocks)`` inside a context: its positions get -inf (no key there), the others
    keep their logits; the top-k ranks them last (and ``paged_slots`` maps them to -1 or a slot outside)."""
    a = indexer_inputs(layout)
    logits0 = _logits(backend, a)
    bt = a["block_table"].clone()
    bt[0, 1] = bad
    bt[1, 2] = bad                                       # past request 1's context: not read either way
    b = dict(a, block_table=bt)
    got = _logits(backend, b)
    want = logits0.clone()
    want[0:2, 4:8] = float("-inf")
    assert _same(got, want)
    limits = ref_indexer.row_limits(a["context_lens"], 2)
    assert torch.equal(_topk(backend, b), ref_indexer.topk_from_logits(want[:, :12], limits, 16, 3))


@pytest.mark.parametrize("lens,same_as", [([INT32_MAX, 7], [[12, 12], [6, 7]]),
                                          ([-2**31, 7], [[0, 0], [6, 7]]),
                                          ([[INT32_MAX, -2], [-2**31, 7]], [[12, 0], [0, 7]])])
def test_indexer_context_lengths_out_of_range(backend, lens, same_as) -> None:
    """A context longer than the block table sees the whole table; a negative one sees nothing; no wrap."""
    a = indexer_inputs("indexer_fp4")
    a["block_table"] = torch.tensor([[3, 0, 4], [1, 2, 0]], dtype=torch.int32)
    got = dict(a, context_lens=torch.tensor(lens, dtype=torch.int32))
    want = dict(a, context_lens=torch.tensor(same_as, dtype=torch.int32))
    assert _same(_logits(backend, got), _logits(backend, want))
    assert torch.equal(_topk(backend, got), _topk(backend, want))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("layout", ["indexer_fp4", "indexer_fp8"])
def test_indexer_nan_rule(backend, layout) -> None:
    """A NaN in a key: NaN logits at its position in every row that sees it (-inf in the rows that do not),
    nothing else changes; the top-k lists NaN positions first, by ascending position. A NaN in a row's
    query or weights: every position that row sees is NaN."""
    a = indexer_inputs(layout)
    logits0 = _logits(backend, a)
    cache = indexer_inputs(layout)["kv_cache"]
    with v4hal.use_backend("reference"):     # checks off: a NaN row gets a NaN scale
        x = torch.randn(2, 64, generator=_gen(5)).bfloat16()
        x[:, 7] = float("nan")
        v4hal.paged_cache_write(cache, x, torch.tensor([3 * 4 + 2, 2 * 4 + 3]), layout)   # slots 14, 11
    b = dict(a, kv_cache=cache)
    got = _logits(backend, b)
    # request 0 reads block 3 at positions 0..3 (slot 14 = position 2); request 1 block 2 at 4..7 (slot 11:
    # position 7, which row 0 of request 1 (limit 6) does not see, row 1 (limit 7) neither)
    nan = torch.zeros_like(got, dtype=torch.bool)
    nan[0:2, 2] = True
    assert torch.equal(got.isnan(), nan)
    assert _same(got.masked_fill(nan, 0), logits0.masked_fill(nan, 0))
    picks = _topk(backend, b)
    assert picks[0, :, 0].tolist() == [2 + 3, 2 + 3]                               # NaN first
    limits = ref_indexer.row_limits(a["context_lens"], 2)
    assert torch.equal(picks, ref_indexer.topk_from_logits(got[:, :12], limits, 16, 3))

    q = a["q"].clone()
    q[1, 0, 2, 9] = float("nan")
    w = a["weights"].clone()
    w[1, 0] = float("nan")
    got = _logits(backend, dict(a, q=q, weights=w))
    vis = ~logits0.isneginf()
    assert got[1][vis[1]].isnan().all() and got[2][vis[2]].isnan().all()
    assert _same(got[[0, 3]], logits0[[0, 3]]) and torch.equal(got.isneginf(), logits0.isneginf())
    picks = _topk(backend, dict(a, q=q, weights=w))
    assert picks[1, 0, :6].tolist() == [3, 4, 5, 6, 7, 8] and (picks[1, 0, 6:] == -1).all()


# ---------------------------------------------------------------- paged_slots
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_paged_slots_without_a_slot_give_minus_one(backend, dtype) -> None:
    """Negative positions, positions past the row, negative block ids and slots past int32 give -1."""
    bt = torch.tensor([[2, -1, -2, 2**30], [0, 1, 5, 3]], dtype=dtype)
    pos = torch.tensor([[0, 5, 4, 9, 13, 16, INT32_MAX, -2],
                        [15, 12, 16, -1, 3, 2**31 - 4, 8, -2**31]], dtype=dtype)
    with v4hal.use_backend(backend):
        got = v4hal.paged_slots(pos, bt, 4)
    want = torch.tensor([[8, -1, -1, -1, -1, -1, -1, -1],
                         [15, 12, -1, -1, 3, -1, 20, -1]], dtype=torch.int32)
    assert got.dtype == torch.int32 and torch.equal(got, want)


# ---------------------------------------------------------------- compressor_ragged (reference only)
def _compressor_call(table: list[list[int]], start_pos: list[int], seed: int = 6):
    """compressor_ragged with ratio 4 (coff 2), D = 8, H = 16, rope dims 4 over a random fp32 state cache of
    4 blocks of 4 rows: request 0 has 6 tokens, request 1 has 5. Returns (outputs, the state cache after)."""
    g = _gen(seed)
    d, h, cd = 8, 16, 16
    x = torch.randn(11, h, generator=g).bfloat16()
    wkv, wgate = torch.randn(cd, h, generator=g) * 0.2, torch.randn(cd, h, generator=g) * 0.2
    ape, norm = torch.randn(4, cd, generator=g), torch.rand(d, generator=g) + 0.5
    ang = torch.arange(16).float().view(-1, 1) * torch.tensor([1.0, 0.1])
    freqs = torch.polar(torch.ones_like(ang), ang)
    state = torch.randn(4, 4, 2 * cd, generator=g)
    with v4hal.use_backend("reference"):
        out = v4hal.compressor_ragged(x, wkv, wgate, ape, norm, freqs, state, torch.tensor(table, dtype=torch.int32),
                                      torch.tensor([0, 6, 11], dtype=torch.int32),
                                      torch.tensor(start_pos, dtype=torch.int32), 4, 1e-6)
    return out, state


def _same_run(a, b) -> None:
    (out_a, state_a), (out_b, state_b) = a, b
    assert all(_same(x, y) for x, y in zip(out_a, out_b))
    assert _same(state_a, state_b)


@pytest.mark.parametrize("table,same_as", [
    ([[-2, 2, 4], [INT32_MAX, 3, -7]], [[0, 2, 0], [0, 3, 0]]),      # ids outside [0, blocks): block 0
    ([[1, 2], [3, 2]], [[1, 2, 0], [3, 2, 0]]),                        # a row shorter than request 0 needs
])
def test_compressor_state_ids_outside_the_cache_mean_not_kept(table, same_as) -> None:
    """With the value checks off a state block id outside ``[0, blocks)``, or a position past its table row,
    counts as block 0 ("not kept"): never written, read as block 0; no IndexError, no wrap-around."""
    _same_run(_compressor_call(table, [6, 0]), _compressor_call(same_as, [6, 0]))


def test_compressor_positions_near_int32_max() -> None:
    """A request at positions just below 2**31 (its table row far too short) runs: nothing of it is written,
    the other request's entries and state rows are those of a run where the first writes nothing either."""
    (entries, req, _), state = _compressor_call([[1, 2, 3], [3, 2, 0]], [INT32_MAX - 6, 0])
    (want_entries, want_req, _), want_state = _compressor_call([[0, 0, 0], [3, 2, 0]], [6, 0])
    assert _same(state, want_state)
    assert torch.isfinite(entries.float()).all() and int((req == 1).sum()) == 1
    assert _same(entries[req == 1], want_entries[want_req == 1])
