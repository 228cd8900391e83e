"""Registered prompt prefixes: the token ids ``[0, P)`` of a computed request and the pages holding
what a continuation at position ``P`` reads.

Keys chain a hash page by page (``h_k = hash(h_{k-1}, tokens of page k)``), so a prefix of ``k`` pages
is found from the hash of its last page; a hit also compares the stored token ids, so a hash collision
never matches. Entries are kept in least-recently-used order for eviction. The `CachePool` owns the
page references an entry holds (it shares them on `insert` and frees them on eviction); this module only
keeps the bookkeeping.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = ["PrefixEntry", "PrefixCache", "page_hash"]


def page_hash(prev: int, tokens: Sequence[int]) -> int:
    """Chained hash of one page of token ids after the pages hashing to ``prev``."""
    return hash((prev, tuple(tokens)))


@dataclass
class PrefixEntry:
    """A registered prefix of ``length`` tokens (a multiple of the token page size).

    ``pages[kind]``: the block ids held, by page index (``-1`` for pages of a position kind, window or
    compressor state, that no continuation needs); ``partial[kind]``: True when the last page also has
    room for entries past ``length // ratio`` (a compressed kind's, or a state kind's whose page size does
    not divide ``length``: it is copied, not shared, on reuse)."""

    source: tuple[int, ...]
    length: int
    pages: dict[str, list[int]]
    partial: dict[str, bool]
    key: tuple[int, int] = (0, 0)     # set by `PrefixCache.insert`

    @property
    def tokens(self) -> tuple[int, ...]:
        """The prefix's token ids (``source`` is the registering prompt, shared by all its entries, so
        registering every page of a long prompt stores its tokens once)."""
        return self.source[:self.length]

    def matches(self, tokens: Sequence[int]) -> bool:
        """Whether the prefix's token ids equal ``tokens``."""
        return len(tokens) == self.length and tuple(tokens) == self.source[:self.length]


class PrefixCache:
    """Prefix entries by (length, chained hash), in LRU order; hit and saved-token counters."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._entries: OrderedDict[tuple[int, int], list[PrefixEntry]] = OrderedDict()
        self.hits = 0
        self.lookups = 0
        self.tokens_saved = 0

    def __len__(self) -> int:
        return sum(len(v) for v in self._entries.values())

    def chain(self, tokens: Sequence[int], n_pages: int, done: list[int] | None = None) -> list[int]:
        """Chained hashes of the first ``n_pages`` pages of ``tokens``; ``done``: hashes of a leading part
        already computed (extended in place and returned, so a caller hashing a growing prompt page by
        page pays each page once)."""
        out = [] if done is None else done
        bs = self.block_size
        for k in range(len(out), n_pages):
            out.append(page_hash(out[-1] if out else 0, tokens[k * bs:(k + 1) * bs]))
        return out

    def find(self, tokens: Sequence[int], chain_hash: int | None = None) -> PrefixEntry | None:
        """The registered entry whose tokens equal ``tokens`` exactly (no LRU update); ``chain_hash``: the
        chained hash of ``tokens``' last page when the caller has it."""
        n = len(tokens) // self.block_size
        if n == 0 or n * self.block_size != len(tokens):
            return None
        key = (len(tokens), self.chain(tokens, n)[-1] if chain_hash is None else chain_hash)
        return next((e for e in self._entries.get(key, ()) if e.matches(tokens)), None)

    def lookup(self, prompt: Sequence[int], max_length: int) -> PrefixEntry | None:
        """The longest entry that is a prefix of ``prompt`` and at most ``max_length`` long; counts the
        lookup and marks the entry most recently used (the caller counts the hit once it is used)."""
        self.lookups += 1
        n = min(len(prompt), max_length) // self.block_size
        best = None
        for k, h in enumerate(self.chain(prompt, n), start=1):
            length = k * self.block_size
            bucket = self._entries.get((length, h))
            if bucket:
                head = prompt[:length]
                best = next((e for e in bucket if e.matches(head)), best)
        if best is not None:
            self._entries.move_to_end(best.key)
        return best

    def record_hit(self, entry: PrefixEntry) -> None:
        """Count a reuse of ``entry``."""
        self.hits += 1
        self.tokens_saved += entry.length

    def insert(self, entry: PrefixEntry, chain_hash: int | None = None) -> None:
        """Register ``entry`` (most recently used; ``chain_hash`` as in `find`). The caller has checked it is
        not registered yet."""
        h = self.chain(entry.source, entry.length // self.block_size)[-1] if chain_hash is None else chain_hash
        entry.key = (entry.length, h)
        self._entries.setdefault(entry.key, []).append(entry)
        self._entries.move_to_end(entry.key)

    def touch(self, entry: PrefixEntry) -> None:
        """Mark ``entry`` most recently used."""
        self._entries.move_to_end(entry.key)

    def holds(self, entry: PrefixEntry) -> bool:
        """Whether ``entry`` itself is registered."""
        return any(e is entry for e in self._entries.get(entry.key, ()))

    def remove(self, entry: PrefixEntry) -> None:
        """Forget ``entry`` (its pages are the caller's to free)."""
        bucket = self._entries[entry.key]
        bucket.remove(entry)
        if not bucket:
            del self._entries[entry.key]

    def snapshot(self) -> tuple[object, ...]:
        """The registered entries (in LRU order) and the counters, for `restore` (entries are not copied:
        they do not change once registered)."""
        return (OrderedDict((k, list(v)) for k, v in self._entries.items()), self.hits, self.lookups,
                self.tokens_saved)

    def restore(self, state: tuple[object, ...]) -> None:
        """Put back a state taken by `snapshot`."""
        entries, self.hits, self.lookups, self.tokens_saved = state
        self._entries = OrderedDict((k, list(v)) for k, v in entries.items())

    def lru_order(self) -> Iterator[PrefixEntry]:
        """Entries from least to most recently used."""
        for bucket in list(self._entries.values()):
            yield from list(bucket)
