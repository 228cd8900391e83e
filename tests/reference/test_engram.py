"""Engram (DeepSeek-V4.1) on the reference backend, against independent oracles written from the public
V4.1 model's facts: a per-token integer walk for the hash, a bit-by-bit e4m3 / ue8m0 decoder for the
lookup, a float64 per-(token, stream) loop for the gate; the release's table sizes for the primes."""
from __future__ import annotations

import math
import random

import pytest
import torch
from sympy import isprime

import v4hal  # noqa: F401  (declares the ops)
from v4hal.hal.dispatch import use_backend
from v4hal.hal.errors import DTypeError, RangeError, ShapeError
from v4hal.ops.engram import (
    DEAD,
    engram_gate,
    engram_hash,
    engram_history,
    engram_lookup,
    engram_multipliers,
    engram_normalize,
    engram_primes,
    engram_row_offsets,
    engram_vocab_map,
    is_prime,
)

# ---------------------------------------------------------------- host constants


def test_primes_reproduce_the_release_table_sizes():
    """Layers 1 and 14, 4-grams over 8 heads above 16M: the sums are the released tables' row counts."""
    primes = engram_primes([1, 14], 4, 8, 16_000_000)
    assert primes.shape == (2, 3, 8)
    assert primes.flatten(1).sum(1).tolist() == [384_006_168, 384_016_682]
    flat = primes.flatten().tolist()
    assert len(set(flat)) == len(flat) and all(isprime(p) and p >= 16_000_000 for p in flat)
    # every (layer, n-gram size) restarts at the smallest unused prime >= the base
    assert primes[0, 0, 0] == 16_000_057 and all(primes[0, i, 0] > primes[0, i - 1, -1] for i in (1, 2))


def test_is_prime_agrees_with_sympy():
    nums = list(range(0, 3000)) + list(range(16_000_000, 16_002_000)) + [2**61 - 1, 2**61 + 1, 3_215_031_751]
    assert [is_prime(n) for n in nums] == [bool(isprime(n)) for n in nums]


def test_row_offsets_make_disjoint_bucket_ranges():
    primes = engram_primes([3], 3, 2, 100)[0]
    off = engram_row_offsets(primes)
    flat = primes.flatten()
    assert off.tolist() == [0] + torch.cumsum(flat, 0)[:-1].tolist()


def test_multipliers_odd_bounded_and_per_layer():
    m = engram_multipliers([1, 14], 4, 99_092)
    bound = (2**63 - 1) // 99_092 // 2
    assert m.dtype == torch.int64 and m.shape == (2, 4)
    assert bool((m % 2 == 1).all()) and bool((m < 2 * bound + 1).all()) and bool((m > 0).all())
    assert m[0].tolist() != m[1].tolist()
    # the largest compressed id times any multiplier fits int64
    assert all(99_091 * int(v) <= 2**63 - 1 for v in m.flatten())
    assert engram_multipliers([1], 4, 99_092).tolist() == m[:1].tolist()
    # the draws numpy 2.x prints for the release's layers (published by an independent C++ port): 2 r + 1
    assert m[0].tolist() == [2 * r + 1 for r in (38316048023122, 2419938046656, 17979836159674, 36993668729195)]
    assert m[1, 0] == 2 * 33858405369630 + 1 and m[1, 3] == 2 * 41309613242795 + 1


# ---------------------------------------------------------------- vocabulary map


def test_vocab_map_normalizes_and_numbers_in_first_seen_order():
    toks = [" The", "the", "THE", "café", "cafe\u0301", "\ufb01x", "fix", " ", "\t", "", "  a  b\n", "a b",
            "Ｈello", "hello"]
    m, size = engram_vocab_map(toks)
    assert m.dtype == torch.int64
    # ids: the, café, fix, " ", "", "a b", hello
    assert m.tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 5, 6, 6]
    assert size == 7
    assert engram_normalize("  Ärger \t") == "arger"
    assert engram_normalize(" ") == " " and engram_normalize("\r\n") == " "
    # the tokenizer library's rules where Python's string methods differ: per-character lowercase (no
    # final sigma), every combining mark (a spacing Mc one too), only Unicode White_Space stripped
    assert engram_normalize("ΣΑΣ") == "σασ"
    assert engram_normalize("\u0915\u0903") == "\u0915"
    assert engram_normalize("\x1cab\u3000") == "\x1cab"
    assert engram_normalize("\u2003x ") == "x" and engram_normalize("\uff21") == "a"
    assert engram_normalize("été") == "ete"


def test_vocab_map_keeps_partial_utf8_tokens_raw():
    m, size = engram_vocab_map(["a\ufffd", "A\ufffd", "a"], raw_tokens=["<0xE2>", "<0xE3>", "a"])
    assert m.tolist() == [0, 1, 2] and size == 3
    with pytest.raises(ShapeError, match="raw_tokens"):
        engram_vocab_map(["a"], raw_tokens=[])


# ---------------------------------------------------------------- hash: oracle


def oracle_rows(seq: list[int], start: int, mult: list[int], primes: list[list[int]], pad: int) -> list[list[int]]:
    """Rows of the tokens ``seq[start:]`` of one request whose full id sequence is ``seq`` (``-1`` = dead; a
    history shorter than N - 1 is written as leading -1): per token walk back s = 0..N-1, stop at the
    first dead token or before the sequence start, fill with pad; XOR the products; modulo; offset."""
    n = len(mult)
    out = []
    for pos in range(start, len(seq)):
        words, stopped = [], False
        for s in range(n):
            tok = seq[pos - s] if pos - s >= 0 else DEAD
            stopped = stopped or tok == DEAD
            words.append(pad if stopped else tok)
        row, base, h = [], 0, words[0] * mult[0]
        for k in range(1, n):
            h ^= words[k] * mult[k]
            for p in primes[k - 1]:
                row.append(h % p + base)
                base += p
        out.append(row)
    return out


def _requests(rng: random.Random, b: int, vocab: int, dead: float, max_len: int = 9) -> list[list[int]]:
    return [[DEAD if rng.random() < dead else rng.randrange(vocab) for _ in range(rng.randrange(max_len + 1))]
            for _ in range(b)]


def _run_chunk(chunks: list[list[int]], history: torch.Tensor, mult, primes, pad):
    ids = torch.tensor([t for c in chunks for t in c], dtype=torch.int64)
    cu = torch.tensor([0] + list(torch.tensor([len(c) for c in chunks]).cumsum(0).tolist()), dtype=torch.int32)
    return engram_hash(ids, cu, history, mult, primes, pad)


@pytest.mark.parametrize("n,heads,seed", [(4, 8, 0), (3, 2, 1), (2, 3, 2), (4, 1, 3)])
def test_hash_matches_the_scalar_oracle(n, heads, seed):
    rng = random.Random(seed)
    vocab = 99_092
    mult = engram_multipliers([1 + seed], n, vocab)[0]
    primes = engram_primes([1 + seed], n, heads, 16_000_000 if n == 4 else 1000)[0]
    reqs = _requests(rng, 5, vocab, 0.15)
    # some requests start mid-sequence: their history holds the ids before the chunk (dead ones -1)
    pasts = [[DEAD if rng.random() < 0.2 else rng.randrange(vocab) for _ in range(rng.randrange(n))] for _ in reqs]
    hist = torch.tensor([[DEAD] * (n - 1 - len(p)) + p for p in pasts], dtype=torch.int64)
    rows, new_hist = _run_chunk(reqs, hist, mult, primes, 2)
    want = []
    for p, r in zip(pasts, reqs):
        full = [DEAD] * (n - 1 - len(p)) + p + r
        want += oracle_rows(full, n - 1, mult.tolist(), primes.tolist(), 2)
    assert rows.dtype == torch.int64 and rows.shape == (sum(map(len, reqs)), (n - 1) * heads)
    assert rows.tolist() == want
    assert new_hist.tolist() == [([DEAD] * (n - 1) + p + r)[-(n - 1):] for p, r in zip(pasts, reqs)]
    assert int(rows.min()) >= 0 and int(rows.max()) < int(primes.sum())


def test_hash_stops_at_dead_tokens_and_the_sequence_start():
    mult = torch.tensor([3, 5, 7, 11])
    primes = torch.tensor([[1_000_003], [1_000_033], [1_000_037]])
    pad = 2
    rows, _ = _run_chunk([[10, 20, DEAD, 30, 40]], engram_history(1, 4), mult, primes, pad)
    off = engram_row_offsets(primes).tolist()

    def h(words):
        acc, out = words[0] * 3, []
        for k, m in enumerate([5, 7, 11], 1):
            acc ^= words[k] * m
            out.append(acc % int(primes[k - 1, 0]) + off[k - 1])
        return out
    assert rows[0].tolist() == h([10, pad, pad, pad])        # sequence start
    assert rows[1].tolist() == h([20, 10, pad, pad])
    assert rows[2].tolist() == h([pad, pad, pad, pad])       # the dead token itself
    assert rows[3].tolist() == h([30, pad, pad, pad])        # look-back stops at the dead token
    assert rows[4].tolist() == h([40, 30, pad, pad])


@pytest.mark.parametrize("seed", range(3))
def test_chunked_prefill_equals_whole(seed):
    """Rows of a request hashed in chunks (the history carried between them) equal those of one call;
    chunks of different requests share calls in any mix, empty chunks included."""
    rng = random.Random(seed)
    n, heads = 4, 8
    mult = engram_multipliers([14], n, 99_092)[0]
    primes = engram_primes([14], n, heads, 16_000_000)[0]
    reqs = _requests(rng, 4, 99_092, 0.1, max_len=20)
    whole, whole_hist = _run_chunk(reqs, engram_history(4, n), mult, primes, 2)
    hist = engram_history(4, n)
    pos = [0] * 4
    got: list[list[list[int]]] = [[] for _ in reqs]
    while any(p < len(r) for p, r in zip(pos, reqs)):
        chunks = []
        for i, r in enumerate(reqs):
            take = rng.randrange(0, 6)
            chunks.append(r[pos[i]:pos[i] + take])
            pos[i] += len(chunks[-1])
        rows, hist = _run_chunk(chunks, hist, mult, primes, 2)
        at = 0
        for i, c in enumerate(chunks):
            got[i] += rows[at:at + len(c)].tolist()
            at += len(c)
    assert [row for g in got for row in g] == whole.tolist()
    assert hist.tolist() == whole_hist.tolist()


def test_prefix_reuse_resumes_from_the_saved_history():
    """A request whose first 7 tokens come from a cached prefix resumes with the history saved there."""
    n = 4
    mult = engram_multipliers([1], n, 99_092)[0]
    primes = engram_primes([1], n, 8, 16_000_000)[0]
    seq = [5, 17, 99_000, 3, DEAD, 8, 12, 40, 41, 42]
    whole, _ = _run_chunk([seq], engram_history(1, n), mult, primes, 2)
    _, saved = _run_chunk([seq[:7]], engram_history(1, n), mult, primes, 2)
    assert saved.tolist() == [[DEAD, 8, 12]]
    rest, _ = _run_chunk([seq[7:]], saved.clone(), mult, primes, 2)
    assert rest.tolist() == whole[7:].tolist()


def test_hash_rejects_bad_input():
    mult, primes = torch.tensor([3, 5, 7]), torch.tensor([[11, 13], [17, 19]])
    ids, cu, hist = torch.tensor([1, 2, 3]), torch.tensor([0, 3]), engram_history(1, 3)
    with pytest.raises(ShapeError, match="history"):
        engram_hash(ids, cu, engram_history(2, 3), mult, primes, 0)
    with pytest.raises(ShapeError, match="primes"):
        engram_hash(ids, cu, hist, mult, primes[:1], 0)
    with pytest.raises(DTypeError, match="ids"):
        engram_hash(ids.int(), cu, hist, mult, primes, 0)
    with pytest.raises(RangeError, match="cu_seqlens"):
        engram_hash(ids, torch.tensor([0, 2]), hist, mult, primes, 0)
    with pytest.raises(RangeError, match="ids"):
        engram_hash(torch.tensor([1, -2, 3]), cu, hist, mult, primes, 0)
    with pytest.raises(RangeError, match="ids"):   # id * multiplier would overflow int64
        engram_hash(torch.tensor([1, 2**62, 3]), cu, hist, mult, primes, 0)
    with pytest.raises(RangeError, match="primes"):
        engram_hash(ids, cu, hist, mult, torch.tensor([[11, 0], [17, 19]]), 0)
    with pytest.raises(RangeError, match="primes"):     # even, or used twice
        engram_hash(ids, cu, hist, mult, torch.tensor([[11, 2**30], [17, 19]]), 0)
    with pytest.raises(RangeError, match="primes"):
        engram_hash(ids, cu, hist, mult, torch.tensor([[11, 13], [17, 11]]), 0)
    with pytest.raises(RangeError, match="multipliers"):
        engram_hash(ids, cu, hist, torch.tensor([3, 2**30, 7]), primes, 0)
    with pytest.raises(RangeError, match="pad_id"):
        engram_hash(ids, cu, hist, mult, primes, -1)


# ---------------------------------------------------------------- lookup: byte decoder oracle


def e4m3_value(byte: int) -> float:
    """The float an e4m3fn byte encodes: sign bit 7, exponent bits 6-3 (bias 7), mantissa bits 2-0;
    exponent 0 is subnormal (m/8 * 2**-6); S.1111.111 is NaN (no infinities)."""
    sign = -1.0 if byte & 0x80 else 1.0
    e, m = (byte >> 3) & 0xF, byte & 0x7
    if e == 0xF and m == 0x7:
        return math.nan
    if e == 0:
        return sign * m / 8 * 2.0 ** -6
    return sign * (1 + m / 8) * 2.0 ** (e - 7)


def oracle_lookup(rows: torch.Tensor, table: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float64 ``[T, n, W]`` decoded byte by byte; an e8m0 scale byte b is 2**(b - 127)."""
    tb = table.view(torch.uint8).tolist()
    sc = scales.view(torch.uint8).tolist() if scales.dtype == torch.float8_e8m0fnu else scales.double().tolist()
    e8 = scales.dtype == torch.float8_e8m0fnu
    out = []
    for r in rows.flatten().tolist():
        vals = []
        for c, byte in enumerate(tb[r]):
            s = 2.0 ** (sc[r][c // 32] - 127) if e8 else sc[r][c // 32]
            vals.append(e4m3_value(byte) * s)
        out.append(vals)
    return torch.tensor(out, dtype=torch.float64).view(*rows.shape, table.shape[1])


def make_table(r: int, w: int, seed: int, e8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, 256, (r, w), generator=g, dtype=torch.uint8)
    table[table & 0x7F == 0x7F] = 0x42          # no NaN codes
    exps = torch.randint(100, 131, (r, w // 32), generator=g)
    scales = exps.to(torch.uint8).view(torch.float8_e8m0fnu) if e8m0 else torch.exp2(exps.float() - 127)
    return table.view(torch.float8_e4m3fn), scales


@pytest.mark.parametrize("e8m0", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_lookup_matches_the_byte_decoder(e8m0, out_dtype):
    table, scales = make_table(50, 64, 0, e8m0)
    rows = torch.randint(0, 50, (7, 5), generator=torch.Generator().manual_seed(1))
    got = engram_lookup(rows, table, scales, out_dtype)
    want = oracle_lookup(rows, table, scales)
    assert got.shape == (7, 5, 64) and got.dtype == out_dtype
    assert torch.equal(got, want.to(out_dtype))


def test_lookup_at_release_width_and_rows_per_token():
    table, scales = make_table(300, 256, 2, True)
    rows = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(3))
    assert torch.equal(engram_lookup(rows, table, scales, torch.float32), oracle_lookup(rows, table, scales).float())


def test_lookup_rejects_bad_input():
    table, scales = make_table(10, 64, 0, True)
    rows = torch.tensor([[0, 9]])
    with pytest.raises(RangeError, match="rows"):
        engram_lookup(torch.tensor([[0, 10]]), table, scales)
    with pytest.raises(ShapeError, match="scales"):
        engram_lookup(rows, table, scales[:, :1])
    with pytest.raises(DTypeError, match="table"):
        engram_lookup(rows, table.view(torch.uint8), scales)
    with pytest.raises(ShapeError, match="divisible"):
        engram_lookup(rows, table[:, :48], scales[:, :1])
    with pytest.raises(DTypeError, match="out_dtype"):
        engram_lookup(rows, table, scales, torch.int32)


# ---------------------------------------------------------------- gate: float64 loop oracle


def oracle_gate(streams, kv, qw, kw, mask, eps):
    """float64, per (token, stream) with scalar loops over D."""
    t, hc, d = streams.shape
    h, kvd, w = streams.double(), kv.double(), (qw.double() * kw.double())
    out = h.clone()
    for i in range(t):
        value = kvd[i, hc * d:]
        for j in range(hc):
            key = kvd[i, j * d:(j + 1) * d]
            x = h[i, j]
            dot = float((x * w[j] * key).sum())
            dot /= math.sqrt(float((x * x).mean()) + eps) * math.sqrt(float((key * key).mean()) + eps) * math.sqrt(d)
            root = math.sqrt(max(abs(dot), 1e-6))
            gate = 1 / (1 + math.exp(root if dot < 0 else -root))
            if mask is not None and not bool(mask[i]):
                gate = 0.0
            out[i, j] = x + gate * value
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_matches_the_loop_oracle(dtype):
    g = torch.Generator().manual_seed(0)
    t, hc, d = 4, 3, 40
    streams = torch.randn(t, hc, d, generator=g).to(dtype)
    kv = torch.randn(t, (hc + 1) * d, generator=g).to(dtype)
    qw, kw = torch.randn(hc, d, generator=g) * 0.3 + 1, torch.randn(hc, d, generator=g) * 0.3 + 1
    kv[1, :d] = streams[1, 0].float() * 5              # a large positive dot
    kv[2, d:2 * d] = -streams[2, 1].float()            # a negative dot
    mask = torch.tensor([True, True, False, True])
    got = engram_gate(streams, kv, qw, kw, mask, 1e-20)
    want = oracle_gate(streams, kv, qw, kw, mask, 1e-20)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    assert torch.equal(got[2], streams[2])              # masked off: passes through


def test_gate_rejects_bad_input():
    s = torch.randn(2, 4, 8)
    kv, w = torch.randn(2, 40), torch.ones(4, 8)
    with pytest.raises(ShapeError, match="kv"):
        engram_gate(s, kv[:, :32], w, w)
    with pytest.raises(ShapeError, match="q_weight"):
        engram_gate(s, kv, w[:3], w)
    with pytest.raises(DTypeError, match="token_mask"):
        engram_gate(s, kv, w, w, torch.ones(2))
    with pytest.raises(RangeError, match="eps"):
        engram_gate(s, kv, w, w, None, 0.0)


def test_ops_run_on_the_reference_backend_by_name():
    with use_backend("reference"):
        rows, hist = engram_hash(torch.tensor([4, 5]), torch.tensor([0, 2]), engram_history(1, 3),
                                 torch.tensor([3, 5, 7]), torch.tensor([[11], [13]]), 1)
    assert rows.shape == (2, 2) and hist.tolist() == [[4, 5]]


def test_hash_reads_nothing_back_to_the_host(monkeypatch):
    """The reference hash is the accelerator path too (no Triton kernel): its own code calls no
    host-reading tensor method and no data-sized op (``repeat_interleave`` is given its output size;
    the value checks, which do read data, run in the op layer and only where enabled)."""
    import sys

    from v4hal.backends.reference import engram as ref_engram

    src = ref_engram.__file__

    def guarded(owner, name):
        original = getattr(owner, name)

        def method(*args, **kwargs):
            if sys._getframe(1).f_code.co_filename == src:
                raise AssertionError(f"{name} called from the reference hash")
            return original(*args, **kwargs)
        return method
    args = (torch.tensor([4, 5, -1, 7, 8]), torch.tensor([0, 2, 2, 5]), engram_history(3, 4),
            engram_multipliers([1], 4, 99_092)[0], engram_primes([1], 4, 8, 16_000_000)[0], 2)
    want = engram_hash(*args)
    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "nonzero", "unique"):
            patch.setattr(torch.Tensor, name, guarded(torch.Tensor, name))
        with use_backend("reference"):
            got = engram_hash(*args)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_engram_layer_composed_from_the_ops_in_chunks():
    """One Engram layer as the graph will run it, in two prefill chunks and a decode step: hash -> lookup ->
    ``wkv`` matmul -> gate. Oracle: the whole sequence at once, written position by position (look-back
    over absolute positions, the dequantized rows by the byte decoder, the gate by the float64 loop);
    the image token is dead (pad in the hash, gate shut)."""
    n, heads, w, hc, d = 3, 2, 32, 2, 16
    g = torch.Generator().manual_seed(5)
    mult = engram_multipliers([14], n, 500)[0]
    primes = engram_primes([14], n, heads, 100)[0]
    r = int(primes.sum())
    table, scales = make_table(r, w, 5, True)
    wkv = torch.randn((hc + 1) * d, (n - 1) * heads * w, generator=g) * 0.05
    qw, kw = torch.randn(hc, d, generator=g) * 0.2 + 1, torch.randn(hc, d, generator=g) * 0.2 + 1
    seq = [7, 300, 41, DEAD, 9, 9, 120, 3]
    streams = torch.randn(len(seq), hc, d, generator=g)
    live = torch.tensor([t != DEAD for t in seq])

    # composed, chunk by chunk
    hist, outs = engram_history(1, n), []
    for lo, hi in ((0, 3), (3, 7), (7, 8)):
        ids = torch.tensor(seq[lo:hi])
        rows, hist = engram_hash(ids, torch.tensor([0, hi - lo]), hist, mult, primes, 2)
        e = engram_lookup(rows, table, scales, torch.float32)
        kv = e.flatten(1) @ wkv.T
        outs.append(engram_gate(streams[lo:hi], kv, qw, kw, live[lo:hi], 1e-20))
    got = torch.cat(outs)

    # oracle, whole sequence
    want_rows = oracle_rows(seq, 0, mult.tolist(), primes.tolist(), 2)
    e = oracle_lookup(torch.tensor(want_rows), table, scales)
    kv = e.flatten(1) @ wkv.double().T
    want = oracle_gate(streams, kv, qw, kw, live, 1e-20)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[3], streams[3])
