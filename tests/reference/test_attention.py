"""Reference attention ops against independent float64 formulas (the oracle of every backend).

Covers sparse_attn, index_scores, indexer_topk and compress_kv of
``v4hal/backends/reference/attention.py``; the float64 formulas below are written with plain
loops on purpose so they share no code path with the vectorized implementation.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import v4hal
from tests.numerics import assert_close, calc_diff, poison_like
from v4hal.backends.reference import attention as ref
from v4hal.hal.errors import RangeError, ShapeError

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# float64 formulas
# ----------------------------------------------------------------------------------------------

def sparse_attn_f64(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor, scale: float,
                    rows: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """out[b, m] = sum_j e_j kv[idx_j] / (sum_j e_j + exp(sink)), one term per listed occurrence."""
    b, m, h, d = q.shape
    out = torch.zeros(b, m, h, d, dtype=torch.float64)
    sink64 = sink.double()
    todo = rows if rows is not None else [(bi, mi) for bi in range(b) for mi in range(m)]
    for bi, mi in todo:
        sel = [j for j in idx[bi, mi].tolist() if j != -1]
        if not sel:
            continue
        keys = kv[bi, sel].double()                          # [k', d], duplicates kept
        for hi in range(h):
            s = (keys @ q[bi, mi, hi].double()) * scale      # [k']
            top = max(float(s.max()), float(sink64[hi]))
            e = torch.exp(s - top)
            denom = e.sum() + math.exp(float(sink64[hi]) - top)
            out[bi, mi, hi] = (e[:, None] * keys).sum(0) / denom
    return out


def index_scores_f64(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    b, s, nh, _ = q.shape
    t = k.shape[1]
    out = torch.zeros(b, s, t, dtype=torch.float64)
    for bi in range(b):
        for si in range(s):
            for ti in range(t):
                dots = q[bi, si].double() @ k[bi, ti].double()          # [H]
                out[bi, si, ti] = (w[bi, si].double() * dots.clamp_min(0)).sum()
    return out


def compress_kv_f64(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, ratio: int,
                    overlap: bool) -> torch.Tensor:
    """Entry i pools block i (channels [d:] when overlapping) and, when overlapping and i > 0,
    channels [:d] of block i-1; the softmax runs per channel over all candidates."""
    b, n, cd = kv.shape
    d = cd // 2 if overlap else cd
    nb = n // ratio
    out = torch.zeros(b, nb, d, dtype=torch.float64)
    kv64, sc64, ape64 = kv.double(), score.double(), ape.double()
    for bi in range(b):
        for i in range(nb):
            vals, logits = [], []
            if overlap and i > 0:
                for j in range(ratio):
                    p = (i - 1) * ratio + j
                    vals.append(kv64[bi, p, :d])
                    logits.append(sc64[bi, p, :d] + ape64[j, :d])
            for j in range(ratio):
                p = i * ratio + j
                lo = d if overlap else 0
                vals.append(kv64[bi, p, lo:lo + d])
                logits.append(sc64[bi, p, lo:lo + d] + ape64[j, lo:lo + d])
            v, lg = torch.stack(vals), torch.stack(logits)              # [cand, d]
            e = torch.exp(lg - lg.max(0).values)
            out[bi, i] = (e * v).sum(0) / e.sum(0)
    return out


# ----------------------------------------------------------------------------------------------
# input builders
# ----------------------------------------------------------------------------------------------

def make_attn_inputs(b: int, m: int, h: int, d: int, n: int, k: int, dtype: torch.dtype, seed: int,
                     minus_one: float = 0.25, empty_rows: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, m, h, d, generator=g).to(dtype)
    kv = torch.randn(b, n, d, generator=g).to(dtype)
    sink = torch.randn(h, generator=g)
    idx = torch.randint(0, n, (b, m, k), generator=g)                  # with replacement: duplicates
    idx[torch.rand(b, m, k, generator=g) < minus_one] = -1
    flat = idx.view(b * m, k)
    for r in torch.randperm(b * m, generator=g)[:empty_rows].tolist():
        flat[r] = -1
    return q, kv, sink, idx.to(torch.int32)


# ----------------------------------------------------------------------------------------------
# sparse_attn
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b,m,h,d,n,k,dtype", [
    (1, 1, 1, 64, 5, 3, torch.float32),       # single row, decode
    (2, 7, 3, 64, 33, 13, torch.float32),     # odd sizes
    (2, 5, 16, 512, 40, 24, torch.bfloat16),
    (1, 9, 16, 64, 20, 64, torch.float16),    # k > n: duplicates guaranteed
    (3, 1, 3, 512, 700, 640, torch.bfloat16),  # m = 1 decode with a model-sized index list
])
def test_sparse_attn_matches_f64(b, m, h, d, n, k, dtype) -> None:
    q, kv, sink, idx = make_attn_inputs(b, m, h, d, n, k, dtype, seed=b * 1000 + m * 10 + h,
                                        empty_rows=1 if b * m > 1 else 0)
    scale = d ** -0.5
    out = ref.sparse_attn(q, kv, sink, idx, scale)
    assert out.shape == q.shape and out.dtype == dtype
    expected = sparse_attn_f64(q, kv, sink, idx, scale)
    assert_close(out, expected, dtype)
    assert calc_diff(out, expected) < (1e-10 if dtype == torch.float32 else 1e-5)


def test_sparse_attn_all_minus_one_rows_are_exact_zeros() -> None:
    q, kv, sink, idx = make_attn_inputs(2, 6, 3, 64, 17, 9, torch.bfloat16, seed=7)
    idx[0, 2] = -1
    idx[1, :] = -1
    for s in (sink, torch.full_like(sink, float("-inf")), torch.full_like(sink, 80.0)):
        out = ref.sparse_attn(q, kv, s, idx, 0.125)
        assert not out.isnan().any()
        assert (out[0, 2] == 0).all() and (out[1] == 0).all()
    # an empty index list (k = 0) is the same as an all -1 row
    out = ref.sparse_attn(q, kv, sink, idx[:, :, :0], 0.125)
    assert out.shape == q.shape and (out == 0).all()


def test_sparse_attn_ignores_unlisted_rows() -> None:
    """kv rows that no index names (row 0 included, which -1 must not alias) may hold NaN."""
    q, kv, sink, idx = make_attn_inputs(2, 5, 3, 64, 16, 7, torch.bfloat16, seed=23, empty_rows=1)
    idx[idx < 4] = -1                                                       # rows 0..3 never listed
    clean = ref.sparse_attn(q, kv, sink, idx, 0.125)
    poisoned = kv.clone()
    poisoned[:, :4] = poison_like(kv[:, :4])
    out = ref.sparse_attn(q, poisoned, sink, idx, 0.125)
    assert not out.isnan().any()
    assert torch.equal(out, clean)
    assert_close(out, sparse_attn_f64(q, kv, sink, idx, 0.125), torch.bfloat16)


def test_sparse_attn_no_sink_is_plain_softmax() -> None:
    q, kv, _, idx = make_attn_inputs(1, 4, 3, 64, 12, 6, torch.float32, seed=3, minus_one=0.0)
    sink = torch.full((3,), float("-inf"))
    out = ref.sparse_attn(q, kv, sink, idx, 0.1)
    keys = kv[0, idx[0].long()]                                            # [m, k, d]
    p = torch.softmax(torch.einsum("mhd,mkd->mhk", q[0].double(), keys.double()) * 0.1, dim=-1)
    assert_close(out[0], torch.einsum("mhk,mkd->mhd", p, keys.double()), torch.float32)


def test_sparse_attn_duplicates_count_per_occurrence() -> None:
    """The public kernel loads every listed index, so [a, a, b] weights key a twice (not a set)."""
    q, kv, sink, _ = make_attn_inputs(1, 1, 2, 64, 4, 1, torch.float32, seed=11)
    twice = torch.tensor([[[0, 0, 1]]], dtype=torch.int32)
    once = torch.tensor([[[0, 1, -1]]], dtype=torch.int32)
    out_twice = ref.sparse_attn(q, kv, sink, twice, 0.125)
    assert_close(out_twice, sparse_attn_f64(q, kv, sink, twice, 0.125), torch.float32)
    # equivalent to listing a once with its score raised by log(2)
    s = (kv[0, :2].double() @ q[0, 0].double().T).T * 0.125                # [h, 2]
    s[:, 0] += math.log(2.0)
    top = torch.maximum(s.max(-1).values, sink.double())
    e = torch.exp(s - top[:, None])
    manual = (e @ kv[0, :2].double()) / (e.sum(-1) + torch.exp(sink.double() - top))[:, None]
    assert_close(out_twice[0, 0], manual, torch.float32)
    assert (ref.sparse_attn(q, kv, sink, once, 0.125) - out_twice).abs().max() > 1e-3


def test_sparse_attn_chunking_is_invisible(monkeypatch: pytest.MonkeyPatch) -> None:
    q, kv, sink, idx = make_attn_inputs(2, 7, 3, 64, 30, 10, torch.float32, seed=5, empty_rows=2)
    whole = ref.sparse_attn(q, kv, sink, idx, 0.125)
    monkeypatch.setattr(ref, "_CHUNK_ELEMS", 3 * 2 * 10 * 64)             # 3 rows per chunk: 3 + 3 + 1
    assert ref._rows_per_chunk(7, 2 * 10 * 64) == 3
    chunked = ref.sparse_attn(q, kv, sink, idx, 0.125)
    assert_close(chunked, whole, torch.float32)
    assert_close(chunked, sparse_attn_f64(q, kv, sink, idx, 0.125), torch.float32)


def test_sparse_attn_model_size_on_cpu() -> None:
    """b=2, m=64, h=16, d=512, k=640 runs chunked (each fp32 intermediate <= 64 MiB); spot-check rows."""
    b, m, h, d, n, k = 2, 64, 16, 512, 1152, 640
    q, kv, sink, idx = make_attn_inputs(b, m, h, d, n, k, torch.bfloat16, seed=17, empty_rows=1)
    assert ref._rows_per_chunk(m, b * k * d) < m
    out = ref.sparse_attn(q, kv, sink, idx, d ** -0.5)
    assert not out.isnan().any()
    rows = [(0, 0), (0, 37), (1, 63), (1, 20)]
    expected = sparse_attn_f64(q, kv, sink, idx, d ** -0.5, rows=rows)
    for bi, mi in rows:
        assert_close(out[bi, mi], expected[bi, mi], torch.bfloat16)


def forbid_host_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every read of tensor data into Python (``.item()``, ``.tolist()``, ``int(t)``...) fail."""
    def forbidden(*_args, **_kwargs):
        raise AssertionError("a reference kernel read tensor data on the host")

    for name in ("item", "tolist", "__int__", "__bool__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)


def test_sparse_attn_reads_no_tensor_data_on_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference kernel leaves the range checks to the op (``V4HAL_CHECK_VALUES``): no host sync,
    and still an all -1 row gives exactly 0 and a -inf sink means "no sink"."""
    q, kv, sink, idx = make_attn_inputs(2, 5, 3, 64, 9, 6, torch.float32, seed=4, empty_rows=2)
    sink[1] = float("-inf")
    expected = sparse_attn_f64(q, kv, sink, idx, 0.125)
    empty = (idx == -1).all(dim=-1)                                         # [b, m]
    forbid_host_reads(monkeypatch)
    out = ref.sparse_attn(q, kv, sink, idx, 0.125)
    monkeypatch.undo()
    assert empty.sum().item() == 2
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert_close(out, expected, torch.float32)


def test_sparse_attn_rejects_bad_values() -> None:
    q, kv, sink, idx = make_attn_inputs(1, 2, 2, 64, 8, 4, torch.float32, seed=1)
    bad = idx.clone()
    bad[0, 0, 0] = 8
    with pytest.raises(RangeError, match="topk_idxs"):
        v4hal.sparse_attn(q, kv, sink, bad, 0.1)
    bad[0, 0, 0] = -2
    with pytest.raises(RangeError, match="topk_idxs"):
        v4hal.sparse_attn(q, kv, sink, bad, 0.1)
    with pytest.raises(RangeError, match="attn_sink"):
        v4hal.sparse_attn(q, kv, torch.tensor([0.0, float("nan")]), idx, 0.1)


# ---- properties (hypothesis) -----------------------------------------------------------------

attn_case = st.fixed_dictionaries({
    "seed": st.integers(0, 2**31 - 1),
    "b": st.integers(1, 2),
    "m": st.integers(1, 4),
    "h": st.sampled_from([1, 3, 16]),
    "d": st.sampled_from([8, 64]),
    "n": st.integers(1, 24),
    "k": st.integers(1, 12),
})


def _case(c: dict):
    return make_attn_inputs(c["b"], c["m"], c["h"], c["d"], c["n"], c["k"], torch.float32, c["seed"],
                            minus_one=0.3)


@settings(max_examples=30, deadline=None)
@given(attn_case)
def test_prop_permuting_indices_keeps_output(c: dict) -> None:
    q, kv, sink, idx = _case(c)
    g = torch.Generator().manual_seed(c["seed"] + 1)
    perm = torch.rand(idx.shape, generator=g).argsort(dim=-1)            # a different permutation per row
    out = ref.sparse_attn(q, kv, sink, idx, c["d"] ** -0.5)
    out_p = ref.sparse_attn(q, kv, sink, idx.gather(-1, perm), c["d"] ** -0.5)
    assert_close(out_p, out, torch.float32)


@settings(max_examples=30, deadline=None)
@given(attn_case, st.integers(1, 9))
def test_prop_adding_minus_one_keeps_output(c: dict, extra: int) -> None:
    q, kv, sink, idx = _case(c)
    g = torch.Generator().manual_seed(c["seed"] + 2)
    padded = torch.cat([idx, torch.full((*idx.shape[:2], extra), -1, dtype=torch.int32)], dim=-1)
    padded = padded.gather(-1, torch.rand(padded.shape, generator=g).argsort(dim=-1))
    out = ref.sparse_attn(q, kv, sink, idx, c["d"] ** -0.5)
    assert_close(ref.sparse_attn(q, kv, sink, padded, c["d"] ** -0.5), out, torch.float32)


@settings(max_examples=30, deadline=None)
@given(attn_case, st.sampled_from([60.0, 1e3, 1e30]))
def test_prop_huge_sink_drives_output_to_zero(c: dict, sink_value: float) -> None:
    q, kv, _, idx = _case(c)
    kv = kv.clamp(-3, 3)
    q = q.clamp(-3, 3)
    # |score| <= 9 * sqrt(d), so every key weighs at most k * exp(9 sqrt(d)/sqrt(d) - sink) = k * exp(9 - sink)
    out = ref.sparse_attn(q, kv, torch.full((c["h"],), sink_value), idx, c["d"] ** -0.5)
    assert not out.isnan().any()
    bound = c["k"] * math.exp(9.0 - sink_value) * 3.0
    assert out.abs().max().item() <= bound + 1e-30


@settings(max_examples=30, deadline=None)
@given(attn_case)
def test_prop_output_is_convex_combination_scaled_by_key_share(c: dict) -> None:
    q, kv, sink, idx = _case(c)
    kv[..., 0] = 1.0                                 # a constant channel reads off the total key weight
    scale = c["d"] ** -0.5
    out = ref.sparse_attn(q, kv, sink, idx, scale).double()
    b, m, h, d = q.shape
    for bi in range(b):
        for mi in range(m):
            sel = [j for j in idx[bi, mi].tolist() if j != -1]
            if not sel:
                assert (out[bi, mi] == 0).all()
                continue
            keys = kv[bi, sel].double()
            s = (keys @ q[bi, mi].double().T).T * scale                      # [h, k']
            top = torch.maximum(s.max(-1).values, sink.double())
            z = torch.exp(s - top[:, None]).sum(-1)
            key_share = z / (z + torch.exp(sink.double() - top))            # 1 - sink share
            assert torch.allclose(out[bi, mi, :, 0], key_share, atol=1e-6, rtol=1e-6)
            lo = keys.min(0).values[None] * key_share[:, None]
            hi = keys.max(0).values[None] * key_share[:, None]
            lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
            assert (out[bi, mi] >= lo - 1e-5).all() and (out[bi, mi] <= hi + 1e-5).all()


# ----------------------------------------------------------------------------------------------
# index_scores
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b,s,nh,dd,t,dtype", [
    (1, 1, 1, 128, 1, torch.float32),
    (2, 5, 3, 32, 7, torch.float32),
    (2, 3, 64, 128, 9, torch.bfloat16),
    (1, 4, 16, 64, 0, torch.float32),          # no compressed entries yet
])
def test_index_scores_matches_f64(b, s, nh, dd, t, dtype) -> None:
    g = torch.Generator().manual_seed(b + s + nh + dd + t)
    q = torch.randn(b, s, nh, dd, generator=g).to(dtype)
    k = torch.randn(b, t, dd, generator=g).to(dtype)
    w = torch.randn(b, s, nh, generator=g).to(dtype)
    out = ref.index_scores(q, k, w)
    assert out.shape == (b, s, t) and out.dtype == torch.float32
    expected = index_scores_f64(q, k, w)
    tol = 1e-5 * max(1.0, float(expected.abs().max())) if t else 1e-5
    assert_close(out, expected, atol=tol, rtol=1e-5)


def test_index_scores_chunking_is_invisible(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, w = (torch.randn(2, 7, 3, 16, generator=g), torch.randn(2, 5, 16, generator=g),
               torch.randn(2, 7, 3, generator=g))
    whole = ref.index_scores(q, k, w)
    monkeypatch.setattr(ref, "_CHUNK_ELEMS", 2 * 2 * 3 * 5)               # 2 query rows per chunk
    assert_close(ref.index_scores(q, k, w), whole, torch.float32)


# ----------------------------------------------------------------------------------------------
# indexer_topk
# ----------------------------------------------------------------------------------------------

def check_topk(out: torch.Tensor, scores64: torch.Tensor, topk: int, start_pos: int, ratio: int,
               offset: int) -> None:
    """Tie-insensitive: right width, valid picks first and distinct, every valid pick scores at least
    as high as every visible entry left out, picks in descending order, masked picks -1."""
    b, s, t = scores64.shape
    width = min(topk, t)
    assert out.dtype == torch.int32 and out.shape == (b, s, width)
    tol = 1e-4 * max(1.0, float(scores64.abs().max())) if scores64.numel() else 0.0
    for bi in range(b):
        for si in range(s):
            visible = min(t, (start_pos + si + 1) // ratio)
            n_pick = min(width, visible)
            row = out[bi, si].tolist()
            assert all(v == -1 for v in row[n_pick:]), row
            picks = [v - offset for v in row[:n_pick]]
            assert len(set(picks)) == n_pick and all(0 <= p < visible for p in picks), (row, visible)
            sc = scores64[bi, si]
            picked = sc[picks] if picks else sc[:0]
            left = sc[[p for p in range(visible) if p not in set(picks)]]
            if picks and left.numel():
                assert picked.min() >= left.max() - tol
            if n_pick > 1:
                assert (picked[1:] <= picked[:-1] + tol).all()
            # exact set when the cut is not a near-tie
            if picks and left.numel():
                ranked = sc[:visible].sort(descending=True).values
                if ranked[n_pick - 1] - ranked[n_pick] > tol:
                    expected = set(sc[:visible].topk(n_pick).indices.tolist())
                    assert set(picks) == expected


@pytest.mark.parametrize("b,s,nh,dd,t,topk,start_pos,ratio,offset", [
    (2, 13, 3, 32, 3, 5, 0, 4, 0),            # prefill, t < topk, early queries see nothing
    (1, 1, 16, 128, 11, 4, 43, 4, 128),       # decode: (43+1)//4 = 11 visible
    (2, 6, 4, 64, 9, 4, 30, 4, 7),            # chunked prefill: visible 7, 8, 8, 8, 8, 9
    (1, 20, 1, 16, 5, 8, 0, 4, 64),           # width = t, many -1
    (1, 4, 2, 8, 4, 2, 0, 1, 3),              # ratio 1
    (2, 9, 64, 128, 40, 16, 100, 4, 128),     # model-like head count, all visible
])
def test_indexer_topk_matches_f64(b, s, nh, dd, t, topk, start_pos, ratio, offset) -> None:
    g = torch.Generator().manual_seed(s * 31 + t)
    q = torch.randn(b, s, nh, dd, generator=g)
    k = torch.randn(b, t, dd, generator=g)
    w = torch.randn(b, s, nh, generator=g)
    out = ref.indexer_topk(q, k, w, topk, start_pos, ratio, offset)
    check_topk(out, index_scores_f64(q, k, w), topk, start_pos, ratio, offset)


def test_indexer_topk_never_picks_future_entries() -> None:
    """Future entries that would score highest are still masked: picks stay in the visible prefix."""
    g = torch.Generator().manual_seed(4)
    b, s, nh, dd, t = 1, 16, 2, 16, 4
    q = torch.randn(b, s, nh, dd, generator=g).abs()
    k = torch.randn(b, t, dd, generator=g).abs()
    k[:, 2:] *= 100.0                                                        # entries 2, 3 dominate
    w = torch.rand(b, s, nh, generator=g) + 0.1
    out = ref.indexer_topk(q, k, w, 3, 0, 4, 10)
    check_topk(out, index_scores_f64(q, k, w), 3, 0, 4, 10)
    assert out[0, 3].tolist() == [10, -1, -1]                              # position 3 sees entry 0 only
    assert out[0, 11].tolist()[0] == 12                                     # entry 2 visible and on top


def test_indexer_topk_empty_and_errors() -> None:
    g = torch.Generator().manual_seed(0)
    q, w = torch.randn(1, 3, 2, 8, generator=g), torch.randn(1, 3, 2, generator=g)
    assert ref.indexer_topk(q, torch.randn(1, 0, 8), w, 4).shape == (1, 3, 0)
    assert ref.indexer_topk(q, torch.randn(1, 5, 8), w, 0).shape == (1, 3, 0)
    for kwargs in ({"topk": -1}, {"topk": 2, "ratio": 0}, {"topk": 2, "start_pos": -1},
                   {"topk": 2, "offset": -3}, {"topk": 2, "offset": 2**31 - 5}):
        with pytest.raises(RangeError):
            v4hal.indexer_topk(q, torch.randn(1, 5, 8), w, **kwargs)


# ----------------------------------------------------------------------------------------------
# compress_kv
# ----------------------------------------------------------------------------------------------

def make_compress_inputs(b: int, n: int, cd: int, ratio: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(b, n, cd, generator=g).to(dtype)
    score = torch.randn(b, n, cd, generator=g) * 2
    ape = torch.randn(ratio, cd, generator=g)
    return kv, score, ape


@pytest.mark.parametrize("b,n,d,ratio,overlap,dtype", [
    (1, 4, 64, 4, True, torch.float32),       # a single entry: block 0 has no previous block
    (2, 12, 32, 4, True, torch.float32),
    (2, 20, 512, 4, True, torch.bfloat16),
    (2, 12, 32, 4, False, torch.float32),
    (1, 6, 16, 3, False, torch.float32),      # odd ratio
    (2, 256, 64, 128, False, torch.bfloat16),  # HCA ratio
    (1, 8, 8, 1, False, torch.float16),       # ratio 1 is the identity
])
def test_compress_kv_matches_f64(b, n, d, ratio, overlap, dtype) -> None:
    cd = 2 * d if overlap else d
    kv, score, ape = make_compress_inputs(b, n, cd, ratio, dtype, seed=n + d + ratio)
    out = ref.compress_kv(kv, score, ape, ratio, overlap)
    assert out.shape == (b, n // ratio, d) and out.dtype == dtype
    expected = compress_kv_f64(kv, score, ape, ratio, overlap)
    assert_close(out, expected, dtype)
    if ratio == 1:
        assert_close(out, kv, dtype)


def test_compress_kv_overlap_dependencies() -> None:
    """Entry i reads channels [:d] of block i-1 and [d:] of block i, nothing else."""
    b, n, d, r = 1, 16, 8, 4
    kv, score, ape = make_compress_inputs(b, n, 2 * d, r, torch.float32, seed=9)
    base = ref.compress_kv(kv, score, ape, r, True)
    # first half of block 1 feeds entry 2 only
    kv2 = kv.clone()
    kv2[:, 4:8, :d] += 1.0
    diff = (ref.compress_kv(kv2, score, ape, r, True) - base).abs().amax(-1)[0]
    assert diff[2] > 1e-3 and diff[[0, 1, 3]].max() == 0
    # second half of block 1 feeds entry 1 only
    kv3 = kv.clone()
    kv3[:, 4:8, d:] += 1.0
    diff = (ref.compress_kv(kv3, score, ape, r, True) - base).abs().amax(-1)[0]
    assert diff[1] > 1e-3 and diff[[0, 2, 3]].max() == 0
    # entry 0 is the plain pool of block 0's second half with ape[:, d:]
    plain = ref.compress_kv(kv[:, :4, d:].contiguous(), score[:, :4, d:].contiguous(),
                            ape[:, d:].contiguous(), r, False)
    assert_close(base[:, :1], plain, torch.float32)


def test_compress_kv_rejects_bad_shapes() -> None:
    kv, score, ape = make_compress_inputs(1, 8, 16, 4, torch.float32, seed=0)
    with pytest.raises(ShapeError, match="multiple of ratio"):
        v4hal.compress_kv(kv[:, :6], score[:, :6], ape, 4, True)
    with pytest.raises(ShapeError, match="ape"):
        v4hal.compress_kv(kv, score, ape[:3], 4, True)
    with pytest.raises(ShapeError, match="score"):
        v4hal.compress_kv(kv, score[:, :4], ape, 4, False)
    with pytest.raises(ShapeError, match="c\\*d"):
        v4hal.compress_kv(kv[..., :15], score[..., :15], ape[:, :15], 4, True)
