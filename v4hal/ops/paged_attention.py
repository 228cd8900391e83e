"""Sparse attention over paged KV caches: V4's sparse decode with explicit slots, two caches and a sink.

``sparse_attn_paged`` has the semantics of FlashMLA's V4 sparse decode (``flash_mla_with_kvcache`` with
``indices``, ``attn_sink``, ``extra_k_cache``, ``topk_length``): the picks of the window cache
(``kv_cache``, ``indices``) and of the compressed cache (``extra_kv_cache``, ``extra_indices``) form one
softmax with the sink in its denominator; it also returns the log-sum-exp of the scores (without the
sink). The caches are attention layouts of :mod:`v4hal.ops.paged` (``model1_fp8`` or ``bf16``) of any
entry width ``D`` the layout allows (V4: 512); ``q``'s last dim must be the caches' ``D``.
"""
from __future__ import annotations

import torch

from v4hal.hal.errors import V4HalError

from . import _checks as C
from ._define import call, define_op
from .paged import PAGED_LAYOUTS, _check_cache, _layout, layout_hint

OP = "sparse_attn_paged"
#: the layouts holding attention entries (keys = values); V4's width is 512
ATTN_LAYOUTS = ("model1_fp8", "bf16")


def _cache(name: str, cache: torch.Tensor, layout: str, dim: int) -> int:
    """The cache checks of :mod:`v4hal.ops.paged` (``dim``: q's width), with the messages naming ``name``;
    returns the entry width."""
    try:
        return _check_cache(OP, cache, PAGED_LAYOUTS[layout], ATTN_LAYOUTS, dim)
    except V4HalError as e:
        msg = str(e)
        prefix = f"{OP}: cache"
        if msg.startswith(prefix):
            msg = f"{OP}: {name}" + msg[len(prefix):]
        raise type(e)(msg) from None


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


def _check(q, kv_cache, indices, attn_sink, softmax_scale, topk_length=None, extra_kv_cache=None,
           extra_indices=None, extra_topk_length=None, layout="model1_fp8"):
    lay = _layout(OP, layout)
    if lay.name not in ATTN_LAYOUTS:
        raise C.RangeError(f"{OP}: layout must be one of {list(ATTN_LAYOUTS)} (attention entries), "
                           f"got {layout!r}{_layout_hint(kv_cache, layout, q)}")
    C.dtype(OP, "q", q, (torch.bfloat16,))
    C.rank(OP, "q", q, (4,), "[b, s, h, D]")
    b, s, h, d = q.shape
    dim = _cache("kv_cache", kv_cache, layout, d)
    if d != dim:
        raise C.ShapeError(f"{OP}: q must be [b, s, h, {dim}], {dim} the entry width D of kv_cache "
                           f"{C.describe(kv_cache)} (layout {layout!r}, {lay.formula}), got {C.describe(q)}"
                           f"{layout_hint(OP, kv_cache, layout, ATTN_LAYOUTS, d, strict=True)}")
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
        xdim = _cache("extra_kv_cache", extra_kv_cache, layout, d)
        if xdim != dim:
            raise C.ShapeError(f"{OP}: extra_kv_cache must hold {dim}-wide entries like kv_cache "
                               f"({C.describe(kv_cache)}), got {C.describe(extra_kv_cache)} holding "
                               f"{xdim}-wide entries (layout {layout!r}, {lay.formula})")
        _indices("extra_indices", extra_indices, b, s)
        _lengths("extra_topk_length", extra_topk_length, b)
    C.same_device(OP, q=q, kv_cache=kv_cache, indices=indices, attn_sink=attn_sink, topk_length=topk_length,
                  extra_kv_cache=extra_kv_cache, extra_indices=extra_indices, extra_topk_length=extra_topk_length)


def _slots(cache: torch.Tensor) -> int:
    return cache.shape[0] * cache.shape[1]


def _value_check(q, kv_cache, indices, attn_sink, softmax_scale, topk_length=None, extra_kv_cache=None,
                 extra_indices=None, extra_topk_length=None, layout="model1_fp8"):
    C.index_range(OP, "indices", indices, -1, _slots(kv_cache))
    if topk_length is not None:
        C.index_range(OP, "topk_length", topk_length, 0, indices.shape[-1] + 1)
    if extra_kv_cache is not None:
        C.index_range(OP, "extra_indices", extra_indices, -1, _slots(extra_kv_cache))
        if extra_topk_length is not None:
            C.index_range(OP, "extra_topk_length", extra_topk_length, 0, extra_indices.shape[-1] + 1)
    if attn_sink.numel() and bool((attn_sink.isnan() | attn_sink.isposinf()).any()):
        raise C.RangeError(f"{OP}: attn_sink must be finite or -inf (no sink), got {C.describe(attn_sink)} "
                           "holding NaN or +inf")


def _fake(q, kv_cache, indices, attn_sink, softmax_scale, topk_length=None, extra_kv_cache=None,
          extra_indices=None, extra_topk_length=None, layout="model1_fp8"):
    b, s, h, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, s), dtype=torch.float32)


define_op(OP, "(Tensor q, Tensor kv_cache, Tensor indices, Tensor attn_sink, float softmax_scale, "
              "Tensor? topk_length=None, Tensor? extra_kv_cache=None, Tensor? extra_indices=None, "
              "Tensor? extra_topk_length=None, str layout=\"model1_fp8\") -> (Tensor, Tensor)",
          check=_check, fake=_fake, value_check=_value_check,
          doc=C.ranges_doc(softmax_scale=C.FLOAT_ARG_RANGE) +
          " Checked values: `indices` in `[-1, kv_cache blocks * block size)`, `extra_indices` likewise for "
          "`extra_kv_cache`; `topk_length` in `[0, topk]`, `extra_topk_length` in `[0, extra_topk]`; "
          "`attn_sink` finite or -inf.")


def sparse_attn_paged(q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor, attn_sink: torch.Tensor,
                      softmax_scale: float, *, topk_length: torch.Tensor | None = None,
                      extra_kv_cache: torch.Tensor | None = None, extra_indices: torch.Tensor | None = None,
                      extra_topk_length: torch.Tensor | None = None,
                      layout: str = "model1_fp8") -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse decode attention of ``q`` (bf16 ``[b, s_q, h, D]``) over cache entries picked by slot.

    ``kv_cache`` / ``extra_kv_cache``: paged caches of ``layout`` (``"model1_fp8"`` or ``"bf16"``) holding
    ``D``-wide entries (``D`` = q's last dim; V4: 512);
    ``indices`` / ``extra_indices``: int32 ``[b, s_q, topk]`` / ``[b, s_q, extra_topk]`` slots
    (``block * block_size + offset``; -1 = no entry); ``topk_length`` / ``extra_topk_length``: int32
    ``[b]``, batch ``i`` uses only its first ``topk_length[i]`` picks; ``attn_sink``: fp32 ``[h]``
    (``-inf`` = no sink). Key = value = the dequantized entry. The picks of both caches form one
    softmax with ``exp(attn_sink)`` in the denominator.

    Returns ``(out, lse)``: out bf16 ``[b, s_q, h, D]``, lse fp32 ``[b, h, s_q]`` (natural-log
    log-sum-exp of the scaled scores of the valid picks, sink excluded); a query with no valid pick
    gives out 0 and lse ``+inf``.
    """
    return call.sparse_attn_paged(q, kv_cache, indices, attn_sink, float(softmax_scale), topk_length,
                                  extra_kv_cache, extra_indices, extra_topk_length, layout)
