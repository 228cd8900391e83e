"""A page allocator: a free list of block ids plus a reference count per block.

A block is allocated with refcount 1 (`PageAllocator.alloc`), shared by more owners with `share`
(+1 each) and handed back with `free` (-1 each; at 0 it returns to the free list). Every method
checks its whole argument before it changes anything, so a failed call leaves the allocator as it was.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from v4hal.hal.errors import RangeError

__all__ = ["PageAllocator", "PoolExhaustedError"]


class PoolExhaustedError(RangeError):
    """Not enough free pages for an allocation; nothing was allocated."""


class PageAllocator:
    """Block ids ``first .. num_blocks-1`` of one page kind, each free or held with a refcount >= 1; ids
    below ``first`` are reserved (never handed out, e.g. block 0 of the compressor state, "not kept")."""

    def __init__(self, num_blocks: int, name: str = "pages", first: int = 0) -> None:
        if not isinstance(first, int) or isinstance(first, bool) or first < 0:
            raise RangeError(f"PageAllocator: first must be an int >= 0, got {first!r}")
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < first + 1:
            raise RangeError(f"PageAllocator: num_blocks must be an int >= first + 1 = {first + 1}, "
                             f"got {num_blocks!r}")
        self.name = name
        self.first = first
        self._refs = [0] * num_blocks
        self._free = list(range(num_blocks - 1, first - 1, -1))    # a stack: block `first` is handed out first

    @property
    def capacity(self) -> int:
        """Number of blocks that can be handed out (reserved ids not counted)."""
        return len(self._refs) - self.first

    @property
    def num_free(self) -> int:
        """Blocks on the free list."""
        return len(self._free)

    @property
    def in_use(self) -> int:
        """Blocks held by at least one owner."""
        return self.capacity - len(self._free)

    def refcount(self, block: int) -> int:
        """Owners of ``block`` (0 when free)."""
        self._check_ids("refcount", [block])
        return self._refs[block]

    def alloc(self, n: int) -> list[int]:
        """``n`` free blocks, each now with refcount 1. Raises `PoolExhaustedError` (nothing taken)
        when fewer than ``n`` are free."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise RangeError(f"PageAllocator.alloc ({self.name}): n must be an int >= 0, got {n!r}")
        if n > len(self._free):
            raise PoolExhaustedError(f"PageAllocator.alloc ({self.name}): {n} pages requested, "
                                     f"{len(self._free)} of {self.capacity} free")
        out = [self._free.pop() for _ in range(n)]
        for b in out:
            self._refs[b] = 1
        return out

    def share(self, blocks: Iterable[int]) -> None:
        """One more owner for each block listed (a block listed twice gains two)."""
        blocks = list(blocks)
        self._check_ids("share", blocks)
        for b in blocks:
            if self._refs[b] == 0:
                raise RangeError(f"PageAllocator.share ({self.name}): block {b} is not allocated")
        for b in blocks:
            self._refs[b] += 1

    def free(self, blocks: Iterable[int]) -> None:
        """One owner fewer for each block listed; a block whose count reaches 0 returns to the free list.
        A block freed more times than it has owners raises `RangeError` naming it (nothing freed)."""
        blocks = list(blocks)
        self._check_ids("free", blocks)
        for b, k in Counter(blocks).items():
            if self._refs[b] < k:
                raise RangeError(f"PageAllocator.free ({self.name}): block {b} is not allocated"
                                 if self._refs[b] == 0 else
                                 f"PageAllocator.free ({self.name}): block {b} freed {k} times, "
                                 f"it has {self._refs[b]} owner(s)")
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def snapshot(self) -> tuple[list[int], list[int]]:
        """The allocator's whole state (reference counts, free list), for `restore`."""
        return list(self._refs), list(self._free)

    def restore(self, state: tuple[list[int], list[int]]) -> None:
        """Put back a state taken by `snapshot` of this allocator."""
        refs, free = state
        if len(refs) != len(self._refs):
            raise RangeError(f"PageAllocator.restore ({self.name}): the state holds {len(refs)} blocks, "
                             f"this allocator {len(self._refs)}")
        self._refs, self._free = list(refs), list(free)

    def _check_ids(self, what: str, blocks: list[int]) -> None:
        for b in blocks:
            if not isinstance(b, int) or isinstance(b, bool) or not self.first <= b < len(self._refs):
                raise RangeError(f"PageAllocator.{what} ({self.name}): block ids must be ints in "
                                 f"[{self.first}, {len(self._refs)}), got {b!r}")
