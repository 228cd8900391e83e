"""What the pages of a runtime's own block tables hold, so a step that skips or replays positions is refused.

A runtime that allocates pages itself (`ForwardBatch.from_block_tables`) keeps the pool only for the cache
tensors; the pool then knows no requests, only blocks. `PageFill` records, per page kind and block, the
*end* of what the steps wrote there: one past the last logical index written (a token position for the
position kinds, a compressed entry ``position // ratio`` for ``"c4"`` / ``"c128"``), 0 when nothing was.
A block of page ``p`` (entries of ``block_size``) holding indices ``p * bs .. end - 1`` reads as filled up
to ``end``; any other value means it holds another page or nothing.

A step of a request at ``start`` (index ``x0``: ``start``, or ``start // ratio`` entries completed) is
accepted when:

- every page it reads that lies wholly before ``x0`` (position kinds from `first_needed_position`,
  compressed kinds from entry 0) is full: ``end == (p + 1) * bs``; a full page written for another request
  at the same page index also passes (a shared prefix page);
- the page holding ``x0``, when ``x0`` is inside it, is filled exactly up to ``x0``: more means the step
  would compute positions again (``start_pos`` replays), less means positions before it were never
  computed (``start_pos`` skips).

A step starting on a page boundary writes a fresh page: whatever the block held before is overwritten (a
recomputed request on reused blocks looks the same as a replay there, and is allowed).
"""
from __future__ import annotations

from collections.abc import Iterable

from v4hal.hal.errors import RangeError
from v4hal.model.config import ModelConfig

from .batch import POSITION_KINDS, RATIO, ForwardBatch, first_needed_position

__all__ = ["PageFill"]


class PageFill:
    """Fill ends per kind and block, 0 for a block no step wrote (``end[kind]``: block -> end, sparse)."""

    def __init__(self, kinds: Iterable[str]) -> None:
        self.end: dict[str, dict[int, int]] = {k: {} for k in kinds}

    @property
    def written(self) -> bool:
        """Whether any step recorded a write."""
        return any(self.end.values())

    def check(self, op: str, cfg: ModelConfig, batch: ForwardBatch) -> list[tuple[str, int, int]]:
        """The ``(kind, block, new end)`` records ``batch`` writes; `RangeError` when a request's step does not
        continue what its pages hold (nothing recorded)."""
        out: list[tuple[str, int, int]] = []
        for k, rows in batch.host_tables.items():
            bs, end = batch.block_sizes[k], self.end[k]
            unit = "positions" if k in POSITION_KINDS else "entries"
            for i, rid in enumerate(batch.req_ids):
                s, e, row = batch.start_positions[i], batch.start_positions[i] + batch.query_lens[i], rows[i]
                if k in POSITION_KINDS:
                    x0, x1, lo = s, e, first_needed_position(cfg, s, k)
                else:
                    x0, x1, lo = s // RATIO[k], e // RATIO[k], 0
                where = f"{op}: request {rid!r} (positions {s} .. {e - 1}), {k} page"
                for p in range(lo // bs, x0 // bs):
                    if end.get(row[p], 0) != (p + 1) * bs:
                        raise RangeError(f"{where} {p} (block {row[p]}) must hold {unit} {p * bs} .. "
                                         f"{(p + 1) * bs - 1} (the step reads them); it "
                                         f"{_holds(end.get(row[p], 0), p, bs, unit)}")
                p = x0 // bs
                if x0 % bs and end.get(row[p], 0) != x0:
                    got = end.get(row[p], 0)
                    why = ("start_pos replays computed positions" if p * bs < got <= (p + 1) * bs and got > x0 else
                           "start_pos skips positions never computed" if got == 0 or p * bs < got < x0 else
                           "the block holds another page")
                    raise RangeError(f"{where} {p} (block {row[p]}) must hold {unit} {p * bs} .. {x0 - 1} and no "
                                     f"more; it {_holds(got, p, bs, unit)} ({why})")
                for p in range(x0 // bs, -(-x1 // bs)) if x1 > x0 else ():
                    out.append((k, row[p], min((p + 1) * bs, x1)))
        return out

    def record(self, writes: list[tuple[str, int, int]]) -> None:
        """Apply the records `check` returned."""
        for k, blk, e in writes:
            self.end[k][blk] = e


def _holds(end: int, page: int, bs: int, unit: str) -> str:
    if end == 0:
        return "holds nothing written"
    if page * bs < end <= (page + 1) * bs:
        return f"holds {unit} {page * bs} .. {end - 1}"
    return f"holds {unit} {(end - 1) // bs * bs} .. {end - 1} of page {(end - 1) // bs}"
