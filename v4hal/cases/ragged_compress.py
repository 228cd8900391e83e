"""Cases of the ragged KV compressor: ``reqs`` requests of ``s`` tokens each, request i at position
``start + i`` (so the requests sit at different phases of their blocks), the state rows their completed
entries read filled in, state blocks allocated only where rows are read or kept (id 0 elsewhere)."""
from __future__ import annotations

from collections.abc import Callable

import torch

from v4hal.ops.ragged_compress import coff_of, max_entries

from ._core import DECODE_CONTEXT, DECODE_SEQS, PREFILL_TOKENS, REQUIRED, Gen, OpCase, Shape, register_case

_PARAMS = {"ratio": REQUIRED, "d": REQUIRED, "h": REQUIRED, "reqs": REQUIRED, "s": REQUIRED, "start": 0,
           "blk": 16, "rd": 64}

_TINY = [
    {"ratio": 4, "d": 32, "h": 64, "reqs": 3, "s": 5, "start": 6, "blk": 4, "rd": 16},
    {"ratio": 4, "d": 16, "h": 32, "reqs": 2, "s": 9, "start": 0, "blk": 8, "rd": 8},
    {"ratio": 128, "d": 32, "h": 64, "reqs": 2, "s": 70, "start": 100, "blk": 64, "rd": 16},
]


def rope_freqs(n: int, rd: int, device: torch.device, base: float = 10000.0) -> torch.Tensor:
    """complex64 ``[n, rd/2]``: rope frequencies of positions 0..n-1 (``base``, unscaled)."""
    inv = 1.0 / (base ** (torch.arange(0, rd, 2, dtype=torch.float32, device=device) / rd))
    ang = torch.outer(torch.arange(n, dtype=torch.float32, device=device), inv)
    return torch.polar(torch.ones_like(ang), ang)


def state_table(s: Shape, first: Callable[[int, int], int | None]
                ) -> tuple[list[int], list[int], int, list[list[int]]]:
    """(start positions, ends, block count, block ids per request) of ``s["reqs"]`` requests of ``s["s"]``
    tokens from ``s["start"]`` on: each request gets fresh blocks of ``s["blk"]`` rows from the first position
    whose state the call touches, ``first(start, end)`` (None: no state kept), to the last it writes."""
    blk = s["blk"]
    starts = [s["start"] + i for i in range(s["reqs"])]
    ends = [p + s["s"] for p in starts]
    cols = max(1, max(-(-e // blk) for e in ends))
    rows, next_id = [], 1
    for p, e in zip(starts, ends):
        row = [0] * cols
        lo = first(p, e)
        if lo is not None:
            for c in range(lo // blk, -(-e // blk)):
                row[c] = next_id
                next_id += 1
        rows.append(row)
    return starts, ends, next_id, rows


def _layout(s: Shape) -> tuple[list[int], list[int], int, list[list[int]]]:
    """`state_table` from the block before the unfinished one (overlapping ratio 4) or the unfinished one."""
    r, coff = s["ratio"], coff_of(s["ratio"])
    return state_table(s, lambda p, e: min(max(0, (p // r - (coff - 1)) * r), max(0, (e // r - (coff - 1)) * r)))


def _build(g: Gen, s: Shape) -> list:
    r, d, h, b = s["ratio"], s["d"], s["h"], s["reqs"]
    cd = coff_of(r) * d
    t = b * s["s"]
    starts, ends, blocks, rows = _layout(s)
    x = g.randn(t, h, dtype="bf16")
    wkv = g.randn(cd, h, dtype="bf16", scale=h ** -0.5)
    wgate = g.randn(cd, h, dtype="bf16", scale=h ** -0.5)
    ape = g.randn(r, cd)
    norm = (g.rand(d) + 0.5).to(torch.bfloat16)
    state = g.randn(blocks, s["blk"], 2 * cd)
    table = torch.tensor(rows, dtype=torch.int32, device=g.device)
    cu = torch.arange(0, t + 1, s["s"], dtype=torch.int32, device=g.device)
    sp = torch.tensor(starts, dtype=torch.int32, device=g.device)
    return [x, wkv, wgate, ape, norm, rope_freqs(max(ends), s["rd"], g.device), state, table, cu, sp, r, 1e-6]


def _entries(s: Shape) -> int:
    return max_entries(s["reqs"] * s["s"], s["ratio"], s["reqs"])


def _flops(s: Shape) -> float:
    t, cd, d, r = s["reqs"] * s["s"], coff_of(s["ratio"]) * s["d"], s["d"], s["ratio"]
    return 2.0 * t * s["h"] * 2 * cd + _entries(s) * (5.0 * coff_of(r) * r * d + 6.0 * d)


def _bytes(s: Shape) -> float:
    """x, the bf16 weights, ape, the state rows written (every token) and read, the rope rows, the outputs."""
    t, cd, d, r = s["reqs"] * s["s"], coff_of(s["ratio"]) * s["d"], s["d"], s["ratio"]
    n = _entries(s)
    return (2.0 * t * s["h"] + 2 * 2.0 * cd * s["h"] + 4.0 * r * cd + 4.0 * 2 * cd * t
            + 4.0 * 2 * cd * _reads(s) + 8.0 * n * s["rd"] / 2 + 2.0 * n * d + 8.0 * n)


def _reads(s: Shape) -> int:
    """State rows one call reads: the earlier tokens of the entries it completes."""
    r, coff = s["ratio"], coff_of(s["ratio"])
    total = 0
    for i in range(s["reqs"]):
        p = s["start"] + i
        if (p + s["s"]) // r > p // r:
            total += p - max(0, (p // r - (coff - 1)) * r)
    return total


def _v4_shapes(cfg: object, mode: str) -> list[tuple[str, Shape]]:
    """The three compressors of V4 (attention C4A, indexer C4Li, attention C128A): decode is 64 requests of
    one token near a 64K context, prefill one request's chunk from position 0."""
    h, d, di, rd = cfg.dim, cfg.head_dim, cfg.index_head_dim, cfg.rope_head_dim
    if mode == "decode":
        base = {"reqs": DECODE_SEQS, "s": 1, "start": DECODE_CONTEXT - DECODE_SEQS}
    elif mode == "prefill":
        base = {"reqs": 1, "s": PREFILL_TOKENS, "start": 0}
    else:
        base = {"reqs": 4, "s": 4, "start": 13}
    out = []
    for label, ratio, dim, blk in (("C4A", 4, d, 16), ("C4Li", 4, di, 16), ("C128A", 128, d, 128)):
        out.append((label, {"ratio": ratio, "d": dim, "h": h, "blk": blk, "rd": rd, **base}))
    return out


register_case(OpCase("compressor_ragged", _build, dict(_PARAMS), tiny=[dict(s) for s in _TINY], shapes=_v4_shapes,
                     flops=_flops, bytes=_bytes, bound="matmul", compute_dtype="bf16"))
