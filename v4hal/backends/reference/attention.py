"""Reference (pure PyTorch, fp32 math) attention ops of DeepSeek-V4: the oracle for every backend.

Ops (schema argument order and names of ``docs/op_contract.md``):

- :func:`sparse_attn`   shared-KV MQA over gathered rows, with an attention sink (spec section 4).
- :func:`index_scores`  lightning-indexer logits ``sum_h w * relu(q_h . k)`` (spec section 5).
- :func:`indexer_topk`  causal mask + top-k of those logits, masked picks -> -1, offset added.
- :func:`compress_kv`   gated softmax pooling of ``ratio`` tokens into one KV entry (spec section 6).

Details the spec leaves open were settled by reading the public DeepSeek-V4 inference code
(``inference/kernel.py`` ``sparse_attn_kernel``; ``inference/model.py`` ``Compressor``,
``Indexer``, ``Attention``); each function's docstring records what was found there.
Nothing here loops over tokens or heads: the only Python loops walk over chunks of query
rows so that the gathered intermediates stay within a fixed memory budget. Inputs arrive
validated by :mod:`v4hal.ops.attention`; nothing here reads tensor data on the host.
"""
from __future__ import annotations

import struct

import torch

from v4hal.hal.registry import implements

# Largest fp32 intermediate (in elements) one chunk may materialize: 2**24 floats = 64 MiB.
# Module-level so tests can shrink it to exercise the chunk boundaries.
_CHUNK_ELEMS: int = 1 << 24


def _rows_per_chunk(rows: int, elems_per_row: int) -> int:
    """How many of ``rows`` query rows fit in one chunk of at most ``_CHUNK_ELEMS`` elements (>= 1)."""
    return max(1, min(rows, _CHUNK_ELEMS // max(1, elems_per_row)))


def top_entries(scores: torch.Tensor, width: int) -> torch.Tensor:
    """int64 indices of the ``width`` highest ``scores`` along the last dim, in descending score order, equal
    scores in ascending index order (a stable sort). FP4-rounded queries and keys give exact ties often; one
    tie rule makes every path (contiguous or paged cache, any chunking, any backend that uses it) pick the
    same entries."""
    return scores.sort(dim=-1, descending=True, stable=True).indices[..., :width]


@implements("sparse_attn", "reference")
def sparse_attn(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, topk_idxs: torch.Tensor,
                softmax_scale: float) -> torch.Tensor:
    """Sparse shared-KV attention with a per-head sink.

    Args:
        q: ``[b, m, h, d]`` float (bf16/fp16/fp32).
        kv: ``[b, n, d]`` same dtype as ``q``; each row is both key and value.
        attn_sink: fp32 ``[h]``; ``exp(attn_sink[h])`` joins the softmax denominator only
            (a key whose value is zero). ``-inf`` means "no sink".
        topk_idxs: int32 ``[b, m, k]`` with entries in ``[-1, n)``; -1 selects nothing.
        softmax_scale: multiplier of the dot products.

    Returns:
        ``[b, m, h, d]`` in q's dtype:
        ``out = sum_j exp(s_j) kv[idx_j] / (sum_j exp(s_j) + exp(sink))`` with
        ``s_j = softmax_scale * q . kv[idx_j]`` over the entries ``idx_j != -1``.

    Notes from the public kernel (``sparse_attn_kernel``): it walks the index list in blocks
    of 64, loads a zero row for -1 and gives it a score of ``-inf``, and loads every listed
    index, so a **duplicated index is counted once per occurrence** (its key appears twice in
    the softmax). This reference does the same. The public kernel's row of all -1 would
    divide ``0 / (0 + exp(sink + inf))``; the contract instead fixes that row to exactly 0,
    which this implementation guarantees (also for ``attn_sink = -inf``). The softmax runs in
    float64 here end to end (`attend`), rounded once to q's dtype; the public kernel additionally
    rounds the probabilities to bf16 before the value product, a kernel detail this oracle does not
    copy. Memory: the gathered rows are materialized in float64 for chunks of query positions sized
    to half of ``_CHUNK_ELEMS`` elements, never for all ``m`` at once.
    """
    b, m, h, d = q.shape
    n = kv.shape[1]
    k = topk_idxs.shape[-1]
    if k == 0 or n == 0 or m == 0 or b == 0:
        # nothing to attend to: every row is an all -1 row
        return torch.zeros(b, m, h, d, dtype=q.dtype, device=q.device)

    batch = torch.arange(b, device=q.device).view(b, 1, 1)
    step = _rows_per_chunk(m, 2 * b * k * d)
    out = torch.empty(b, m, h, d, dtype=q.dtype, device=q.device) if step < m else None
    for lo in range(0, m, step):
        hi = min(m, lo + step)
        idx = topk_idxs[:, lo:hi].long()                                   # [b, c, k]
        invalid = idx == -1
        rows = kv[batch, idx.clamp_min(0)]                                 # [b, c, k, d]
        o, _ = attend(q[:, lo:hi], rows, invalid, attn_sink, softmax_scale)
        if out is None:         # one chunk holds every query row
            return o.to(q.dtype)
        out[:, lo:hi] = o.to(q.dtype)
    return out


def attend(q: torch.Tensor, rows: torch.Tensor, invalid: torch.Tensor, attn_sink: torch.Tensor,
           softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The math of the sparse attention references, in float64: ``q [b, c, h, d]``, gathered key/value
    ``rows [b, c, k, d]`` (any values where ``invalid [b, c, k]``), sink fp32 ``[h]`` -> (out float64
    ``[b, c, h, d]``, log-sum-exp of the valid scaled scores float64 ``[b, c, h]``, -inf without one).

    float64 makes the result independent of the order and the number of the picks (trailing -1s, a
    window listed by ring slot or by position, picks split over two caches): every path that attends
    to the same entries rounds to the same bf16 output. The scale is the fp32 value of
    ``softmax_scale`` (what the kernels multiply by).
    """
    rows = rows.double().masked_fill(invalid.unsqueeze(-1), 0.0)               # -1 loads a zero row
    scores = torch.matmul(q.double(), rows.transpose(-1, -2))                   # [b, c, h, k]
    scores.mul_(struct.unpack("f", struct.pack("f", softmax_scale))[0])      # the fp32 value of the scale
    scores.masked_fill_(invalid.unsqueeze(2), float("-inf"))
    sink = attn_sink.to(device=q.device, dtype=torch.float64)                   # [h]
    # Subtract max(scores, sink): same softmax, and neither a huge sink nor an empty row overflows.
    top = torch.maximum(scores.amax(dim=-1), sink)                              # [b, c, h]
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    p = torch.exp(scores - top.unsqueeze(-1))                                   # masked -> exactly 0
    denom = p.sum(dim=-1) + torch.exp(sink - top)                               # >= 1 unless all terms vanish
    o = torch.matmul(p, rows) / denom.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(-1)
    return o, torch.logsumexp(scores, dim=-1)


@implements("index_scores", "reference")
def index_scores(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Lightning-indexer logits.

    Args:
        q: ``[b, s, H, D]`` float (indexer queries, already roped/rotated/quantized by the caller).
        k: ``[b, t, D]`` float (compressed indexer keys).
        weights: ``[b, s, H]`` float (per-query head weights, already scaled by the caller).

    Returns:
        fp32 ``[b, s, t]``: ``I[b, s, t] = sum_h weights[b, s, h] * relu(q[b, s, h] . k[b, t])``.

    The public ``Indexer.forward`` forms ``einsum('bshd,btd->bsht')``, applies ``relu`` and
    then sums the weighted heads; it does that in bf16, this oracle in float64, rounded to fp32 once.
    With V4's FP4-rounded queries and keys (and bf16 weights) every product and every per-head dot
    product is exact in float64, so the result does not depend on the summation order, the shapes or
    the chunking: the same fp32 logits (and top-k picks) whether the keys are read from a contiguous
    or a paged cache, one query or many at a time. The ``[b, s, H, t]`` intermediate is built for
    chunks of query rows sized to ``_CHUNK_ELEMS``.
    """
    b, s, nh, dd = q.shape
    t = k.shape[1]
    out = torch.empty(b, s, t, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    kf = k.double()
    step = _rows_per_chunk(s, b * nh * t)
    for lo in range(0, s, step):
        hi = min(s, lo + step)
        logits = torch.einsum("bshd,btd->bsht", q[:, lo:hi].double(), kf).relu_()  # [b, c, H, t]
        out[:, lo:hi] = torch.einsum("bsht,bsh->bst", logits, weights[:, lo:hi].double())
    return out


@implements("indexer_topk", "reference")
def indexer_topk(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, topk: int, start_pos: int = 0,
                 ratio: int = 4, offset: int = 0) -> torch.Tensor:
    """Causally masked top-k of the indexer logits.

    Args:
        q, k, weights: as in :func:`index_scores`.
        topk: how many entries to keep (``index_topk``).
        start_pos: absolute position of query 0; query ``i`` sits at ``start_pos + i``.
        ratio: tokens per compressed entry.
        offset: added to every valid pick (the size of the window part of the KV tensor).

    Returns:
        int32 ``[b, s, min(topk, t)]``: the highest-scoring entries in descending score order
        (equal scores: the lower entry first), ``entry + offset`` when valid, -1 when masked. Masked picks
        score ``-inf`` and therefore come last.

    Mask (public ``Indexer.forward``): entry ``j`` is visible to query ``i`` when its whole
    ``ratio``-token span is complete, ``j < (start_pos + i + 1) // ratio``. The public code
    applies it in prefill (``start_pos == 0``, as ``j >= (i + 1) // ratio`` -> ``-inf``, then
    maps picks ``>= (i + 1) // ratio`` to -1 by their index) and skips it in decode, where the
    cache holds exactly ``(start_pos + 1) // ratio`` entries, so the formula above is the same
    rule for both. The public code takes ``min(index_topk, end_pos // ratio)`` picks, which is
    ``min(topk, t)`` when ``k`` holds the entries up to the last query.
    """
    s = q.shape[1]
    t = k.shape[1]
    width = min(topk, t)
    scores = index_scores(q, k, weights)                                            # [b, s, t]
    pos = torch.arange(start_pos, start_pos + s, device=q.device)
    limit = ((pos + 1) // ratio).view(1, s, 1)                                      # visible entries
    visible = torch.arange(t, device=q.device).view(1, 1, t) < limit
    scores.masked_fill_(~visible, float("-inf"))
    picks = top_entries(scores, width)                                              # [b, s, width]
    out = torch.where(picks < limit, picks + offset, torch.full_like(picks, -1))
    return out.to(torch.int32)


@implements("compress_kv", "reference")
def compress_kv(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, ratio: int, overlap: bool) -> torch.Tensor:
    """Gated softmax pooling of every ``ratio`` tokens into one compressed KV entry.

    Args:
        kv: ``[b, n, c*d]`` float, ``c = 2`` if ``overlap`` else 1, ``n % ratio == 0``.
        score: fp32 ``[b, n, c*d]`` gate logits.
        ape: fp32 ``[ratio, c*d]`` learned positional bias, row ``j`` for the ``j``-th token of a block.
        ratio: tokens per entry.
        overlap: overlapping windows (the public model uses them exactly when ``ratio == 4``).

    Returns:
        ``[b, n // ratio, d]`` in kv's dtype (pooling only: no norm, rope or quantization).

    Without overlap, entry ``i`` is ``sum_j softmax_j(score[i*r+j] + ape[j]) * kv[i*r+j]``,
    the softmax taken per channel over the ``r`` tokens of block ``i``.

    With overlap (public ``Compressor.overlap_transform`` and its decode state), ``ape`` is
    added to the full ``2d``-wide score of every token first (row ``j`` = position inside its
    own block); then entry ``i`` pools, per channel ``c < d``, over ``2r`` candidates: the
    **first half** of the channels (``[:d]``) of the ``r`` tokens of block ``i-1``, followed by
    the **second half** (``[d:]``) of the ``r`` tokens of block ``i``. Block 0 has no previous
    block: its first ``r`` candidates are padded with kv = 0 and score = ``-inf``, so entry 0
    is a plain softmax pool of block 0's second half.
    """
    b, n, cd = kv.shape
    d = cd // (2 if overlap else 1)
    nb = n // ratio
    kvf = kv.float().reshape(b, nb, ratio, cd)
    logits = score.float().reshape(b, nb, ratio, cd) + ape.float()
    if overlap:
        prev_kv = torch.zeros(b, nb, ratio, d, dtype=torch.float32, device=kv.device)
        prev_lg = torch.full((b, nb, ratio, d), float("-inf"), dtype=torch.float32, device=kv.device)
        prev_kv[:, 1:] = kvf[:, :-1, :, :d]
        prev_lg[:, 1:] = logits[:, :-1, :, :d]
        kvf = torch.cat([prev_kv, kvf[..., d:]], dim=2)      # [b, nb, 2r, d]
        logits = torch.cat([prev_lg, logits[..., d:]], dim=2)
    pooled = (kvf * torch.softmax(logits, dim=2)).sum(dim=2)  # [b, nb, d]
    return pooled.to(kv.dtype)
