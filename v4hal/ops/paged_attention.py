"""Sparse attention over paged KV caches: V4's sparse decode with explicit slots, two caches and a sink.

``sparse_attn_paged`` has the semantics of FlashMLA's V4 sparse decode (``flash_mla_with_kvcache`` with
``indices``, ``attn_sink``, ``extra_k_cache``, ``topk_length``): the picks of the window cache
(``kv_cache``, ``indices``) and of the compressed cache (``extra_kv_cache``, ``extra_indices``) form one
softmax with the sink in its denominator; on request (``return_lse=True``, FlashInfer's opt-in) it also returns the
log-sum-exp of the scores (without the sink). The caches are attention layouts of :mod:`v4hal.ops.paged`
(``model1_fp8``, ``bf16``, V4.1's ``v41_window_fp8`` / ``v41_compressed_fp4``) of any entry width ``D``
the layout allows (V4: 512); ``q``'s last dim must be the caches' ``D``. ``layout`` is the window
cache's, ``extra_layout`` the extra cache's (None: ``layout``; V4.1: ``"v41_window_fp8"`` and
``"v41_compressed_fp4"``).

Two ways of giving the picks, one semantics (a backend takes whichever its kernel prefers):

- by slot (FlashMLA): ``indices`` / ``extra_indices`` hold ``block * block_size + offset`` slots;
- by position (CANN's ``npu_sparse_attn_sharedkv`` / ``npu_sparse_flash_attention``): ``positions``
  ``[b, s_q]`` (each query's token position) with ``block_table`` ``[b, pages]`` and ``window_size``
  give the window as a band: query ``p`` picks positions ``max(0, p - window_size + 1) .. p`` of its
  row's pages (``indices`` is None); ``extra_block_table`` ``[b, pages]`` with ``extra_ratio`` makes
  ``extra_indices`` entry indices ``c`` into the row's compressed pages, of which a query at ``p``
  sees only ``c < (p + 1) // extra_ratio`` (later picks are masked).

:func:`band_positions` and :func:`resolve_slots` turn the position form into the slot form; the
reference computes on that, so both forms give the same result bit for bit.
"""
from __future__ import annotations

import torch

from v4hal.hal.errors import V4HalError

from . import _checks as C
from ._checks import INT32_MAX
from ._define import call, define_op
from .paged import PAGED_LAYOUTS, _check_cache, _layout, layout_hint

OP = "sparse_attn_paged"
#: the layouts holding attention entries (keys = values); V4's and V4.1's width is 512
ATTN_LAYOUTS = ("model1_fp8", "bf16", "v41_window_fp8", "v41_compressed_fp4")


def _cache(name: str, cache: torch.Tensor, layout: str, dim: int, layout_arg: str = "layout",
           fix_arg: str = "layout") -> int:
    """The cache checks of :mod:`v4hal.ops.paged` (``dim``: q's width), with the messages naming ``name``,
    the layout argument ``layout_arg`` it is read with and ``fix_arg`` in the hint's fix; returns the entry
    width."""
    try:
        return _check_cache(OP, cache, PAGED_LAYOUTS[layout], ATTN_LAYOUTS, dim)
    except V4HalError as e:
        msg = str(e)
        prefix = f"{OP}: cache"
        if msg.startswith(prefix):
            msg = f"{OP}: {name}" + msg[len(prefix):]
        if layout_arg != "layout":
            msg = msg.replace(f"layout {layout!r}", f"{layout_arg} {layout!r}")
        if fix_arg != "layout":
            msg = msg.replace("pass layout=", f"pass {fix_arg}=")
        raise type(e)(msg) from None


def _attn_layout(name: str, layout: object, cache: torch.Tensor, q: torch.Tensor):
    """The `PagedLayout` named by the layout argument ``name``; RangeError unless it holds attention entries."""
    lay = _layout(OP, layout, name)
    if lay.name not in ATTN_LAYOUTS:
        hint = _layout_hint(cache, layout, q) if isinstance(cache, torch.Tensor) else ""
        if name != "layout":
            hint = hint.replace("pass layout=", f"pass {name}=")
        raise C.RangeError(f"{OP}: {name} must be one of {list(ATTN_LAYOUTS)} (attention entries), "
                           f"got {layout!r}{hint}")
    return lay


def _layout_hint(kv_cache: torch.Tensor, layout: str, q: torch.Tensor) -> str:
    """`layout_hint` for an attention layout holding q-wide entries (any width when q is not 4-D)."""
    d = q.shape[-1] if isinstance(q, torch.Tensor) and q.dim() == 4 else None
    return layout_hint(OP, kv_cache, layout, ATTN_LAYOUTS, d)


def _indices(name: str, idx: torch.Tensor, b: int, s: int) -> None:
    C.dtype(OP, name, idx, (torch.int32,))
    if idx.dim() != 3 or tuple(idx.shape[:2]) != (b, s):
        raise C.ShapeError(f"{OP}: {name} must be [b, s, k] = [{b}, {s}, k], got {C.describe(idx)}")


def _lengths(name: str, lengths: torch.Tensor | None, b: int) -> None:
    if lengths is not None:
        C.dtype(OP, name, lengths, (torch.int32,))
        C.shape(OP, name, lengths, (b,), "[b]")


def _table(name: str, table: torch.Tensor, b: int) -> None:
    C.dtype(OP, name, table, (torch.int32,))
    if table.dim() != 2 or table.shape[0] != b:
        raise C.ShapeError(f"{OP}: {name} must be [b, pages] = [{b}, pages], got {C.describe(table)}")


def _check_forms(b: int, s: int, indices, topk_length, extra_indices, positions, block_table, window_size,
                 extra_block_table, extra_ratio) -> None:
    """The two ways of giving the picks (module doc): exactly one window form, and the position form's
    arguments together."""
    band = block_table is not None
    if band == (indices is not None):
        raise C.ShapeError(f"{OP}: give the window either by slot (indices) or as a band (positions, block_table, "
                           f"window_size), exactly one: got {'both' if band else 'neither'}")
    if positions is not None:
        C.dtype(OP, "positions", positions, C.INTS)
        C.shape(OP, "positions", positions, (b, s), "[b, s]")
    elif band or extra_block_table is not None:
        raise C.ShapeError(f"{OP}: {'block_table' if band else 'extra_block_table'} needs positions "
                           "(each query's token position, [b, s])")
    if band:
        _table("block_table", block_table, b)
        C.in_range(OP, "window_size", window_size, 1, INT32_MAX)
        if topk_length is not None:
            raise C.ShapeError(f"{OP}: topk_length applies to slot indices; a band window (block_table) takes none")
    elif window_size != 0:
        raise C.RangeError(f"{OP}: window_size is the band width and needs block_table; got {window_size} "
                           "with slot indices")
    if extra_block_table is not None:
        if extra_indices is None:
            raise C.ShapeError(f"{OP}: extra_block_table needs extra_kv_cache and extra_indices (entry indices)")
        _table("extra_block_table", extra_block_table, b)
        C.in_range(OP, "extra_ratio", extra_ratio, 1, INT32_MAX)
    elif extra_ratio != 0:
        raise C.RangeError(f"{OP}: extra_ratio is the visibility ratio of entry indices and needs "
                           f"extra_block_table; got {extra_ratio} with slot extra_indices")
    if positions is not None and not band and extra_block_table is None:
        raise C.ShapeError(f"{OP}: positions is read only with block_table or extra_block_table")


def _check(q, kv_cache, indices, attn_sink, softmax_scale, topk_length=None, extra_kv_cache=None,
           extra_indices=None, extra_topk_length=None, layout="model1_fp8", positions=None, block_table=None,
           window_size=0, extra_block_table=None, extra_ratio=0, return_lse=False, extra_layout=None):
    lay = _attn_layout("layout", layout, kv_cache, q)
    xlay = lay if extra_layout is None else _attn_layout("extra_layout", extra_layout, extra_kv_cache, q)
    C.dtype(OP, "q", q, (torch.bfloat16,))
    C.rank(OP, "q", q, (4,), "[b, s, h, D]")
    b, s, h, d = q.shape
    dim = _cache("kv_cache", kv_cache, layout, d)
    if d != dim:
        raise C.ShapeError(f"{OP}: q must be [b, s, h, {dim}], {dim} the entry width D of kv_cache "
                           f"{C.describe(kv_cache)} (layout {layout!r}, {lay.formula}), got {C.describe(q)}"
                           f"{layout_hint(OP, kv_cache, layout, ATTN_LAYOUTS, d, strict=True)}")
    _check_forms(b, s, indices, topk_length, extra_indices, positions, block_table, window_size, extra_block_table,
                 extra_ratio)
    if indices is not None:
        _indices("indices", indices, b, s)
    C.dtype(OP, "attn_sink", attn_sink, (torch.float32,))
    C.shape(OP, "attn_sink", attn_sink, (h,), "[h]")
    C.float_arg(OP, "softmax_scale", softmax_scale)
    _lengths("topk_length", topk_length, b)
    if (extra_kv_cache is None) != (extra_indices is None):
        given, missing = ("extra_kv_cache", "extra_indices") if extra_indices is None else \
            ("extra_indices", "extra_kv_cache")
        raise C.ShapeError(f"{OP}: extra_kv_cache and extra_indices come together: {given} was given "
                           f"without {missing}")
    if extra_topk_length is not None and extra_indices is None:
        raise C.ShapeError(f"{OP}: extra_topk_length needs extra_kv_cache and extra_indices, got neither")
    if extra_kv_cache is not None:
        xarg = "layout" if extra_layout is None else "extra_layout"
        xdim = _cache("extra_kv_cache", extra_kv_cache, xlay.name, d, xarg, "extra_layout")
        if xdim != dim:
            raise C.ShapeError(f"{OP}: extra_kv_cache must hold {dim}-wide entries like kv_cache "
                               f"({C.describe(kv_cache)}), got {C.describe(extra_kv_cache)} holding "
                               f"{xdim}-wide entries ({xarg} {xlay.name!r}, {xlay.formula})")
        _indices("extra_indices", extra_indices, b, s)
        _lengths("extra_topk_length", extra_topk_length, b)
    C.same_device(OP, q=q, kv_cache=kv_cache, indices=indices, attn_sink=attn_sink, topk_length=topk_length,
                  extra_kv_cache=extra_kv_cache, extra_indices=extra_indices, extra_topk_length=extra_topk_length,
                  positions=positions, block_table=block_table, extra_block_table=extra_block_table)


def _slots(cache: torch.Tensor) -> int:
    return cache.shape[0] * cache.shape[1]


def _value_check(q, kv_cache, indices, attn_sink, softmax_scale, topk_length=None, extra_kv_cache=None,
                 extra_indices=None, extra_topk_length=None, layout="model1_fp8", positions=None, block_table=None,
                 window_size=0, extra_block_table=None, extra_ratio=0, return_lse=False, extra_layout=None):
    if block_table is not None:
        C.index_range(OP, "positions", positions, 0, min(INT32_MAX, block_table.shape[1] * kv_cache.shape[1]))
    elif positions is not None:
        C.index_range(OP, "positions", positions, 0, INT32_MAX)
    if block_table is not None:
        C.index_range(OP, "block_table", block_table, -1, kv_cache.shape[0])
    else:
        C.index_range(OP, "indices", indices, -1, _slots(kv_cache))
    if topk_length is not None:
        C.index_range(OP, "topk_length", topk_length, 0, indices.shape[-1] + 1)
    if extra_block_table is not None:
        C.index_range(OP, "extra_block_table", extra_block_table, -1, extra_kv_cache.shape[0])
        C.index_range(OP, "extra_indices", extra_indices, -1, extra_block_table.shape[1] * extra_kv_cache.shape[1])
    elif extra_kv_cache is not None:
        C.index_range(OP, "extra_indices", extra_indices, -1, _slots(extra_kv_cache))
        if extra_topk_length is not None:
            C.index_range(OP, "extra_topk_length", extra_topk_length, 0, extra_indices.shape[-1] + 1)
    if attn_sink.numel() and bool((attn_sink.isnan() | attn_sink.isposinf()).any()):
        raise C.RangeError(f"{OP}: attn_sink must be finite or -inf (no sink), got {C.describe(attn_sink)} "
                           "holding NaN or +inf")


def lse_out(q: torch.Tensor, return_lse: bool) -> torch.Tensor:
    """The lse output: fp32 ``[b, h, s_q]`` when requested, else an empty fp32 ``[0]`` (not computed)."""
    b, s, h, _ = q.shape
    return q.new_empty((b, h, s) if return_lse else (0,), dtype=torch.float32)


def _fake(q, kv_cache, indices, attn_sink, softmax_scale, topk_length=None, extra_kv_cache=None,
          extra_indices=None, extra_topk_length=None, layout="model1_fp8", positions=None, block_table=None,
          window_size=0, extra_block_table=None, extra_ratio=0, return_lse=False, extra_layout=None):
    return torch.empty_like(q), lse_out(q, return_lse)


def band_positions(positions: torch.Tensor, window_size: int) -> torch.Tensor:
    """int64 ``[b, s_q, window_size]``: the window of each query position ``p`` (int ``[b, s_q]``), positions
    ``max(0, p - window_size + 1) .. p`` in increasing order, then -1 (for ``p < window_size - 1``)."""
    pos = positions.long()
    first = pos - pos.clamp(max=window_size - 1)
    w = first.unsqueeze(-1) + torch.arange(window_size, device=pos.device)
    return torch.where(w <= pos.unsqueeze(-1), w, torch.full_like(w, -1))


def entry_picks(extra_indices: torch.Tensor, positions: torch.Tensor, extra_ratio: int) -> torch.Tensor:
    """int64 ``[b, s_q, k]``: entry indices with those a query at ``p`` does not see (``c >= (p + 1) //
    extra_ratio``) set to -1."""
    c = extra_indices.long()
    limit = ((positions.long() + 1) // extra_ratio).unsqueeze(-1)
    return torch.where((c >= 0) & (c < limit), c, torch.full_like(c, -1))


def resolve_slots(kv_cache: torch.Tensor, indices: torch.Tensor | None, extra_kv_cache: torch.Tensor | None,
                  extra_indices: torch.Tensor | None, positions: torch.Tensor | None,
                  block_table: torch.Tensor | None, window_size: int, extra_block_table: torch.Tensor | None,
                  extra_ratio: int, slots_of) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The slot form of a call: (int32 window slots ``[b, s_q, k]``, int32 extra slots or None).

    ``slots_of(positions, block_table, block_size)`` is the backend's ``paged_slots``."""
    if block_table is not None:
        b, s = positions.shape
        win = band_positions(positions, window_size)
        indices = slots_of(win.view(b, s * window_size), block_table, kv_cache.shape[1]).view(b, s, window_size)
    if extra_block_table is not None and extra_indices is not None and extra_kv_cache is not None:
        b, s, k = extra_indices.shape
        c = entry_picks(extra_indices, positions, extra_ratio)
        extra_indices = slots_of(c.view(b, s * k), extra_block_table, extra_kv_cache.shape[1]).view(b, s, k)
    return indices, extra_indices


define_op(OP, "(Tensor q, Tensor kv_cache, Tensor? indices, Tensor attn_sink, float softmax_scale, "
              "Tensor? topk_length=None, Tensor? extra_kv_cache=None, Tensor? extra_indices=None, "
              "Tensor? extra_topk_length=None, str layout=\"model1_fp8\", Tensor? positions=None, "
              "Tensor? block_table=None, int window_size=0, Tensor? extra_block_table=None, int extra_ratio=0, "
              "bool return_lse=False, str? extra_layout=None) -> (Tensor, Tensor)",
          check=_check, fake=_fake, value_check=_value_check,
          doc=C.ranges_doc(softmax_scale=C.FLOAT_ARG_RANGE) +
          " Checked values: `indices` in `[-1, kv_cache blocks * block size)`, `extra_indices` likewise for "
          "`extra_kv_cache` (entry indices with `extra_block_table`: `[-1, pages * block size)`); `block_table` / "
          "`extra_block_table` in `[-1, blocks)` of their cache; `positions` in "
          "`[0, block_table pages * block size)` (`[0, 2**31 - 1)` without `block_table`); `topk_length` in "
          "`[0, topk]`, `extra_topk_length` in `[0, extra_topk]`; `attn_sink` finite or -inf.")


def sparse_attn_paged(q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor | None, attn_sink: torch.Tensor,
                      softmax_scale: float, *, topk_length: torch.Tensor | None = None,
                      extra_kv_cache: torch.Tensor | None = None, extra_indices: torch.Tensor | None = None,
                      extra_topk_length: torch.Tensor | None = None, layout: str = "model1_fp8",
                      positions: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
                      window_size: int = 0, extra_block_table: torch.Tensor | None = None, extra_ratio: int = 0,
                      return_lse: bool = False, extra_layout: str | None = None
                      ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sparse decode attention of ``q`` (bf16 ``[b, s_q, h, D]``) over picked cache entries.

    ``kv_cache``: a paged cache of ``layout`` (``"model1_fp8"``, ``"bf16"``, ``"v41_window_fp8"`` or
    ``"v41_compressed_fp4"``), ``extra_kv_cache`` one of ``extra_layout`` (same choices; None: ``layout``;
    V4.1: ``layout="v41_window_fp8", extra_layout="v41_compressed_fp4"``), both holding ``D``-wide entries
    (``D`` = q's last dim; V4 and V4.1: 512); ``attn_sink``: fp32 ``[h]`` (``-inf`` = no sink).
    Key = value = the dequantized entry. The picks of both caches form one softmax with
    ``exp(attn_sink)`` in the denominator.

    The window cache's picks, one of:

    - by slot: ``indices`` int32 ``[b, s_q, topk]`` (``block * block_size + offset``; -1 = no entry) and
      ``topk_length`` int32 ``[b]`` (batch ``i`` uses only its first ``topk_length[i]`` picks);
    - as a band: ``indices=None``, ``positions`` int32/int64 ``[b, s_q]`` (token positions),
      ``block_table`` int32 ``[b, pages]`` (row ``i``'s pages of ``kv_cache``) and ``window_size``: query
      ``p`` picks positions ``max(0, p - window_size + 1) .. p`` (:func:`band_positions`).

    The compressed cache's picks ``extra_indices`` int32 ``[b, s_q, extra_topk]`` (with
    ``extra_topk_length`` like ``topk_length``): slots, or with ``extra_block_table`` int32 ``[b, pages]``
    and ``extra_ratio`` entry indices ``c`` into row ``i``'s pages, visible to a query at ``p`` when
    ``c < (p + 1) // extra_ratio`` (needs ``positions``).

    Returns out bf16 ``[b, s_q, h, D]``, or with ``return_lse=True`` ``(out, lse)``, lse fp32
    ``[b, h, s_q]`` (natural-log log-sum-exp of the scaled scores of the valid picks, sink excluded);
    a query with no valid pick gives out 0 and lse ``+inf``.
    """
    out, lse = call.sparse_attn_paged(q, kv_cache, indices, attn_sink, float(softmax_scale), topk_length,
                                      extra_kv_cache, extra_indices, extra_topk_length, layout, positions,
                                      block_table, int(window_size), extra_block_table, int(extra_ratio),
                                      bool(return_lse), extra_layout)
    return (out, lse) if return_lse else out
