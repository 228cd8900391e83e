"""Cases of sparse attention over paged caches: random block tables, holes, uneven topk_length, two caches,
V4's 512-wide entries and the narrower ones of a V4-shaped config (``d``)."""
from __future__ import annotations

import torch

from v4hal.ops.paged import PAGED_LAYOUTS, new_paged_cache

from ._core import DECODE_CONTEXT, DECODE_SEQS, REQUIRED, Gen, OpCase, Shape, reference, register_case

_PARAMS = {"layout": REQUIRED, "b": REQUIRED, "s": REQUIRED, "h": REQUIRED, "block_size": REQUIRED,
           "ctx": REQUIRED, "topk": REQUIRED, "extra_ctx": 0, "extra_topk": 0, "holes": 0.0, "uneven": False,
           "d": 512}

#: slots written per paged_cache_write call while filling a cache (bounds the temporaries)
_FILL_CHUNK = 1 << 16


def _filled_cache(g: Gen, blocks: int, block_size: int, layout: str, d: int) -> torch.Tensor:
    """A cache of ``layout`` whose every slot holds a random ``d``-wide entry (unit-variance bf16 before
    quantization)."""
    cache = new_paged_cache(blocks, block_size, layout, device=g.device, dim=d)
    n = blocks * block_size
    for lo in range(0, n, _FILL_CHUNK):
        hi = min(n, lo + _FILL_CHUNK)
        slots = torch.arange(lo, hi, dtype=torch.int32, device=g.device)
        reference("paged_cache_write", cache, g.randn(hi - lo, d, dtype="bf16"), slots, layout)
    return cache


def _picks(g: Gen, s: Shape, ctx: int, k: int, zero_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cache, int32 slots ``[b, s, k]``, int32 lengths ``[b]``) for sequences of ``ctx`` tokens each.

    Every sequence owns ``ceil(ctx / block_size)`` pages of one shared cache through a random block
    table (its pages scattered over the cache); each query picks ``k`` random positions of its
    sequence, a fraction ``holes`` of them -1, and with ``holes > 0`` query (0, 0) picks nothing. With
    ``uneven``, the lengths are random in ``[1, k]``, and with ``zero_last`` the last batch's is 0."""
    b, sq, bs = s["b"], s["s"], s["block_size"]
    pages = -(-ctx // bs)
    cache = _filled_cache(g, b * pages, bs, s["layout"], s["d"])
    table = g.rand(b * pages).argsort().view(b, pages)                     # random block table
    pos = g.randint(ctx, (b, sq, k))
    slots = table.gather(1, (pos // bs).view(b, -1)).view(b, sq, k) * bs + pos % bs
    if s["holes"] > 0:
        slots = torch.where(g.rand(b, sq, k) < s["holes"], torch.full_like(slots, -1), slots)
        slots[0, 0] = -1
    if s["uneven"]:
        lengths = (g.randint(k, (b,), dtype=torch.int32) + 1).to(torch.int32)
        if zero_last:
            lengths[-1] = 0
    else:
        lengths = torch.full((b,), k, dtype=torch.int32, device=g.device)
    return cache, slots.to(torch.int32).contiguous(), lengths


def _build(g: Gen, s: Shape) -> list:
    b, sq, h = s["b"], s["s"], s["h"]
    q = g.randn(b, sq, h, s["d"], dtype="bf16")
    sink = g.randn(h)
    cache, idx, lengths = _picks(g, s, s["ctx"], s["topk"], zero_last=b > 1)
    extra = [None, None, None]
    if s["extra_topk"]:
        extra = list(_picks(g, s, s["extra_ctx"], s["extra_topk"], zero_last=False))
    uneven = s["uneven"]
    return [q, cache, idx, sink, s["d"] ** -0.5, lengths if uneven else None, extra[0], extra[1],
            extra[2] if uneven else None, s["layout"], None, None, 0, None, 0, True]


def _bytes(s: Shape) -> float:
    """q read, out and lse written, and per pick its entry's bytes and its int32 slot."""
    rows = s["b"] * s["s"]
    entry = PAGED_LAYOUTS[s["layout"]].token_bytes(s["d"])
    picks = rows * (s["topk"] + s["extra_topk"])
    return 2 * rows * s["h"] * s["d"] * 2 + rows * s["h"] * 4 + picks * (entry + 4)


def _flops(s: Shape) -> float:
    return s["b"] * s["s"] * s["h"] * (s["topk"] + s["extra_topk"]) * (4 * s["d"] + 5)


def _v4_shapes(c, mode: str) -> list[tuple[str, Shape]]:
    """V4 decode: the window cache (``window_size`` picks) plus the compressed cache of a 64K context
    (ratio 4 with ``index_topk`` picks; ratio 128 with all of its entries picked); pages of 64 tokens;
    entries ``head_dim`` wide."""
    h, win = c.n_heads, c.window_size
    base = {"layout": "model1_fp8", "s": 1, "h": h, "block_size": 64, "ctx": win, "topk": win, "d": c.head_dim}
    if mode == "quick":
        return [("decode", {**base, "b": 2, "extra_ctx": 256, "extra_topk": min(c.index_topk, 256), "holes": 0.1,
                            "uneven": True})]
    if mode != "decode":
        return []   # a decode op: prefill runs the contiguous sparse_attn
    return [("csa", {**base, "b": DECODE_SEQS, "extra_ctx": DECODE_CONTEXT // 4, "extra_topk": c.index_topk}),
            ("hca", {**base, "b": DECODE_SEQS, "extra_ctx": DECODE_CONTEXT // 128,
                     "extra_topk": DECODE_CONTEXT // 128})]


# bf16 caches are dense (a copy keeps their strides); model1_fp8 pages of 72 tokens (24 at d = 128) need no
# padding
_TINY = [
    {"layout": "bf16", "b": 2, "s": 2, "h": 4, "block_size": 4, "ctx": 12, "topk": 8, "holes": 0.25,
     "uneven": True},
    {"layout": "bf16", "b": 2, "s": 1, "h": 3, "block_size": 5, "ctx": 10, "topk": 6, "extra_ctx": 20,
     "extra_topk": 9, "holes": 0.2, "uneven": True},
    {"layout": "model1_fp8", "b": 2, "s": 2, "h": 4, "block_size": 72, "ctx": 60, "topk": 8, "extra_ctx": 72,
     "extra_topk": 8, "holes": 0.25, "uneven": True},
    {"layout": "model1_fp8", "b": 1, "s": 3, "h": 2, "block_size": 72, "ctx": 100, "topk": 16},
    {"layout": "model1_fp8", "d": 128, "b": 2, "s": 2, "h": 3, "block_size": 24, "ctx": 30, "topk": 8,
     "extra_ctx": 24, "extra_topk": 6, "holes": 0.25, "uneven": True},
    {"layout": "bf16", "d": 128, "b": 2, "s": 1, "h": 4, "block_size": 4, "ctx": 12, "topk": 8, "holes": 0.25,
     "uneven": True},
]

register_case(OpCase("sparse_attn_paged", _build, dict(_PARAMS), tiny=[dict(s) for s in _TINY], shapes=_v4_shapes,
                     flops=_flops, bytes=_bytes, bound="memory"))
