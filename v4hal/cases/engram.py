"""Cases of the Engram ops (V4.1): n-gram hashing, the FP8 table lookup, the gate.

The V4.1 sizes: 4-grams (look-back 0..3) over 8 heads = 24 rows per token per layer, rows of 256
e4m3 values with one ue8m0 scale per 32, primes above 16M, a compressed vocabulary of 99,092 ids. The
benchmarked tables hold 2**20 rows (the release's 384M-row tables live in host memory; the gather's
traffic per token does not depend on the table's size).
"""
from __future__ import annotations

import functools

import torch

from v4hal.ops.engram import DEAD, multiplier_table, prime_table

from ._core import REQUIRED, Gen, OpCase, Shape, register_case, tokens

V41_NGRAM = 4
V41_HEADS = 8
V41_ROW_WIDTH = 256
V41_BUCKETS = 16_000_000
V41_VOCAB = 99_092
BENCH_TABLE_ROWS = 2**20


@functools.lru_cache(maxsize=8)
def _layout(n: int, heads: int, buckets: int, vocab: int) -> tuple[list[int], list[list[int]]]:
    """(multipliers ``[n]``, primes ``[n - 1, heads]``) of Engram layer 1, as lists (the tensors are made
    per call: a cached tensor would leak out of a fake-tensor build)."""
    return multiplier_table([1], n, vocab)[0], prime_table([1], n, heads, buckets)[0]


def _split(g: Gen, t: int, b: int) -> torch.Tensor:
    """int32 cu_seqlens ``[b + 1]`` of t tokens over b requests (some may be empty)."""
    if b == 1:
        return torch.tensor([0, t], dtype=torch.int32, device=g.device)
    cuts = torch.sort(g.randint(t + 1, (b - 1,))).values
    return torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), t)]).to(torch.int32)


def _engram_hash(g: Gen, s: Shape) -> list:
    t, b, n = s["t"], s["b"], s["n"]
    mult, primes = _layout(n, s["heads"], s["buckets"], s["vocab"])
    ids = g.randint(s["vocab"], (t,))
    dead = g.rand(t) < s["dead"]
    ids = torch.where(dead, torch.full_like(ids, DEAD), ids)
    history = g.randint(s["vocab"] + 1, (b, n - 1)) - 1          # -1: nothing before / a dead token
    as_tensor = functools.partial(torch.tensor, dtype=torch.int64, device=g.device)
    return [ids, _split(g, t, b), history, as_tensor(mult), as_tensor(primes), 2]


def _hash_shapes(c, mode):
    base = {"n": V41_NGRAM, "heads": V41_HEADS, "buckets": V41_BUCKETS, "vocab": V41_VOCAB, "dead": 0.0}
    b = {"quick": 4, "decode": tokens("decode"), "prefill": 1}[mode]
    return [("engram_hash", {**base, "t": tokens(mode), "b": b})]


register_case(OpCase(
    "engram_hash", _engram_hash,
    {"t": REQUIRED, "b": REQUIRED, "n": V41_NGRAM, "heads": V41_HEADS, "buckets": V41_BUCKETS, "vocab": V41_VOCAB,
     "dead": 0.1},
    tiny=[{"t": 11, "b": 3, "n": 3, "heads": 2, "buckets": 1000, "vocab": 50, "dead": 0.2},
          {"t": 9, "b": 2}, {"t": 0, "b": 2, "n": 4, "heads": 1, "buckets": 97, "vocab": 30}],
    shapes=_hash_shapes,
    # per token and column: a multiply and an XOR per look-back step, a modulo and the offset add
    flops=lambda s: s["t"] * (s["n"] * 2 + (s["n"] - 1) * s["heads"] * 2),
    bytes=lambda s: 8 * (s["t"] + s["t"] * (s["n"] - 1) * s["heads"] + 2 * s["b"] * (s["n"] - 1))))


def _engram_lookup(g: Gen, s: Shape) -> list:
    r, w = s["r"], s["w"]
    table = g.randn(r, w, scale=64.0, dtype="fp8")
    exps = g.randint(9, (r, w // 32)) + 123                       # 2**-4 .. 2**4
    if s["scale"] == "e8m0":
        scales = exps.to(torch.uint8).view(torch.float8_e8m0fnu)
    else:
        scales = torch.exp2(exps.float() - 127)
    rows = g.randint(r, (s["t"], s["n"]))
    return [rows, table, scales, s["out"]]


def _lookup_bytes(s: Shape) -> float:
    per_row = s["w"] + s["w"] // 32 * (1 if s["scale"] == "e8m0" else 4) + s["w"] * s["out"].itemsize + 8
    return s["t"] * s["n"] * per_row


register_case(OpCase(
    "engram_lookup", _engram_lookup,
    {"t": REQUIRED, "n": V41_NGRAM * V41_HEADS - V41_HEADS, "w": V41_ROW_WIDTH, "r": REQUIRED, "scale": "e8m0",
     "out": torch.bfloat16},
    tiny=[{"t": 5, "n": 3, "w": 64, "r": 40}, {"t": 3, "n": 24, "w": 256, "r": 100, "scale": "fp32",
                                                 "out": torch.float32},
          {"t": 2, "n": 2, "w": 96, "r": 7, "out": torch.float16}, {"t": 1, "n": 24, "w": 256, "r": 10}],
    shapes=lambda c, mode: [("engram_rows", {"t": tokens(mode), "r": BENCH_TABLE_ROWS})],
    flops=lambda s: s["t"] * s["n"] * s["w"], bytes=_lookup_bytes))


def _engram_gate(g: Gen, s: Shape) -> list:
    t, hc, d = s["t"], s["hc"], s["d"]
    streams = g.randn(t, hc, d, dtype=s["dtype"])
    kv = g.randn(t, (hc + 1) * d, dtype=s["dtype"])
    q_weight = g.randn(hc, d, scale=0.2) + 1
    k_weight = g.randn(hc, d, scale=0.2) + 1
    mask = (g.rand(t) >= 0.25) if s["mask"] else None
    return [streams, kv, q_weight, k_weight, mask, 1e-20]


register_case(OpCase(
    "engram_gate", _engram_gate, {"t": REQUIRED, "hc": REQUIRED, "d": REQUIRED, "mask": True, "dtype": "bf16"},
    tiny=[{"t": 5, "hc": 4, "d": 96}, {"t": 3, "hc": 2, "d": 1100, "mask": False, "dtype": "fp32"},
          {"t": 4, "hc": 1, "d": 16, "dtype": "fp16"}],
    shapes=lambda c, mode: [("engram_gate", {"t": tokens(mode), "hc": c.hc_mult, "d": c.dim})],
    flops=lambda s: 10 * s["t"] * s["hc"] * s["d"]))
