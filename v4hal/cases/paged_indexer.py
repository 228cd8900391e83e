"""Cases of the paged lightning indexer: logits and top-k over a paged FP4/FP8 key cache, and slots.

Every request owns ``mb`` distinct random blocks of the cache (the block table), block-table entries
past a request's context are -1, and the last request of a tiny case has an empty context. With
``ctx2d`` the context lengths are given per query row (``[b, next_n]``). ``d`` is the key width (V4: 128).
"""
from __future__ import annotations

import torch

from v4hal.ops.paged import PAGED_LAYOUTS, new_paged_cache

from ._core import DECODE_CONTEXT, DECODE_SEQS, REQUIRED, Gen, OpCase, Shape, reference, register_case

PAGE = 64          # V4 serving page: 64 compressed entries

_PARAMS = {"b": REQUIRED, "n": 1, "h": REQUIRED, "mb": REQUIRED, "block_size": REQUIRED, "layout": "indexer_fp4",
           "ctx2d": False, "full": False, "extra": 0, "topk": 8, "offset": 0, "d": 128}


def _paged_keys(g: Gen, s: Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cache filled at every slot, block table int32 ``[b, mb]``, context_lens int32 ``[b]``)."""
    b, mb, bs, layout = s["b"], s["mb"], s["block_size"], s["layout"]
    nb = b * mb + 1                                                   # one block no request uses
    cache = new_paged_cache(nb, bs, layout, device=g.device, dim=s["d"])
    x = g.randn(nb * bs, s["d"], dtype="bf16")
    reference("paged_cache_write", cache, x, torch.arange(nb * bs, dtype=torch.int32, device=g.device), layout)
    table = g.distinct(1, nb, b * mb).view(b, mb)
    cap = mb * bs
    if s["full"]:
        ctx = torch.full((b,), cap, dtype=torch.int32, device=g.device)
    else:
        ctx = g.randint(cap + 1, (b,), dtype=torch.int32)
        ctx[0] = cap
        if b > 1:
            ctx[-1] = 0
    need = (ctx.long() + bs - 1) // bs
    cols = torch.arange(mb, device=g.device).view(1, mb)
    table = torch.where(cols < need.view(b, 1), table, torch.full_like(table, -1))
    return cache, table.contiguous(), ctx


def _indexer_args(g: Gen, s: Shape) -> list:
    b, n, h = s["b"], s["n"], s["h"]
    cache, table, ctx = _paged_keys(g, s)
    q = g.randn(b, n, h, s["d"], dtype="bf16")
    weights = g.randn(b * n, h, scale=(h * s["d"]) ** -0.5)
    if s["ctx2d"]:
        per_row = (ctx.view(b, 1).float() * g.rand(b, n)).to(torch.int32)
        per_row[:, -1] = ctx
        ctx = per_row.contiguous()
    return [q, cache, weights, ctx, table]


def _logits(g: Gen, s: Shape) -> list:
    return _indexer_args(g, s) + [s["mb"] * s["block_size"] + s["extra"], s["layout"]]


def _topk(g: Gen, s: Shape) -> list:
    return _indexer_args(g, s) + [s["topk"], s["layout"], s["offset"]]


def _flops(s: Shape) -> float:
    """Every query head against every position of the block table: 2 per multiply-add, ReLU, weight, sum."""
    return s["b"] * s["n"] * s["mb"] * s["block_size"] * s["h"] * (2 * s["d"] + 3)


def _key_bytes(s: Shape) -> float:
    """The keys of every block-table position, the block table, the queries and the weights."""
    w = PAGED_LAYOUTS[s["layout"]].token_bytes(s["d"])
    rows = s["b"] * s["n"]
    return s["b"] * s["mb"] * (s["block_size"] * w + 4) + rows * s["h"] * (2 * s["d"] + 4) + 4 * s["b"] * s["n"]


def _logits_bytes(s: Shape) -> float:
    return _key_bytes(s) + 4 * s["b"] * s["n"] * (s["mb"] * s["block_size"] + s["extra"])


def _topk_bytes(s: Shape) -> float:
    return _key_bytes(s) + 4 * s["b"] * s["n"] * s["topk"]


def _shapes(c, mode: str) -> list[tuple[str, Shape]]:
    """V4 decode: 64 requests at a 64K-token context (16K compressed entries of the FP4 cache in pages of
    64), one query row each; and the same with two rows (an MTP draft) and per-row lengths. Keys
    ``index_head_dim`` wide."""
    h, k = c.index_n_heads, c.index_topk
    if mode == "quick":
        return [("decode", {"b": 2, "h": h, "mb": 4, "block_size": 16, "topk": min(k, 32), "d": c.index_head_dim})]
    if mode != "decode":
        return []
    mb = DECODE_CONTEXT // 4 // PAGE
    base = {"b": DECODE_SEQS, "h": h, "mb": mb, "block_size": PAGE, "full": True, "topk": k, "offset": 128,
            "d": c.index_head_dim}
    return [("fp4", dict(base)), ("fp4 mtp", dict(base, n=2, ctx2d=True))]


_TINY = [
    {"b": 3, "n": 2, "h": 5, "mb": 3, "block_size": 4, "extra": 3, "topk": 6, "offset": 7},
    {"b": 2, "n": 2, "h": 4, "mb": 2, "block_size": 5, "layout": "indexer_fp8", "ctx2d": True, "topk": 12},
    {"b": 2, "n": 2, "h": 3, "mb": 2, "block_size": 4, "d": 64, "extra": 2, "topk": 5, "offset": 3},
    {"b": 2, "n": 1, "h": 4, "mb": 2, "block_size": 3, "d": 64, "layout": "indexer_fp8", "topk": 4},
]

register_case(OpCase("indexer_logits_paged", _logits, dict(_PARAMS), tiny=[dict(s) for s in _TINY],
                     shapes=_shapes, flops=_flops, bytes=_logits_bytes, bound="memory"))
register_case(OpCase("indexer_topk_paged", _topk, dict(_PARAMS), tiny=[dict(s) for s in _TINY],
                     shapes=_shapes, flops=_flops, bytes=_topk_bytes, bound="memory"))


# ---------------------------------------------------------------- paged_slots
def _slots(g: Gen, s: Shape) -> list:
    """``reqs > 0``: a step's ``b`` rows reading ``reqs`` requests' table rows through ``req_index`` (else
    ``req_index`` None: row ``i`` reads table row ``i``)."""
    b, k, mb, bs, reqs = s["b"], s["k"], s["mb"], s["block_size"], s.get("reqs", 0)
    rows = reqs or b
    table = g.distinct(1, rows * mb + 3, rows * mb).view(rows, mb).contiguous()
    positions = g.randint(mb * bs, (b, k), dtype=torch.int32)
    positions = torch.where(g.rand(b, k) < 0.2, torch.full_like(positions, -1), positions)
    return [positions, table, bs, g.randint(reqs, (b,), dtype=torch.int32) if reqs else None]


def _slots_shapes(c, mode: str) -> list[tuple[str, Shape]]:
    """The indexer's picks of a V4 decode batch turned into slots of 64-entry pages."""
    if mode == "quick":
        return [("decode", {"b": 2, "k": min(c.index_topk, 32), "mb": 4, "block_size": 16})]
    if mode != "decode":
        return []
    return [("picks", {"b": DECODE_SEQS, "k": c.index_topk, "mb": DECODE_CONTEXT // 4 // PAGE, "block_size": PAGE})]


register_case(OpCase("paged_slots", _slots, {"b": REQUIRED, "k": REQUIRED, "mb": REQUIRED, "block_size": REQUIRED,
                                             "reqs": 0},
                     tiny=[{"b": 3, "k": 5, "mb": 3, "block_size": 4}, {"b": 7, "k": 5, "mb": 3, "block_size": 4,
                                                                        "reqs": 2}],
                     shapes=_slots_shapes,
                     bytes=lambda s: s["b"] * s["k"] * 12 + (s.get("reqs", 0) or s["b"]) * s["mb"] * 4,
                     bound="memory"))
