"""The two-level (candidate) indexer of DeepSeek-V4.1: candidate blocks, and logits / top-k inside them.

A candidate-source layer scores every visible position with :func:`~v4hal.ops.paged_indexer.indexer_logits_paged`
and publishes, per query row, its best blocks of ``candidate_block`` consecutive logical positions
(:func:`indexer_candidate_blocks`: block score = the largest logit of the block's visible positions; the
newest block, the one holding the row's last visible position, is always kept; V4.1: 2048 blocks of 8).
Later index layers score only the positions of those blocks (:func:`indexer_logits_paged_sparse`, the
semantics of DeepGEMM's paged sparse MQA logits) and pick their top-k among them
(:func:`indexer_topk_paged_sparse`).

Candidate block ``c`` of a row covers logical positions ``c * candidate_block .. c * candidate_block +
candidate_block - 1`` of that row's request; ``-1`` is no block. The visibility of a position (``context_lens``
``[b]`` or ``[b, next_n]``), the block table and the key caches follow :mod:`v4hal.ops.paged_indexer`
exactly, so a sparse logit equals the dense logit of the same position bit for bit.

V4.1's score ``sum_h relu(q_h . k) * D**-0.5 * w_h * H**-0.5`` is these ops' ``sum_h weights_h * relu(q_h . k)``
with ``weights = w * D**-0.5 * H**-0.5`` (as V4 folds its scale into the weights); V4.1's FP4 queries are
passed as their exact bf16 values (``fp4_act_quant`` and back: an e2m1 value times a power of two is a bf16
value).

Ties: :func:`indexer_candidate_blocks` keeps, among equal block scores, the lower block id; the top-k keeps,
among equal logits, the earlier column of the sparse logits (with ascending candidates: the lower position).
"""
from __future__ import annotations

import torch

from . import _checks as C
from ._checks import INT32_MAX
from ._define import call, define_op
from .paged_indexer import _check_inputs, _values

#: V4.1's candidate blocks: 8 logical positions each, 2048 per query row
CANDIDATE_BLOCK = 8
MAX_CANDIDATE_BLOCK = 2**16


def _row_count(op: str, logits: torch.Tensor, context_lens: torch.Tensor) -> tuple[int, int]:
    """(b, next_n) of ``logits [b * next_n, W]`` and ``context_lens [b]`` / ``[b, next_n]``."""
    if context_lens.dim() == 2:
        b, n = context_lens.shape
        if logits.shape[0] != b * n:
            raise C.ShapeError(f"{op}: logits must be [b * N, W] = [{b * n}, W] for context_lens "
                               f"{C.describe(context_lens)}, got {C.describe(logits)}")
        return b, n
    b = context_lens.shape[0]
    if b == 0 or logits.shape[0] % b or logits.shape[0] == 0:
        raise C.ShapeError(f"{op}: logits must be [b * N, W] with N >= 1 rows per request, b = {b} from "
                           f"context_lens {C.describe(context_lens)}, got {C.describe(logits)}")
    return b, logits.shape[0] // b


# ---------------------------------------------------------------- indexer_candidate_blocks
def _check_blocks(logits, context_lens, n_blocks, candidate_block=CANDIDATE_BLOCK):
    op = "indexer_candidate_blocks"
    C.dtype(op, "logits", logits, (torch.float32,))
    C.rank(op, "logits", logits, (2,), "[b * N, W]")
    C.dtype(op, "context_lens", context_lens, (torch.int32,))
    C.rank(op, "context_lens", context_lens, (1, 2), "[b] or [b, N]")
    _row_count(op, logits, context_lens)
    C.in_range(op, "n_blocks", n_blocks, 1, C.MAX_TOPK)
    C.in_range(op, "candidate_block", candidate_block, 1, MAX_CANDIDATE_BLOCK)
    C.same_device(op, logits=logits, context_lens=context_lens)


def _value_check_blocks(logits, context_lens, n_blocks, candidate_block=CANDIDATE_BLOCK):
    op = "indexer_candidate_blocks"
    if context_lens.numel() == 0:
        return
    lo, hi = int(context_lens.min()), int(context_lens.max())
    if lo < 0:
        raise C.RangeError(f"{op}: context_lens values must be >= 0, got min {lo}")
    if hi > logits.shape[1]:
        raise C.RangeError(f"{op}: logits must hold every visible position: W = {logits.shape[1]}, "
                           f"context_lens holds {hi}")


def _fake_blocks(logits, context_lens, n_blocks, candidate_block=CANDIDATE_BLOCK):
    b, n = _row_count("indexer_candidate_blocks", logits, context_lens)
    return logits.new_empty((b, n, n_blocks), dtype=torch.int32)


define_op("indexer_candidate_blocks",
          f"(Tensor logits, Tensor context_lens, int n_blocks, int candidate_block={CANDIDATE_BLOCK}) -> Tensor",
          check=_check_blocks, value_check=_value_check_blocks, fake=_fake_blocks,
          doc=C.ranges_doc(n_blocks=C.interval(1, C.MAX_TOPK),
                           candidate_block=C.interval(1, MAX_CANDIDATE_BLOCK)) +
          " Checked values: `context_lens` in `[0, W]` (the logits hold every visible position).")


def indexer_candidate_blocks(logits: torch.Tensor, context_lens: torch.Tensor, n_blocks: int, *,
                             candidate_block: int = CANDIDATE_BLOCK) -> torch.Tensor:
    """The candidate blocks a V4.1 candidate-source layer publishes: int32 ``[b, next_n, n_blocks]``.

    logits: fp32 ``[b * next_n, W]`` (:func:`~v4hal.ops.paged_indexer.indexer_logits_paged`'s, ``W`` at least
    every context length). context_lens: int32 ``[b]`` or ``[b, next_n]``, the visibility rule of
    :mod:`v4hal.ops.paged_indexer` (row ``i`` of request ``b`` sees the positions ``t < limit``). The row's
    visible blocks are ``0 .. ceil(limit / candidate_block) - 1``; a block's score is the largest logit of
    its visible positions (NaN if one is NaN, ranked above every number); the newest visible block is
    always kept, the rest by descending score, equal scores by ascending block id, never one whose score is
    ``-inf`` (no scored position). Output: the chosen block ids (at most ``n_blocks``) in ascending order,
    then ``-1``.
    """
    return call.indexer_candidate_blocks(logits, context_lens, int(n_blocks), int(candidate_block))


# ---------------------------------------------------------------- indexer_logits_paged_sparse
def _check_candidates(op: str, q, kv_cache, weights, context_lens, block_table, candidates, candidate_block, layout):
    _check_inputs(op, q, kv_cache, weights, context_lens, block_table, layout)
    b, n = q.shape[0], q.shape[1]
    C.dtype(op, "candidates", candidates, (torch.int32,))
    C.rank(op, "candidates", candidates, (3,), "[b, N, K]")
    if tuple(candidates.shape[:2]) != (b, n):
        raise C.ShapeError(f"{op}: candidates must be [b, N, K] = [{b}, {n}, K], got {C.describe(candidates)}")
    C.in_range(op, "candidate_block", candidate_block, 1, MAX_CANDIDATE_BLOCK)
    if candidates.shape[2] * candidate_block > INT32_MAX:
        raise C.ShapeError(f"{op}: candidates cover K * candidate_block positions per row, at most "
                           f"{C.show(INT32_MAX)}, got {candidates.shape[2]} * {candidate_block}")
    C.same_device(op, q=q, candidates=candidates)


def _value_check_candidates(op: str, kv_cache, context_lens, block_table, candidates, candidate_block) -> None:
    """The paged indexer's value rules, and candidate ids in ``[-1, ceil(M * block size / candidate_block))``."""
    _values(op, kv_cache, context_lens, block_table)
    span = -(-block_table.shape[1] * kv_cache.shape[1] // candidate_block)
    C.index_range(op, "candidates", candidates, -1, span)


def _check_sparse_logits(q, kv_cache, weights, context_lens, block_table, candidates,
                         candidate_block=CANDIDATE_BLOCK, layout="indexer_fp4"):
    _check_candidates("indexer_logits_paged_sparse", q, kv_cache, weights, context_lens, block_table, candidates,
                      candidate_block, layout)


define_op("indexer_logits_paged_sparse",
          "(Tensor q, Tensor kv_cache, Tensor weights, Tensor context_lens, Tensor block_table, Tensor candidates, "
          f"int candidate_block={CANDIDATE_BLOCK}, str layout=\"indexer_fp4\") -> Tensor",
          check=_check_sparse_logits,
          value_check=lambda q, kv_cache, w, context_lens, block_table, candidates, candidate_block=CANDIDATE_BLOCK,
          layout="indexer_fp4": _value_check_candidates("indexer_logits_paged_sparse", kv_cache, context_lens,
                                                        block_table, candidates, candidate_block),
          fake=lambda q, kv_cache, w, cl, bt, candidates, candidate_block=CANDIDATE_BLOCK, layout="indexer_fp4":
          q.new_empty((q.shape[0] * q.shape[1], candidates.shape[2] * candidate_block), dtype=torch.float32),
          doc=C.ranges_doc(candidate_block=C.interval(1, MAX_CANDIDATE_BLOCK)) +
          " Checked values: as `indexer_topk_paged`, and `candidates` in "
          "`[-1, ceil(max_blocks * block size / candidate_block))`.")


def indexer_logits_paged_sparse(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor,
                                context_lens: torch.Tensor, block_table: torch.Tensor, candidates: torch.Tensor, *,
                                candidate_block: int = CANDIDATE_BLOCK,
                                layout: str = "indexer_fp4") -> torch.Tensor:
    """Indexer logits at the positions of candidate blocks: fp32 ``[b * next_n, K * candidate_block]``.

    ``out[b * next_n + i, j * candidate_block + o]`` is :func:`~v4hal.ops.paged_indexer.indexer_logits_paged`'s
    logit of row ``(b, i)`` at position ``t = candidates[b, i, j] * candidate_block + o``, bit for bit;
    ``-inf`` where the candidate is ``-1`` (or, with value checks off, any id outside the block table),
    where ``t`` is at or past the row's limit, or where ``t``'s page id is not a block of ``kv_cache``.

    q, kv_cache, weights, context_lens, block_table, layout: as ``indexer_logits_paged``. candidates: int32
    ``[b, next_n, K]`` candidate block ids (:func:`indexer_candidate_blocks`' output; duplicates allowed).
    """
    return call.indexer_logits_paged_sparse(q, kv_cache, weights, context_lens, block_table, candidates,
                                            int(candidate_block), layout)


# ---------------------------------------------------------------- indexer_topk_paged_sparse
def _check_sparse_topk(q, kv_cache, weights, context_lens, block_table, candidates, topk,
                       candidate_block=CANDIDATE_BLOCK, layout="indexer_fp4", offset=0):
    op = "indexer_topk_paged_sparse"
    _check_candidates(op, q, kv_cache, weights, context_lens, block_table, candidates, candidate_block, layout)
    C.in_range(op, "topk", topk, 1, C.MAX_TOPK)
    width = block_table.shape[1] * kv_cache.shape[1]
    C.in_range(op, "offset", offset, 0, INT32_MAX - width,
               note=f" (2**31 - 1 - M * block size, M * block size = {width}: picks are int32)")


define_op("indexer_topk_paged_sparse",
          "(Tensor q, Tensor kv_cache, Tensor weights, Tensor context_lens, Tensor block_table, Tensor candidates, "
          f"int topk, int candidate_block={CANDIDATE_BLOCK}, str layout=\"indexer_fp4\", int offset=0) -> Tensor",
          check=_check_sparse_topk,
          value_check=lambda q, kv_cache, w, context_lens, block_table, candidates, topk,
          candidate_block=CANDIDATE_BLOCK, *a: _value_check_candidates(
              "indexer_topk_paged_sparse", kv_cache, context_lens, block_table, candidates, candidate_block),
          fake=lambda q, kv_cache, w, cl, bt, candidates, topk, *a: q.new_empty((q.shape[0], q.shape[1], topk),
                                                                                dtype=torch.int32),
          doc=C.ranges_doc(topk=C.interval(1, C.MAX_TOPK), candidate_block=C.interval(1, MAX_CANDIDATE_BLOCK),
                           offset="[0, 2**31 - 1 - max_blocks * block size]") +
          " Checked values: as `indexer_logits_paged_sparse`.")


def indexer_topk_paged_sparse(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor,
                              context_lens: torch.Tensor, block_table: torch.Tensor, candidates: torch.Tensor,
                              topk: int, *, candidate_block: int = CANDIDATE_BLOCK, layout: str = "indexer_fp4",
                              offset: int = 0) -> torch.Tensor:
    """The ``topk`` best positions inside the candidate blocks: int32 ``[b, next_n, topk]``.

    By :func:`indexer_logits_paged_sparse`'s logits, descending, equal logits in ascending column order;
    ``t + offset`` for a scored position ``t``, ``-1`` past the row's count of scored positions (those not
    ``-inf`` by the rules there). Arguments as there; give distinct candidates for distinct picks.
    """
    return call.indexer_topk_paged_sparse(q, kv_cache, weights, context_lens, block_table, candidates, int(topk),
                                          int(candidate_block), layout, int(offset))
