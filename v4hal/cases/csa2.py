"""Cases of V4.1's compressor (``csa2_compressor_ragged``): ``reqs`` requests of ``s`` tokens each, request i
at position ``start + i`` (so at ratio 2 half of them complete a group from a state row written earlier),
the compress rope (theta 160000 with YaRN x16 in the model; here a plain table of the same shape), and
state blocks allocated where rows are read or kept (id 0 elsewhere)."""
from __future__ import annotations

import torch

from v4hal.ops.ragged_compress import max_entries

from ._core import DECODE_CONTEXT, DECODE_SEQS, PREFILL_TOKENS, REQUIRED, Gen, OpCase, Shape, register_case
from .ragged_compress import rope_freqs, state_table

_PARAMS = {"ratio": REQUIRED, "d": REQUIRED, "h": REQUIRED, "reqs": REQUIRED, "s": REQUIRED, "start": 0,
           "blk": 16, "rd": 64}

_TINY = [
    {"ratio": 2, "d": 32, "h": 64, "reqs": 3, "s": 5, "start": 3, "blk": 4, "rd": 16},
    {"ratio": 1, "d": 16, "h": 32, "reqs": 2, "s": 6, "start": 0, "blk": 4, "rd": 8},
]

#: V4.1-Flash: hidden size, compressed entry width (the attention head dim), rope dims
V41_HIDDEN, V41_HEAD_DIM, V41_ROPE_DIM = 5120, 512, 64


def _v41_freqs(n: int, rd: int, device: torch.device) -> torch.Tensor:
    """complex64 ``[n, rd/2]``: V4.1's compress rope base (160000), unscaled."""
    return rope_freqs(n, rd, device, 160000.0)


def _table(s: Shape) -> tuple[list[int], list[int], int, list[list[int]]]:
    """`state_table` from the first position a call reads (the even partner of an odd start at ratio 2) to
    the last it writes; ratio 1 keeps no state."""
    r = s["ratio"]
    return state_table(s, lambda p, e: p - p % r if r > 1 else None)


def _build(g: Gen, s: Shape) -> list:
    r, d, h, b = s["ratio"], s["d"], s["h"], s["reqs"]
    t = b * s["s"]
    starts, ends, blocks, rows = _table(s)
    x = g.randn(t, h, dtype="bf16")
    wkv = g.randn(d, h, dtype="bf16", scale=h ** -0.5)
    wgate = g.randn(d, h, dtype="bf16", scale=h ** -0.5) if r > 1 else None
    norm = (g.rand(d) + 0.5).to(torch.bfloat16)
    state = g.randn(blocks, s["blk"], 2 * d)
    table = torch.tensor(rows, dtype=torch.int32, device=g.device)
    cu = torch.arange(0, t + 1, s["s"], dtype=torch.int32, device=g.device)
    sp = torch.tensor(starts, dtype=torch.int32, device=g.device)
    return [x, wkv, wgate, norm, _v41_freqs(max(ends), s["rd"], g.device), state, table, cu, sp, r, 1e-20]


def _entries(s: Shape) -> int:
    return max_entries(s["reqs"] * s["s"], s["ratio"], s["reqs"])


def _flops(s: Shape) -> float:
    t, d, r = s["reqs"] * s["s"], s["d"], s["ratio"]
    proj = 2.0 * t * s["h"] * d * (2 if r > 1 else 1)
    return proj + _entries(s) * (5.0 * r * d + 8.0 * d)


def _bytes(s: Shape) -> float:
    """x, the bf16 weights, the state rows written (every token, ratio 2) and read (one per odd start),
    the rope rows, the two outputs."""
    t, d, r = s["reqs"] * s["s"], s["d"], s["ratio"]
    n = _entries(s)
    w = 2 if r > 1 else 1
    state = 0.0
    if r > 1:
        reads = sum(1 for i in range(s["reqs"]) if (s["start"] + i) % r and s["s"] >= r - (s["start"] + i) % r)
        state = 4.0 * 2 * d * (t + reads)
    return 2.0 * t * s["h"] + w * 2.0 * d * s["h"] + state + 8.0 * n * s["rd"] / 2 + 2 * 2.0 * n * d + 8.0 * n


def _v41_shapes(cfg: object, mode: str) -> list[tuple[str, Shape]]:
    """V4.1-Flash's KV-source compressors (ratio 2) and the ratio-1 form at the release width: decode is 64
    requests of one token near a 64K context, prefill one request's chunk from position 0."""
    if mode == "decode":
        base = {"reqs": DECODE_SEQS, "s": 1, "start": DECODE_CONTEXT - DECODE_SEQS}
    elif mode == "prefill":
        base = {"reqs": 1, "s": PREFILL_TOKENS, "start": 0}
    else:
        base = {"reqs": 4, "s": 4, "start": 13}
    return [(f"V4.1 ratio {r}", {"ratio": r, "d": V41_HEAD_DIM, "h": V41_HIDDEN, "blk": 16, "rd": V41_ROPE_DIM,
                                 **base}) for r in (2, 1)]


register_case(OpCase("csa2_compressor_ragged", _build, dict(_PARAMS), tiny=[dict(s) for s in _TINY],
                     shapes=_v41_shapes, flops=_flops, bytes=_bytes, bound="matmul", compute_dtype="bf16"))
