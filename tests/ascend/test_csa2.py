"""csa2_compressor_ragged through the Ascend backend: no CANN compressor mode pools V4.1's groups over this
op's paged state, so every chip runs the reference on the NPU tensors, with that reason recorded, and
gives the reference's bits (state cache included)."""
from __future__ import annotations

import pytest
import torch

import v4hal

from .conftest import ascend, fell_back, native, reference

D, H = 64, 1024


def _args(ratio: int):
    g = torch.Generator().manual_seed(ratio)
    x = torch.randn(7, H, generator=g).to(torch.bfloat16)
    wkv = (torch.randn(D, H, generator=g) * H ** -0.5).to(torch.bfloat16)
    wgate = (torch.randn(D, H, generator=g) * H ** -0.5).to(torch.bfloat16) if ratio == 2 else None
    norm = (torch.rand(D, generator=g) + 0.5).to(torch.bfloat16)
    inv = 1.0 / (160000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    freqs = torch.polar(torch.ones(16, 8), torch.outer(torch.arange(16, dtype=torch.float32), inv))
    state = torch.randn(5, 4, 2 * D, generator=g)
    table = torch.tensor([[1, 2], [3, 4]], dtype=torch.int32)
    return [x, wkv, wgate, norm, freqs, state, table, torch.tensor([0, 4, 7], dtype=torch.int32),
            torch.tensor([1, 0], dtype=torch.int32), ratio, 1e-20]


@pytest.mark.parametrize("ratio", [1, 2])
def test_runs_the_reference_with_the_reason(npu, ratio):
    a = _args(ratio)
    b = [t.clone() if isinstance(t, torch.Tensor) else t for t in a]
    got = ascend(v4hal.csa2_compressor_ragged, *a)
    want = reference(v4hal.csa2_compressor_ragged, *b)
    for o, w in zip(got, want):
        assert torch.equal(o, w)
    assert torch.equal(a[5], b[5])
    assert not native("csa2_compressor_ragged")
    assert fell_back("csa2_compressor_ragged", "no CANN compressor mode")
