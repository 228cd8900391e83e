"""PageAllocator: refcounts, free list, and errors that leave the allocator unchanged."""
from __future__ import annotations

import copy

import pytest

from v4hal.hal.errors import RangeError, V4HalError
from v4hal.serve import PageAllocator, PoolExhaustedError


def _state(a: PageAllocator) -> object:
    return copy.deepcopy((a._refs, a._free))


def test_alloc_share_free_counts() -> None:
    a = PageAllocator(4, "token")
    assert (a.capacity, a.in_use, a.num_free) == (4, 0, 4)
    x = a.alloc(3)
    assert x == [0, 1, 2] and (a.in_use, a.num_free) == (3, 1)
    a.share([1, 1])
    assert a.refcount(1) == 3
    a.free([0, 1])
    assert a.refcount(0) == 0 and a.refcount(1) == 2 and a.in_use == 2
    a.free([1, 1, 2])
    assert a.in_use == 0 and sorted(a.alloc(4)) == [0, 1, 2, 3]
    assert a.alloc(0) == []


def test_exhaustion_takes_nothing() -> None:
    a = PageAllocator(3)
    a.alloc(2)
    before = _state(a)
    with pytest.raises(PoolExhaustedError, match="2 pages requested, 1 of 3 free"):
        a.alloc(2)
    assert _state(a) == before
    assert issubclass(PoolExhaustedError, RangeError) and issubclass(PoolExhaustedError, V4HalError)


def test_double_free_names_the_block_and_changes_nothing() -> None:
    a = PageAllocator(4)
    a.alloc(2)
    a.free([1])
    before = _state(a)
    with pytest.raises(RangeError, match="block 1 is not allocated"):
        a.free([0, 1])          # block 0 is valid, the list as a whole is not
    assert _state(a) == before and a.refcount(0) == 1
    with pytest.raises(RangeError, match="block 0 freed 2 times, it has 1 owner"):
        a.free([0, 0])
    with pytest.raises(RangeError, match="block 3 is not allocated"):
        a.share([0, 3])
    with pytest.raises(RangeError, match=r"ints in \[0, 4\), got -1"):
        a.free([-1])
    assert _state(a) == before


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(RangeError, match="num_blocks"):
        PageAllocator(bad)  # type: ignore[arg-type]
