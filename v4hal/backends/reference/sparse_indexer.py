"""Reference candidate indexer (V4.1): candidate blocks from dense logits, logits and top-k at candidates.

The sparse logits use the dense reference's arithmetic (:mod:`.paged_indexer`: float64 dot products and
head sum, rounded to fp32 once), on the keys of the candidate positions only, gathered slot by slot and
dequantized from the cache bytes; so a sparse logit equals the dense one of the same position. The work
walks chunks of query rows and candidate columns of at most ``_CHUNK_ELEMS`` fp32-sized elements.
Inputs arrive validated by :mod:`v4hal.ops.sparse_indexer`.
"""
from __future__ import annotations

import torch

from v4hal.hal import formats as F
from v4hal.hal.registry import implements
from v4hal.ops.paged import PAGED_LAYOUTS, cache_dim

from .attention import top_entries
from .paged import _region, fp4_dequant
from .paged_indexer import row_limits

# Largest fp32-sized intermediate (elements) of one chunk: 2**24 = 64 MiB. Tests shrink it to cross chunk edges.
_CHUNK_ELEMS: int = 1 << 24


def dequant_slots(kv_cache: torch.Tensor, layout: str, blocks: torch.Tensor, toks: torch.Tensor) -> torch.Tensor:
    """fp32 ``[..., D]``: the keys at token ``toks`` of pages ``blocks`` (int64 ``[...]``, valid)."""
    d = cache_dim(kv_cache, layout)
    if layout == "bf16":
        return kv_cache[blocks, toks, 0].float()
    if layout == "indexer_fp4":
        scale_bytes = PAGED_LAYOUTS[layout].scale_bytes(d)
        return fp4_dequant(_region(kv_cache, layout, 0, d // 2)[blocks, toks],
                           _region(kv_cache, layout, d // 2, scale_bytes)[blocks, toks])
    y = F.fp8_to_float(_region(kv_cache, layout, 0, d)[blocks, toks].contiguous().view(F.FP8_DTYPE))
    s = _region(kv_cache, layout, d, 4)[blocks, toks].contiguous().view(torch.float32)     # [..., 1]
    return y * s


def candidate_positions(candidates: torch.Tensor, candidate_block: int) -> torch.Tensor:
    """int64 ``[b, N, K * candidate_block]``: the logical positions the candidate blocks cover (-1 blocks
    give negative positions)."""
    offs = torch.arange(candidate_block, device=candidates.device)
    return (candidates.long().unsqueeze(-1) * candidate_block + offs).flatten(2)


def sparse_slots(kv_cache: torch.Tensor, context_lens: torch.Tensor, block_table: torch.Tensor,
                 candidates: torch.Tensor, candidate_block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(valid bool, page int64, token int64), each ``[b, N, K * candidate_block]``: whether the candidate
    position is scored (candidate >= 0, below the row's limit and the block table's span, its page id a
    block of ``kv_cache``), and where its key lives (page 0, token 0 where not valid)."""
    b, n, _ = candidates.shape
    nb, bs = kv_cache.shape[0], kv_cache.shape[1]
    mb = block_table.shape[1]
    pos = candidate_positions(candidates, candidate_block)
    limits = row_limits(context_lens, n).clamp_max(mb * bs)                        # [b, N]
    valid = (candidates.long().unsqueeze(-1) >= 0).expand(-1, -1, -1, candidate_block).flatten(2)
    valid &= (pos >= 0) & (pos < limits.unsqueeze(-1))
    col = torch.where(valid, pos // bs, torch.zeros_like(pos))
    if mb == 0:
        return valid & False, torch.zeros_like(pos), torch.zeros_like(pos)
    page = torch.gather(block_table.long().view(b, 1, mb).expand(b, n, mb), 2, col)
    valid &= (page >= 0) & (page < nb)
    zero = torch.zeros_like(pos)
    return valid, torch.where(valid, page, zero), torch.where(valid, pos % bs, zero)


@implements("indexer_logits_paged_sparse", "reference")
def indexer_logits_paged_sparse(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor,
                                context_lens: torch.Tensor, block_table: torch.Tensor, candidates: torch.Tensor,
                                candidate_block: int = 8, layout: str = "indexer_fp4") -> torch.Tensor:
    """fp32 ``[b * N, K * candidate_block]``: the dense logits at the candidate positions, -inf where not scored."""
    b, n, h, d = q.shape
    width = candidates.shape[2] * candidate_block
    out = torch.full((b, n, width), float("-inf"), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out.view(b * n, width)
    valid, page, tok = sparse_slots(kv_cache, context_lens, block_table, candidates, candidate_block)
    qf = q.double().reshape(b * n, h, d)
    w = weights.double().view(b * n, 1, h)
    valid, page, tok = (t.reshape(b * n, width) for t in (valid, page, tok))
    flat = out.view(b * n, width)
    per_col = 2 * max(h, d)                         # fp32-sized elements per row and column, largest intermediate
    cols = max(1, min(width, _CHUNK_ELEMS // per_col))
    rows = max(1, min(b * n, _CHUNK_ELEMS // (per_col * cols)))
    for r0 in range(0, b * n, rows):
        r1 = min(b * n, r0 + rows)
        for c0 in range(0, width, cols):
            c1 = min(width, c0 + cols)
            keys = dequant_slots(kv_cache, layout, page[r0:r1, c0:c1], tok[r0:r1, c0:c1]).double()
            scores = torch.matmul(qf[r0:r1], keys.transpose(1, 2)).relu_()            # [r, h, c]
            logits = torch.matmul(w[r0:r1], scores).squeeze(1)                         # [r, c]
            flat[r0:r1, c0:c1] = logits.masked_fill(~valid[r0:r1, c0:c1], float("-inf")).float()
    return flat


def topk_from_sparse(logits: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor, topk: int,
                     offset: int) -> torch.Tensor:
    """int32 ``[b, N, topk]`` from sparse logits ``[b * N, C]``, the scored mask and the positions
    ``[b, N, C]``: the best columns (descending, ties by ascending column) as ``position + offset`` when
    scored, else -1."""
    b, n, c = valid.shape
    width = min(topk, c)
    picks = top_entries(logits.view(b, n, c), width)
    ok = torch.gather(valid, 2, picks)
    out = torch.where(ok, torch.gather(positions, 2, picks) + offset, torch.full_like(picks, -1))
    if width < topk:
        out = torch.cat([out, out.new_full((b, n, topk - width), -1)], dim=-1)
    return out.to(torch.int32)


def sparse_topk(logits: torch.Tensor, kv_cache: torch.Tensor, context_lens: torch.Tensor, block_table: torch.Tensor,
                candidates: torch.Tensor, topk: int, candidate_block: int, offset: int) -> torch.Tensor:
    """:func:`topk_from_sparse` for the sparse logits of these candidates (any backend's logits)."""
    valid = sparse_slots(kv_cache, context_lens, block_table, candidates, candidate_block)[0]
    return topk_from_sparse(logits, valid, candidate_positions(candidates, candidate_block), topk, offset)


@implements("indexer_topk_paged_sparse", "reference")
def indexer_topk_paged_sparse(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor,
                              context_lens: torch.Tensor, block_table: torch.Tensor, candidates: torch.Tensor,
                              topk: int, candidate_block: int = 8, layout: str = "indexer_fp4",
                              offset: int = 0) -> torch.Tensor:
    """int32 ``[b, N, topk]``: top positions by :func:`indexer_logits_paged_sparse` (+ offset), -1 padded."""
    logits = indexer_logits_paged_sparse(q, kv_cache, weights, context_lens, block_table, candidates,
                                         candidate_block, layout)
    return sparse_topk(logits, kv_cache, context_lens, block_table, candidates, topk, candidate_block, offset)


@implements("indexer_candidate_blocks", "reference")
def indexer_candidate_blocks(logits: torch.Tensor, context_lens: torch.Tensor, n_blocks: int,
                             candidate_block: int = 8) -> torch.Tensor:
    """int32 ``[b, N, n_blocks]``: the newest visible block plus the best others by block max (none whose max
    is -inf), ascending, -1 padded."""
    rows, w = logits.shape
    b = context_lens.shape[0]
    n = rows // b
    limits = row_limits(context_lens, n).clamp_max(w).view(rows, 1)                  # [rows, 1]
    nblk = -(-w // candidate_block)
    padded = torch.full((rows, nblk * candidate_block), float("-inf"), dtype=torch.float32, device=logits.device)
    padded[:, :w] = logits
    pos = torch.arange(nblk * candidate_block, device=logits.device).view(1, -1)
    padded = padded.masked_fill(pos >= limits, float("-inf"))
    score = padded.view(rows, nblk, candidate_block).amax(dim=-1)                     # NaN if one is NaN
    visible = -(-limits // candidate_block)                                           # [rows, 1] blocks seen
    blk = torch.arange(nblk, device=logits.device).view(1, -1)
    score = score.masked_fill(blk >= visible, float("-inf"))
    newest = visible - 1                                                              # -1: no block seen
    score = score.masked_fill(blk == newest, float("-inf"))
    width = min(n_blocks, nblk)
    others = top_entries(score, width - 1)                                            # [rows, width - 1]
    scored = torch.gather(score, 1, others) != float("-inf")                          # NaN stays: it ranks first
    others = torch.where((others < newest) & scored, others, torch.full_like(others, nblk))   # dropped: sort last
    picks = torch.cat([others, torch.where(newest >= 0, newest, nblk).expand(rows, 1)], dim=1)
    picks = picks.sort(dim=-1).values
    out = torch.where(picks < nblk, picks, torch.full_like(picks, -1))
    if width < n_blocks:
        out = torch.cat([out, out.new_full((rows, n_blocks - width), -1)], dim=-1)
    return out.to(torch.int32).view(b, n, n_blocks)
