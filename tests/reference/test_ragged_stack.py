"""The reference compressor stacks ``wkv | wgate`` for its one projection GEMM without a copy when the two are
adjacent row ranges of one tensor (as the model keeps them after ``prepare``), and copies them otherwise."""
from __future__ import annotations

import torch

from v4hal.backends.reference import ragged_compress as R


def test_adjacent_weights_are_stacked_in_place_and_others_copied() -> None:
    both = torch.randn(12, 8)
    a, b = both[:6], both[6:]
    got = R._stacked(a, b)
    assert got is not None and got.data_ptr() == both.data_ptr() and torch.equal(got, both)
    assert R._stacked(both[:5], both[6:11]) is None                      # a gap
    assert R._stacked(b, a) is None                                     # the wrong order
    assert R._stacked(a, torch.randn(6, 8)) is None                     # another storage
    assert R._stacked(a.to(torch.bfloat16), b) is None                  # another dtype
    x = torch.randn(3, 8)
    apart = R.project(x, a.clone(), b.clone())
    stacked = R.project(x, a, b)
    assert all(torch.equal(u, v) for u, v in zip(apart, stacked))

