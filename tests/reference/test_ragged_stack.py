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



def test_plan_of_a_call_completing_no_entry_skips_the_pooling_tables() -> None:
    i32 = torch.int32
    table = torch.tensor([[1, 2], [3, 4]], dtype=i32)
    cu = torch.tensor([0, 1, 2], dtype=i32)
    R._LAST.clear()
    idle = R._plan(cu, torch.tensor([5, 9], dtype=i32), table, 2, 2, 4, 5, 16, 64)     # positions 5, 9: none done
    assert idle.none and not hasattr(idle, "blocks")
    assert torch.equal(idle.entry_req, torch.full((2,), -1, dtype=i32))
    R._LAST.clear()
    done = R._plan(cu, torch.tensor([7, 9], dtype=i32), table, 2, 2, 4, 5, 16, 64)     # position 7 completes entry 1
    assert not done.none and done.blocks.shape == (2, 8) and done.entry_pos.tolist() == [1, -1]
    R._LAST.clear()
