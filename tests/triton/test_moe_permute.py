"""Triton moe_dispatch / moe_combine against the reference backend (under the interpreter): both
must agree bit for bit (the stable order of the contract; combine's fp32 sum in slot order).

Cases: empty experts, E = 1, T*k not a multiple of the rank chunk and several chunks per expert
run, k = 1 and 8, no tokens, element types copied as raw bits (bf16, fp16 with NaN payloads,
fp32, fp8). Output buffers start poisoned; the wrappers must not synchronise with the host.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import v4hal
from tests.numerics import bits, poisoned_empty  # noqa: F401  (fixture)
from v4hal.backends.reference import moe as ref
from v4hal.backends.triton import moe_permute as tri
from v4hal.hal.errors import DTypeError, ShapeError

CASES = [  # T, k, E
    (7, 3, 5),
    (40, 6, 16),     # 240 slots: several 32-slot chunks
    (1, 1, 1),
    (33, 2, 1),      # E = 1
    (50, 8, 64),     # many experts, most with few rows
    (0, 4, 3),       # no tokens
]


pytestmark = pytest.mark.usefixtures("poisoned_empty")


def routing(t: int, k: int, e: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, e, (t, k), generator=g, dtype=torch.int32)
    if e > 2:
        idx[idx == 1] = 2            # expert 1 gets no rows
    return idx


@pytest.mark.parametrize("t,k,e", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dispatch_and_combine_bitwise(t, k, e, dtype):
    g = torch.Generator().manual_seed(t * 31 + k)
    x = torch.randn(t, 40, generator=g).to(dtype)
    idx = routing(t, k, e, seed=t + e)
    got = tri.moe_dispatch(x, idx, e)
    exp = ref.moe_dispatch(x, idx, e)
    for name, a, b in zip(("x_sorted", "group_offsets", "sorted_to_flat"), got, exp):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(bits(a), bits(b)), f"{name} differs"
    y = torch.randn(t * k, 40, generator=g).to(dtype)
    w = torch.rand(t, k, generator=g)
    out = tri.moe_combine(y, w, exp[2])
    out_ref = ref.moe_combine(y, w, exp[2])
    assert out.dtype == out_ref.dtype and out.shape == out_ref.shape
    assert torch.equal(bits(out), bits(out_ref)), "moe_combine differs from the reference"


def test_dispatch_copies_raw_bits():
    """fp16 rows with NaN payloads and infinities, and fp8 rows, arrive bit for bit."""
    idx = routing(9, 2, 4, seed=1)
    raw = torch.randint(-(2 ** 15), 2 ** 15, (9, 24), dtype=torch.int32).to(torch.int16)
    raw[0, :4] = torch.tensor([0x7C01, 0x7E55, -1024, 0x7C00], dtype=torch.int16)   # NaNs, -inf bits, inf
    x16 = raw.view(torch.float16)
    got, exp = tri.moe_dispatch(x16, idx, 4)[0], ref.moe_dispatch(x16, idx, 4)[0]
    assert torch.equal(bits(got), bits(exp))
    x8 = torch.randint(0, 256, (9, 24), dtype=torch.uint8).view(torch.float8_e4m3fn)
    got, exp = tri.moe_dispatch(x8, idx, 4)[0], ref.moe_dispatch(x8, idx, 4)[0]
    assert torch.equal(bits(got), bits(exp))


def test_round_trip_through_the_public_ops():
    """dispatch -> identity experts -> combine with weights summing to 1 gives x back (fp32)."""
    x = torch.randn(21, 16)
    idx = routing(21, 3, 6, seed=2)
    w = torch.full((21, 3), 0.25)
    w[:, 0] = 0.5
    with v4hal.use_backend("triton"):
        x_sorted, offsets, handle = v4hal.moe_dispatch(x, idx, 6)
        out = v4hal.moe_combine(x_sorted, w, handle)
    counts = torch.bincount(idx.view(-1).long(), minlength=6)
    assert torch.equal(offsets[1:] - offsets[:-1], counts)
    torch.testing.assert_close(out, x, atol=1e-6, rtol=1e-6)


def test_no_host_sync(monkeypatch):
    """The wrappers never read a tensor value on the host (no .item(), int(t), bool(t), .tolist())."""
    x = torch.randn(12, 8)
    idx = routing(12, 2, 5, seed=3)
    y = torch.randn(24, 8)
    w = torch.rand(12, 2)
    s2f = ref.moe_dispatch(x, idx, 5)[2]

    def forbidden(*_args, **_kwargs):
        raise AssertionError("host synchronisation inside a Triton MoE wrapper")

    for name in ("item", "tolist", "__int__", "__bool__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    tri.moe_dispatch(x, idx, 5)
    tri.moe_combine(y, w, s2f)


def test_errors_name_the_argument():
    handle = v4hal.MoEHandle(torch.arange(4), 2, 2)
    with v4hal.use_backend("triton"):
        with pytest.raises(DTypeError, match="indices must be int32"):
            v4hal.moe_dispatch(torch.zeros(2, 4), torch.zeros(2, 1, dtype=torch.int64), 3)
        with pytest.raises(ShapeError, match="y must be"):
            v4hal.moe_combine(torch.zeros(3, 4), torch.zeros(2, 2), handle)
        with pytest.raises(DTypeError, match="weights must be float32"):
            v4hal.moe_combine(torch.zeros(4, 4), torch.zeros(2, 2, dtype=torch.float64), handle)
