"""Cases of sparse attention over paged caches: random block tables, holes, uneven topk_length, two caches,
V4's 512-wide entries and the narrower ones of a V4-shaped config (``d``), and V4.1's caches (a
``v41_window_fp8`` window cache with a ``v41_compressed_fp4`` extra cache: ``extra_layout``)."""
from __future__ import annotations

import torch

from v4hal.ops.paged import PAGED_LAYOUTS, new_paged_cache

from ._core import DECODE_CONTEXT, DECODE_SEQS, REQUIRED, Gen, OpCase, Shape, reference, register_case
from .gemm import is_v4_flash

_PARAMS = {"layout": REQUIRED, "b": REQUIRED, "s": REQUIRED, "h": REQUIRED, "block_size": REQUIRED,
           "ctx": REQUIRED, "topk": REQUIRED, "extra_ctx": 0, "extra_topk": 0, "holes": 0.0, "uneven": False,
           "d": 512, "extra_layout": None}

#: V4.1-Flash decode: 64 heads of 512, a 128-token window, 512 compressed picks (of ratio-2 entries)
V41_HEADS, V41_WINDOW, V41_TOPK, V41_RATIO = 64, 128, 512, 2

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


def _picks(g: Gen, s: Shape, ctx: int, k: int, zero_last: bool, layout: str
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cache of ``layout``, int32 slots ``[b, s, k]``, int32 lengths ``[b]``) for sequences of ``ctx``
    tokens each.

    Every sequence owns ``ceil(ctx / block_size)`` pages of one shared cache through a random block
    table (its pages scattered over the cache); each query picks ``k`` random positions of its
    sequence, a fraction ``holes`` of them -1, and with ``holes > 0`` query (0, 0) picks nothing. With
    ``uneven``, the lengths are random in ``[1, k]``, and with ``zero_last`` the last batch's is 0."""
    b, sq, bs = s["b"], s["s"], s["block_size"]
    pages = -(-ctx // bs)
    cache = _filled_cache(g, b * pages, bs, layout, s["d"])
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
    cache, idx, lengths = _picks(g, s, s["ctx"], s["topk"], zero_last=b > 1, layout=s["layout"])
    extra = [None, None, None]
    if s["extra_topk"]:
        extra = list(_picks(g, s, s["extra_ctx"], s["extra_topk"], zero_last=False, layout=_extra_layout(s)))
    uneven = s["uneven"]
    args = [q, cache, idx, sink, s["d"] ** -0.5, lengths if uneven else None, extra[0], extra[1],
            extra[2] if uneven else None, s["layout"], None, None, 0, None, 0, True]
    return args + [s["extra_layout"]]


def _extra_layout(s: Shape) -> str:
    return s["extra_layout"] or s["layout"]


def _bytes(s: Shape) -> float:
    """q read, out and lse written, and per pick its entry's bytes (of its cache's layout) and its int32 slot."""
    rows = s["b"] * s["s"]
    entry = PAGED_LAYOUTS[s["layout"]].token_bytes(s["d"])
    extra = PAGED_LAYOUTS[_extra_layout(s)].token_bytes(s["d"])
    return (2 * rows * s["h"] * s["d"] * 2 + rows * s["h"] * 4 + rows * s["topk"] * (entry + 4)
            + rows * s["extra_topk"] * (extra + 4))


def _flops(s: Shape) -> float:
    return s["b"] * s["s"] * s["h"] * (s["topk"] + s["extra_topk"]) * (4 * s["d"] + 5)


def _v4_shapes(c, mode: str) -> list[tuple[str, Shape]]:
    """V4 decode: the window cache (``window_size`` picks) plus the compressed cache of a 64K context
    (ratio 4 with ``index_topk`` picks; ratio 128 with all of its entries picked); pages of 64 tokens;
    entries ``head_dim`` wide."""
    h, win = c.n_heads, c.window_size
    base = {"layout": "model1_fp8", "s": 1, "h": h, "block_size": 64, "ctx": win, "topk": win, "d": c.head_dim}
    v41 = {"layout": "v41_window_fp8", "extra_layout": "v41_compressed_fp4", "s": 1, "h": V41_HEADS,
           "block_size": 64, "ctx": V41_WINDOW, "topk": V41_WINDOW, "extra_topk": V41_TOPK, "d": 512}
    if mode == "quick":
        return [("decode", {**base, "b": 2, "extra_ctx": 256, "extra_topk": min(c.index_topk, 256), "holes": 0.1,
                            "uneven": True}),
                ("v41_decode", {**v41, "b": 1, "extra_ctx": 2 * V41_TOPK, "holes": 0.1})]
    if mode != "decode":
        return []   # a decode op: prefill runs the contiguous sparse_attn
    out = [("csa", {**base, "b": DECODE_SEQS, "extra_ctx": DECODE_CONTEXT // 4, "extra_topk": c.index_topk}),
           ("hca", {**base, "b": DECODE_SEQS, "extra_ctx": DECODE_CONTEXT // 128,
                    "extra_topk": DECODE_CONTEXT // 128})]
    if is_v4_flash(c):   # V4.1-Flash's decode rides on the v4-flash sets
        out.append(("v41_csa", {**v41, "b": DECODE_SEQS, "extra_ctx": DECODE_CONTEXT // V41_RATIO}))
    return out


# bf16 caches are dense (a copy keeps their strides); model1_fp8 pages of 72 tokens (24 at d = 128) need no
# padding, nor v41_window_fp8 pages of a multiple of 32 tokens, nor v41_compressed_fp4 ones of a multiple of 8
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
    # V4.1 (d = 96: 3 fp8 / 6 fp4 scale groups, a 128-wide tile)
    {"layout": "v41_window_fp8", "extra_layout": "v41_compressed_fp4", "b": 2, "s": 2, "h": 4, "block_size": 64,
     "ctx": 70, "topk": 16, "extra_ctx": 80, "extra_topk": 20, "holes": 0.25, "uneven": True},
    {"layout": "v41_window_fp8", "extra_layout": "v41_compressed_fp4", "d": 96, "b": 1, "s": 2, "h": 3,
     "block_size": 32, "ctx": 40, "topk": 8, "extra_ctx": 36, "extra_topk": 12, "holes": 0.2},
    {"layout": "v41_window_fp8", "b": 1, "s": 1, "h": 2, "block_size": 64, "ctx": 64, "topk": 16},
    {"layout": "v41_compressed_fp4", "extra_layout": "bf16", "d": 64, "b": 1, "s": 1, "h": 2, "block_size": 8,
     "ctx": 12, "topk": 8, "extra_ctx": 8, "extra_topk": 5},
]

register_case(OpCase("sparse_attn_paged", _build, dict(_PARAMS), tiny=[dict(s) for s in _TINY], shapes=_v4_shapes,
                     flops=_flops, bytes=_bytes, bound="memory"))
