"""Cases of RMSNorm, rotary embedding and the Hadamard transform."""
from __future__ import annotations

import math

import torch

from ._core import PREFILL_TOKENS, REQUIRED, Gen, OpCase, Shape, register_case, tokens


def _rms_norm(g: Gen, s: Shape) -> list:
    return [g.randn(s["t"], s["d"], dtype="bf16"), g.randn(s["d"], scale=0.1) + 1, 1e-6]


def rotary_freqs(b: int, s: int, rd: int, device: torch.device, base: float = 10000.0) -> torch.Tensor:
    """complex64 ``[s, rd/2]`` for positions 0..s-1, or ``[b, 1, rd/2]`` (one position per sequence,
    ``37 * i``) when ``s == 1`` and ``b > 1`` (a decode batch)."""
    inv = 1.0 / (base ** (torch.arange(0, rd, 2, device=device, dtype=torch.float32) / rd))
    if s == 1 and b > 1:
        pos = torch.arange(b, device=device, dtype=torch.float32).view(b, 1) * 37
    else:
        pos = torch.arange(s, device=device, dtype=torch.float32)
    angles = pos[..., None] * inv
    return torch.polar(torch.ones_like(angles), angles)


def _rotary_emb(g: Gen, s: Shape) -> list:
    b, sl, h, rd = s["b"], s["s"], s["h"], s["rd"]
    return [g.randn(b, sl, h, rd, dtype="bf16"), rotary_freqs(b, sl, rd, g.device), bool(s["inverse"])]


def _rotary_shapes(c, mode):
    h, rd = c.n_heads, c.rope_head_dim
    b, sl = {"quick": (2, 8), "decode": (tokens("decode"), 1), "prefill": (1, PREFILL_TOKENS)}[mode]
    return [("q", {"b": b, "s": sl, "h": h, "rd": rd})]


register_case(OpCase(
    "rms_norm", _rms_norm, {"t": REQUIRED, "d": REQUIRED}, tiny=[{"t": 5, "d": 96}],
    shapes=lambda c, mode: [("attn_norm", {"t": tokens(mode), "d": c.dim})], flops=lambda s: 4 * s["t"] * s["d"]))

register_case(OpCase(
    "rotary_emb", _rotary_emb, {"b": REQUIRED, "s": REQUIRED, "h": REQUIRED, "rd": REQUIRED, "inverse": False},
    tiny=[{"b": 2, "s": 3, "h": 2, "rd": 16}, {"b": 3, "s": 1, "h": 2, "rd": 16, "inverse": True}],
    shapes=_rotary_shapes, flops=lambda s: 3 * s["b"] * s["s"] * s["h"] * s["rd"]))

register_case(OpCase(
    "hadamard_transform", lambda g, s: [g.randn(s["t"], s["d"], dtype="bf16"), None], {"t": REQUIRED, "d": REQUIRED},
    tiny=[{"t": 3, "d": 128}],
    shapes=lambda c, mode: [("index_q", {"t": tokens(mode) * c.index_n_heads, "d": c.index_head_dim})],
    flops=lambda s: s["t"] * s["d"] * math.log2(s["d"])))
