"""compressor_ragged on the reference backend: the entries of V4's compressor bit for bit (``compress_kv``
over the whole sequence, then norm and rope), whatever the chunking of the requests' tokens, with several
requests at different positions in one call; the state cache layout; and bad input.

Projections: a CPU GEMM may round a row differently when only a few rows share the call. The op projects in
fixed tiles (a row's bits never depend on the batch), and so does the model's fp32 ``Linear``: both agree
bit for bit (checked).
"""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass

import pytest
import torch

import v4hal
from v4hal.backends.reference import ragged_compress as ref
from v4hal.hal.errors import DTypeError, RangeError, ShapeError
from v4hal.model.attention import Compressor
from v4hal.model.config import ModelConfig
from v4hal.ops.ragged_compress import coff_of, max_entries

H, RD, EPS = 64, 16, 1e-6


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _freqs(n: int, rd: int = RD) -> torch.Tensor:
    inv = 1.0 / (10000.0 ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
    return torch.polar(torch.ones(n, rd // 2), torch.outer(torch.arange(n, dtype=torch.float32), inv))


@dataclass
class Weights:
    ratio: int
    d: int
    wkv: torch.Tensor
    wgate: torch.Tensor
    ape: torch.Tensor
    norm: torch.Tensor

    @property
    def cd(self) -> int:
        return coff_of(self.ratio) * self.d


def _weights(ratio: int, d: int, seed: int) -> Weights:
    g = torch.Generator().manual_seed(seed)
    cd = coff_of(ratio) * d
    return Weights(ratio, d, torch.randn(cd, H, generator=g) * 0.2, torch.randn(cd, H, generator=g) * 0.5,
                   torch.randn(ratio, cd, generator=g), torch.rand(d, generator=g) + 0.5)


def _model_compressor(w: Weights) -> Compressor:
    cfg = ModelConfig.preset("v4-mini")
    cfg.dim, cfg.rope_head_dim, cfg.norm_eps = H, RD, EPS
    comp = Compressor(cfg, w.ratio, w.d, rotate=False)
    comp.wkv.weight, comp.wgate.weight = w.wkv.clone(), w.wgate.clone()
    comp.ape, comp.norm.weight = w.ape.clone(), w.norm.clone()
    return comp


def _pooled_whole(w: Weights, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """compress_kv over a whole sequence, then RMSNorm and rope (the model's prefill, written out)."""
    n = x.shape[0] // w.ratio * w.ratio
    kv, score = ref.project(x[:n], w.wkv, w.wgate)
    pooled = v4hal.compress_kv(kv.unsqueeze(0), score.unsqueeze(0), w.ape, w.ratio, w.ratio == 4)[0]
    normed = v4hal.rms_norm(pooled.to(torch.bfloat16), w.norm, EPS)
    tail = v4hal.rotary_emb(normed[None, :, -RD:], freqs[0:n:w.ratio])[0]
    return torch.cat([normed[:, :-RD], tail], dim=-1)


class Runner:
    """Drives compressor_ragged over requests fed in chunks, keeping the state cache and block table.

    ``sparse``: only the blocks whose rows a later call reads get an id (others stay 0, never written),
    as a serving runtime with a sliding state window allocates them; else every block gets one."""

    def __init__(self, w: Weights, xs: list[torch.Tensor], blk: int, sparse: bool, freqs: torch.Tensor,
                 padded: bool = False) -> None:
        self.w, self.xs, self.blk, self.sparse, self.freqs = w, xs, blk, sparse, freqs
        cols = max(-(-x.shape[0] // blk) for x in xs)
        self.table = torch.zeros(len(xs), cols, dtype=torch.int32)
        self.next_id = 1
        blocks = len(xs) * cols + 1
        width = 2 * w.cd
        store = torch.full((blocks, blk + (3 if padded else 0), width), float("nan"))
        self.state = store[:, :blk]                    # padded pages: stride(0) > blk * width when padded
        self.done = [0] * len(xs)
        self.entries: list[list[tuple[int, torch.Tensor]]] = [[] for _ in xs]

    def _alloc(self, i: int, lo: int, hi: int) -> None:
        for c in range(lo // self.blk, -(-hi // self.blk)) if hi > lo else ():
            if self.table[i, c] == 0:
                self.table[i, c] = self.next_id
                self.next_id += 1

    def call(self, chunks: dict[int, int]) -> None:
        """One call: request i gets its next ``chunks[i]`` tokens (0 allowed)."""
        r, coff = self.w.ratio, coff_of(self.w.ratio)
        order = sorted(chunks)
        xs, cu, sp = [], [0], []
        for i in order:
            s, n = self.done[i], chunks[i]
            xs.append(self.xs[i][s:s + n])
            cu.append(cu[-1] + n)
            sp.append(s)
            end = s + n
            keep_lo = max(0, (end // r - (coff - 1)) * r)
            self._alloc(i, 0 if not self.sparse else keep_lo, end)
        idx = torch.tensor(order)
        x = torch.cat(xs) if xs else torch.zeros(0, H, dtype=torch.bfloat16)
        out, req, pos = v4hal.compressor_ragged(
            x, self.w.wkv, self.w.wgate, self.w.ape, self.w.norm, self.freqs, self.state, self.table[idx],
            torch.tensor(cu, dtype=torch.int32), torch.tensor(sp, dtype=torch.int32), r, EPS)
        n_rows = max_entries(x.shape[0], r, len(order))
        assert out.shape == (n_rows, self.w.d) and req.shape == pos.shape == (n_rows,)
        used = int((req >= 0).sum())
        assert bool((req[:used] >= 0).all()) and bool((req[used:] == -1).all()) and bool((pos[used:] == -1).all())
        assert not out[used:].any()
        # request order then entry order, and exactly the entries completed by this call
        expect = [(k, j) for k, i in enumerate(order)
                  for j in range(self.done[i] // r, (self.done[i] + chunks[i]) // r)]
        assert list(zip(req[:used].tolist(), pos[:used].tolist())) == expect
        for row, (k, j) in enumerate(expect):
            self.entries[order[k]].append((j, out[row]))
        for i in order:
            self.done[i] += chunks[i]

    def result(self, i: int) -> torch.Tensor:
        js = [j for j, _ in self.entries[i]]
        assert js == list(range(len(js)))
        return torch.stack([e for _, e in self.entries[i]]) if js else torch.zeros(0, self.w.d, dtype=torch.bfloat16)


def _random_run(runner: Runner, rng: random.Random, max_chunk: int) -> None:
    lens = [x.shape[0] for x in runner.xs]
    while any(d < n for d, n in zip(runner.done, lens)):
        live = [i for i in range(len(lens)) if runner.done[i] < lens[i]]
        picked = rng.sample(live, rng.randint(1, len(live)))
        chunks = {}
        for i in picked:
            left = lens[i] - runner.done[i]
            chunks[i] = min(left, rng.choice([1, 1, rng.randint(1, max_chunk)]))
        if rng.random() < 0.3:   # a request with no token in this call
            idle = [i for i in range(len(lens)) if i not in chunks]
            if idle:
                chunks[rng.choice(idle)] = 0
        runner.call(chunks)


CONFIGS = [  # (ratio, D, request lengths, state block size)
    pytest.param(4, 32, [23, 9, 17, 3], 4, id="r4-D32"),
    pytest.param(4, 128, [13, 21, 6], 16, id="r4-D128"),
    pytest.param(128, 32, [300, 131, 127], 64, id="r128-D32"),
]


@pytest.mark.parametrize("ratio,d,lens,blk", CONFIGS)
@pytest.mark.parametrize("sparse", [False, True], ids=["all-blocks", "sparse-blocks"])
def test_random_chunks_equal_the_whole_sequence_bit_for_bit(ratio, d, lens, blk, sparse) -> None:
    w = _weights(ratio, d, seed=ratio + d)
    g = torch.Generator().manual_seed(7)
    xs = [(torch.randn(n, H, generator=g) * 2).to(torch.bfloat16) for n in lens]
    freqs = _freqs(max(lens) + 1)
    rng = random.Random(ratio * 1000 + d + sparse)
    runner = Runner(w, xs, blk, sparse, freqs, padded=sparse)
    _random_run(runner, rng, max_chunk=3 * ratio if ratio == 4 else 150)
    # the model's projections of all tokens at once (as fused projections give them)
    x_all = torch.cat(xs)
    comp = _model_compressor(w)
    kv_all, score_all = comp.wkv(x_all.float()), comp.wgate(x_all.float())
    kv_op, score_op = ref.project(x_all, w.wkv, w.wgate)
    assert torch.equal(kv_all, kv_op) and torch.equal(score_all, score_op)
    for i, x in enumerate(xs):
        got = runner.result(i)
        assert got.shape[0] == x.shape[0] // ratio
        assert torch.equal(_bits(got), _bits(_pooled_whole(w, x, freqs))), f"request {i}: whole sequence"


def test_projection_bits_do_not_depend_on_the_batch() -> None:
    w = _weights(4, 32, seed=1)
    x = (torch.randn(40, H, generator=torch.Generator().manual_seed(2))).to(torch.bfloat16)
    kv, score = ref.project(x, w.wkv, w.wgate)
    for lo, hi in ((0, 1), (3, 5), (17, 40)):
        k2, s2 = ref.project(x[lo:hi], w.wkv, w.wgate)
        assert torch.equal(k2, kv[lo:hi]) and torch.equal(s2, score[lo:hi])
    torch.testing.assert_close(kv, x.float() @ w.wkv.T, rtol=1e-5, atol=1e-5)


def test_state_rows_hold_kv_and_score_plus_ape_at_their_positions() -> None:
    """Position p of request i: row p % blk of block table[i, p // blk] = [kv | score + ape[p % ratio]];
    block 0 is never written."""
    w = _weights(4, 32, seed=3)
    blk = 4
    x = (torch.randn(10, H, generator=torch.Generator().manual_seed(4))).to(torch.bfloat16)
    state = torch.zeros(6, blk, 2 * w.cd)
    table = torch.tensor([[0, 0, 0, 0], [2, 5, 3, 0]], dtype=torch.int32)   # request 0's rows are not kept
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    sp = torch.tensor([0, 4], dtype=torch.int32)                            # request 1: positions 4..10
    table[1, 0] = 1   # positions 0..3 of request 1 were written by an earlier call: fill them in
    kv0, sc0 = ref.project(x[:4], w.wkv, w.wgate)
    state[1] = torch.cat([kv0, sc0 + w.ape], dim=-1)
    before = state.clone()
    v4hal.compressor_ragged(x[:10], w.wkv, w.wgate, w.ape, w.norm, _freqs(16), state, table, cu, sp, 4, EPS)
    kv, score = ref.project(x[:10], w.wkv, w.wgate)
    assert torch.equal(state[0], before[0])                                 # block 0 untouched
    for t in range(3, 10):
        p = 4 + t - 3
        row = state[table[1, p // blk], p % blk]
        assert torch.equal(row[:w.cd], kv[t]) and torch.equal(row[w.cd:], score[t] + w.ape[p % 4])
    assert torch.equal(state[1], before[1]) and torch.equal(state[4], before[4])


def test_entries_of_one_call_equal_those_of_one_call_per_request() -> None:
    """Batching requests together changes no bit of any request's entries."""
    w = _weights(4, 32, seed=5)
    g = torch.Generator().manual_seed(6)
    xs = [(torch.randn(n, H, generator=g)).to(torch.bfloat16) for n in (9, 2, 14)]
    freqs = _freqs(32)
    together = Runner(w, xs, 8, False, freqs)
    together.call({0: 9, 1: 2, 2: 14})
    for i, x in enumerate(xs):
        alone = Runner(w, [x], 8, False, freqs)
        alone.call({0: x.shape[0]})
        assert torch.equal(_bits(alone.result(0)), _bits(together.result(i)))


def test_reference_reads_nothing_back_to_the_host(monkeypatch) -> None:
    """The reference (what runs on NPU tensors outside the CANN op) makes no host sync of its own: without its
    CPU-only shortcuts (plan reuse, skipping the pooling when no entry completes) it reads no value back."""
    monkeypatch.setattr(ref, "CPU_SHORTCUTS", False)
    w = _weights(128, 32, seed=8)
    x = torch.randn(200, H).to(torch.bfloat16)
    args = (x, w.wkv, w.wgate, w.ape, w.norm, _freqs(256), torch.zeros(9, 64, 2 * w.cd),
            torch.arange(1, 9, dtype=torch.int32).view(2, 4), torch.tensor([0, 130, 200], dtype=torch.int32),
            torch.tensor([0, 100], dtype=torch.int32), 128, EPS)
    here = ref.__file__

    def guarded(name):
        original = getattr(torch.Tensor, name)

        def method(self, *a, **k):
            if sys._getframe(1).f_code.co_filename == here:
                raise AssertionError(f"Tensor.{name} called from the reference")
            return original(self, *a, **k)
        return method

    for name in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, guarded(name))
    out, req, pos = ref.compressor_ragged(*args)
    monkeypatch.undo()
    monkeypatch.setattr(ref, "CPU_SHORTCUTS", False)
    assert req.tolist()[:2] == [0, 1] and pos.tolist()[:2] == [0, 0]   # both requests complete entry 0


def _valid_args(ratio: int = 4) -> list:
    w = _weights(ratio, 32, seed=9)
    x = torch.randn(6, H).to(torch.bfloat16)
    return [x, w.wkv, w.wgate, w.ape, w.norm, _freqs(64), torch.zeros(5, 4, 2 * w.cd),
            torch.tensor([[1, 2], [3, 4]], dtype=torch.int32), torch.tensor([0, 2, 6], dtype=torch.int32),
            torch.tensor([0, 1], dtype=torch.int32), ratio, EPS]


@pytest.mark.parametrize("index,value,error,match", [
    (10, 8, RangeError, "ratio must be one of"),
    (0, torch.randn(6, H + 1).bfloat16(), ShapeError, "wkv must be"),
    (1, torch.randn(64, H).double(), DTypeError, "wkv must be"),
    (3, torch.randn(4, 32), ShapeError, "ape must be"),
    (5, torch.randn(8, 8), DTypeError, "freqs_cis must be complex64"),
    (6, torch.zeros(5, 4, 100), ShapeError, "state_cache must be"),
    (6, torch.zeros(4, 5, 128).transpose(0, 1), ShapeError, "state_cache rows must be dense"),
    (7, torch.tensor([[1, 2]], dtype=torch.int32), ShapeError, "state_block_table must be"),
    (8, torch.tensor([0, 2, 6, 6], dtype=torch.int32), ShapeError, "cu_seqlens must be"),
    (8, torch.tensor([0, 4, 3], dtype=torch.int32), RangeError, "cu_seqlens must be non-decreasing"),
    (8, torch.tensor([0, 2, 5], dtype=torch.int32), RangeError, "cu_seqlens must be non-decreasing from 0 to T"),
    (9, torch.tensor([0, -1], dtype=torch.int32), RangeError, "start_pos must be >= 0"),
    (9, torch.tensor([0, 5], dtype=torch.int32), RangeError, "state_block_table rows must cover"),
    (7, torch.tensor([[1, 2], [3, 9]], dtype=torch.int32), RangeError, r"ids must be in \[0, 5\)"),
    (7, torch.tensor([[1, 2], [3, 1]], dtype=torch.int32), RangeError, "share a block row"),
    (9, torch.tensor([0, 60], dtype=torch.int32), RangeError, "state_block_table rows must cover"),
    (11, float("nan"), RangeError, "norm_eps"),
])
def test_bad_input_names_the_argument(index, value, error, match) -> None:
    args = _valid_args()
    args[index] = value
    with pytest.raises(error, match=match):
        v4hal.compressor_ragged(*args)


def test_reads_from_block_zero_and_short_rope_tables_are_refused() -> None:
    args = _valid_args()
    # request 1 at position 5 completes entry 1 (positions 4..7) and reads positions 0..4 from blocks 3 and 0
    args[7] = torch.tensor([[1, 2], [0, 4]], dtype=torch.int32)
    args[9] = torch.tensor([0, 5], dtype=torch.int32)
    args[8] = torch.tensor([0, 2, 5], dtype=torch.int32)
    args[0] = args[0][:5]
    with pytest.raises(RangeError, match="to block 0"):
        v4hal.compressor_ragged(*args)
    args = _valid_args()
    args[5] = _freqs(0)
    with pytest.raises(RangeError, match="freqs_cis must cover position 0"):
        v4hal.compressor_ragged(*args)


def test_cpu_shortcuts_change_no_bit(monkeypatch) -> None:
    """Reusing a step's plan across compressors (same batch tensors, one mutated in place between calls) and
    skipping the pooling of calls that complete nothing give the outputs and state of the plain path."""
    w4, w4b = _weights(4, 32, seed=11), _weights(4, 16, seed=12)
    g = torch.Generator().manual_seed(13)
    runs = []
    for shortcuts in (False, True):
        monkeypatch.setattr(ref, "CPU_SHORTCUTS", shortcuts)
        states = [torch.zeros(10, 4, 2 * w.cd) for w in (w4, w4b)]
        table = torch.arange(1, 9, dtype=torch.int32).view(2, 4)
        outs = []
        for start, n in ((0, 5), (5, 1), (6, 1), (7, 2)):
            x = (torch.randn(2 * n, H, generator=g.manual_seed(start)) * 2).to(torch.bfloat16)
            cu = torch.tensor([0, n, 2 * n], dtype=torch.int32)
            sp = torch.tensor([start, start], dtype=torch.int32)
            for w, st in zip((w4, w4b), states):                       # two compressors, one batch
                outs.append(ref.compressor_ragged(x, w.wkv, w.wgate, w.ape, w.norm, _freqs(16), st, table, cu, sp,
                                                  4, EPS))
            sp.add_(0)                                                   # same values, same tensors
        table[1, 2] = 9                                                  # in place: the plan must not be reused
        outs.append(ref.compressor_ragged(x, w4.wkv, w4.wgate, w4.ape, w4.norm, _freqs(16), states[0], table, cu,
                                          sp, 4, EPS))
        runs.append((outs, states))
    (a, sa), (b, sb) = runs
    for x, y in zip(a, b):
        assert all(torch.equal(_bits(p), _bits(q)) for p, q in zip(x, y))
    assert all(torch.equal(p, q) for p, q in zip(sa, sb))
    assert sb[0][9].any()                                                # the last call wrote block 9


def test_value_checks_see_a_table_changed_in_place() -> None:
    """The op checks a step's batch tensors once per ratio and reuses the verdict for the same tensors with the
    same values only: a table changed in place after a passing call is checked again."""
    args = _valid_args()
    v4hal.compressor_ragged(*args)
    args[7][1, 0] = 7                                                   # past the state cache's 5 blocks
    with pytest.raises(RangeError, match=r"state_block_table ids must be in \[0, 5\)"):
        v4hal.compressor_ragged(*args)
