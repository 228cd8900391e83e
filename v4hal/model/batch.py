"""One forward step over many requests: their new tokens flattened, their positions, and the page tables
and slots the paged caches are addressed with.

Page kinds (`KINDS`) and what one entry of each is:

- ``"token"``: one token position ``p`` (page ``p // block_size``): the sliding-window KV of every layer.
- ``"c4"``: one compressed entry ``j = p // 4`` of the ratio-4 layers (KV and indexer keys).
- ``"c128"``: one compressed entry ``j = p // 128`` of the ratio-128 layers.
- ``"state4"`` / ``"state128"``: one token position ``p`` (page ``p // state_block_size``): the fp32 state
  (the ``kv | score`` projections of the position) of the ratio-4 layers' compressors (main and indexer) /
  of the ratio-128 layers' compressor. Block 0 of a state kind is never handed out: the compressor reads a
  table entry 0 as "not kept", and released pages are passed to it as 0.

DeepSeek-V4.1 (``cfg.is_v41``) uses ``"token"`` (every layer's window KV) and, for its KV-source layers:

- ``"c2"`` / ``"c1"``: one compressed entry ``j = p // 2`` / ``j = p`` of the ratio-2 / ratio-1 KV sources
  (compressed KV, and the indexer keys of the sources that feed an indexer);
- ``"state2"``: one token position ``p``, the fp32 ``kv | gate`` projections of the ratio-2 sources'
  compressors (a group's first token waits there for its second; block 0 reserved as for ``"state4"``).

The position kinds (`POSITION_KINDS`) release their pages behind `first_needed_position` as a request
advances; compressed pages stay until the request ends. A slot is ``block * block_size + offset``; ``-1``
means "no slot".
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from v4hal.hal.errors import DTypeError, RangeError, ShapeError

from .config import ModelConfig

__all__ = ["KINDS", "RATIO", "POSITION_KINDS", "STATE_KINDS", "STATE_BLOCK_SIZE", "FIRST_BLOCK", "ForwardBatch",
           "block_sizes_of", "build_batch", "kinds_of", "first_needed_position", "pages_needed", "written_pages",
           "history_width", "token_history"]

#: The page kinds, and the token positions one entry of each covers.
KINDS: tuple[str, ...] = ("token", "c4", "c128", "state4", "state128", "c2", "c1", "state2")
RATIO: dict[str, int] = {"token": 1, "c4": 4, "c128": 128, "state4": 1, "state128": 1, "c2": 2, "c1": 1,
                         "state2": 1}
#: kinds whose entries are token positions (pages released behind `first_needed_position`)
POSITION_KINDS: tuple[str, ...] = ("token", "state4", "state128", "state2")
#: compressor-state kinds: their own page size, block 0 reserved
STATE_KINDS: tuple[str, ...] = ("state4", "state128", "state2")
#: default page size of the state kinds (positions per page)
STATE_BLOCK_SIZE = 16
#: the first block id of each kind a table may hold (block 0 of a state kind means "not kept")
FIRST_BLOCK: dict[str, int] = {k: int(k in STATE_KINDS) for k in KINDS}
#: the compress ratio whose layers use each kind (0: every layer)
_LAYERS = {"token": 0, "c4": 4, "c128": 128, "state4": 4, "state128": 128}


def kinds_of(cfg: ModelConfig) -> tuple[str, ...]:
    """The page kinds ``cfg``'s layers use (main and MTP): always ``"token"``, then ``"c4"`` / ``"c128"``
    and ``"state4"`` / ``"state128"`` when some layer has compress ratio 4 / 128. V4.1: ``"token"``, then
    ``"c2"`` (with ``"state2"``) / ``"c1"`` when some KV-source layer has compress ratio 2 / 1."""
    if cfg.is_v41:
        ratios = {cfg.compress_ratios[i] for i in cfg.kv_source_layers}
        want = {"token": True, "c2": 2 in ratios, "c1": 1 in ratios, "state2": 2 in ratios}
        return tuple(k for k in KINDS if want.get(k, False))
    return tuple(k for k in _LAYERS if _LAYERS[k] == 0 or _LAYERS[k] in cfg.compress_ratios)


def first_needed_position(cfg: ModelConfig, p: int, kind: str = "token") -> int:
    """The first position of a position kind a step at position ``p`` (or later) still reads, clamped at
    0: ``"token"`` (window KV) ``p - window + 1``; ``"state4"`` (ratio-4 compressor state) the start of the
    block before the unfinished one, ``p // 4 * 4 - 4`` (overlapping pooling); ``"state128"`` / ``"state2"``
    the start of the unfinished block, ``p // 128 * 128`` / ``p // 2 * 2``."""
    if kind == "token":
        lo = p - cfg.window_size + 1
    elif kind == "state4":
        lo = p // 4 * 4 - 4
    elif kind == "state128":
        lo = p // 128 * 128
    elif kind == "state2":
        lo = p // 2 * 2
    else:
        raise RangeError(f"first_needed_position: kind must be one of {list(POSITION_KINDS)}, got {kind!r}")
    return max(lo, 0)


def pages_needed(kind: str, end: int, block_size: int) -> int:
    """Pages of ``kind`` (of ``block_size`` entries) that positions ``0 .. end-1`` fill: ``ceil(end / bs)``
    for a position kind, or the pages of the ``end // ratio`` compressed entries completed by then."""
    n = end // RATIO[kind]
    return -(-n // block_size)


def block_sizes_of(kinds: Sequence[str], block_size: int, state_block_size: int) -> dict[str, int]:
    """Page size of each kind: ``state_block_size`` for the state kinds, ``block_size`` for the others."""
    return {k: state_block_size if k in STATE_KINDS else block_size for k in kinds}


@dataclass(frozen=True)
class ForwardBatch:
    """The new tokens of ``B`` requests, ``T`` in all, flattened request after request.

    Tensors (one device): ``input_ids [T]`` int64; ``positions [T]`` int32; ``req_index [T]`` int32 (row
    of the token's request in this batch); ``cu_seqlens [B+1]`` int32 (request ``b``'s tokens are rows
    ``cu_seqlens[b] .. cu_seqlens[b+1]-1``); ``start_pos [B]`` int32 (first new position); ``seq_lens [B]``
    int32 (positions computed after this step); ``block_tables[kind] [B, max_pages]`` int32, ``-1`` padded
    (and ``-1`` for pages released behind `first_needed_position`), pages of ``block_sizes[kind]`` entries
    (``block_size`` for ``"token"`` / ``"c4"`` / ``"c128"``, the state page size for ``"state4"`` /
    ``"state128"``); ``token_slots [T]`` int32, the token-kind slot each token's window KV goes to;
    ``entry_slots[kind] [T]`` int32 for ``"c4"``/``"c128"``: the slot of the compressed entry the token
    completes (``(p + 1) % ratio == 0``), else -1;
    ``last_token_index [B]`` int64, the row of each request's last token (for logits);
    ``history_ids [B, H]`` int64 or None: for a config with Engram layers (DeepSeek-V4.1), the token ids of the
    ``H = engram_max_ngram_size - 1`` positions before each request's first new position, oldest first, -1
    before position 0 (what the Engram n-gram hash looks back at; `history_width`). The pool that knows the
    requests' tokens fills it, so it follows a request across steps, chunks and reused prefixes.

    Host copies: ``req_ids``, ``query_lens``, ``start_positions`` and ``host_tables`` (Python ints, no
    device sync).
    """

    req_ids: tuple[Hashable, ...]
    block_size: int
    query_lens: tuple[int, ...]
    start_positions: tuple[int, ...]
    input_ids: torch.Tensor
    positions: torch.Tensor
    req_index: torch.Tensor
    cu_seqlens: torch.Tensor
    start_pos: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: dict[str, torch.Tensor]
    block_sizes: dict[str, int]
    token_slots: torch.Tensor
    entry_slots: dict[str, torch.Tensor]
    last_token_index: torch.Tensor
    #: host copy of ``block_tables`` (rows as given, not padded), read by the pool's checks without a device sync
    host_tables: dict[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict, repr=False, compare=False)
    #: the `CachePool` token of the pool that built the batch (``CachePool.build_batch``), None for a runtime's
    #: own tables (`from_block_tables`); `CachePool.begin_step` refuses a batch of another pool
    origin: object | None = field(default=None, repr=False, compare=False)
    history_ids: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def num_requests(self) -> int:
        return len(self.req_ids)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens)

    @property
    def max_context_len(self) -> int:
        """Largest ``seq_lens`` entry."""
        return max(s + n for s, n in zip(self.start_positions, self.query_lens))

    @classmethod
    def from_block_tables(cls, cfg: ModelConfig, *, req_ids: Sequence[Hashable], input_ids: torch.Tensor,
                          cu_seqlens: torch.Tensor, start_pos: torch.Tensor, block_tables: dict[str, torch.Tensor],
                          block_size: int, num_blocks: dict[str, int],
                          state_block_size: int = STATE_BLOCK_SIZE,
                          history_ids: torch.Tensor | None = None) -> "ForwardBatch":
        """A batch over a runtime's own page tables (the pool holds only the cache tensors).

        ``input_ids [T]``, ``cu_seqlens [B+1]``, ``start_pos [B]`` (each request's first new position: what
        it has computed so far) and ``block_tables[kind] [B, pages]`` (-1 where a request holds no page) for
        every kind of ``cfg`` (`kinds_of`): integer tensors, int32 or int64 each, on one device. Pages of
        ``block_size`` entries (``state_block_size`` for the state kinds); ``num_blocks[kind]``: the blocks of
        that kind's cache tensors (`CachePool.num_blocks`), every kind.

        Checked (reading the tensors, one host sync), before anything is written: dtypes, shapes and
        devices; each request has >= 1 token and ends at or before ``cfg.max_seq_len``; block ids are -1 or
        in ``[first, num_blocks)``, ``first`` = 1 for the state kinds (their block 0 means "not kept") and 0
        otherwise; each table holds a block for every page the step reads or writes (each position kind
        from its `first_needed_position`, every compressed entry up to the step's end); a row lists a block
        at most once; a block the step writes is in no other request's row (a page may be shared by
        several requests only while none of them writes it, e.g. a prefix's full pages). Where the pages
        came from (which pool, what they hold) is checked when the batch runs (`CachePool.begin_step`).
        ``history_ids [B, H]`` (int, -1 or token ids): for a config with Engram layers, each request's token
        ids before its first new position (`ForwardBatch`); may be left out when every request starts at 0.
        Raises `ShapeError` / `DTypeError` / `RangeError`.
        """
        op = "ForwardBatch.from_block_tables"
        tensors = {"input_ids": input_ids, "cu_seqlens": cu_seqlens, "start_pos": start_pos}
        tensors.update({f"block_tables[{k!r}]": t for k, t in block_tables.items()}
                       if isinstance(block_tables, dict) else {})
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise DTypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if not isinstance(block_tables, dict):
            raise DTypeError(f"{op}: block_tables must be a dict of kind -> tensor, got {type(block_tables).__name__}")
        devices = {t.device for t in tensors.values()}
        if len(devices) > 1:
            raise RangeError(f"{op}: every tensor must be on one device, got {sorted(map(str, devices))}")
        for name, t in tensors.items():
            if t.dtype not in (torch.int32, torch.int64):
                raise DTypeError(f"{op}: {name} must be int32 or int64, got {str(t.dtype)[6:]}")
        for name, v in (("block_size", block_size), ("state_block_size", state_block_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise RangeError(f"{op}: {name} must be an int >= 1, got {v!r}")
        ids = list(req_ids)
        b = len(ids)
        if b == 0:
            raise ShapeError(f"{op}: req_ids must name at least one request, got none")
        if len(set(ids)) != b:
            raise RangeError(f"{op}: req_ids must be distinct, got {ids}")
        if input_ids.dim() != 1 or input_ids.shape[0] < 1:
            raise ShapeError(f"{op}: input_ids must be [T] with T >= 1, got {list(input_ids.shape)}")
        if list(cu_seqlens.shape) != [b + 1]:
            raise ShapeError(f"{op}: cu_seqlens must be [B+1] = [{b + 1}], got {list(cu_seqlens.shape)}")
        if list(start_pos.shape) != [b]:
            raise ShapeError(f"{op}: start_pos must be [B] = [{b}], got {list(start_pos.shape)}")
        kinds = kinds_of(cfg)
        if sorted(block_tables) != sorted(kinds):
            raise RangeError(f"{op}: block_tables must have exactly the kinds {list(kinds)}, got {list(block_tables)}")
        if not isinstance(num_blocks, dict) or sorted(num_blocks) != sorted(kinds) or any(
                not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in num_blocks.values()):
            raise RangeError(f"{op}: num_blocks must map each kind {list(kinds)} to its block count (an int >= 1; "
                             f"CachePool.num_blocks), got {num_blocks!r}")
        for k, t in block_tables.items():
            if t.dim() != 2 or t.shape[0] != b:
                raise ShapeError(f"{op}: block_tables[{k!r}] must be [B, pages] = [{b}, pages], got {list(t.shape)}")
        cu, starts = cu_seqlens.tolist(), start_pos.tolist()
        t_total = input_ids.shape[0]
        if cu[0] != 0 or cu[-1] != t_total:
            raise RangeError(f"{op}: cu_seqlens must start at 0 and end at T = {t_total}, got {cu}")
        lens = [cu[i + 1] - cu[i] for i in range(b)]
        for i in range(b):
            if lens[i] < 1:
                raise RangeError(f"{op}: request {ids[i]!r} must have at least one token, got cu_seqlens {cu}")
            if starts[i] < 0 or starts[i] + lens[i] > cfg.max_seq_len:
                raise RangeError(f"{op}: request {ids[i]!r} positions {starts[i]} .. {starts[i] + lens[i] - 1} "
                                 f"must lie in [0, max_seq_len = {cfg.max_seq_len})")
        tokens = input_ids.tolist()
        bad_ids = [x for x in tokens if not 0 <= x < cfg.vocab_size]
        if bad_ids:
            raise RangeError(f"{op}: input_ids must lie in [0, vocab_size = {cfg.vocab_size}), got {bad_ids[:4]}")
        tables = {k: t.tolist() for k, t in block_tables.items()}
        for k, rows in tables.items():
            first, cap = FIRST_BLOCK[k], num_blocks[k]
            for i, row in enumerate(rows):
                bad = [x for x in row if x != -1 and not first <= x < cap]
                if bad:
                    why = (f"; block 0 of {k!r} is reserved (the compressor reads it as 'not kept')"
                           if 0 in bad and first else "")
                    raise RangeError(f"{op}: block_tables[{k!r}] row {i} (request {ids[i]!r}) holds block ids outside "
                                     f"-1 and [{first}, num_blocks = {cap}): {bad[:4]}{why}")
        sizes = block_sizes_of(kinds, block_size, state_block_size)
        _check_coverage(op, cfg, ids, starts, lens, tables, sizes)
        _check_sharing(op, ids, starts, lens, tables, sizes)
        history = None
        width = history_width(cfg)
        if history_ids is not None:
            if not isinstance(history_ids, torch.Tensor) or history_ids.dtype not in (torch.int32, torch.int64):
                raise DTypeError(f"{op}: history_ids must be an int32/int64 tensor, got "
                                 f"{getattr(history_ids, 'dtype', type(history_ids).__name__)}")
            if tuple(history_ids.shape) != (b, width):
                raise ShapeError(f"{op}: history_ids must be [B, engram_max_ngram_size - 1] = [{b}, {width}], got "
                                 f"{list(history_ids.shape)}")
            history = history_ids.tolist()
            bad = [x for row in history for x in row if not -1 <= x < cfg.vocab_size]
            if bad:
                raise RangeError(f"{op}: history_ids must be -1 or in [0, vocab_size = {cfg.vocab_size}), got "
                                 f"{bad[:4]}")
        elif width and any(starts):
            raise RangeError(f"{op}: a config with Engram layers needs history_ids [B, {width}] (the token ids "
                             f"before each request's start) when a request starts after position 0")
        return build_batch(cfg, ids, tokens, starts, lens, tables, block_size, input_ids.device,
                           state_block_size=state_block_size, history=history)


def written_pages(kind: str, start: int, end: int, block_size: int) -> range:
    """Page indices of ``kind`` (pages of ``block_size`` entries) that positions ``start .. end-1`` write."""
    if kind in POSITION_KINDS:
        return range(start // block_size, (end - 1) // block_size + 1)
    r = RATIO[kind]
    lo, hi = start // r, end // r      # entries completed by this step
    return range(lo // block_size, -(-hi // block_size)) if hi > lo else range(0)


def _check_coverage(op: str, cfg: ModelConfig, ids: list, starts: list[int], lens: list[int],
                    tables: dict[str, list[list[int]]], block_sizes: dict[str, int]) -> None:
    """Each request's table holds every page its step reads or writes (position kinds from their own
    `first_needed_position`)."""
    for k, rows in tables.items():
        block_size = block_sizes[k]
        for i, row in enumerate(rows):
            start, end = starts[i], starts[i] + lens[i]
            if k in POSITION_KINDS:
                need = range(first_needed_position(cfg, start, k) // block_size, pages_needed(k, end, block_size))
            else:
                need = range(pages_needed(k, end, block_size))
            missing = [p for p in need if p >= len(row) or row[p] < 0]
            if missing:
                raise RangeError(f"{op}: block_tables[{k!r}] row {i} (request {ids[i]!r}, positions {start} .. "
                                 f"{end - 1}) must hold a block for pages {need.start} .. {need.stop - 1}; "
                                 f"page {missing[0]} is " + ("past the table's end" if missing[0] >= len(row)
                                                             else "-1"))


def _check_sharing(op: str, ids: list, starts: list[int], lens: list[int], tables: dict[str, list[list[int]]],
                   block_sizes: dict[str, int]) -> None:
    """A row lists each block at most once; a block the step writes is in no other request's row."""
    for k, rows in tables.items():
        holders: dict[int, int] = {}          # block -> the first row listing it
        shared: set[int] = set()
        for i, row in enumerate(rows):
            pages: dict[int, int] = {}
            for p, blk in enumerate(row):
                if blk < 0:
                    continue
                if blk in pages:
                    raise RangeError(f"{op}: block_tables[{k!r}] row {i} (request {ids[i]!r}) lists block {blk} at "
                                     f"pages {pages[blk]} and {p}: a block holds one page of one request")
                pages[blk] = p
                if holders.setdefault(blk, i) != i:
                    shared.add(blk)
        for i, row in enumerate(rows):
            for p in written_pages(k, starts[i], starts[i] + lens[i], block_sizes[k]):
                blk = row[p]
                if blk in shared:
                    other = next(j for j, r in enumerate(rows) if j != i and blk in r)
                    raise RangeError(f"{op}: block_tables[{k!r}]: block {blk} is written by request {ids[i]!r} (its "
                                     f"page {p}) and is in the table of request {ids[other]!r} too; a page may be "
                                     f"shared only while no request of the step writes it")


def build_batch(cfg: ModelConfig, req_ids: Sequence[Hashable], tokens: Sequence[int], starts: Sequence[int],
                lens: Sequence[int], tables: dict[str, Sequence[Sequence[int]]], block_size: int,
                device: torch.device | str | None, *, state_block_size: int = STATE_BLOCK_SIZE,
                origin: object | None = None, history: Sequence[Sequence[int]] | None = None) -> ForwardBatch:
    """Assemble a `ForwardBatch` from host lists the caller has validated (``tokens``: the ``sum(lens)``
    new token ids in request order; ``tables[kind][b]``: request ``b``'s block ids, pages of ``block_size``
    entries, ``state_block_size`` for the state kinds; ``origin``: the building pool's token, None for a
    runtime's own tables); ``history[b]``: request ``b``'s token ids before its start (`ForwardBatch.history_ids`;
    None: -1 everywhere, right for requests starting at 0)."""
    b = len(req_ids)
    n = torch.tensor(list(lens), dtype=torch.int64)
    s = torch.tensor(list(starts), dtype=torch.int64)
    cu = torch.zeros(b + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(n, 0)
    t = int(cu[-1])
    req_index = torch.repeat_interleave(torch.arange(b), n)
    positions = s[req_index] + torch.arange(t) - cu[:-1][req_index]
    block_tables: dict[str, torch.Tensor] = {}
    for k, rows in tables.items():
        width = max([1] + [len(r) for r in rows])
        bt = torch.full((b, width), -1, dtype=torch.int64)
        for i, r in enumerate(rows):
            bt[i, :len(r)] = torch.tensor(list(r), dtype=torch.int64)
        block_tables[k] = bt

    def slot_of(kind: str, idx: torch.Tensor) -> torch.Tensor:
        return block_tables[kind][req_index, idx // block_size] * block_size + idx % block_size

    token_slots = slot_of("token", positions)
    entry_slots = {}
    for k in tables:
        if k not in POSITION_KINDS:
            r = RATIO[k]
            done = (positions + 1) % r == 0
            entry = torch.where(done, positions // r, 0)
            entry_slots[k] = torch.where(done, slot_of(k, entry), -1)
    dev = torch.device("cpu") if device is None else torch.device(device)

    def i32(x: torch.Tensor) -> torch.Tensor:
        return x.to(device=dev, dtype=torch.int32)

    return ForwardBatch(
        req_ids=tuple(req_ids), block_size=block_size, query_lens=tuple(int(x) for x in lens),
        start_positions=tuple(int(x) for x in starts),
        input_ids=torch.tensor(list(tokens), dtype=torch.int64, device=dev), positions=i32(positions),
        req_index=i32(req_index), cu_seqlens=i32(cu), start_pos=i32(s), seq_lens=i32(s + n),
        block_tables={k: i32(v) for k, v in block_tables.items()},
        block_sizes=block_sizes_of(tuple(tables), block_size, state_block_size), token_slots=i32(token_slots),
        entry_slots={k: i32(v) for k, v in entry_slots.items()}, last_token_index=(cu[1:] - 1).to(dev),
        host_tables={k: tuple(tuple(int(x) for x in r) for r in rows) for k, rows in tables.items()}, origin=origin,
        history_ids=_history_tensor(cfg, b, history, dev))


def history_width(cfg: ModelConfig) -> int:
    """Token ids of history the Engram hash reads before a request's start: ``engram_max_ngram_size - 1`` for a
    config with Engram layers, else 0."""
    return cfg.engram_max_ngram_size - 1 if cfg.engram_layers else 0


def token_history(tokens: Sequence[int], start: int, width: int) -> list[int]:
    """The ``width`` token ids of ``tokens`` before position ``start``, oldest first, -1 before position 0."""
    return [int(tokens[p]) if p >= 0 else -1 for p in range(start - width, start)]


def _history_tensor(cfg: ModelConfig, b: int, history: Sequence[Sequence[int]] | None,
                    dev: torch.device) -> torch.Tensor | None:
    width = history_width(cfg)
    if not width:
        return None
    if history is None:
        return torch.full((b, width), -1, dtype=torch.int64, device=dev)
    return torch.tensor([list(r) for r in history], dtype=torch.int64, device=dev).view(b, width)
