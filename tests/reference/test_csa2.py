"""csa2_compressor_ragged on the reference backend against an independent oracle written from V4.1's
compressor facts (HF ``DeepseekV41Compressor`` on its cache path): per-channel two-token softmax pooling of
fp32 projections at ratio 2, per-token ``norm(wkv(x))`` at ratio 1, RMSNorm normalized in fp32 and rounded
before the weight, interleaved rope on the last dims at position ``g * ratio``. Then: the whole prompt
against any chunking bit for bit (partial groups wait in the state pages), ragged batches of several
requests, the state layout, and bad input.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from v4hal.hal.errors import DTypeError, RangeError, ShapeError
from v4hal.ops.csa2 import csa2_compressor_ragged

H, D, RD, EPS = 48, 32, 8, 1e-6


def _freqs(n: int, rd: int = RD, theta: float = 160000.0) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
    return torch.polar(torch.ones(n, rd // 2), torch.outer(torch.arange(n, dtype=torch.float32), inv))


def _weights(ratio: int, seed: int, wdtype: torch.dtype = torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    wkv = (torch.randn(D, H, generator=g) * H ** -0.5).to(wdtype)
    wgate = (torch.randn(D, H, generator=g) * H ** -0.5 * 3).to(wdtype) if ratio == 2 else None
    norm = (torch.rand(D, generator=g) + 0.5).to(torch.bfloat16)
    return wkv, wgate, norm


def oracle(x: torch.Tensor, wkv: torch.Tensor, wgate: torch.Tensor | None, norm: torch.Tensor,
           freqs: torch.Tensor, ratio: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent oracle of one request's whole prompt ``x [L, H]``: ``(entries, latent) [L // ratio, D]``,
    written element by element from the V4.1 facts (fp64 where the facts say fp32, rounded at the same
    points: the pooled entry to x's dtype, the normalized entry to x's dtype, the weighted entry to x's
    dtype, the rotated pair to x's dtype)."""
    xd = x.double()
    kv = xd @ wkv.double().t()
    gate = xd @ wgate.double().t() if wgate is not None else None
    n = x.shape[0] // ratio
    lat = torch.zeros(n, D, dtype=x.dtype)
    ent = torch.zeros(n, D, dtype=x.dtype)
    half = RD // 2
    for g in range(n):
        pooled = [0.0] * D
        for c in range(D):
            if ratio == 1:
                pooled[c] = float(kv[g, c])
            else:
                a, b = float(gate[2 * g, c]), float(gate[2 * g + 1, c])
                m = max(a, b)
                ea, eb = math.exp(a - m), math.exp(b - m)
                pooled[c] = (float(kv[2 * g, c]) * ea + float(kv[2 * g + 1, c]) * eb) / (ea + eb)
        p = torch.tensor(pooled, dtype=torch.float64).to(x.dtype).double()
        ms = sum(float(v) ** 2 for v in p) / D
        y = (p / math.sqrt(ms + eps)).to(x.dtype).double()
        lat[g] = (norm.double() * y).to(x.dtype)
        ent[g] = lat[g]
        f = freqs[g * ratio]
        for i in range(half):
            c0 = D - RD + 2 * i
            re, im = float(lat[g, c0]), float(lat[g, c0 + 1])
            co, si = float(f[i].real), float(f[i].imag)
            ent[g, c0] = re * co - im * si
            ent[g, c0 + 1] = re * si + im * co
    return ent, lat


class Runner:
    """Feeds requests' tokens to the op in calls, each with its own state blocks (blk rows)."""

    def __init__(self, ratio: int, lens: list[int], blk: int = 4, seed: int = 0, dtype=torch.float32):
        self.ratio, self.lens, self.blk = ratio, lens, blk
        self.wkv, self.wgate, self.norm = _weights(ratio, seed)
        g = torch.Generator().manual_seed(seed + 1)
        self.x = [torch.randn(n, H, generator=g).to(dtype) for n in lens]
        cols = max(1, max(-(-n // blk) for n in lens))
        self.table = torch.zeros(len(lens), cols, dtype=torch.int32)
        nxt = 1
        for i in range(len(lens)):
            for c in range(cols):
                self.table[i, c] = nxt
                nxt += 1
        self.state = torch.full((nxt, blk, 2 * D), float("nan"))
        self.freqs = _freqs(max(lens) + 1)
        self.done = [0] * len(lens)
        self.out: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def call(self, counts: list[int]) -> None:
        """One op call: ``counts[i]`` more tokens of request i (0: absent from the call)."""
        ids = [i for i, c in enumerate(counts) if c > 0]
        if not ids:
            return
        xs = [self.x[i][self.done[i]:self.done[i] + counts[i]] for i in ids]
        cu = torch.tensor([0] + [sum(counts[i] for i in ids[:k + 1]) for k in range(len(ids))], dtype=torch.int32)
        sp = torch.tensor([self.done[i] for i in ids], dtype=torch.int32)
        ent, lat, rq, ps = csa2_compressor_ragged(torch.cat(xs), self.wkv, self.wgate, self.norm, self.freqs,
                                                  self.state, self.table[ids], cu, sp, self.ratio, EPS)
        for k in range(ent.shape[0]):
            if int(rq[k]) >= 0:
                key = (ids[int(rq[k])], int(ps[k]))
                assert key not in self.out
                self.out[key] = (ent[k], lat[k])
        for i in ids:
            self.done[i] += counts[i]

    def stacked(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.lens[i] // self.ratio
        assert sorted(p for r, p in self.out if r == i) == list(range(n))
        if n == 0:
            empty = torch.zeros(0, D, dtype=self.x[i].dtype)
            return empty, empty
        return (torch.stack([self.out[(i, g)][0] for g in range(n)]),
                torch.stack([self.out[(i, g)][1] for g in range(n)]))


@pytest.mark.parametrize("ratio", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_prompt_matches_oracle(ratio, dtype):
    r = Runner(ratio, [9, 6, 1], dtype=dtype)
    r.call(r.lens)
    for i in range(3):
        ent, lat = r.stacked(i)
        want_e, want_l = oracle(r.x[i], r.wkv, r.wgate, r.norm, r.freqs, ratio, EPS)
        if dtype == torch.bfloat16:
            # the oracle's fp64 intermediates round to the same bf16 values (bit for bit at these seeds)
            assert torch.equal(lat.view(torch.int16), want_l.view(torch.int16))
            assert torch.equal(ent.view(torch.int16), want_e.view(torch.int16))
        else:
            torch.testing.assert_close(lat, want_l, atol=2e-6, rtol=2e-6)
            torch.testing.assert_close(ent, want_e, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("ratio", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_chunking_is_bit_exact(ratio, seed):
    lens = [11, 7, 5, 8]
    whole = Runner(ratio, lens, seed=seed, dtype=torch.bfloat16)
    whole.call(lens)
    chunked = Runner(ratio, lens, seed=seed, dtype=torch.bfloat16)
    rng = random.Random(seed)
    while chunked.done != lens:
        counts = [0 if rng.random() < 0.3 else rng.randint(1, 3) for _ in lens]
        chunked.call([min(c, n - d) for c, n, d in zip(counts, lens, chunked.done)])
    for i in range(len(lens)):
        for a, b in zip(whole.stacked(i), chunked.stacked(i)):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_decode_one_token_at_a_time_reads_the_partial_group():
    """Ratio 2, one token per call: the odd call completes the group from the state row of the even one."""
    lens = [6, 5]
    r = Runner(2, lens)
    for _ in range(6):
        r.call([1 if d < n else 0 for d, n in zip(r.done, lens)])
    for i in range(2):
        want_e, want_l = oracle(r.x[i], r.wkv, r.wgate, r.norm, r.freqs, 2, EPS)
        ent, lat = r.stacked(i)
        torch.testing.assert_close(ent, want_e, atol=2e-5, rtol=2e-5)


def test_state_rows_hold_kv_then_gate_logits():
    r = Runner(2, [3])
    r.call([3])
    x = r.x[0]
    for p in range(3):
        row = r.state[int(r.table[0, p // r.blk]), p % r.blk]
        torch.testing.assert_close(row[:D], x[p] @ r.wkv.float().t(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(row[D:], x[p] @ r.wgate.float().t(), atol=1e-5, rtol=1e-5)


def test_ratio_one_leaves_the_state_alone():
    r = Runner(1, [4, 3])
    before = r.state.clone()
    r.call([4, 3])
    assert torch.equal(before.isnan(), r.state.isnan())
    assert len(r.out) == 7


def test_output_rows_past_the_entries_are_zero_and_minus_one():
    r = Runner(2, [3, 3])
    x = torch.cat(r.x)
    ent, lat, rq, ps = csa2_compressor_ragged(x, r.wkv, r.wgate, r.norm, r.freqs, r.state, r.table,
                                              torch.tensor([0, 3, 6], dtype=torch.int32),
                                              torch.tensor([0, 0], dtype=torch.int32), 2, EPS)
    assert ent.shape == (5, D) and rq.tolist() == [0, 1, -1, -1, -1] and ps.tolist() == [0, 0, -1, -1, -1]
    assert not ent[2:].any() and not lat[2:].any()


def _args(ratio: int = 2):
    wkv, wgate, norm = _weights(ratio, 0)
    return [torch.randn(4, H), wkv, wgate, norm, _freqs(8), torch.zeros(3, 4, 2 * D),
            torch.tensor([[1, 2]], dtype=torch.int32), torch.tensor([0, 4], dtype=torch.int32),
            torch.tensor([0], dtype=torch.int32), ratio, EPS]


@pytest.mark.parametrize("edit, err, words", [
    (lambda a: a.__setitem__(9, 4), RangeError, "ratio"),
    (lambda a: a.__setitem__(2, None), ShapeError, "wgate"),
    (lambda a: a.__setitem__(1, a[1][:, :5]), ShapeError, "wkv"),
    (lambda a: a.__setitem__(5, torch.zeros(3, 4, D)), ShapeError, "state_cache"),
    (lambda a: a.__setitem__(0, a[0].to(torch.int32)), DTypeError, "x"),
    (lambda a: a.__setitem__(4, _freqs(2)), RangeError, "freqs_cis"),
    (lambda a: a.__setitem__(6, torch.tensor([[1, 9]], dtype=torch.int32)), RangeError, "state_block_table"),
])
def test_bad_input_names_the_argument(edit, err, words):
    a = _args()
    edit(a)
    with pytest.raises(err, match=words):
        csa2_compressor_ragged(*a)


def test_ratio_one_refuses_a_gate():
    a = _args(1)
    a[2] = torch.zeros(D, H, dtype=torch.bfloat16)
    with pytest.raises(ShapeError, match="wgate must be None"):
        csa2_compressor_ragged(*a)


def test_partial_group_read_from_block_zero_is_refused():
    """Ratio 2, a call starting at an odd position reads the state row of the even one: block 0 there is
    refused (it is never written)."""
    a = _args()
    a[0], a[7], a[8] = torch.randn(3, H), torch.tensor([0, 3], dtype=torch.int32), torch.tensor([1], dtype=torch.int32)
    a[6] = torch.tensor([[0, 2]], dtype=torch.int32)
    with pytest.raises(RangeError, match="block 0"):
        csa2_compressor_ragged(*a)
