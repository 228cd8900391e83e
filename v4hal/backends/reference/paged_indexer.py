"""Reference lightning indexer over paged key caches (fp32 math): logits, top-k, position -> slot.

The keys are gathered page by page through the block table and dequantized in fp32 from the bytes of
the ``indexer_fp4`` / ``indexer_fp8`` layouts (the regions :mod:`.paged` reads; the key width ``D`` from the
cache's last dim): e2m1 codes times their ue8m0 scale (one per 32 values), or e4m3 values times their fp32
scale (one per key). For ``indexer_fp4`` these fp32 keys equal ``paged_cache_read``'s bf16 ones exactly
(an e2m1 value times a power of two is a bf16 value); for ``indexer_fp8`` ``paged_cache_read`` rounds them
to bf16, this does not.

The work walks chunks of requests and of block-table columns sized to ``_CHUNK_ELEMS`` fp32 elements,
over every column of the block table (no host read of ``context_lens``): at V4-Flash decode (64
requests, 64 heads, 16K entries) the largest intermediate is 64 MiB. Inputs arrive validated by
:mod:`v4hal.ops.paged_indexer`.
"""
from __future__ import annotations

import torch

from v4hal.hal import formats as F
from v4hal.hal.registry import implements
from v4hal.ops._checks import INT32_MAX
from v4hal.ops.paged import PAGED_LAYOUTS, cache_dim

from .attention import top_entries
from .paged import _region, fp4_dequant

# Largest fp32 intermediate (elements) of one chunk: 2**24 = 64 MiB. Tests shrink it to cross chunk edges.
_CHUNK_ELEMS: int = 1 << 24


def row_limits(context_lens: torch.Tensor, next_n: int) -> torch.Tensor:
    """int64 ``[b, next_n]``: how many leading positions each query row sees.

    ``[b]`` lengths: row ``i`` sees ``context_lens[b] - next_n + 1 + i`` (at least 0); ``[b, next_n]``:
    the given length of each row."""
    if context_lens.dim() == 2:
        return context_lens.long()
    b = context_lens.shape[0]
    rows = torch.arange(next_n, device=context_lens.device).view(1, next_n)
    return (context_lens.long().view(b, 1) - next_n + 1 + rows).clamp_min(0)


def dequant_pages(kv_cache: torch.Tensor, layout: str, blocks: torch.Tensor) -> torch.Tensor:
    """fp32 ``[..., block_size, D]``: every key of the pages ``blocks`` (int64 ``[...]``, valid ids)."""
    d = cache_dim(kv_cache, layout)
    if layout == "bf16":
        return kv_cache[blocks, :, 0].float()
    if layout == "indexer_fp4":
        scale_bytes = PAGED_LAYOUTS[layout].scale_bytes(d)
        return fp4_dequant(_region(kv_cache, layout, 0, d // 2)[blocks],
                           _region(kv_cache, layout, d // 2, scale_bytes)[blocks])
    y = F.fp8_to_float(_region(kv_cache, layout, 0, d)[blocks].contiguous().view(F.FP8_DTYPE))
    s = _region(kv_cache, layout, d, 4)[blocks].contiguous().view(torch.float32)     # [..., bs, 1]
    return y * s


@implements("indexer_logits_paged", "reference")
def indexer_logits_paged(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor, context_lens: torch.Tensor,
                         block_table: torch.Tensor, max_context_len: int,
                         layout: str = "indexer_fp4") -> torch.Tensor:
    """fp32 ``[b * next_n, max_context_len]``: ``sum_h w * relu(q . k_t)`` for visible ``t``, else -inf (also
    where ``t``'s block id is outside ``[0, blocks)``: no key). IEEE arithmetic: ``relu(NaN)`` is NaN."""
    b, n, h, d = q.shape
    nb, bs = kv_cache.shape[0], kv_cache.shape[1]
    mb = block_table.shape[1]
    out = torch.full((b * n, max_context_len), float("-inf"), dtype=torch.float32, device=q.device)
    width = min(max_context_len, mb * bs)             # positions past the block table are never visible
    if out.numel() == 0 or width == 0:
        return out
    limits = row_limits(context_lens, n)                                           # [b, n]
    # float64 math rounded to fp32 once, like the reference index_scores: with FP4 keys (and FP4-rounded
    # queries) the logits then do not depend on shapes or chunking, so the picks equal a contiguous cache's
    qf = q.double().reshape(b, n * h, d)
    w = weights.double().view(b, n, 1, h)
    per_req = 2 * max(n * h, d)                   # fp32-sized elements per request and key of the largest intermediate
    cols = max(1, _CHUNK_ELEMS // (per_req * bs))
    reqs = max(1, min(b, _CHUNK_ELEMS // (per_req * bs * min(cols, mb))))
    for r0 in range(0, b, reqs):
        r1 = min(b, r0 + reqs)
        for c0 in range(0, -(-width // bs), cols):
            c1 = min(mb, c0 + cols, -(-width // bs))
            ids = block_table[r0:r1, c0:c1].long()
            no_block = (ids < 0) | (ids >= nb)                                     # -1, or out of range
            keys = dequant_pages(kv_cache, layout, ids.masked_fill(no_block, 0)).flatten(1, 2).double()
            scores = torch.matmul(qf[r0:r1], keys.transpose(1, 2)).relu_()         # [c, n*h, T]
            logits = torch.matmul(w[r0:r1], scores.view(r1 - r0, n, h, -1)).squeeze(2)  # [c, n, T]
            pos = torch.arange(c0 * bs, c1 * bs, device=q.device)
            hidden = (pos.view(1, 1, -1) >= limits[r0:r1].unsqueeze(-1)) | \
                no_block.repeat_interleave(bs, dim=1).unsqueeze(1)
            logits.masked_fill_(hidden, float("-inf"))
            t1 = min(c1 * bs, width)
            out.view(b, n, max_context_len)[r0:r1, :, c0 * bs:t1] = logits[..., :t1 - c0 * bs].float()
    return out


def topk_from_logits(logits: torch.Tensor, limits: torch.Tensor, topk: int, offset: int) -> torch.Tensor:
    """int32 ``[b, next_n, topk]`` from logits ``[b * next_n, W]`` and row limits ``[b, next_n]``: the
    best positions (descending), ``+ offset`` when below the row's limit, else -1 (also past ``W``)."""
    b, n = limits.shape
    width = min(topk, logits.shape[1])
    picks = top_entries(logits.view(b, n, -1), width)                                       # [b, n, width]
    out = torch.where(picks < limits.unsqueeze(-1), picks + offset, torch.full_like(picks, -1))
    if width < topk:
        out = torch.cat([out, out.new_full((b, n, topk - width), -1)], dim=-1)
    return out.to(torch.int32)


@implements("indexer_topk_paged", "reference")
def indexer_topk_paged(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor, context_lens: torch.Tensor,
                       block_table: torch.Tensor, topk: int, layout: str = "indexer_fp4",
                       offset: int = 0) -> torch.Tensor:
    """int32 ``[b, next_n, topk]``: top positions by :func:`indexer_logits_paged` (+ offset), -1 padded."""
    width = block_table.shape[1] * kv_cache.shape[1]
    logits = indexer_logits_paged(q, kv_cache, weights, context_lens, block_table, width, layout)
    return topk_from_logits(logits, row_limits(context_lens, q.shape[1]), topk, offset)


@implements("paged_slots", "reference")
def paged_slots(positions: torch.Tensor, block_table: torch.Tensor, block_size: int,
                req_index: torch.Tensor | None = None) -> torch.Tensor:
    """int32 like ``positions``: ``block_table[r, p // block_size] * block_size + p % block_size`` with ``r`` row
    ``i``'s ``req_index`` entry (default ``i``); -1 where there is no slot: a negative position, a block past
    the row, a negative block id, a slot past int32. Reads only the picked entries of the table."""
    b, mb = block_table.shape
    n = positions.shape[0]
    if positions.numel() == 0 or mb == 0:
        return torch.full_like(positions, -1, dtype=torch.int32)
    pos = positions.reshape(n, -1).long()
    rows = torch.arange(n, device=pos.device) if req_index is None else req_index.long()
    col = pos // block_size
    valid = (pos >= 0) & (col < mb)
    blk = block_table[rows.unsqueeze(1), col.clamp(0, mb - 1)].long()
    slots = blk * block_size + pos % block_size
    valid &= (blk >= 0) & (slots <= INT32_MAX)
    return torch.where(valid, slots, torch.full_like(slots, -1)).to(torch.int32).view(positions.shape)
