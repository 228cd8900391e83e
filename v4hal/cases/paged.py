"""Cases of the paged caches: writing entries into a cache of each layout, and reading them back, at V4's
entry widths (``d`` None) and at the narrower ones of a V4-shaped config."""
from __future__ import annotations

import torch

from v4hal.ops.paged import PAGED_LAYOUTS, new_paged_cache

from ._core import REQUIRED, Gen, OpCase, Shape, reference, register_case, tokens

_PARAMS = {"layout": REQUIRED, "blocks": REQUIRED, "block_size": REQUIRED, "t": REQUIRED, "d": None}

# model1_fp8 pages of a multiple of 72 tokens (24 at d = 128) need no padding, so a copy of the cache keeps
# its strides; so do V4.1's pages of a multiple of 32 tokens (v41_window_fp8) or 8 (v41_compressed_fp4)
_TINY = [
    {"layout": "model1_fp8", "blocks": 2, "block_size": 72, "t": 5},
    {"layout": "bf16", "blocks": 2, "block_size": 3, "t": 4},
    {"layout": "indexer_fp4", "blocks": 3, "block_size": 4, "t": 7},
    {"layout": "indexer_fp8", "blocks": 2, "block_size": 3, "t": 4},
    {"layout": "model1_fp8", "d": 128, "blocks": 2, "block_size": 24, "t": 5},
    {"layout": "bf16", "d": 128, "blocks": 2, "block_size": 3, "t": 4},
    {"layout": "indexer_fp4", "d": 64, "blocks": 3, "block_size": 4, "t": 7},
    {"layout": "indexer_fp8", "d": 64, "blocks": 2, "block_size": 3, "t": 4},
    {"layout": "v41_window_fp8", "blocks": 2, "block_size": 32, "t": 4},
    {"layout": "v41_compressed_fp4", "blocks": 2, "block_size": 8, "t": 4},
    {"layout": "v41_window_fp8", "d": 64, "blocks": 2, "block_size": 32, "t": 5},
    {"layout": "v41_compressed_fp4", "d": 64, "blocks": 2, "block_size": 8, "t": 5},
]


def _dim(s: Shape) -> int:
    """The shape's entry width (None: the layout's V4 width)."""
    return PAGED_LAYOUTS[s["layout"]].dim if s["d"] is None else s["d"]


def _slots(g: Gen, s: Shape, holes: bool) -> torch.Tensor:
    """int32 ``[t]``: distinct slots of the cache, the second one -1 when ``holes`` (and t > 1)."""
    slots = g.distinct(1, s["blocks"] * s["block_size"], s["t"])[0].contiguous()
    if holes and s["t"] > 1:
        slots[1] = -1
    return slots


def _filled_cache(g: Gen, s: Shape) -> torch.Tensor:
    """A cache of the shape's layout with entries written at ``t`` random slots."""
    layout = s["layout"]
    cache = new_paged_cache(s["blocks"], s["block_size"], layout, device=g.device, dim=_dim(s))
    x = g.randn(s["t"], _dim(s), dtype="bf16")
    reference("paged_cache_write", cache, x, _slots(g, s, holes=False), layout)
    return cache


def _write(g: Gen, s: Shape) -> list:
    cache = _filled_cache(g, s)
    x = g.randn(s["t"], _dim(s), dtype="bf16")
    return [cache, x, _slots(g, s, holes=True), s["layout"]]


def _read(g: Gen, s: Shape) -> list:
    cache = _filled_cache(g, s)
    n = s["blocks"] * s["block_size"]
    slots = g.randint(n, (s["t"],), dtype=torch.int64)      # repeats allowed when reading
    if s["t"] > 1:
        slots[0] = -1
    return [cache, slots, s["layout"]]


def _v4_shapes(cfg, mode: str) -> list[tuple[str, Shape]]:
    """A step's tokens written into (read from) a 64K-token window cache (``head_dim``-wide entries) and its
    FP4 indexer cache (``index_head_dim``-wide keys), pages of 72 tokens (no padding); and V4.1's window and
    compressed caches (``head_dim``-wide entries, 512 in the release) in FlashMLA's pages of 64 tokens."""
    blocks = 64 * 1024 // 72 + 1
    v4 = [(layout, {"layout": layout, "blocks": blocks, "block_size": 72, "t": tokens(mode), "d": d})
          for layout, d in (("model1_fp8", cfg.head_dim), ("indexer_fp4", cfg.index_head_dim))]
    v41 = [(layout, {"layout": layout, "blocks": 1024, "block_size": 64, "t": tokens(mode), "d": cfg.head_dim})
           for layout in ("v41_window_fp8", "v41_compressed_fp4")]
    return v4 + v41


def _bytes(s: Shape) -> float:
    """Least traffic of a write or a read of ``t`` entries: the entries' cache bytes, the bf16 rows and the
    slots (not the whole cache)."""
    lay = PAGED_LAYOUTS[s["layout"]]
    return s["t"] * (lay.token_bytes(_dim(s)) + 2 * _dim(s) + 8)


register_case(OpCase("paged_cache_write", _write, dict(_PARAMS), tiny=[dict(s) for s in _TINY], shapes=_v4_shapes,
                     bytes=_bytes))
register_case(OpCase("paged_cache_read", _read, dict(_PARAMS), tiny=[dict(s) for s in _TINY], shapes=_v4_shapes,
                     bytes=_bytes))
