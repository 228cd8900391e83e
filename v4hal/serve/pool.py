"""The cache pool: every layer's paged caches, one page allocator per page kind, the requests' block
tables, and registered prefixes.

Each layer's caches (window, compressed, indexer, compressor state, and the page kind of each) are those
`v4hal.model.caches` lists: the pool allocates them over many requests' pages.

A request's pages are reserved by `CachePool.plan` before a step, marked computed by `CachePool.advance`
(which frees the pages of each position kind that no later position reads) and freed by
`CachePool.release`. `CachePool.begin_step` checks a batch against the pool before a step runs (a batch of
another pool, a stale one, a runtime's tables that skip or replay positions). Every method checks its input
before it changes anything: after an error the pool is as it was. A caller that makes several calls as
one unit (an engine step) opens a `CachePool.checkpoint` and either commits it or rolls the pool back to it.
"""
from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from v4hal.hal.errors import RangeError, ShapeError
from v4hal.model.batch import (
    FIRST_BLOCK,
    POSITION_KINDS,
    RATIO,
    STATE_BLOCK_SIZE,
    STATE_KINDS,
    ForwardBatch,
    block_sizes_of,
    build_batch,
    first_needed_position,
    history_width,
    kinds_of,
    pages_needed,
    token_history,
    written_pages,
)
from v4hal.model.caches import V41_WINDOW_LAYOUTS, CacheSpec, LayerCaches, cache_layouts, kv_scale_fmt, layer_specs
from v4hal.model.config import ModelConfig
from v4hal.ops.paged import PAGED_LAYOUTS, new_paged_cache

from .fill import PageFill
from .pages import PageAllocator, PoolExhaustedError
from .prefix import PrefixCache, PrefixEntry

__all__ = ["CachePool", "RequestState", "LayerCaches", "CacheSpec", "PoolCheckpoint", "alloc_cache", "cache_layouts",
           "kv_scale_fmt", "layout_problem", "memory_table"]


#: rope dims the ``model1_fp8`` layout keeps in bf16
MODEL1_ROPE = 64


def layout_problem(cfg: ModelConfig, attn_layout: str, indexer_layout: str) -> str | None:
    """Why a pool of these layouts would not store exactly what ``cfg``'s model computed, or None.

    The model rounds its KV (window and compressed entries) to FP8 e4m3 in blocks of 64 with
    `kv_scale_fmt` scales, and its indexer keys (after the Hadamard rotation) to FP4 e2m1 in blocks of 32
    with power-of-two scales, and keeps the rounded values in bf16. ``bf16`` pages hold those values as
    they are; ``model1_fp8`` (blocks of 64, ue8m0 scales) holds the KV exactly only when the model's scales
    are ue8m0 too (an ``amax / 448`` scale's values round again); ``indexer_fp4`` (blocks of 32, ue8m0)
    holds the FP4 keys exactly. Every other pairing rounds the values again (``indexer_fp8``: one fp32
    scale per entry; an FP4 layout for the KV; ``model1_fp8`` for the keys).

    DeepSeek-V4.1 rounds its window KV as ``v41_window_fp8`` stores it (e4m3, ue8m0 scales per 32) and its
    compressed KV as ``v41_compressed_fp4`` does (the compressed caches take that layout beside
    ``v41_window_fp8``, ``bf16`` beside ``bf16``): its attention layout is one of those two."""
    if cfg.is_v41:
        if attn_layout not in V41_WINDOW_LAYOUTS:
            return (f"attn_layout {attn_layout!r} does not hold DeepSeek-V4.1's window KV as the model rounds it; "
                    f"a V4.1 model takes attn_layout in {list(V41_WINDOW_LAYOUTS)}")
    elif attn_layout == "model1_fp8":
        fmt = kv_scale_fmt(cfg)
        if fmt != "ue8m0":
            return (f"attn_layout 'model1_fp8' stores FP8 with power-of-two (ue8m0) scales, but this model rounds "
                    f"its KV with scale_fmt {fmt!r} (amax / 448 scales; config scale_fmt {cfg.scale_fmt!r}, "
                    f"scale_dtype {cfg.scale_dtype!r}): the pages would round every entry again; use "
                    f"attn_layout='bf16'")
    elif attn_layout != "bf16":
        return (f"attn_layout {attn_layout!r} would round the model's FP8 KV again; the attention caches take "
                f"'model1_fp8' (ue8m0 models) or 'bf16'")
    if indexer_layout not in ("indexer_fp4", "bf16"):
        return (f"indexer_layout {indexer_layout!r} would round the model's FP4 indexer keys again"
                + (" (one fp32 scale per entry)" if indexer_layout == "indexer_fp8" else "")
                + "; the indexer caches take 'indexer_fp4' or 'bf16'")
    return None


def alloc_cache(num_blocks: int, block_size: int, layout: str, dim: int,
                device: str | torch.device | None = None) -> torch.Tensor:
    """A zeroed paged cache of ``layout`` for ``dim``-wide entries: ``[num_blocks, block_size, 1, W]``.
    Raises `ShapeError` when the layout holds no ``dim``-wide entries (see `v4hal.ops.paged.PAGED_LAYOUTS`)."""
    if layout not in PAGED_LAYOUTS:
        raise RangeError(f"alloc_cache: layout must be one of {list(PAGED_LAYOUTS)}, got {layout!r}")
    _check_width(layout, dim)
    return new_paged_cache(num_blocks, block_size, layout, device=device, dim=dim)


def _check_width(layout: str, dim: int, where: str = "alloc_cache") -> None:
    why = PAGED_LAYOUTS[layout].dim_problem(dim)
    if why is not None:
        raise ShapeError(f"{where}: {why}")


@dataclass
class RequestState:
    """One request: ``tokens`` known so far (prompt, then appended outputs), positions ``0 .. computed-1``
    done, pages reserved for positions ``< reserved``, ``tables[kind]`` its block ids by page index (-1 for
    pages released), ``shared[kind]`` how many leading pages came shared from a prefix (never written),
    ``prefix_len`` tokens reused from a registered prefix, ``prompt_len`` the prompt's tokens."""

    req_id: Hashable
    tokens: list[int]
    computed: int = 0
    reserved: int = 0
    tables: dict[str, list[int]] = field(default_factory=dict)
    shared: dict[str, int] = field(default_factory=dict)
    prefix_len: int = 0
    prompt_len: int = 0
    source: tuple[int, ...] | None = None     # the tokens as one tuple, shared by the prefixes registered from it
    chain: list[int] = field(default_factory=list)   # chained page hashes of ``source`` computed so far


@dataclass
class PoolCheckpoint:
    """The pool's bookkeeping at `CachePool.checkpoint` (allocators, requests with their original objects,
    prefix entries and counters), plus the contents of pages that were held then and freed since (saved
    before anything could overwrite them; ``saving`` stops once the caller has done its cache writes)."""

    allocators: dict[str, tuple[list[int], list[int]]]
    requests: list[tuple[RequestState, dict[str, object]]]
    prefix: tuple[object, ...]
    saved: dict[tuple[str, int], list[torch.Tensor]] = field(default_factory=dict)
    saving: bool = True


def _state_fields(st: RequestState) -> dict[str, object]:
    """A copy of a request's fields (its lists and dicts copied; ``source`` is an immutable tuple)."""
    return {k: copy.copy(v) if k != "tables" else {kind: list(t) for kind, t in v.items()}
            for k, v in vars(st).items()}


class CachePool:
    """Paged caches of every layer of ``cfg``, with per-kind allocators, requests and prefix reuse.

    ``blocks[kind]``: pages of each kind (default: ``max_batch_size`` sequences of ``max_seq_len``);
    ``block_size``: entries per page (tokens for ``"token"``, compressed entries for ``"c4"``/``"c128"``);
    ``state_block_size``: positions per page of the compressor-state kinds ``"state4"`` / ``"state128"``
    (whose block 0 is reserved: ``blocks`` counts the pages handed out);
    ``attn_layout`` / ``indexer_layout``: `v4hal.ops.paged.PAGED_LAYOUTS` names (default: `cache_layouts` of
    the device and config; ``model1_fp8`` needs ``rope_head_dim == 64``); a pair that would not store exactly
    what the model computed is refused (`layout_problem`, `RangeError`); ``allocate=False`` builds
    the allocators and byte accounting only (no tensors), e.g. to size a 1M-token cache.
    """

    #: the open checkpoint (at most one)
    _checkpoint: PoolCheckpoint | None = None

    def __init__(self, cfg: ModelConfig, *, blocks: dict[str, int] | None = None, block_size: int = 64,
                 state_block_size: int = STATE_BLOCK_SIZE, device: str | torch.device | None = None,
                 attn_layout: str | None = None, indexer_layout: str | None = None, allocate: bool = True) -> None:
        op = "CachePool"
        if not isinstance(cfg, ModelConfig):
            raise RangeError(f"{op}: cfg must be a ModelConfig, got {type(cfg).__name__}")
        default_attn, default_index = cache_layouts(device, cfg)
        attn_layout = default_attn if attn_layout is None else attn_layout
        indexer_layout = default_index if indexer_layout is None else indexer_layout
        for name, lay in (("attn_layout", attn_layout), ("indexer_layout", indexer_layout)):
            if lay not in PAGED_LAYOUTS:
                raise RangeError(f"{op}: {name} must be one of {list(PAGED_LAYOUTS)}, got {lay!r}")
        if attn_layout == "model1_fp8" and cfg.rope_head_dim != MODEL1_ROPE:
            raise ShapeError(f"{op}: attn_layout 'model1_fp8' stores the last {MODEL1_ROPE} values of an entry as "
                             f"bf16 (the rope dims), got rope_head_dim {cfg.rope_head_dim}; use attn_layout='bf16'")
        for name, v in (("block_size", block_size), ("state_block_size", state_block_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise RangeError(f"{op}: {name} must be an int >= 1, got {v!r}")
        why = layout_problem(cfg, attn_layout, indexer_layout)
        if why is not None:
            raise RangeError(f"{op}: {why}")
        self.cfg, self.block_size, self.state_block_size = cfg, block_size, state_block_size
        self.attn_layout, self.indexer_layout = attn_layout, indexer_layout
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.kinds = kinds_of(cfg)
        #: entries per page of each kind
        self.block_sizes = block_sizes_of(self.kinds, block_size, state_block_size)
        blocks = {} if blocks is None else dict(blocks)
        unknown = [k for k in blocks if k not in self.kinds]
        if unknown:
            raise RangeError(f"{op}: blocks has kinds {unknown} this config does not use; kinds: {list(self.kinds)}")
        counts = {k: blocks.get(k, max(1, cfg.max_batch_size * pages_needed(k, cfg.max_seq_len, self.block_sizes[k])))
                  for k in self.kinds}
        for k, n in counts.items():
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise RangeError(f"{op}: blocks[{k!r}] must be an int >= 1, got {n!r}")
        self.specs = layer_specs(cfg, attn_layout, indexer_layout)
        if allocate:
            for s in self.specs:
                if s.layout is not None:
                    _check_width(s.layout, s.dim, f"{op} (layer {s.layer} {s.name} cache)")
        # state block 0 is never handed out: the compressor reads a state table entry 0 as "not kept"
        # (released pages are passed to it as block 0), so no live position may live there
        self.allocators = {k: PageAllocator(counts[k] + (k in STATE_KINDS), k, first=int(k in STATE_KINDS))
                           for k in self.kinds}
        self.layers = [LayerCaches(r) for r in cfg.compress_ratios]
        if allocate:
            for s in self.specs:
                n, bs = counts[s.kind] + (s.kind in STATE_KINDS), self.block_sizes[s.kind]
                t = (torch.zeros(n, bs, s.dim, dtype=torch.float32, device=self.device) if s.layout is None
                     else alloc_cache(n, bs, s.layout, s.dim, self.device))
                setattr(self.layers[s.layer], s.name, t)
        self.allocated = allocate
        self.requests: dict[Hashable, RequestState] = {}
        self.prefix = PrefixCache(block_size)
        #: what the steps of a runtime's own block tables wrote where (see `begin_step`)
        self.fill = PageFill(self.kinds)
        self._key = object()          # recorded in the batches this pool builds

    @property
    def num_blocks(self) -> dict[str, int]:
        """Blocks of each kind's cache tensors (reserved ones included): what
        `ForwardBatch.from_block_tables` bounds a runtime's block ids by."""
        return {k: a.capacity + a.first for k, a in self.allocators.items()}

    # ------------------------------------------------------------------ bytes
    def page_bytes(self) -> dict[str, int]:
        """Bytes of one page of each kind (of that kind's page size), summed over every layer's tensors of
        that kind. Raises
        `ShapeError` when a layout holds no entries of the config's width."""
        out = dict.fromkeys(self.kinds, 0)
        for s in self.specs:
            if s.layout is not None:
                _check_width(s.layout, s.dim, f"CachePool.page_bytes (layer {s.layer} {s.name} cache)")
            bs = self.block_sizes[s.kind]
            out[s.kind] += (4 * s.dim * bs if s.layout is None else PAGED_LAYOUTS[s.layout].page_bytes(s.dim, bs))
        return out

    def pages_in_use(self) -> dict[str, int]:
        """Allocated pages per kind (held by requests or registered prefixes)."""
        return {k: a.in_use for k, a in self.allocators.items()}

    def bytes_in_use(self) -> int:
        """Bytes of every allocated page."""
        pb = self.page_bytes()
        return sum(pb[k] * a.in_use for k, a in self.allocators.items())

    def request_bytes(self, tokens: int) -> dict[str, int]:
        """Bytes per kind one request holds once ``tokens`` positions are computed (pages of each position
        kind behind its `first_needed_position` released)."""
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
            raise RangeError(f"CachePool.request_bytes: tokens must be an int >= 1, got {tokens!r}")
        pb, bs = self.page_bytes(), self.block_sizes
        held = {k: pages_needed(k, tokens, bs[k]) - (first_needed_position(self.cfg, tokens, k) // bs[k]
                                                     if k in POSITION_KINDS else 0) for k in self.kinds}
        return {k: held[k] * pb[k] for k in self.kinds}

    def kv_bytes_per_token(self, tokens: int) -> float:
        """Cache bytes per token of one request of ``tokens`` positions (`request_bytes` / ``tokens``)."""
        return sum(self.request_bytes(tokens).values()) / tokens

    def stats(self) -> dict[str, object]:
        """Pages in use and free per kind, bytes in use (None when a layout does not hold the config's
        widths), requests, prefix entries, lookups, hits and tokens saved."""
        try:
            used: int | None = self.bytes_in_use()
        except ShapeError:
            used = None
        return {"pages_in_use": self.pages_in_use(),
                "pages_free": {k: a.num_free for k, a in self.allocators.items()},
                "bytes_in_use": used, "requests": len(self.requests),
                "prefixes": len(self.prefix), "prefix_lookups": self.prefix.lookups,
                "prefix_hits": self.prefix.hits, "prefix_tokens_saved": self.prefix.tokens_saved}

    # ------------------------------------------------------------------ requests
    def _state(self, op: str, req_id: Hashable) -> RequestState:
        st = self.requests.get(req_id) if isinstance(req_id, Hashable) else None
        if st is None:
            raise RangeError(f"CachePool.{op}: request {req_id!r} is not active (never added or already released)")
        return st

    def _check_tokens(self, op: str, tokens: object, have: int) -> list[int]:
        if isinstance(tokens, torch.Tensor) or not isinstance(tokens, Sequence):
            raise RangeError(f"CachePool.{op}: tokens must be a list of ints, got {type(tokens).__name__}")
        out = list(tokens)
        bad = [t for t in out if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise RangeError(f"CachePool.{op}: token ids must be ints in [0, vocab_size = {self.cfg.vocab_size}), "
                             f"got {bad[:4]}")
        if have + len(out) > self.cfg.max_seq_len:
            raise RangeError(f"CachePool.{op}: a request holds at most max_seq_len = {self.cfg.max_seq_len} "
                             f"tokens, got {have + len(out)}")
        return out

    def add_request(self, req_id: Hashable, prompt_tokens: Sequence[int]) -> RequestState:
        """Start request ``req_id`` with its prompt. When a registered prefix of the prompt (leaving >= 1
        token to compute) is found, the request starts at ``computed = P`` on that prefix's pages: full
        pages shared, a partly filled last page (a compressed or state kind's) copied into a fresh page."""
        if not isinstance(req_id, Hashable) or req_id in self.requests:
            raise RangeError(f"CachePool.add_request: req_id must be a new hashable id, got {req_id!r}"
                             + (" (already active)" if isinstance(req_id, Hashable) else ""))
        tokens = self._check_tokens("add_request", prompt_tokens, 0)
        if not tokens:
            raise RangeError("CachePool.add_request: prompt_tokens must hold at least one token, got none")
        st = RequestState(req_id, tokens, tables={k: [] for k in self.kinds}, shared=dict.fromkeys(self.kinds, 0),
                          prompt_len=len(tokens))
        entry = self.prefix.lookup(tokens, len(tokens) - 1)
        if entry is not None:
            try:
                self._reuse(st, entry)
            except PoolExhaustedError:
                pass          # no room for the copied pages: compute the whole prompt instead
        self.requests[req_id] = st
        return st

    def _reuse(self, st: RequestState, entry: PrefixEntry) -> None:
        copies = self._reserve({k: 1 for k, part in entry.partial.items() if part}, protect=entry)
        for k in self.kinds:
            pages = entry.pages[k]
            full = pages[:-1] if entry.partial[k] else pages
            self.allocators[k].share([b for b in full if b >= 0])
            st.tables[k] = list(full)
            st.shared[k] = len(full)
            if entry.partial[k]:
                dst = copies[k][0]
                self._copy_page(k, pages[-1], dst)
                st.tables[k].append(dst)
        st.computed = st.reserved = st.prefix_len = entry.length
        self.prefix.record_hit(entry)

    def append_tokens(self, req_id: Hashable, tokens: Sequence[int]) -> None:
        """Append known tokens (e.g. the sampled output) to request ``req_id``."""
        st = self._state("append_tokens", req_id)
        st.tokens.extend(self._check_tokens("append_tokens", tokens, len(st.tokens)))

    def plan(self, req_id: Hashable, n_tokens: int) -> None:
        """Reserve the pages of every kind that positions ``computed .. computed+n_tokens-1`` write
        (all or nothing: `PoolExhaustedError` after evicting what prefixes it can, pool unchanged)."""
        self._plan([(req_id, n_tokens)])

    def _check_items(self, op: str, items: Iterable[tuple[Hashable, int]], *, planned: bool,
                     known: bool) -> list[tuple[RequestState, int]]:
        items = list(items)
        if not items:
            raise RangeError(f"CachePool.{op}: items must name at least one (req_id, n_tokens), got none")
        for it in items:
            if not isinstance(it, tuple) or len(it) != 2:
                raise RangeError(f"CachePool.{op}: each item must be a (req_id, n_tokens) pair, got {it!r}")
        twice = [rid for rid, k in Counter(self._state(op, rid).req_id for rid, _ in items).items() if k > 1]
        if twice:
            raise RangeError(f"CachePool.{op}: request {twice[0]!r} appears twice in one batch")
        out = []
        for rid, n in items:
            st = self._state(op, rid)
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise RangeError(f"CachePool.{op}: request {rid!r}: n_tokens must be an int >= 1, got {n!r}")
            end = st.computed + n
            if end > self.cfg.max_seq_len:
                raise RangeError(f"CachePool.{op}: request {rid!r}: positions {st.computed} .. {end - 1} go past "
                                 f"max_seq_len = {self.cfg.max_seq_len}")
            if known and end > len(st.tokens):
                raise RangeError(f"CachePool.{op}: request {rid!r}: positions {st.computed} .. {end - 1} need "
                                 f"tokens not known yet (it has {len(st.tokens)})")
            if planned and end > st.reserved:
                raise RangeError(f"CachePool.{op}: request {rid!r}: positions {st.computed} .. {end - 1} are not "
                                 f"planned (pages reserved up to position {st.reserved - 1}); call plan first")
            out.append((st, n))
        return out

    def _plan(self, items: Iterable[tuple[Hashable, int]]) -> None:
        checked = self._check_items("plan", items, planned=False, known=False)
        grow = [(st, n, {k: max(0, pages_needed(k, st.computed + n, self.block_sizes[k]) - len(st.tables[k]))
                         for k in self.kinds}) for st, n in checked]
        need = Counter()
        for _, _, g in grow:
            need.update(g)
        got = self._reserve(dict(need))
        for st, n, g in grow:
            for k, m in g.items():
                st.tables[k].extend(got[k][:m])
                del got[k][:m]
            st.reserved = max(st.reserved, st.computed + n)

    def advance(self, req_id: Hashable, n_tokens: int) -> None:
        """Mark positions ``computed .. computed+n_tokens-1`` computed and free the pages of each position
        kind entirely before its `first_needed_position` of the next position."""
        ((st, n),) = self._check_items("advance", [(req_id, n_tokens)], planned=True, known=True)
        self._advance(st, n)

    def advance_batch(self, batch: ForwardBatch, *, register_prefixes: bool = False) -> None:
        """`advance` every request of ``batch`` by its token count (checked for all first; each request must
        still be at the batch's start position). ``register_prefixes``: before pages are released, register
        every page-aligned prefix of the prompt this step completed (the engine's automatic prefix caching;
        registered prefixes are evicted LRU when pages run short)."""
        checked = self._check_items("advance_batch", zip(batch.req_ids, batch.query_lens), planned=True, known=True)
        for (st, _), start in zip(checked, batch.start_positions):
            if st.computed != start:
                raise RangeError(f"CachePool.advance_batch: request {st.req_id!r} is at position {st.computed}, "
                                 f"the batch starts it at {start}")
        for st, n in checked:
            self._advance(st, n, register_prefixes)

    def _advance(self, st: RequestState, n: int, register_prefixes: bool = False) -> None:
        start = st.computed
        st.computed += n
        if register_prefixes:
            bs = self.block_size
            for length in range((start // bs + 1) * bs, min(st.computed, st.prompt_len) + 1, bs):
                self.register_prefix(st.req_id, length)
        for k in self.kinds:
            if k in POSITION_KINDS:
                table = st.tables[k]
                stop = min(first_needed_position(self.cfg, st.computed, k) // self.block_sizes[k], len(table))
                self._free(k, table[:stop])
                table[:stop] = [-1] * stop

    def release(self, req_id: Hashable) -> None:
        """Free every page of request ``req_id`` and forget it (error if not active; nothing changes)."""
        st = self._state("release", req_id)
        for k in self.kinds:
            self._free(k, st.tables[k])
        del self.requests[req_id]

    # ------------------------------------------------------------------ batches
    def build_batch(self, items: Sequence[tuple[Hashable, int]],
                    device: str | torch.device | None = None) -> ForwardBatch:
        """The `ForwardBatch` of ``items`` = ``[(req_id, n_tokens), ...]`` (each request's next ``n_tokens``
        positions, already planned) on ``device`` (default: the pool's)."""
        checked = self._check_items("build_batch", items, planned=True, known=True)
        for st, n in checked:
            for k in self.kinds:
                pages = written_pages(k, st.computed, st.computed + n, self.block_sizes[k])
                if pages and pages.start < st.shared[k]:
                    raise RangeError(f"CachePool.build_batch: request {st.req_id!r} would write {k} page "
                                     f"{pages.start}, which it shares with a registered prefix")
        tokens = [t for st, n in checked for t in st.tokens[st.computed:st.computed + n]]
        return build_batch(self.cfg, [st.req_id for st, _ in checked], tokens, [st.computed for st, _ in checked],
                           [n for _, n in checked], {k: [st.tables[k] for st, _ in checked] for k in self.kinds},
                           self.block_size, self.device if device is None else device,
                           state_block_size=self.state_block_size, origin=self._key,
                           history=self._history([st for st, _ in checked]))

    def _history(self, states: Sequence[RequestState]) -> list[list[int]] | None:
        """Each request's token ids before its next position, for the Engram hash (`ForwardBatch.history_ids`):
        read from the request's known tokens, which hold a reused prefix's too; None without Engram layers."""
        width = history_width(self.cfg)
        return [token_history(st.tokens, st.computed, width) for st in states] if width else None

    def begin_step(self, batch: ForwardBatch, op: str = "CachePool.begin_step") -> list[tuple[str, int, int]]:
        """Check that ``batch`` may run on this pool's caches now (`V4Model.forward_batch` calls it before any
        kernel); for a runtime's own tables, return what the step writes (`PageFill` records), which
        `end_step` applies once the step has run (a step that raises records nothing, so the runtime may
        retry it). `RangeError` (nothing changed) when:

        - a batch this pool built: a request is no longer active, or no longer at the batch's start
          position (the batch is stale: advanced, released or aborted since it was built), or its pages
          changed; a batch another pool built is refused whole;
        - a batch of a runtime's own tables (`ForwardBatch.from_block_tables`): this pool manages requests
          or prefixes of its own (their pages would be overwritten), a block id is past this pool's
          blocks, or a request's step does not continue what its pages hold (`PageFill`: ``start_pos``
          skips or replays positions).
        """
        if batch.origin is not None:
            self._check_own_batch(op, batch)
            return []
        if self.requests or any(a.in_use for a in self.allocators.values()):
            raise RangeError(f"{op}: the batch is a runtime's own block tables (ForwardBatch.from_block_tables), but "
                             f"this pool manages {len(self.requests)} requests and {self.pages_in_use()} pages of its "
                             f"own, which the runtime's blocks would overwrite; run them on a pool that only holds "
                             f"the cache tensors")
        caps = self.num_blocks
        for k, rows in batch.host_tables.items():
            top = max((x for r in rows for x in r), default=-1)
            if k not in caps or top >= caps[k]:
                raise RangeError(f"{op}: block_tables[{k!r}] holds block {top}, this pool has "
                                 f"{caps.get(k, 0)} blocks of {k!r} (the batch was built for another pool)")
        return self.fill.check(op, self.cfg, batch)

    def end_step(self, writes: list[tuple[str, int, int]]) -> None:
        """Record what a step that ran wrote (the list `begin_step` returned for it)."""
        self.fill.record(writes)

    def copy_page(self, kind: str, src: int, dst: int, upto: int) -> None:
        """For a runtime's own tables: copy block ``src`` of ``kind`` into block ``dst`` (every layer's tensor
        of that kind) for a request that continues at position ``upto`` on the copy, e.g. the partly filled
        last page of a shared prefix. The copy is recorded as holding what ``src`` held before ``upto``
        (position ``upto`` for the position kinds, entry ``upto // ratio`` for the compressed ones), so the
        request's first step may start there (`begin_step`). `RangeError` on a kind, block or position out
        of range (nothing copied)."""
        op = "CachePool.copy_page"
        if kind not in self.kinds:
            raise RangeError(f"{op}: kind must be one of {list(self.kinds)}, got {kind!r}")
        lo, hi = FIRST_BLOCK[kind], self.num_blocks[kind]
        for name, b in (("src", src), ("dst", dst)):
            if not isinstance(b, int) or isinstance(b, bool) or not lo <= b < hi:
                raise RangeError(f"{op}: {name} must be a block id in [{lo}, {hi}) of {kind!r}, got {b!r}")
        if not isinstance(upto, int) or isinstance(upto, bool) or not 0 <= upto <= self.cfg.max_seq_len:
            raise RangeError(f"{op}: upto must be a position in [0, max_seq_len = {self.cfg.max_seq_len}], "
                             f"got {upto!r}")
        self._copy_page(kind, src, dst)
        idx = upto if kind in POSITION_KINDS else upto // RATIO[kind]
        self.fill.record([(kind, dst, min(self.fill.end[kind].get(src, 0), idx))])

    def _check_own_batch(self, op: str, batch: ForwardBatch) -> None:
        if batch.origin is not self._key:
            raise RangeError(f"{op}: the batch was built by another CachePool; a batch runs only on the pool that "
                             f"built it (its block tables address that pool's pages)")
        if self.fill.written:
            raise RangeError(f"{op}: this pool has run a runtime's own block tables (from_block_tables); its "
                             f"allocators do not know those pages, so it cannot run batches of its own")
        for i, rid in enumerate(batch.req_ids):
            st = self.requests.get(rid)
            s, end = batch.start_positions[i], batch.start_positions[i] + batch.query_lens[i]
            if st is None:
                raise RangeError(f"{op}: request {rid!r} of the batch is not active in the pool (released since the "
                                 f"batch was built)")
            if st.computed != s:
                what = ("would compute positions {} .. {} again".format(s, st.computed - 1) if s < st.computed
                        else "would skip positions {} .. {}".format(st.computed, s - 1))
                raise RangeError(f"{op}: the batch starts request {rid!r} at position {s}, the pool has computed "
                                 f"it up to {st.computed}: the batch is stale and {what}; build it again")
            for k in self.kinds:
                n = pages_needed(k, end, self.block_sizes[k])
                if list(batch.host_tables[k][i][:n]) != st.tables[k][:n]:
                    raise RangeError(f"{op}: request {rid!r}'s {k} pages changed since the batch was built; "
                                     f"build it again")

    def schedule(self, items: Sequence[tuple[Hashable, int]],
                 device: str | torch.device | None = None) -> ForwardBatch:
        """`plan` every item (all or nothing) then `build_batch`."""
        items = list(items)
        self._check_items("schedule", items, planned=False, known=True)
        self._plan(items)
        return self.build_batch(items, device)

    # ------------------------------------------------------------------ prefixes
    def register_prefix(self, req_id: Hashable, length: int | None = None) -> PrefixEntry | None:
        """Register the first ``length`` tokens of request ``req_id`` (a multiple of ``block_size``, at most
        ``computed``) as a reusable prefix; the entry shares the pages of each position kind a continuation
        at ``length`` reads (from its `first_needed_position`; a partly filled last state page is copied on
        reuse) and the compressed pages of entries ``< length // ratio``. ``length=None``: the longest
        such prefix whose position pages are still held (None when there is none). Registering a prefix
        already registered returns that entry."""
        op = "CachePool.register_prefix"
        st = self._state("register_prefix", req_id)
        bs = self.block_size
        if length is None:
            length = next((p for p in range(st.computed // bs * bs, 0, -bs) if self._prefix_pages_held(st, p)), None)
            if length is None:
                return None
        elif not isinstance(length, int) or isinstance(length, bool) or length < bs or length % bs \
                or length > st.computed:
            raise RangeError(f"{op}: length must be a multiple of block_size = {bs} in [{bs}, computed = "
                             f"{st.computed}], got {length!r}")
        elif not self._prefix_pages_held(st, length):
            lows = ", ".join(f"{k} from {first_needed_position(self.cfg, length, k)}"
                             for k in self.kinds if k in POSITION_KINDS)
            raise RangeError(f"{op}: request {req_id!r} no longer holds the token pages (window KV or compressor "
                             f"state) a continuation at {length} reads (positions: {lows})")
        if st.source is None or len(st.source) < length:
            st.source = tuple(st.tokens)
        h = self.prefix.chain(st.source, length // bs, st.chain)[length // bs - 1]
        found = self.prefix.find(st.source[:length], h)
        if found is not None:
            self.prefix.touch(found)
            return found
        pages: dict[str, list[int]] = {}
        partial: dict[str, bool] = {}
        for k in self.kinds:
            kbs = self.block_sizes[k]
            entries = length // RATIO[k]
            lo_page = first_needed_position(self.cfg, length, k) // kbs if k in POSITION_KINDS else 0
            pages[k] = [-1] * lo_page + st.tables[k][lo_page:pages_needed(k, length, kbs)]
            partial[k] = entries % kbs != 0
        for k in self.kinds:
            self.allocators[k].share([b for b in pages[k] if b >= 0])
        entry = PrefixEntry(st.source, length, pages, partial)
        self.prefix.insert(entry, h)
        return entry

    def _prefix_pages_held(self, st: RequestState, length: int) -> bool:
        for k in self.kinds:
            if k in POSITION_KINDS:
                kbs = self.block_sizes[k]
                lo_page = first_needed_position(self.cfg, length, k) // kbs
                if not all(b >= 0 for b in st.tables[k][lo_page:pages_needed(k, length, kbs)]):
                    return False
        return True

    def evict_prefix(self, entry: PrefixEntry) -> None:
        """Forget a registered prefix and free the page references it holds (`RangeError` when it is not
        registered)."""
        if not self.prefix.holds(entry):
            raise RangeError("CachePool.evict_prefix: the entry is not registered (evicted already?)")
        self.prefix.remove(entry)
        for k, pages in entry.pages.items():
            self._free(k, pages)

    # ------------------------------------------------------------------ pages
    def _reserve(self, need: dict[str, int], protect: PrefixEntry | None = None) -> dict[str, list[int]]:
        """Allocate ``need[kind]`` pages of each kind, evicting least recently used prefixes (not ``protect``)
        when a kind is short; `PoolExhaustedError` with nothing changed when even that is not enough."""
        short = {k: n - self.allocators[k].num_free for k, n in need.items() if n > self.allocators[k].num_free}
        if short:
            for e in self._eviction_plan(short, protect):
                self.evict_prefix(e)
        return {k: self.allocators[k].alloc(need.get(k, 0)) for k in self.kinds}

    def _eviction_plan(self, short: dict[str, int], protect: PrefixEntry | None) -> list[PrefixEntry]:
        drops: Counter = Counter()
        freed: Counter = Counter()
        chosen: list[PrefixEntry] = []
        for e in self.prefix.lru_order():
            if e is protect:
                continue
            chosen.append(e)
            for k, pages in e.pages.items():
                for b in pages:
                    if b >= 0:
                        drops[(k, b)] += 1
                        if drops[(k, b)] == self.allocators[k].refcount(b):
                            freed[k] += 1
            if all(freed[k] >= n for k, n in short.items()):
                return chosen
        what = ", ".join(f"{k}: {n + self.allocators[k].num_free} needed, {self.allocators[k].num_free} free of "
                         f"{self.allocators[k].capacity}" for k, n in short.items())
        raise PoolExhaustedError(f"CachePool: out of pages ({what}; evicting every registered prefix would free "
                                 f"{dict(freed) or 0})")

    def _page_views(self, kind: str) -> list[torch.Tensor]:
        """Every layer's tensor of ``kind`` as ``[blocks, elements of one page]`` (all the page's bytes);
        none when the pool has no tensors."""
        if not self.allocated:
            return []
        out = []
        for s in self.specs:
            if s.kind == kind:
                t = getattr(self.layers[s.layer], s.name)
                if s.layout is None:
                    out.append(t.view(t.shape[0], -1))
                else:
                    n = PAGED_LAYOUTS[s.layout].page_bytes(s.dim, self.block_sizes[kind]) // t.element_size()
                    out.append(t.as_strided((t.shape[0], n), (n, 1), t.storage_offset()))
        return out

    def _copy_page(self, kind: str, src: int, dst: int) -> None:
        """Copy page ``src`` to ``dst`` in every layer's tensor of ``kind`` (all the page's bytes)."""
        for pages in self._page_views(kind):
            pages[dst].copy_(pages[src])

    def _free(self, kind: str, blocks: Iterable[int]) -> None:
        """Drop one reference to each block listed (-1 entries skipped). Under an open checkpoint that still
        saves, a block held at the checkpoint that returns to the free list gets its contents saved first
        (a later allocation may overwrite it; `rollback` puts them back)."""
        blocks = [b for b in blocks if b >= 0]
        alloc = self.allocators[kind]
        alloc.free(blocks)
        cp = self._checkpoint
        if cp is None or not cp.saving or not self.allocated:
            return
        held = cp.allocators[kind][0]
        for b in dict.fromkeys(blocks):
            if held[b] > 0 and alloc.refcount(b) == 0 and (kind, b) not in cp.saved:
                cp.saved[(kind, b)] = [pages[b].clone() for pages in self._page_views(kind)]

    # ------------------------------------------------------------------ transactions
    def checkpoint(self) -> PoolCheckpoint:
        """Open a checkpoint: `rollback` returns the pool to this moment (allocators, requests, block tables,
        prefix entries, LRU order and counters, and the contents of pages freed since, which may have been
        handed out and written), `commit` keeps what happened. One checkpoint at a time; cost: a copy of
        the bookkeeping (no page contents, unless pages held now are freed before `seal`)."""
        if self._checkpoint is not None:
            raise RangeError("CachePool.checkpoint: a checkpoint is already open (commit or roll it back first)")
        cp = PoolCheckpoint({k: a.snapshot() for k, a in self.allocators.items()},
                            [(st, _state_fields(st)) for st in self.requests.values()], self.prefix.snapshot())
        self._checkpoint = cp
        return cp

    def seal(self, cp: PoolCheckpoint) -> None:
        """Tell the open checkpoint that no cache page is written before it closes: pages freed from now on
        keep their contents anyway, so they are no longer copied."""
        self._open(cp, "seal").saving = False

    def commit(self, cp: PoolCheckpoint) -> None:
        """Close ``cp`` keeping every change since it opened."""
        self._open(cp, "commit")
        self._checkpoint = None

    def rollback(self, cp: PoolCheckpoint) -> None:
        """Close ``cp`` and put the pool back as it was when ``cp`` opened (the request objects too: the
        ones alive then are the pool's requests again, with their fields as they were)."""
        self._open(cp, "rollback")
        for (kind, b), saved in cp.saved.items():
            for pages, data in zip(self._page_views(kind), saved):
                pages[b].copy_(data)
        for k, a in self.allocators.items():
            a.restore(cp.allocators[k])
        for st, fields in cp.requests:
            vars(st).update(fields)
        self.requests = {st.req_id: st for st, _ in cp.requests}
        self.prefix.restore(cp.prefix)
        self._checkpoint = None

    def _open(self, cp: PoolCheckpoint, op: str) -> PoolCheckpoint:
        if cp is not self._checkpoint:
            raise RangeError(f"CachePool.{op}: the checkpoint is not this pool's open one (closed already?)")
        return cp

    def request_peak_pages(self, length: int, chunk: int) -> dict[str, int]:
        """Pages of each kind one request holds at its worst moment while it computes positions
        ``0 .. length-1`` in steps of at most ``chunk`` tokens: every compressed page, and for a position
        kind the pages spanned by one step plus what it reads behind (a bound, at most one page above the
        exact peak). A request whose figure exceeds a kind's pages cannot run in this pool even alone."""
        for name, v in (("length", length), ("chunk", chunk)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise RangeError(f"CachePool.request_peak_pages: {name} must be an int >= 1, got {v!r}")
        out = {}
        for k in self.kinds:
            bs = self.block_sizes[k]
            pages = pages_needed(k, length, bs)
            if k in POSITION_KINDS:
                base = 2 * (self.cfg.window_size + 128)        # the read-behind distance is periodic from here
                reach = max(p - first_needed_position(self.cfg, p, k) for p in range(base, base + 128))
                span = min(length, reach + min(chunk, length))
                pages = min(pages, -(-(span - 1) // bs) + 1)
            out[k] = pages
        return out


def memory_table(presets: Sequence[str] = ("v4-flash", "v4-pro"), tokens: int = 1 << 20, *,
                 layouts: Sequence[tuple[str, str]] = (("model1_fp8", "indexer_fp4"), ("bf16", "bf16")),
                 block_size: int = 64, state_block_size: int = STATE_BLOCK_SIZE) -> list[dict[str, object]]:
    """Cache bytes of one ``tokens``-long request per preset and (attention, indexer) layout pair, from a pool
    built with ``allocate=False`` (pages of ``block_size`` entries, ``state_block_size`` for the state
    kinds; a V4.1 preset takes ``v41_window_fp8`` for ``model1_fp8``). Rows: ``config``, ``attn_layout``,
    ``indexer_layout``, ``tokens``, ``kv_bytes_per_token``,
    ``total_bytes`` and ``bytes_by_kind`` (per page kind)."""
    rows = []
    for name in presets:
        cfg = ModelConfig.preset(name)
        cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, tokens), max_batch_size=1)
        for attn, idx in layouts:
            if cfg.is_v41 and attn == "model1_fp8":      # V4.1's quantized window format
                attn = "v41_window_fp8"
            pool = CachePool(cfg, block_size=block_size, state_block_size=state_block_size, attn_layout=attn,
                             indexer_layout=idx, allocate=False)
            by_kind = pool.request_bytes(tokens)
            total = sum(by_kind.values())
            rows.append({"config": name, "attn_layout": attn, "indexer_layout": idx, "tokens": tokens,
                         "kv_bytes_per_token": total / tokens, "total_bytes": total, "bytes_by_kind": by_kind})
    return rows
