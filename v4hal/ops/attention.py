"""Sparse attention (shared-KV MQA with an attention sink), the lightning indexer, and the
compressor's pooling."""
from __future__ import annotations

import torch

from . import _checks as C
from ._checks import FLOATS, INT32_MAX
from ._define import call, define_op


def _check_sparse_attn(q, kv, attn_sink, topk_idxs, softmax_scale):
    op = "sparse_attn"
    C.dtype(op, "q", q, FLOATS)
    C.rank(op, "q", q, (4,), "[b, m, h, d]")
    b, m, h, d = q.shape
    C.dtype(op, "kv", kv, (q.dtype,))
    C.rank(op, "kv", kv, (3,), "[b, n, d]")
    if kv.shape[0] != b or kv.shape[2] != d:
        raise C.ShapeError(f"{op}: kv must be [b, n, d] = [{b}, n, {d}], got {C.describe(kv)}")
    C.dtype(op, "attn_sink", attn_sink, (torch.float32,))
    C.shape(op, "attn_sink", attn_sink, (h,), "[h]")
    C.dtype(op, "topk_idxs", topk_idxs, (torch.int32,))
    C.rank(op, "topk_idxs", topk_idxs, (3,), "[b, m, k]")
    if tuple(topk_idxs.shape[:2]) != (b, m):
        raise C.ShapeError(f"{op}: topk_idxs must be [b, m, k] = [{b}, {m}, k], got {C.describe(topk_idxs)}")
    C.float_arg(op, "softmax_scale", softmax_scale)
    C.same_device(op, q=q, kv=kv, attn_sink=attn_sink, topk_idxs=topk_idxs)


def _values_sparse_attn(q, kv, attn_sink, topk_idxs, softmax_scale):
    C.index_range("sparse_attn", "topk_idxs", topk_idxs, -1, kv.shape[1])
    if attn_sink.numel() and bool((attn_sink.isnan() | attn_sink.isposinf()).any()):
        raise C.RangeError(f"sparse_attn: attn_sink must be finite or -inf (no sink), got {attn_sink.tolist()}")


define_op("sparse_attn", "(Tensor q, Tensor kv, Tensor attn_sink, Tensor topk_idxs, float softmax_scale) -> Tensor",
          check=_check_sparse_attn, fake=lambda q, *a: torch.empty_like(q), value_check=_values_sparse_attn,
          doc=C.ranges_doc(softmax_scale=C.FLOAT_ARG_RANGE))


def sparse_attn(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, topk_idxs: torch.Tensor,
                softmax_scale: float) -> torch.Tensor:
    """Attention of ``q [b, m, h, d]`` over the rows ``kv[b, topk_idxs[b, m]]`` (keys = values; -1 skipped),
    with ``exp(attn_sink[h])`` added to the softmax denominator. An all -1 row gives 0. Out like q."""
    return call.sparse_attn(q, kv, attn_sink, topk_idxs, float(softmax_scale))


def _check_indexer_inputs(op, q, k, weights):
    C.dtype(op, "q", q, FLOATS)
    C.rank(op, "q", q, (4,), "[b, s, H, D]")
    b, s, h, d = q.shape
    C.dtype(op, "k", k, FLOATS)
    C.rank(op, "k", k, (3,), "[b, t, D]")
    if k.shape[0] != b or k.shape[2] != d:
        raise C.ShapeError(f"{op}: k must be [b, t, D] = [{b}, t, {d}], got {C.describe(k)}")
    C.dtype(op, "weights", weights, FLOATS)
    C.shape(op, "weights", weights, (b, s, h), "[b, s, H]")
    C.same_device(op, q=q, k=k, weights=weights)


define_op("index_scores", "(Tensor q, Tensor k, Tensor weights) -> Tensor",
          check=lambda q, k, w: _check_indexer_inputs("index_scores", q, k, w),
          fake=lambda q, k, w: q.new_empty((q.shape[0], q.shape[1], k.shape[1]), dtype=torch.float32))


def index_scores(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Lightning-indexer scores ``I[b, s, t] = sum_h weights[b, s, h] * relu(q[b, s, h] . k[b, t])``, fp32."""
    return call.index_scores(q, k, weights)


def _check_indexer_topk(q, k, weights, topk, start_pos, ratio, offset):
    op = "indexer_topk"
    _check_indexer_inputs(op, q, k, weights)
    C.in_range(op, "topk", topk, 1, C.MAX_TOPK)
    C.in_range(op, "ratio", ratio, 1, C.MAX_RATIO)
    s, t = q.shape[1], k.shape[1]
    C.in_range(op, "start_pos", start_pos, 0, INT32_MAX - s,
               note=f" (2**31 - 1 - s with s = {s}: positions start_pos + i are int32)")
    C.in_range(op, "offset", offset, 0, INT32_MAX - t, note=f" (2**31 - 1 - t with t = {t}: picks are int32)")


define_op("indexer_topk",
          "(Tensor q, Tensor k, Tensor weights, int topk, int start_pos=0, int ratio=4, int offset=0) -> Tensor",
          check=_check_indexer_topk,
          doc=C.ranges_doc(topk=C.interval(1, C.MAX_TOPK), ratio=C.interval(1, C.MAX_RATIO),
                           start_pos="[0, 2**31 - 1 - s]", offset="[0, 2**31 - 1 - t]"),
          fake=lambda q, k, w, topk, *a: q.new_empty((q.shape[0], q.shape[1], min(topk, k.shape[1])),
                                                      dtype=torch.int32))


def indexer_topk(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, topk: int, *, start_pos: int = 0,
                 ratio: int = 4, offset: int = 0) -> torch.Tensor:
    """Top ``min(topk, t)`` compressed entries per query (int32 ``[b, s, min(topk, t)]``), ``t + offset`` when
    the entry's span is complete before the query (``t < (start_pos + i + 1) // ratio``), else -1."""
    return call.indexer_topk(q, k, weights, topk, start_pos, ratio, offset)


def _check_compress_kv(kv, score, ape, ratio, overlap):
    op = "compress_kv"
    C.dtype(op, "kv", kv, FLOATS)
    C.rank(op, "kv", kv, (3,), "[b, n, c*d]")
    C.in_range(op, "ratio", ratio, 1, C.MAX_RATIO)
    b, n, cd = kv.shape
    c = 2 if overlap else 1
    if n % ratio:
        raise C.ShapeError(f"{op}: kv length n = kv.shape[1] ({n}) must be a multiple of ratio ({ratio})")
    C.divisible(op, "kv.shape[2] (c*d)", cd, c, "c (2 when overlap)")
    C.dtype(op, "score", score, (torch.float32,))
    C.shape(op, "score", score, (b, n, cd), "[b, n, c*d]")
    C.dtype(op, "ape", ape, (torch.float32,))
    C.shape(op, "ape", ape, (ratio, cd), "[ratio, c*d]")
    C.same_device(op, kv=kv, score=score, ape=ape)


define_op("compress_kv", "(Tensor kv, Tensor score, Tensor ape, int ratio, bool overlap) -> Tensor",
          check=_check_compress_kv, doc=C.ranges_doc(ratio=C.interval(1, C.MAX_RATIO)),
          fake=lambda kv, score, ape, ratio, overlap: kv.new_empty(
              (kv.shape[0], kv.shape[1] // ratio, kv.shape[2] // (2 if overlap else 1))))


def compress_kv(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, ratio: int, overlap: bool) -> torch.Tensor:
    """Pool every ``ratio`` positions of ``kv [b, n, c*d]`` into one entry with ``softmax(score + ape)`` weights
    per channel (ratio 4: overlapping windows, c = 2) -> ``[b, n/ratio, d]``."""
    return call.compress_kv(kv, score, ape, ratio, bool(overlap))
