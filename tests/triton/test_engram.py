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
from v4hal.ops.engram import engram_gate, engram_lookup


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
