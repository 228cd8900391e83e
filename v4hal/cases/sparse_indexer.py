"""Cases of the candidate indexer (V4.1): candidate blocks from logits, logits and top-k at candidates.

The paged FP4/FP8 key caches, block tables and contexts are the paged indexer's cases' (every request
owns distinct random pages; block-table entries past a context are -1; the last request of a tiny case has
an empty context). The candidates are ``k`` distinct random blocks of ``candidate_block`` positions per
query row, ascending, each row's newest visible block among them, some slots ``-1`` (``holes``).
"""
from __future__ import annotations

import torch

from ._core import DECODE_CONTEXT, DECODE_SEQS, REQUIRED, Gen, OpCase, Shape, register_case
from .paged_indexer import PAGE, _indexer_args, _key_bytes

# DeepSeek-V4.1-Flash's indexer: 32 heads of 128, top-512 inside 2048 candidate blocks of 8 positions;
# the ratio-2 compressed cache of a 64K-token context holds 32K entries
V41_HEADS, V41_DIM, V41_TOPK, V41_BLOCKS, V41_CANDIDATE_BLOCK, V41_RATIO = 32, 128, 512, 2048, 8, 2

_PARAMS = {"b": REQUIRED, "n": 1, "h": REQUIRED, "mb": REQUIRED, "block_size": REQUIRED, "layout": "indexer_fp4",
           "ctx2d": False, "full": False, "extra": 0, "topk": 8, "offset": 0, "d": 128,
           "k": REQUIRED, "candidate_block": V41_CANDIDATE_BLOCK, "holes": True}


def _row_limits(ctx: torch.Tensor, n: int) -> torch.Tensor:
    """int64 ``[b, n]``: the visible positions of each row (the paged indexer's rule)."""
    if ctx.dim() == 2:
        return ctx.long()
    rows = torch.arange(n, device=ctx.device).view(1, n)
    return (ctx.long().view(-1, 1) - n + 1 + rows).clamp_min(0)


def _candidates(g: Gen, s: Shape, ctx: torch.Tensor) -> torch.Tensor:
    """int32 ``[b, n, k]``: ascending distinct block ids over the block table's span, -1 holes."""
    b, n, k, cb = s["b"], s["n"], s["k"], s["candidate_block"]
    span = -(-s["mb"] * s["block_size"] // cb)
    keys = g.rand(b * n, span)
    newest = (-(-_row_limits(ctx, n).view(-1, 1) // cb) - 1).clamp(0, span - 1)
    keys.scatter_(1, newest, 2.0)                                    # the newest visible block: always in
    width = min(k, span)
    picks = keys.topk(width, dim=1).indices.sort(dim=1).values
    if s["holes"]:
        picks = torch.where(g.rand(b * n, width) < 0.15, torch.full_like(picks, -1), picks)
    if width < k:
        picks = torch.cat([picks, picks.new_full((b * n, k - width), -1)], dim=1)
    return picks.to(torch.int32).view(b, n, k).contiguous()


def _sparse_args(g: Gen, s: Shape) -> list:
    args = _indexer_args(g, s)
    return args + [_candidates(g, s, args[3])]


def _sparse_logits(g: Gen, s: Shape) -> list:
    return _sparse_args(g, s) + [s["candidate_block"], s["layout"]]


def _sparse_topk(g: Gen, s: Shape) -> list:
    return _sparse_args(g, s) + [s["topk"], s["candidate_block"], s["layout"], s["offset"]]


def _positions(s: Shape) -> int:
    return s["k"] * s["candidate_block"]


def _flops(s: Shape) -> float:
    """Every query head against every candidate position: 2 per multiply-add, ReLU, weight, sum."""
    return s["b"] * s["n"] * _positions(s) * s["h"] * (2 * s["d"] + 3)


def _sparse_key_bytes(s: Shape) -> float:
    """The keys of the candidate positions (each row's own), the candidates, the queries and the weights;
    the block table as the dense case counts it."""
    from v4hal.ops.paged import PAGED_LAYOUTS

    rows = s["b"] * s["n"]
    dense = _key_bytes(s) - s["b"] * s["mb"] * s["block_size"] * PAGED_LAYOUTS[s["layout"]].token_bytes(s["d"])
    return dense + rows * (_positions(s) * PAGED_LAYOUTS[s["layout"]].token_bytes(s["d"]) + 4 * s["k"])


def _shapes(c, mode: str) -> list[tuple[str, Shape]]:
    """Quick: v4-mini's indexer dims. Decode: V4.1-Flash's candidate indexer (32 heads x 128, 2048 blocks of 8,
    top-512) for 64 requests at a 64K-token context (32K ratio-2 entries in pages of 64), one query row each,
    and two rows with per-row lengths (an MTP draft)."""
    if mode == "quick":
        return [("decode", {"b": 2, "h": c.index_n_heads, "mb": 4, "block_size": 16, "k": 4, "candidate_block": 8,
                            "topk": min(c.index_topk, 16), "d": c.index_head_dim})]
    if mode != "decode":
        return []
    base = {"b": DECODE_SEQS, "h": V41_HEADS, "mb": DECODE_CONTEXT // V41_RATIO // PAGE, "block_size": PAGE,
            "full": True, "k": V41_BLOCKS, "candidate_block": V41_CANDIDATE_BLOCK, "topk": V41_TOPK, "offset": 128,
            "d": V41_DIM, "holes": False}
    return [("v4.1 fp4", dict(base)), ("v4.1 fp4 mtp", dict(base, n=2, ctx2d=True))]


_TINY = [
    {"b": 3, "n": 2, "h": 5, "mb": 3, "block_size": 4, "k": 2, "candidate_block": 2, "topk": 3, "offset": 7},
    {"b": 2, "n": 2, "h": 4, "mb": 2, "block_size": 5, "layout": "indexer_fp8", "ctx2d": True, "k": 3,
     "candidate_block": 3, "topk": 12},
    {"b": 2, "n": 1, "h": 3, "mb": 4, "block_size": 4, "d": 64, "k": 5, "candidate_block": 2, "topk": 5,
     "offset": 3},
    {"b": 2, "n": 1, "h": 4, "mb": 3, "block_size": 8, "d": 128, "k": 2, "candidate_block": 8, "topk": 6},
]

register_case(OpCase("indexer_logits_paged_sparse", _sparse_logits, dict(_PARAMS), tiny=[dict(s) for s in _TINY],
                     shapes=_shapes, flops=_flops, bound="memory",
                     bytes=lambda s: _sparse_key_bytes(s) + 4 * s["b"] * s["n"] * _positions(s)))
register_case(OpCase("indexer_topk_paged_sparse", _sparse_topk, dict(_PARAMS), tiny=[dict(s) for s in _TINY],
                     shapes=_shapes, flops=_flops, bound="memory",
                     bytes=lambda s: _sparse_key_bytes(s) + 4 * s["b"] * s["n"] * s["topk"]))


# ---------------------------------------------------------------- indexer_candidate_blocks
_BLOCK_PARAMS = {"b": REQUIRED, "n": 1, "w": REQUIRED, "n_blocks": REQUIRED, "candidate_block": V41_CANDIDATE_BLOCK,
                 "ctx2d": False}


def _blocks(g: Gen, s: Shape) -> list:
    """Logits ``[b * n, w]`` with runs of equal values (FP4 ties) and -inf past each row's length."""
    b, n, w = s["b"], s["n"], s["w"]
    ctx = g.randint(w + 1, (b,), dtype=torch.int32)
    ctx[0] = w
    if s["ctx2d"]:
        per_row = (ctx.view(b, 1).float() * g.rand(b, n)).to(torch.int32)
        per_row[:, -1] = ctx
        ctx = per_row.contiguous()
    logits = (g.randn(b * n, w) * 4).round() / 4                     # coarse values: ties between blocks
    limits = _row_limits(ctx, n).view(-1, 1)
    logits = logits.masked_fill(torch.arange(w, device=g.device).view(1, w) >= limits, float("-inf"))
    return [logits.contiguous(), ctx, s["n_blocks"], s["candidate_block"]]


def _block_shapes(c, mode: str) -> list[tuple[str, Shape]]:
    """Decode: the V4.1-Flash candidate source publishes 2048 blocks of 8 over 32K entries per request."""
    if mode == "quick":
        return [("decode", {"b": 2, "w": 256, "n_blocks": 8, "candidate_block": 8})]
    if mode != "decode":
        return []
    return [("v4.1 source", {"b": DECODE_SEQS, "w": DECODE_CONTEXT // V41_RATIO, "n_blocks": V41_BLOCKS,
                             "candidate_block": V41_CANDIDATE_BLOCK})]


register_case(OpCase("indexer_candidate_blocks", _blocks, dict(_BLOCK_PARAMS),
                     tiny=[{"b": 3, "w": 37, "n_blocks": 3, "candidate_block": 4},
                           {"b": 2, "n": 2, "w": 20, "n_blocks": 8, "candidate_block": 3, "ctx2d": True},
                           {"b": 2, "w": 64, "n_blocks": 4, "candidate_block": 8}],
                     shapes=_block_shapes, flops=lambda s: s["b"] * s["n"] * s["w"], bound="memory",
                     bytes=lambda s: s["b"] * s["n"] * (4 * s["w"] + 4 * s["n_blocks"]) + 4 * s["b"] * s["n"]))
