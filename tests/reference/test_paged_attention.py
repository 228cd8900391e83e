"""sparse_attn_paged (reference): equal to sparse_attn over the same entries laid out contiguously, bit for
bit, over random block tables, -1 holes, uneven topk_length, an all-invalid row and both caches; lse against
a direct float64 computation; the edge cases and the argument checks."""
from __future__ import annotations

import pytest
import torch

import v4hal
from v4hal import cases
from v4hal.backends.reference import attention as ref_attention
from v4hal.backends.reference.paged import paged_cache_read
from v4hal.backends.reference.paged_attention import effective_indices
from v4hal.hal.errors import DTypeError, RangeError, ShapeError
from v4hal.ops.paged import new_paged_cache

TINY = [s for _, s in cases.tiny_cases("sparse_attn_paged")]
OP = torch.ops.v4hal.sparse_attn_paged


def _ref(*args):
    with v4hal.use_backend("reference"):
        return OP(*args)


def contiguous_equivalent(args: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kv ``[b, n1 + n2, 512]``, topk_idxs ``[b, s, k1 + k2]``, valid): every entry of both caches
    dequantized by paged_cache_read by its layout (the same rows for every batch), and the picks as row numbers
    (-1 for holes and for picks past topk_length)."""
    q, cache, idx, _, _, lengths, extra_cache, extra_idx, extra_lengths, layout = args[:10]
    extra_layout = (args[16] if len(args) > 16 else None) or layout
    b = q.shape[0]
    rows, picks, offset = [], [], 0
    for c, i, n, lay in ((cache, idx, lengths, layout), (extra_cache, extra_idx, extra_lengths, extra_layout)):
        if c is None:
            continue
        slots = c.shape[0] * c.shape[1]
        rows.append(paged_cache_read(c, torch.arange(slots), lay))
        e = effective_indices(i, n)
        picks.append(torch.where(e >= 0, e + offset, -1))
        offset += slots
    kv = torch.cat(rows).unsqueeze(0).expand(b, -1, -1).contiguous()
    topk = torch.cat(picks, dim=-1).to(torch.int32)
    return kv, topk, topk >= 0


@pytest.mark.parametrize("shape", TINY, ids=[cases.describe_shape(s) for s in TINY])
def test_equals_sparse_attn_on_the_same_entries_bit_for_bit(shape):
    args = cases.make_case("sparse_attn_paged", shape, seed=3)
    out, lse = _ref(*args)
    kv, topk, valid = contiguous_equivalent(args)
    assert bool((~valid).any()) or not (shape.get("holes") or shape.get("uneven"))
    expected = ref_attention.sparse_attn(args[0], kv, args[3], topk, args[4])
    assert out.dtype == torch.bfloat16 and out.shape == args[0].shape
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))

    # lse: natural log-sum-exp of the scaled scores of the valid picks, sink excluded; +inf for none
    b, s, h, d = args[0].shape
    rows = kv.double()[torch.arange(b).view(b, 1, 1), topk.long().clamp_min(0)]          # [b, s, k, d]
    z = torch.einsum("bshd,bskd->bhsk", args[0].double(), rows) * args[4]
    z = z.masked_fill(~valid.unsqueeze(1), float("-inf"))
    direct = torch.logsumexp(z, dim=-1)
    none = ~valid.any(-1)                                                                 # [b, s]
    assert lse.dtype == torch.float32 and lse.shape == (b, h, s)
    assert bool(torch.isposinf(lse[none.unsqueeze(1).expand(b, h, s)]).all())
    finite = ~none.unsqueeze(1).expand(b, h, s)
    torch.testing.assert_close(lse[finite].double(), direct[finite], atol=1e-5, rtol=1e-5)

    # FlashMLA's formulation: softmax over the picks, then scaled by exp(lse) / (exp(lse) + exp(sink))
    p = torch.softmax(z, dim=-1).nan_to_num(0.0)
    o = torch.einsum("bhsk,bskd->bshd", p, rows)
    sink = args[3].double().view(1, 1, h, 1)
    o = o / (1 + torch.exp(sink - direct.transpose(1, 2).unsqueeze(-1)))
    o = o.masked_fill(none.view(b, s, 1, 1), 0.0)
    torch.testing.assert_close(out.double(), o, atol=1.6e-2, rtol=1.6e-2)


def test_all_invalid_rows_give_zero_and_plus_inf():
    shape = TINY[2]      # model1_fp8, both caches: query (0, 0) has holes only in both caches
    args = cases.make_case("sparse_attn_paged", shape, seed=3)
    args[2][0, 0] = -1
    args[7][0, 0] = -1
    for sink in (torch.randn(shape["h"]), torch.full((shape["h"],), float("-inf"))):
        args[3] = sink
        out, lse = _ref(*args)
        assert torch.equal(out[0, 0], torch.zeros_like(out[0, 0]))
        assert bool(torch.isposinf(lse[0, :, 0]).all())
        assert bool(torch.isfinite(lse[0, :, 1]).all()) and bool(out[0, 1].abs().amax() > 0)
    # lengths of 0 in both caches: the whole batch picks nothing
    args[5] = torch.tensor([0, 3], dtype=torch.int32)
    args[8] = torch.tensor([0, 3], dtype=torch.int32)
    out, lse = _ref(*args)
    assert not bool(out[0].any()) and bool(torch.isposinf(lse[0]).all()) and bool(torch.isfinite(lse[1]).all())


def test_topk_length_limits_each_batch_to_its_first_picks():
    args = cases.make_case("sparse_attn_paged", TINY[3], seed=5)
    k = args[2].shape[-1]
    full, _ = _ref(*args)
    args[5] = torch.tensor([k], dtype=torch.int32)
    same, _ = _ref(*args)
    assert torch.equal(full, same)
    args[5] = torch.tensor([5], dtype=torch.int32)
    cut, cut_lse = _ref(*args)
    args[5] = None
    args[2] = args[2].clone()
    args[2][..., 5:] = -1
    masked, masked_lse = _ref(*args)
    assert torch.equal(cut, masked) and torch.equal(cut_lse, masked_lse) and not torch.equal(cut, full)


def test_chunked_equals_unchunked(monkeypatch):
    args = cases.make_case("sparse_attn_paged", TINY[3], seed=7)
    whole = _ref(*args)
    monkeypatch.setattr(ref_attention, "_CHUNK_ELEMS", 1)     # one query row per chunk
    chunked = _ref(*args)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_the_block_table_is_followed():
    """An entry moved to another page and its slot updated gives the same result; the old slot then
    points at a different entry and changes it."""
    args = cases.make_case("sparse_attn_paged", TINY[0], seed=2)
    cache, idx = args[1], args[2]
    out, lse = _ref(*args)
    n = cache.shape[0] * cache.shape[1]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    moved = cache.clone()
    moved.view(n, 512)[perm] = cache.view(n, 512)
    args[1], args[2] = moved, torch.where(idx >= 0, perm[idx.long().clamp_min(0)], -1).to(torch.int32)
    out2, lse2 = _ref(*args)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    args[2] = idx
    assert not torch.equal(_ref(*args)[0], out)


# ------------------------------------------------------------------------------------------- checks
def _valid(layout: str = "bf16", extra: bool = True) -> dict:
    q = torch.randn(2, 1, 4, 512).bfloat16()
    cache = new_paged_cache(3, 4, layout)
    kw = dict(topk_length=torch.tensor([2, 3], dtype=torch.int32))
    if extra:
        kw.update(extra_kv_cache=new_paged_cache(2, 4, layout), extra_indices=torch.zeros(2, 1, 5, dtype=torch.int32),
                  extra_topk_length=torch.tensor([5, 0], dtype=torch.int32))
    return dict(q=q, kv_cache=cache, indices=torch.full((2, 1, 3), 11, dtype=torch.int32),
                attn_sink=torch.zeros(4), softmax_scale=0.1, layout=layout, **kw)


def _call(**kw):
    args = dict(kw)
    args.setdefault("return_lse", True)
    return v4hal.sparse_attn_paged(args.pop("q"), args.pop("kv_cache"), args.pop("indices"), args.pop("attn_sink"),
                                   args.pop("softmax_scale"), **args)


BAD = [
    (dict(layout="bogus"), RangeError, r"sparse_attn_paged: layout must be one of"),
    (dict(layout="indexer_fp4"), RangeError,
     r"layout must be one of \['model1_fp8', 'bf16', 'v41_window_fp8', 'v41_compressed_fp4'\]"),
    (dict(extra_layout="indexer_fp4"), RangeError, r"sparse_attn_paged: extra_layout must be one of \['model1_fp8'"),
    (dict(extra_layout="bogus"), RangeError, r"sparse_attn_paged: extra_layout must be one of .*got 'bogus'"),
    (dict(extra_kv_cache=new_paged_cache(2, 4, "v41_compressed_fp4")), DTypeError,
     r"extra_kv_cache must be bfloat16 for layout 'bf16'.*pass extra_layout='v41_compressed_fp4'$"),
    (dict(extra_layout="v41_window_fp8"), DTypeError,
     r"extra_kv_cache must be uint8 or float8_e4m3fn for extra_layout 'v41_window_fp8'"),
    (dict(extra_layout="v41_compressed_fp4", extra_kv_cache=new_paged_cache(2, 4, "v41_window_fp8")), ShapeError,
     r"extra_kv_cache must be \[blocks, block size, 1, W\] with W a width of extra_layout 'v41_compressed_fp4'"
     r".*pass extra_layout='v41_window_fp8'$"),
    (dict(extra_layout="v41_compressed_fp4", extra_kv_cache=new_paged_cache(2, 4, "v41_compressed_fp4", dim=256)),
     ShapeError, r"extra_kv_cache must hold 512-wide entries .* 256-wide entries \(extra_layout 'v41_compressed_fp4'"),
    (dict(layout="v41_window_fp8"), DTypeError,
     r"kv_cache must be uint8 or float8_e4m3fn for layout 'v41_window_fp8'"),
    (dict(layout="model1_fp8"), DTypeError, r"sparse_attn_paged: kv_cache must be uint8 or float8_e4m3fn"),
    (dict(kv_cache=torch.zeros(3, 4, 1, 513, dtype=torch.bfloat16)), ShapeError,
     r"q must be \[b, s, h, 513\], 513 the entry width D of kv_cache"),
    (dict(layout="model1_fp8", kv_cache=torch.zeros(3, 4, 1, 585, dtype=torch.uint8)), ShapeError,
     r"kv_cache must be \[blocks, block size, 1, W\] with W a width of layout 'model1_fp8'.*a W no D gives"),
    (dict(extra_kv_cache=new_paged_cache(2, 4, "bf16", dim=128)), ShapeError,
     r"extra_kv_cache must hold 512-wide entries like kv_cache .* holding 128-wide entries"),
    (dict(kv_cache=torch.zeros(3, 8, 1, 512, dtype=torch.bfloat16)[:, :4]), ShapeError, r"kv_cache strides"),
    (dict(extra_kv_cache=torch.zeros(2, 4, 1, 512)), DTypeError, r"extra_kv_cache must be bfloat16"),
    (dict(indices=torch.full((2, 1, 3), 12, dtype=torch.int32)), RangeError, r"indices values must be in \[-1, 12\)"),
    (dict(indices=torch.full((2, 1, 3), -2, dtype=torch.int32)), RangeError, r"indices values"),
    (dict(extra_indices=torch.full((2, 1, 5), 8, dtype=torch.int32)), RangeError,
     r"extra_indices values must be in \[-1, 8\)"),
    (dict(indices=torch.zeros(2, 2, 3, dtype=torch.int32)), ShapeError, r"indices must be \[b, s, k\]"),
    (dict(indices=torch.zeros(2, 1, 3, dtype=torch.int64)), DTypeError, r"indices must be int32"),
    (dict(topk_length=torch.tensor([4, 0], dtype=torch.int32)), RangeError, r"topk_length values must be in \[0, 4\)"),
    (dict(topk_length=torch.tensor([-1, 0], dtype=torch.int32)), RangeError, r"topk_length values"),
    (dict(topk_length=torch.tensor([1], dtype=torch.int32)), ShapeError, r"topk_length must be \[b\]"),
    (dict(extra_topk_length=torch.tensor([6, 0], dtype=torch.int32)), RangeError, r"extra_topk_length values"),
    (dict(extra_kv_cache=None), ShapeError, r"extra_kv_cache and extra_indices come together: extra_indices"),
    (dict(extra_indices=None), ShapeError, r"come together: extra_kv_cache was given without extra_indices"),
    (dict(extra_kv_cache=None, extra_indices=None), ShapeError, r"extra_topk_length needs extra_kv_cache"),
    (dict(q=torch.randn(2, 1, 4, 512)), DTypeError, r"q must be bfloat16"),
    (dict(q=torch.randn(2, 1, 4, 256).bfloat16()), ShapeError, r"q must be \[b, s, h, 512\]"),
    (dict(attn_sink=torch.zeros(3)), ShapeError, r"attn_sink must be \[h\]"),
    (dict(attn_sink=torch.tensor([0.0, float("nan"), 0.0, 0.0])), RangeError, r"attn_sink must be finite or -inf"),
    (dict(softmax_scale=float("inf")), RangeError, r"softmax_scale must be in"),
    (dict(block_table=torch.zeros(2, 3, dtype=torch.int32)), ShapeError,
     r"give the window either by slot \(indices\) or as a band .*got both"),
    (dict(indices=None), ShapeError, r"give the window either by slot .*got neither"),
    (dict(indices=None, topk_length=None, block_table=torch.zeros(2, 3, dtype=torch.int32), window_size=4),
     ShapeError, r"block_table needs positions"),
    (dict(indices=None, topk_length=None, block_table=torch.zeros(2, 3, dtype=torch.int32),
          positions=torch.zeros(2, 1, dtype=torch.int32)), RangeError, r"window_size must be in \[1, "),
    (dict(indices=None, block_table=torch.zeros(2, 3, dtype=torch.int32), window_size=4,
          positions=torch.zeros(2, 1, dtype=torch.int32)), ShapeError, r"a band window \(block_table\) takes none"),
    (dict(indices=None, topk_length=None, block_table=torch.zeros(2, 3, dtype=torch.int64), window_size=4,
          positions=torch.zeros(2, 1, dtype=torch.int32)), DTypeError, r"block_table must be int32"),
    (dict(indices=None, topk_length=None, block_table=torch.zeros(3, 3, dtype=torch.int32), window_size=4,
          positions=torch.zeros(2, 1, dtype=torch.int32)), ShapeError, r"block_table must be \[b, pages\]"),
    (dict(indices=None, topk_length=None, block_table=torch.full((2, 3), 3, dtype=torch.int32), window_size=4,
          positions=torch.zeros(2, 1, dtype=torch.int32)), RangeError, r"block_table values must be in \[-1, 3\)"),
    (dict(indices=None, topk_length=None, block_table=torch.zeros(2, 3, dtype=torch.int32), window_size=4,
          positions=torch.full((2, 1), -1, dtype=torch.int32)), RangeError, r"positions values must be in \[0, "),
    (dict(indices=None, topk_length=None, block_table=torch.zeros(2, 3, dtype=torch.int32), window_size=4,
          positions=torch.zeros(2, 2, dtype=torch.int32)), ShapeError, r"positions must be \[b, s\]"),
    (dict(window_size=4), RangeError, r"window_size is the band width and needs block_table"),
    (dict(extra_ratio=4), RangeError, r"extra_ratio is the visibility ratio .* needs extra_block_table"),
    (dict(positions=torch.zeros(2, 1, dtype=torch.int32)), ShapeError, r"positions is read only with block_table"),
    (dict(extra_block_table=torch.zeros(2, 2, dtype=torch.int32), extra_ratio=4), ShapeError,
     r"extra_block_table needs positions"),
    (dict(extra_block_table=torch.zeros(2, 2, dtype=torch.int32), positions=torch.zeros(2, 1, dtype=torch.int32)),
     RangeError, r"extra_ratio must be in \[1, "),
    (dict(extra_block_table=torch.zeros(2, 1, dtype=torch.int32), extra_ratio=4,
          positions=torch.zeros(2, 1, dtype=torch.int32), extra_indices=torch.full((2, 1, 5), 4, dtype=torch.int32)),
     RangeError, r"extra_indices values must be in \[-1, 4\)"),
]


@pytest.mark.parametrize("change,error,pattern", BAD, ids=[p for _, _, p in BAD])
def test_bad_arguments_name_the_argument(change, error, pattern):
    kw = _valid()
    kw.update(change)
    if kw.get("layout") == "model1_fp8" and "kv_cache" not in change:
        kw["extra_kv_cache"] = new_paged_cache(2, 4, "model1_fp8")
    with pytest.raises(error, match=pattern):
        _call(**kw)


def test_valid_call_and_model1_layout_pass_the_checks():
    out, lse = _call(**_valid())
    assert out.shape == (2, 1, 4, 512) and lse.shape == (2, 4, 1)
    alone = _call(**_valid(), return_lse=False)
    assert isinstance(alone, torch.Tensor) and torch.equal(alone, out)
    kw = _valid("model1_fp8")
    out, lse = _call(**kw)
    assert not bool(out.any())       # zeroed caches: every entry is 0, so the output is 0


# ------------------------------------------------------------- the two ways of giving the picks
def _two_forms(layout: str, seed: int) -> tuple[dict, dict]:
    """One call in the position form (band window over per-row pages, compressed picks as entry indices with
    ratio 4, some not yet visible) and the same call in the slot form, built independently (a loop over
    positions, not :func:`resolve_slots`). ``layout``: both caches' layout, or ``"window+extra"``."""
    g = torch.Generator().manual_seed(seed)
    layout, _, extra_layout = layout.partition("+")
    extra_layout = extra_layout or layout
    b, s, h, bs, window, ratio = 3, 2, 4, 4, 5, 4
    pages = 6
    cache = new_paged_cache(b * pages, bs, layout)
    xcache = new_paged_cache(b * 2, bs, extra_layout)
    rand = torch.randn(b * pages * bs, 512, generator=g).bfloat16()
    v4hal.paged_cache_write(cache, rand, torch.arange(b * pages * bs, dtype=torch.int32), layout)
    xrand = torch.randn(b * 2 * bs, 512, generator=g).bfloat16()
    v4hal.paged_cache_write(xcache, xrand, torch.arange(b * 2 * bs, dtype=torch.int32), extra_layout)
    table = torch.randperm(b * pages, generator=g).to(torch.int32).view(b, pages)
    xtable = torch.randperm(b * 2, generator=g).to(torch.int32).view(b, 2)
    positions = torch.tensor([[0, 1], [6, 7], [17, 18]], dtype=torch.int32)
    k = 6
    ent = torch.randint(-1, 6, (b, s, k), generator=g, dtype=torch.int32)
    slots = torch.full((b, s, window), -1, dtype=torch.int32)
    xslots = torch.full((b, s, k), -1, dtype=torch.int32)
    for i in range(b):
        for j in range(s):
            p = int(positions[i, j])
            first = max(0, p - window + 1)
            for n, t in enumerate(range(first, p + 1)):
                slots[i, j, n] = int(table[i, t // bs]) * bs + t % bs
            for n in range(k):
                c = int(ent[i, j, n])
                if 0 <= c < (p + 1) // ratio:
                    xslots[i, j, n] = int(xtable[i, c // bs]) * bs + c % bs
    common = dict(q=torch.randn(b, s, h, 512, generator=g).bfloat16(), kv_cache=cache,
                  attn_sink=torch.randn(h, generator=g), softmax_scale=512 ** -0.5, extra_kv_cache=xcache,
                  layout=layout, extra_layout=extra_layout, return_lse=True)
    band = dict(common, indices=None, positions=positions, block_table=table, window_size=window,
                extra_indices=ent, extra_block_table=xtable, extra_ratio=ratio)
    by_slot = dict(common, indices=slots, extra_indices=xslots)
    return band, by_slot


V41 = "v41_window_fp8+v41_compressed_fp4"


@pytest.mark.parametrize("layout", ["bf16", "model1_fp8", V41, "v41_window_fp8", "model1_fp8+v41_compressed_fp4"])
def test_band_window_and_entry_indices_equal_the_slot_form_bit_for_bit(layout):
    band, by_slot = _two_forms(layout, seed=21)
    out_b, lse_b = _call(**band)
    out_s, lse_s = _call(**by_slot)
    assert torch.equal(out_b, out_s) and torch.equal(lse_b, lse_s)
    assert bool((out_b != 0).any())


def _as_bf16(cache: torch.Tensor, layout: str) -> torch.Tensor:
    """A bf16 cache of the same blocks and block size holding ``cache``'s entries decoded (paged_cache_read)."""
    nb, bs = cache.shape[0], cache.shape[1]
    out = new_paged_cache(nb, bs, "bf16", dim=512)
    out.view(nb * bs, 512).copy_(paged_cache_read(cache, torch.arange(nb * bs), layout))
    return out


@pytest.mark.parametrize("layout", [V41, "v41_window_fp8", "v41_compressed_fp4", "bf16+v41_compressed_fp4"])
@pytest.mark.parametrize("form", ["band", "slot"])
def test_v41_caches_equal_bf16_caches_of_their_decoded_entries_bit_for_bit(layout, form):
    """Each cache decoded by its own layout, then the float64 math: the same out and lse, bit for bit, as the
    call over bf16 caches holding the decoded entries."""
    call = _two_forms(layout, seed=5)[form == "slot"]
    got = _call(**call)
    plain = dict(call, kv_cache=_as_bf16(call["kv_cache"], call["layout"]),
                 extra_kv_cache=_as_bf16(call["extra_kv_cache"], call["extra_layout"]), layout="bf16",
                 extra_layout=None)
    want = _call(**plain)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert bool((got[0] != 0).any())
    # the extra cache read by the window's layout instead is another call (or no call at all)
    if call["layout"] != call["extra_layout"] and call["layout"] != "bf16":
        with pytest.raises((ShapeError, DTypeError)):
            _call(**dict(call, extra_layout=None))


@pytest.mark.parametrize("layout", ["bf16", "model1_fp8"])
def test_extra_layout_defaults_to_layout(layout):
    """extra_layout None and extra_layout = layout are the same call (every V4 call is unchanged)."""
    band, by_slot = _two_forms(layout, seed=9)
    for call in (band, by_slot):
        a = _call(**dict(call, extra_layout=None))
        b = _call(**dict(call, extra_layout=layout))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
