"""The shared output conversion (``v4hal/backends/triton/_cast.py``) under the interpreter: fp32 ->
bf16 / fp16 / fp32 through ``cast_out(v, out_ptr.dtype.element_ty, SOFT=True)`` gives torch's bits
(round to nearest even) for every class of fp32 input: ties to even and odd, carries into the
exponent, overflow to inf, infinities, NaN, signed zeros, subnormals, random bit patterns."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import triton
import triton.language as tl

from v4hal.backends.triton._cast import cast_out


@triton.jit
def _store_kernel(x_ptr, out_ptr, n, SOFT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    v = tl.load(x_ptr + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, cast_out(v, out_ptr.dtype.element_ty, SOFT), mask=ok)


def _special_bits() -> torch.Tensor:
    """fp32 bit patterns around every rounding decision of fp32 -> bf16."""
    base = torch.tensor([
        0x3F800000, 0x3F808000, 0x3F818000,     # 1.0, tie to even (down), tie to odd (up)
        0x3F808001, 0x3F807FFF,                 # just above / below a tie
        0x3F7F8000, 0x3F7FFFFF,                 # tie and near-tie that carry into the exponent (-> 1.0)
        0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF,     # below / at / above the overflow threshold (-> inf)
        0x7F800000, 0x7FC00000, 0x7FFFFFFF, 0x7F800001,   # inf, quiet NaN, NaN with full payload, signalling NaN
        0x00000000, 0x00000001, 0x00008000, 0x00018000, 0x007FFFFF, 0x00800000,   # zero, subnormals, min normal
    ], dtype=torch.int64)
    return torch.cat([base, base | 0x80000000]).to(torch.int32)     # and the negatives


def _run(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full(x.shape, float("nan"), dtype=dtype)
    block = 1024
    _store_kernel[(triton.cdiv(x.numel(), block),)](x, out, x.numel(), SOFT=True, BLOCK=block)
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bitwise equal, or both NaN (the NaN payload is not specified)."""
    ints = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return (a.view(ints) == b.view(ints)) | (a.isnan() & b.isnan())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cast_out_matches_torch_rounding(dtype) -> None:
    g = torch.Generator().manual_seed(0)
    random_bits = torch.randint(-(2 ** 31), 2 ** 31, (6000,), generator=g, dtype=torch.int64).to(torch.int32)
    normal = torch.randn(4000, generator=g) * torch.logspace(-30, 30, 4000)
    x = torch.cat([_special_bits().view(torch.float32), random_bits.view(torch.float32), normal])
    got = _run(x, dtype)
    want = x.to(dtype)
    bad = ~_same(got, want)
    assert not bool(bad.any()), (f"{int(bad.sum())} of {x.numel()} conversions differ from torch, first: "
                                 f"fp32 bits {hex(int(x[bad][0].view(torch.int32)) & 0xFFFFFFFF)} -> "
                                 f"{float(got[bad][0])!r}, torch {float(want[bad][0])!r}")


def test_bf16_ties_go_to_even() -> None:
    """Exact midpoints between neighbouring bf16 values of every exponent: to the even mantissa."""
    exps = torch.arange(1, 255, dtype=torch.int32) << 23
    mants = torch.tensor([0x0, 0x1, 0x2, 0x7E, 0x7F], dtype=torch.int32) << 16      # kept mantissa bits
    bits = (exps[:, None] | mants[None, :] | 0x8000).reshape(-1)                     # + half an ulp
    x = bits.view(torch.float32)
    got = _run(x, torch.bfloat16)
    assert torch.equal(got.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
    finite = torch.isfinite(got)
    assert int((~finite).sum()) == 1          # the midpoint above the largest bf16 rounds to inf
    assert bool((got[finite].view(torch.int16) & 1 == 0).all())
