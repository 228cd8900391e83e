"""Triton csa2_compressor_ragged against the reference backend under the interpreter: ratios 1 and 2,
fp32/fp16/bf16 x, several requests per call fed in uneven chunks (so entries complete from state rows
written by earlier calls), odd channel counts of the pair tile, and the state rows each writes."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import random

import pytest
import torch

from v4hal.backends.reference import csa2 as ref
from v4hal.backends.triton import csa2 as tri

H = 40


def _freqs(n: int, rd: int) -> torch.Tensor:
    inv = 1.0 / (160000.0 ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
    return torch.polar(torch.ones(n, rd // 2), torch.outer(torch.arange(n, dtype=torch.float32), inv))


@pytest.mark.parametrize("ratio", [1, 2])
@pytest.mark.parametrize("dtype, d, rd", [(torch.float32, 32, 8), (torch.float16, 24, 8),
                                          (torch.bfloat16, 64, 16)])
def test_matches_reference_over_chunked_calls(ratio, dtype, d, rd):
    g = torch.Generator().manual_seed(ratio * 7 + d)
    lens = [9, 4, 7]
    wkv = (torch.randn(d, H, generator=g) * H ** -0.5).to(torch.bfloat16)
    wgate = (torch.randn(d, H, generator=g) * H ** -0.5 * 3).to(torch.bfloat16) if ratio == 2 else None
    norm = torch.rand(d, generator=g) + 0.5
    xs = [torch.randn(n, H, generator=g).to(dtype) for n in lens]
    blk = 4
    cols = 3
    table = torch.arange(1, 1 + len(lens) * cols, dtype=torch.int32).view(len(lens), cols)
    state_ref = torch.randn(1 + len(lens) * cols, blk, 2 * d, generator=g)
    state_tri = state_ref.clone()
    freqs = _freqs(16, rd)
    done = [0] * len(lens)
    rng = random.Random(ratio)
    calls = 0
    while done != lens:
        counts = [min(rng.randint(1, 3), n - k) for n, k in zip(lens, done)]
        ids = [i for i, c in enumerate(counts) if c > 0]
        x = torch.cat([xs[i][done[i]:done[i] + counts[i]] for i in ids])
        cu = torch.tensor([0] + list(torch.tensor([counts[i] for i in ids]).cumsum(0)), dtype=torch.int32)
        sp = torch.tensor([done[i] for i in ids], dtype=torch.int32)
        args = (wkv, wgate, norm, freqs)
        want = ref.csa2_compressor_ragged(x, *args, state_ref, table[ids], cu, sp, ratio, 1e-6)
        got = tri.csa2_compressor_ragged(x, *args, state_tri, table[ids], cu, sp, ratio, 1e-6)
        for w, o in zip(want[2:], got[2:]):
            assert torch.equal(w, o)
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        for w, o in zip(want[:2], got[:2]):
            assert w.dtype == o.dtype == dtype
            torch.testing.assert_close(o, w, atol=tol, rtol=tol)
        assert torch.equal(state_ref, state_tri)
        for i in ids:
            done[i] += counts[i]
        calls += 1
    assert calls >= 3

