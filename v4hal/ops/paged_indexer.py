"""The lightning indexer over paged, quantized key caches: logits, top-k, and logical position -> slot.

``indexer_logits_paged`` has the semantics of DeepGEMM's paged MQA logits (``fp8_paged_mqa_logits`` /
``fp8_fp4_paged_mqa_logits``): ``b`` requests of ``next_n`` query rows each, every request reading its
keys through its own row of a block table; logical position ``t`` of request ``b`` lives at slot
``block_table[b, t // block_size] * block_size + t % block_size`` of the cache. Row ``i`` of request
``b`` (output row ``b * next_n + i``) sees the positions ``t < limit``:

- ``context_lens`` int32 ``[b]``: ``limit = context_lens[b] - next_n + 1 + i`` (the last row sees the
  whole context, each earlier row one position less: the causal rule of ``next_n`` draft tokens);
- ``context_lens`` int32 ``[b, next_n]``: ``limit = context_lens[b, i]`` (one length per row).

Entries at or past a row's limit are ``-inf``. The keys are the indexer entries of the ``indexer_fp4`` or
``indexer_fp8`` layout of :mod:`v4hal.ops.paged`, dequantized in fp32, of the width ``D`` the cache's last
dim tells (V4: 128); ``q``'s last dim must be that ``D``.

Error messages write ``N`` for ``next_n`` and ``M`` for the block table's width (``max_blocks``).
"""
from __future__ import annotations

import torch

from v4hal.hal.errors import V4HalError

from . import _checks as C
from ._checks import INT32_MAX, INTS
from ._define import call, define_op
from .paged import PAGED_LAYOUTS, PagedLayout, _check_cache, _layout, layout_hint

#: the layouts holding indexer keys: the quantized ones, and bf16 (keys stored as the rounded values)
INDEXER_LAYOUTS = tuple(name for name in PAGED_LAYOUTS if name.startswith("indexer_")) + ("bf16",)


def _indexer_layout(op: str, layout: object, kv_cache: torch.Tensor, qdim: int | None) -> PagedLayout:
    lay = _layout(op, layout)
    if lay.name not in INDEXER_LAYOUTS:
        raise C.RangeError(f"{op}: layout must be one of {list(INDEXER_LAYOUTS)} (indexer key caches), "
                           f"got {layout!r}{layout_hint(op, kv_cache, lay.name, INDEXER_LAYOUTS, qdim)}")
    return lay


def _kv_cache(op: str, kv_cache: torch.Tensor, lay: PagedLayout, dim: int | None) -> int:
    """The cache checks of :mod:`v4hal.ops.paged` (``dim``: q's width, None when q has no width yet), with the
    messages naming ``kv_cache``; returns the key width."""
    try:
        return _check_cache(op, kv_cache, lay, INDEXER_LAYOUTS, dim)
    except V4HalError as e:
        msg, prefix = str(e), f"{op}: cache"
        if msg.startswith(prefix):
            msg = f"{op}: kv_cache" + msg[len(prefix):]
        raise type(e)(msg) from None


def _check_inputs(op: str, q, kv_cache, weights, context_lens, block_table, layout) -> PagedLayout:
    qdim = q.shape[-1] if isinstance(q, torch.Tensor) and q.dim() == 4 else None
    lay = _indexer_layout(op, layout, kv_cache, qdim)
    dim = _kv_cache(op, kv_cache, lay, qdim)
    C.dtype(op, "q", q, (torch.bfloat16,))
    C.rank(op, "q", q, (4,), f"[b, N, H, {dim}]")
    b, n, h, d = q.shape
    if d != dim:
        raise C.ShapeError(f"{op}: q must be [b, N, H, {dim}], {dim} the key width D of kv_cache "
                           f"{C.describe(kv_cache)} (layout {lay.name!r}, {lay.formula}), got {C.describe(q)}"
                           f"{layout_hint(op, kv_cache, lay.name, INDEXER_LAYOUTS, d, strict=True)}")
    if n < 1:
        raise C.ShapeError(f"{op}: q must hold at least one query row per request (N >= 1), got {C.describe(q)}")
    C.dtype(op, "weights", weights, (torch.float32, torch.bfloat16))
    C.shape(op, "weights", weights, (b * n, h), "[b * N, H]")
    C.dtype(op, "context_lens", context_lens, (torch.int32,))
    if tuple(context_lens.shape) not in ((b,), (b, n)):
        raise C.ShapeError(f"{op}: context_lens must be [b] = [{b}] or [b, N] = [{b}, {n}], "
                           f"got {C.describe(context_lens)}")
    C.dtype(op, "block_table", block_table, (torch.int32,))
    C.rank(op, "block_table", block_table, (2,), "[b, M]")
    if block_table.shape[0] != b:
        raise C.ShapeError(f"{op}: block_table must be [b, M] = [{b}, M], "
                           f"got {C.describe(block_table)}")
    if block_table.shape[1] * kv_cache.shape[1] > INT32_MAX:
        raise C.ShapeError(f"{op}: block_table rows address M * block size positions, at most "
                           f"{C.show(INT32_MAX)}, got {block_table.shape[1]} * {kv_cache.shape[1]}")
    C.same_device(op, q=q, kv_cache=kv_cache, weights=weights, context_lens=context_lens, block_table=block_table)
    return lay


def _values(op: str, kv_cache: torch.Tensor, context_lens: torch.Tensor, block_table: torch.Tensor) -> None:
    """context_lens in ``[0, max_blocks * block size]``; block ids in ``[-1, blocks)``, and ``>= 0`` for
    every block a context uses."""
    nb, bs = kv_cache.shape[0], kv_cache.shape[1]
    b, mb = block_table.shape
    if context_lens.numel() == 0:
        return
    lo, hi = int(context_lens.min()), int(context_lens.max())
    if lo < 0:
        raise C.RangeError(f"{op}: context_lens values must be >= 0, got min {lo}")
    if hi > mb * bs:
        raise C.RangeError(f"{op}: block_table rows are shorter than a context needs: {mb} blocks of {bs} "
                           f"positions hold {mb * bs}, context_lens holds {hi}")
    if block_table.numel() == 0:
        return
    C.index_range(op, "block_table", block_table, -1, nb)
    need = (context_lens.view(b, -1).amax(dim=1).long() + bs - 1) // bs            # blocks each row uses
    used = torch.arange(mb, device=block_table.device).view(1, mb) < need.view(b, 1)
    bad = used & (block_table < 0)
    if bool(bad.any()):
        row, col = (int(v) for v in bad.nonzero()[0])
        raise C.RangeError(f"{op}: block_table holds no block (-1) at row {row}, column {col}, inside the "
                           f"context of that request (context_lens needs {int(need[row])} blocks)")


# ---------------------------------------------------------------- indexer_logits_paged
def _check_logits(q, kv_cache, weights, context_lens, block_table, max_context_len, layout="indexer_fp4"):
    op = "indexer_logits_paged"
    _check_inputs(op, q, kv_cache, weights, context_lens, block_table, layout)
    C.in_range(op, "max_context_len", max_context_len, 0, INT32_MAX)


def _value_check_logits(q, kv_cache, weights, context_lens, block_table, max_context_len, layout="indexer_fp4"):
    op = "indexer_logits_paged"
    _values(op, kv_cache, context_lens, block_table)
    if context_lens.numel() and int(context_lens.max()) > max_context_len:
        raise C.RangeError(f"{op}: max_context_len must be >= every context length, got {max_context_len} "
                           f"with context_lens up to {int(context_lens.max())}")


define_op("indexer_logits_paged",
          "(Tensor q, Tensor kv_cache, Tensor weights, Tensor context_lens, Tensor block_table, int max_context_len, "
          "str layout=\"indexer_fp4\") -> Tensor",
          check=_check_logits, value_check=_value_check_logits,
          fake=lambda q, kv_cache, w, cl, bt, max_context_len, layout="indexer_fp4": q.new_empty(
              (q.shape[0] * q.shape[1], max_context_len), dtype=torch.float32),
          doc=C.ranges_doc(max_context_len=C.interval(0, INT32_MAX)) +
          " Checked values: `context_lens` in `[0, max_blocks * block size]` and at most `max_context_len`; "
          "`block_table` in `[-1, kv_cache blocks)`, no -1 among the blocks a context uses.")


def indexer_logits_paged(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor, context_lens: torch.Tensor,
                         block_table: torch.Tensor, max_context_len: int, *,
                         layout: str = "indexer_fp4") -> torch.Tensor:
    """Lightning-indexer logits over a paged key cache: fp32 ``[b * next_n, max_context_len]``.

    ``logits[b * next_n + i, t] = sum_h weights[b * next_n + i, h] * relu(q[b, i, h] . k_t)`` with ``k_t``
    the key at logical position ``t`` of request ``b`` (slot ``block_table[b, t // block_size] *
    block_size + t % block_size`` of ``kv_cache``), dequantized in fp32; ``-inf`` where ``t`` is at or
    past the row's limit (see the module docstring).

    q: bf16 ``[b, next_n, H, D]`` with ``D`` the cache's key width (V4: 128), used as given (the V4 model
    passes its indexer queries through ``fp4_act_quant`` and back before this call). kv_cache: a cache of
    ``layout`` (``"indexer_fp4"``, ``"indexer_fp8"`` or ``"bf16"``). weights: fp32 or bf16
    ``[b * next_n, H]`` (bf16: V4's own dtype for them; the sum is computed in fp32 either way, so a bf16
    tensor and an fp32 tensor of the same values give the same logits). context_lens:
    int32 ``[b]`` or ``[b, next_n]``. block_table: int32 ``[b, max_blocks]`` of block ids (``-1``: none).
    max_context_len: the logits' width.
    """
    return call.indexer_logits_paged(q, kv_cache, weights, context_lens, block_table, int(max_context_len), layout)


# ---------------------------------------------------------------- indexer_topk_paged
def _check_topk(q, kv_cache, weights, context_lens, block_table, topk, layout="indexer_fp4", offset=0):
    op = "indexer_topk_paged"
    _check_inputs(op, q, kv_cache, weights, context_lens, block_table, layout)
    C.in_range(op, "topk", topk, 1, C.MAX_TOPK)
    width = block_table.shape[1] * kv_cache.shape[1]
    C.in_range(op, "offset", offset, 0, INT32_MAX - width,
               note=f" (2**31 - 1 - M * block size, M * block size = {width}: picks are int32)")


define_op("indexer_topk_paged",
          "(Tensor q, Tensor kv_cache, Tensor weights, Tensor context_lens, Tensor block_table, int topk, "
          "str layout=\"indexer_fp4\", int offset=0) -> Tensor",
          check=_check_topk,
          value_check=lambda q, kv_cache, w, context_lens, block_table, *a: _values(
              "indexer_topk_paged", kv_cache, context_lens, block_table),
          fake=lambda q, kv_cache, w, cl, bt, topk, *a: q.new_empty((q.shape[0], q.shape[1], topk),
                                                                    dtype=torch.int32),
          doc=C.ranges_doc(topk=C.interval(1, C.MAX_TOPK), offset="[0, 2**31 - 1 - max_blocks * block size]") +
          " Checked values: `context_lens` in `[0, max_blocks * block size]`; `block_table` in "
          "`[-1, kv_cache blocks)`, no -1 among the blocks a context uses.")


def indexer_topk_paged(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor, context_lens: torch.Tensor,
                       block_table: torch.Tensor, topk: int, *, layout: str = "indexer_fp4",
                       offset: int = 0) -> torch.Tensor:
    """The ``topk`` best logical positions per query row by :func:`indexer_logits_paged`'s logits:
    int32 ``[b, next_n, topk]`` in descending logit order (ties unordered), ``t + offset`` for a visible
    position, ``-1`` in the slots past the row's visible count. Arguments as there."""
    return call.indexer_topk_paged(q, kv_cache, weights, context_lens, block_table, int(topk), layout, int(offset))


# ---------------------------------------------------------------- paged_slots
def _check_slots(positions, block_table, block_size, req_index=None):
    op = "paged_slots"
    C.dtype(op, "positions", positions, INTS)
    C.min_rank(op, "positions", positions, 1, "[n, ...]")
    C.dtype(op, "block_table", block_table, INTS)
    C.rank(op, "block_table", block_table, (2,), "[b, M]")
    if req_index is None:
        if block_table.shape[0] != positions.shape[0]:
            raise C.ShapeError(f"{op}: block_table must be [b, M] with b = positions.shape[0] = "
                               f"{positions.shape[0]} (or give req_index), got {C.describe(block_table)}")
    else:
        C.dtype(op, "req_index", req_index, INTS)
        if tuple(req_index.shape) != (positions.shape[0],):
            raise C.ShapeError(f"{op}: req_index must be [n] = [{positions.shape[0]}] (one block-table row per "
                               f"row of positions), got {C.describe(req_index)}")
    C.in_range(op, "block_size", block_size, 1, INT32_MAX)
    C.same_device(op, positions=positions, block_table=block_table, req_index=req_index)


def _value_check_slots(positions, block_table, block_size, req_index=None):
    op = "paged_slots"
    if positions.numel() == 0:
        return
    lo = int(positions.min())
    if lo < -1:
        raise C.RangeError(f"{op}: positions values must be >= -1 (-1: no entry), got min {lo}")
    b, mb = block_table.shape
    n = positions.shape[0]
    if req_index is None:
        rows = torch.arange(n, device=positions.device)
    else:
        rows = req_index.long()
        if int(rows.min()) < 0 or int(rows.max()) >= b:
            raise C.RangeError(f"{op}: req_index values must lie in [0, block_table rows = {b}), got "
                               f"{int(rows.min())} .. {int(rows.max())}")
    pos = positions.reshape(n, -1).long()
    col = torch.where(pos >= 0, pos // block_size, torch.full_like(pos, -1))
    if int(col.max()) >= mb:
        raise C.RangeError(f"{op}: block_table rows are shorter than a context needs: position "
                           f"{int(pos.max())} of positions lies in block {int(col.max())}, rows hold {mb} blocks")
    if int(col.max()) < 0:
        return
    blocks = block_table[rows.unsqueeze(1), col.clamp_min(0)].long()
    blocks = torch.where(col >= 0, blocks, torch.zeros_like(blocks))     # positions -1 use no block
    if int(blocks.min()) < 0:
        raise C.RangeError(f"{op}: block_table holds no block (a negative id) where positions points, "
                           "a block table row shorter than a context needs")
    top = int(blocks.max()) * block_size + block_size - 1
    if top > INT32_MAX:
        raise C.RangeError(f"{op}: block_table ids times block_size must give int32 slots, got block "
                           f"{int(blocks.max())} * {block_size}")


define_op("paged_slots", "(Tensor positions, Tensor block_table, int block_size, Tensor? req_index=None) -> Tensor",
          check=_check_slots, value_check=_value_check_slots,
          fake=lambda positions, block_table, block_size, req_index=None: torch.empty_like(positions,
                                                                                           dtype=torch.int32),
          doc=C.ranges_doc(block_size=C.interval(1, INT32_MAX)) +
          " Checked values: `positions` >= -1; `req_index` in `[0, block_table rows)`; every position's block "
          "inside its `block_table` row and that entry >= 0; the slots fit int32.")


def paged_slots(positions: torch.Tensor, block_table: torch.Tensor, block_size: int, *,
                req_index: torch.Tensor | None = None) -> torch.Tensor:
    """Logical positions -> cache slots: int32 like ``positions`` (int ``[n, ...]``),
    ``block_table[r, p // block_size] * block_size + p % block_size`` for position ``p`` of row ``i``,
    ``r = req_index[i]`` (int ``[n]``; default ``r = i``, block_table then ``[n, max_blocks]``); ``-1`` stays
    ``-1``. ``req_index`` lets many rows (a step's tokens) read their request's row of one table without
    copying it per row. Turns indexer picks and window positions into the slots ``sparse_attn_paged`` takes."""
    return call.paged_slots(positions, block_table, int(block_size), req_index)
