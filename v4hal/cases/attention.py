"""Cases of sparse attention, the lightning indexer and the KV compressor."""
from __future__ import annotations

import torch

from v4hal.bench import peers

from ._core import (
    DECODE_CONTEXT,
    DECODE_SEQS,
    DECODE_TOKENS,
    PREFILL_INDEX_QUERIES,
    PREFILL_TOKENS,
    REQUIRED,
    Gen,
    OpCase,
    Shape,
    dtype_of,
    register_case,
    short_dtype,
)


def topk_indices(g: Gen, b: int, m: int, k: int, n: int, masked: float) -> torch.Tensor:
    """int32 ``[b, m, k]`` in [0, n); a fraction ``masked`` is -1, and with ``masked > 0`` and ``m > 1``
    the first row is entirely -1 (it must give zeros)."""
    idx = g.randint(n, (b, m, k), dtype=torch.int32)
    if masked > 0:
        idx = torch.where(g.rand(b, m, k) < masked, torch.full_like(idx, -1), idx)
        if m > 1:
            idx[0, 0] = -1
    return idx


def _sparse_attn(g: Gen, s: Shape) -> list:
    b, m, h, d, n, k = s["b"], s["m"], s["h"], s["d"], s["n"], s["topk"]
    q = g.randn(b, m, h, d, dtype=s["dtype"])
    kv = g.randn(b, n, d, dtype=s["dtype"])
    return [q, kv, g.randn(h), topk_indices(g, b, m, k, n, s["masked"]), d ** -0.5]


def _sparse_attn_bytes(s: Shape) -> float:
    """q read and the output written, the gathered KV rows and their int32 indices, the sink."""
    rows, e = s["b"] * s["m"], dtype_of(s["dtype"]).itemsize
    return 2 * rows * s["h"] * s["d"] * e + rows * s["topk"] * (e * s["d"] + 4) + 4 * s["h"]


def _sparse_attn_shapes(c, mode):
    h, hd, win = c.n_heads, c.head_dim, c.window_size
    if mode == "quick":
        return [("decode", {"b": 2, "m": 2, "h": h, "d": hd, "n": 96, "topk": win + c.index_topk, "masked": 0.1})]
    if mode == "decode":
        n_comp = DECODE_CONTEXT // 4
        hca = win + DECODE_CONTEXT // 128
        return [("csa", {"b": DECODE_SEQS, "m": 1, "h": h, "d": hd, "n": win + n_comp, "topk": win + c.index_topk,
                         "masked": 0.0}),
                ("hca", {"b": DECODE_SEQS, "m": 1, "h": h, "d": hd, "n": hca, "topk": hca, "masked": 0.0})]
    s = PREFILL_TOKENS
    return [("csa", {"b": 1, "m": s, "h": h, "d": hd, "n": win + s, "topk": win + c.index_topk, "masked": 0.0})]


def _indexer_inputs(g: Gen, s: Shape) -> list:
    b, m, h, d, t = s["b"], s["m"], s["h"], s["d"], s["t"]
    return [g.randn(b, m, h, d, dtype=s["dtype"]), g.randn(b, t, d, dtype=s["dtype"]),
            g.randn(b, m, h, dtype=s["dtype"], scale=(h * d) ** -0.5)]


def _indexer_topk(g: Gen, s: Shape) -> list:
    return _indexer_inputs(g, s) + [s["topk"], s["start_pos"], s["ratio"], s["offset"]]


def _index_flops(s: Shape) -> float:
    return s["b"] * s["m"] * s["t"] * s["h"] * (2 * s["d"] + 3)


def _index_scores_shapes(c, mode):
    h, d = c.index_n_heads, c.index_head_dim
    if mode == "quick":
        return [("decode", {"b": 2, "m": 2, "h": h, "d": d, "t": 64})]
    if mode == "decode":
        return [("index", {"b": DECODE_SEQS, "m": 1, "h": h, "d": d, "t": DECODE_CONTEXT // 4})]
    return [("index", {"b": 1, "m": PREFILL_INDEX_QUERIES, "h": h, "d": d, "t": DECODE_CONTEXT // 4})]


def _indexer_topk_shapes(c, mode):
    h, d, k = c.index_n_heads, c.index_head_dim, c.index_topk
    if mode == "quick":
        return [("prefill", {"b": 1, "m": 32, "h": h, "d": d, "t": 8, "topk": k, "offset": 128})]
    if mode == "decode":
        return [("index", {"b": DECODE_SEQS, "m": 1, "h": h, "d": d, "t": DECODE_CONTEXT // 4, "topk": k,
                           "start_pos": DECODE_CONTEXT - 1, "offset": 128})]
    return [("index", {"b": 1, "m": PREFILL_INDEX_QUERIES, "h": h, "d": d, "t": PREFILL_INDEX_QUERIES // 4,
                       "topk": k, "offset": 128})]


def _compress_kv(g: Gen, s: Shape) -> list:
    b, n, d, r = s["b"], s["n"], s["d"], s["ratio"]
    c = 2 if r == 4 else 1
    return [g.randn(b, n, c * d, dtype=s["dtype"]), g.randn(b, n, c * d), g.randn(r, c * d, scale=0.1), r, r == 4]


def _compress_kv_shapes(c, mode):
    hd = c.head_dim
    if mode == "quick":
        return [("ratio4", {"b": 1, "n": 32, "d": hd, "ratio": 4})]
    if mode == "decode":
        return [("ratio4", {"b": DECODE_TOKENS, "n": 4, "d": hd, "ratio": 4})]
    return [(f"ratio{r}", {"b": 1, "n": PREFILL_TOKENS, "d": hd, "ratio": r}) for r in (4, 128)]


def _dtype_rate(s: Shape) -> str:
    return short_dtype(dtype_of(s["dtype"]))


register_case(OpCase(
    "sparse_attn", _sparse_attn,
    {"b": REQUIRED, "m": REQUIRED, "h": REQUIRED, "d": REQUIRED, "n": REQUIRED, "topk": REQUIRED, "dtype": "bf16",
     "masked": 0.2},
    tiny=[{"b": 2, "m": 3, "h": 5, "d": 64, "n": 40, "topk": 12, "dtype": "fp32"},
          {"b": 1, "m": 1, "h": 16, "d": 512, "n": 70, "topk": 24}],
    shapes=_sparse_attn_shapes, flops=lambda s: s["b"] * s["m"] * s["h"] * s["topk"] * (4 * s["d"] + 5),
    bytes=_sparse_attn_bytes, bound="matmul", compute_dtype=_dtype_rate, peers=(peers.gather_sdpa,)))

register_case(OpCase(
    "index_scores", _indexer_inputs,
    {"b": REQUIRED, "m": REQUIRED, "h": REQUIRED, "d": REQUIRED, "t": REQUIRED, "dtype": "bf16"},
    tiny=[{"b": 2, "m": 3, "h": 4, "d": 64, "t": 9, "dtype": "fp32"}],
    shapes=_index_scores_shapes, flops=_index_flops, bound="matmul", compute_dtype=_dtype_rate))

register_case(OpCase(
    "indexer_topk", _indexer_topk,
    {"b": REQUIRED, "m": REQUIRED, "h": REQUIRED, "d": REQUIRED, "t": REQUIRED, "topk": REQUIRED, "start_pos": 0,
     "ratio": 4, "offset": 0, "dtype": "bf16"},
    tiny=[{"b": 2, "m": 5, "h": 4, "d": 64, "t": 9, "topk": 4, "start_pos": 20, "dtype": "fp32"}],
    shapes=_indexer_topk_shapes, flops=_index_flops, bound="matmul", compute_dtype=_dtype_rate))

register_case(OpCase(
    "compress_kv", _compress_kv, {"b": REQUIRED, "n": REQUIRED, "d": REQUIRED, "ratio": REQUIRED, "dtype": "bf16"},
    tiny=[{"b": 2, "n": 16, "d": 32, "ratio": 4}, {"b": 1, "n": 256, "d": 16, "ratio": 128}],
    shapes=_compress_kv_shapes,
    flops=lambda s: s["b"] * s["n"] * (2 if s["ratio"] == 4 else 1) * s["d"] * 7))
