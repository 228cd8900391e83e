"""The Engram Triton kernels under the interpreter (CPU tables): the FP8 gather + dequantization against
the byte-by-byte decoder, the gate against the float64 loop and the reference, and the host-table
requirement of the lookup."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from types import SimpleNamespace

import pytest
import torch

import v4hal  # noqa: F401
from tests.reference.test_engram import make_table, oracle_gate, oracle_lookup
from v4hal.backends.reference import engram as ref
from v4hal.backends.triton import engram as tri
from v4hal.hal.dispatch import use_backend
from v4hal.ops.engram import engram_gate, engram_hash, engram_lookup, engram_multipliers, engram_primes


@pytest.mark.parametrize("e8m0", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,n,w,r", [(5, 24, 256, 64), (3, 3, 96, 11), (1, 1, 32, 1)])
def test_lookup_matches_the_byte_decoder(e8m0, out_dtype, t, n, w, r):
    table, scales = make_table(r, w, t + n, e8m0)
    rows = torch.randint(0, r, (t, n), generator=torch.Generator().manual_seed(w))
    with use_backend("triton"):
        got = engram_lookup(rows, table, scales, out_dtype)
    want = oracle_lookup(rows, table, scales).to(out_dtype)
    assert got.dtype == out_dtype and got.shape == (t, n, w)
    assert torch.equal(got, want)


def test_lookup_nan_code_and_int32_rows():
    table, scales = make_table(4, 32, 0, True)
    table.view(torch.uint8)[2, 5] = 0xFF                     # e4m3 NaN
    rows = torch.tensor([[2, 0], [1, 2]], dtype=torch.int32)
    with use_backend("triton"):
        got = engram_lookup(rows, table, scales, torch.float32)
    want = ref.engram_lookup(rows, table, scales, torch.float32)
    assert torch.equal(got.isnan(), want.isnan()) and int(got.isnan().sum()) == 2
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


def test_lookup_of_no_tokens():
    table, scales = make_table(4, 64, 0, True)
    with use_backend("triton"):
        got = engram_lookup(torch.empty(0, 24, dtype=torch.int64), table, scales)
    assert got.shape == (0, 24, 64) and got.dtype == torch.bfloat16


def test_host_table_requirement():
    """On a GPU a host table and its scales must be pinned; device tables and pinned host tables are served."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def host(dev, pinned):
        return SimpleNamespace(device=dev, is_pinned=lambda: pinned)

    def args(table, scales, rows_dev):
        return {"rows": SimpleNamespace(device=rows_dev), "table": table, "scales": scales}
    assert "table is in pageable host memory" in tri._host_table_pinned(args(host(cpu, False), host(cpu, True), cuda))
    assert "scales is in pageable" in tri._host_table_pinned(args(host(cpu, True), host(cpu, False), cuda))
    assert tri._host_table_pinned(args(host(cpu, True), host(cpu, True), cuda)) is None
    assert tri._host_table_pinned(args(host(cuda, False), host(cuda, False), cuda)) is None
    assert tri._host_table_pinned(args(host(cpu, False), host(cpu, False), cpu)) is None   # the interpreter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,hc,d,masked", [(4, 4, 96, True), (2, 2, 2500, False), (3, 1, 7, True)])
def test_gate_matches_the_oracle_and_the_reference(dtype, t, hc, d, masked):
    g = torch.Generator().manual_seed(d)
    streams = torch.randn(t, hc, d, generator=g).to(dtype)
    kv = torch.randn(t, (hc + 1) * d, generator=g).to(dtype)
    qw, kw = torch.randn(hc, d, generator=g) * 0.3 + 1, torch.randn(hc, d, generator=g).to(dtype) * 0.3 + 1
    mask = (torch.arange(t) % 3 != 1) if masked else None
    with use_backend("triton"):
        got = engram_gate(streams, kv, qw, kw, mask, 1e-20)
    want = ref.engram_gate(streams, kv, qw, kw, mask, 1e-20)
    exact = oracle_gate(streams, kv, qw, kw, mask, 1e-20)
    assert got.dtype == dtype and got.shape == streams.shape
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.double(), exact, rtol=tol, atol=tol)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    if masked:
        assert torch.equal(got[1], streams[1])


def _hash_both(ids, cu, hist, mult, primes, pad):
    """(reference, triton) outputs of engram_hash on the same inputs (the history is not written in place)."""
    with use_backend("reference"):
        want = engram_hash(ids, cu, hist.clone(), mult, primes, pad)
    with use_backend("triton"):
        got = engram_hash(ids, cu, hist.clone(), mult, primes, pad)
    return want, got


@pytest.mark.parametrize("n,heads,b,max_len,seed", [(4, 8, 5, 9, 0), (3, 2, 70, 4, 1), (2, 3, 3, 150, 2),
                                                     (6, 1, 9, 1, 3), (4, 8, 130, 2, 4)])
def test_hash_matches_the_scalar_oracle(n, heads, b, max_len, seed):
    """Ragged batches (empty requests, dead tokens, histories with dead entries) across several token and
    history programs: the rows equal the scalar oracle's and the reference's, bit for bit."""
    import random

    from tests.reference.test_engram import DEAD, oracle_rows
    rng = random.Random(seed)
    vocab = 99_092
    mult = engram_multipliers([1 + seed], n, vocab)[0]
    primes = engram_primes([1 + seed], n, heads, 16_000_000 if n == 4 else 1000)[0]
    reqs = [[DEAD if rng.random() < 0.15 else rng.randrange(vocab) for _ in range(rng.randrange(max_len + 1))]
            for _ in range(b)]
    pasts = [[DEAD if rng.random() < 0.2 else rng.randrange(vocab) for _ in range(rng.randrange(n))] for _ in reqs]
    hist = torch.tensor([[DEAD] * (n - 1 - len(p)) + p for p in pasts], dtype=torch.int64)
    ids = torch.tensor([t for r in reqs for t in r], dtype=torch.int64)
    cu = torch.tensor([0] + torch.tensor([len(r) for r in reqs]).cumsum(0).tolist(), dtype=torch.int32)
    (want_rows, want_hist), (rows, new_hist) = _hash_both(ids, cu, hist, mult, primes, 2)
    oracle = [row for p, r in zip(pasts, reqs)
              for row in oracle_rows([DEAD] * (n - 1 - len(p)) + p + r, n - 1, mult.tolist(), primes.tolist(), 2)]
    assert rows.dtype == torch.int64 and rows.shape == (len(ids), (n - 1) * heads)
    assert rows.tolist() == oracle and torch.equal(rows, want_rows)
    assert new_hist.tolist() == [([DEAD] * (n - 1) + p + r)[-(n - 1):] for p, r in zip(pasts, reqs)]
    assert torch.equal(new_hist, want_hist)


def test_hash_of_ids_at_the_int64_limit():
    """The largest ids the op accepts (id * multiplier just below 2**63): products, XOR and modulo in int64."""
    mult = torch.tensor([(1 << 40) + 1, 3, (1 << 33) + 7], dtype=torch.int64)
    top = (2 ** 63 - 1) // int(mult.max())
    primes = torch.tensor([[1_000_003, 999_983], [16_000_057, 2_147_483_647]], dtype=torch.int64)
    ids = torch.tensor([top, top - 1, 5, top, -1, top - 2, 0], dtype=torch.int64)
    cu = torch.tensor([0, 4, 4, 7], dtype=torch.int64)
    hist = torch.tensor([[top, -1], [3, 4], [-1, top]], dtype=torch.int64)
    (want_rows, want_hist), (rows, new_hist) = _hash_both(ids, cu, hist, mult, primes, top)
    assert torch.equal(rows, want_rows) and torch.equal(new_hist, want_hist)
    assert int(rows.min()) >= 0


def test_hash_of_no_tokens_keeps_the_history():
    mult = torch.tensor([3, 5, 7], dtype=torch.int64)
    primes = torch.tensor([[11, 13], [17, 19]], dtype=torch.int64)
    hist = torch.tensor([[1, 2], [-1, 4]], dtype=torch.int64)
    with use_backend("triton"):
        rows, new_hist = engram_hash(torch.empty(0, dtype=torch.int64), torch.zeros(3, dtype=torch.int32), hist,
                                     mult, primes, 0)
    assert rows.shape == (0, 4) and torch.equal(new_hist, hist)
