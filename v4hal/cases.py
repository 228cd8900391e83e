"""Seeded random inputs for every op, shared by ``v4hal parity``, ``v4hal bench`` and the tests.

``make_case(op, shape, seed, device)`` returns the op's schema arguments (a list, schema order) built
from a shape dict; ``SMALL_SHAPES`` are the CPU-sized parity cases (odd sizes, -1 indices, empty experts).
Quantized operands are produced by the reference quantizers, so every backend sees valid data.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from v4hal.hal.dispatch import use_backend

FP8 = torch.float8_e4m3fn


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g: torch.Generator, *shape: int, dtype=torch.float32, device="cpu", scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


def _ref(op: str, *args: Any) -> Any:
    with use_backend("reference"):
        return getattr(torch.ops.v4hal, op)(*args)


def _topk_idxs(g: torch.Generator, b: int, m: int, k: int, n: int, device: str, invalid: float = 0.2) -> torch.Tensor:
    idx = torch.randint(0, n, (b, m, k), generator=g, dtype=torch.int32)
    idx[torch.rand(b, m, k, generator=g) < invalid] = -1
    if m > 1:
        idx[0, 0] = -1  # one row entirely masked: must give zeros
    return idx.to(device)


def _group_offsets(g: torch.Generator, m: int, e: int, device: str) -> torch.Tensor:
    ids = torch.randint(0, e, (m,), generator=g)
    if e > 1:
        ids[ids == e - 1] = 0  # the last expert gets no rows
    counts = torch.bincount(ids, minlength=e)
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(device)


# ---- builders: shape dict -> schema-ordered args ----
def _act_quant(g, s, dev):
    return [_randn(g, s["m"], s["k"], dtype=s.get("dtype", torch.bfloat16), device=dev), 128, s.get("fmt"),
            s.get("scale_dtype", torch.float32)]


def _fp4_act_quant(g, s, dev):
    return [_randn(g, s["m"], s["k"], dtype=s.get("dtype", torch.bfloat16), device=dev), 32]


def _dequant_fp8(g, s, dev):
    y, sc = _ref("act_quant", _randn(g, s["m"], s["k"], device=dev), 128, None, torch.float32)
    return [y, sc, 128, torch.float32]


def _dequant_fp4(g, s, dev):
    y, sc = _ref("fp4_act_quant", _randn(g, s["m"], s["k"], device=dev), 32)
    return [y, sc, 32, torch.float32]


def _quant_weight_fp8(g, s, dev):
    return [_randn(g, s["n"], s["k"], dtype=torch.bfloat16, device=dev, scale=0.05), 128, "ue8m0"]


def _quant_weight_fp4(g, s, dev):
    return [_randn(g, s["n"], s["k"], dtype=torch.bfloat16, device=dev, scale=0.05), 32]


def _fp8_gemm(g, s, dev):
    a, a_s = _ref("act_quant", _randn(g, s["m"], s["k"], device=dev), 128, "ue8m0", torch.float32)
    b, b_s = _ref("quant_weight_fp8", _randn(g, s["n"], s["k"], device=dev, scale=0.05), 128, "ue8m0")
    return [a, a_s, b, b_s, torch.float32, torch.bfloat16]


def _fp4_gemm(g, s, dev):
    a, a_s = _ref("act_quant", _randn(g, s["m"], s["k"], device=dev), 128, "ue8m0", torch.float32)
    b, b_s = _ref("quant_weight_fp4", _randn(g, s["n"], s["k"], device=dev, scale=0.05), 32)
    return [a, a_s, b, b_s, torch.float32, torch.bfloat16]


def _grouped_gemm(g, s, dev):
    m, n, k, e, fmt = s["m"], s["n"], s["k"], s["e"], s.get("fmt", "bf16")
    offsets = _group_offsets(g, m, e, dev)
    x = _randn(g, m, k, device=dev)
    w = _randn(g, e, n, k, device=dev, scale=0.05)
    if fmt in ("bf16", "fp16", "fp32"):
        dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[fmt]
        return [x.to(dt), w.to(dt), offsets, None, None, torch.bfloat16]
    xq, xs = _ref("act_quant", x, 128, "ue8m0", torch.float32)
    wq, ws = _ref("quant_weight_fp8" if fmt == "fp8" else "quant_weight_fp4", w, *((128, "ue8m0") if fmt == "fp8" else (32,)))
    return [xq, wq, offsets, xs, ws, torch.bfloat16]


def _sparse_attn(g, s, dev):
    b, m, h, d, n, k = s["b"], s["m"], s["h"], s["d"], s["n"], s["topk"]
    dt = s.get("dtype", torch.bfloat16)
    q = _randn(g, b, m, h, d, dtype=dt, device=dev)
    kv = _randn(g, b, n, d, dtype=dt, device=dev)
    sink = _randn(g, h, device=dev)
    return [q, kv, sink, _topk_idxs(g, b, m, k, n, dev), d ** -0.5]


def _indexer_inputs(g, s, dev):
    b, m, h, d, t = s["b"], s["m"], s["h"], s["d"], s["t"]
    dt = s.get("dtype", torch.bfloat16)
    return [_randn(g, b, m, h, d, dtype=dt, device=dev), _randn(g, b, t, d, dtype=dt, device=dev),
            _randn(g, b, m, h, dtype=dt, device=dev, scale=(h * d) ** -0.5)]


def _indexer_topk(g, s, dev):
    return _indexer_inputs(g, s, dev) + [s["topk"], s.get("start_pos", 0), 4, s.get("offset", 0)]


def _compress_kv(g, s, dev):
    b, n, d, r = s["b"], s["n"], s["d"], s["ratio"]
    c = 2 if r == 4 else 1
    return [_randn(g, b, n, c * d, dtype=s.get("dtype", torch.bfloat16), device=dev),
            _randn(g, b, n, c * d, device=dev), _randn(g, r, c * d, device=dev), r, r == 4]


def _moe_gate(g, s, dev):
    t, d, e, k = s["t"], s["d"], s["e"], s["topk"]
    x = _randn(g, t, d, dtype=torch.bfloat16, device=dev)
    w = _randn(g, e, d, dtype=torch.bfloat16, device=dev, scale=d ** -0.5)
    if s.get("hash"):
        tid2eid = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(64)]).to(torch.int32).to(dev)
        ids = torch.randint(0, 64, (t,), generator=g).to(dev)
        return [x, w, k, None, "sqrtsoftplus", 1.5, tid2eid, ids]
    return [x, w, k, _randn(g, e, device=dev, scale=0.1), "sqrtsoftplus", 1.5, None, None]


def _routing(g, t, e, k, dev):
    pool = e - 1 if e > k else e  # the last expert gets no token when there is room
    ids = torch.stack([torch.randperm(pool, generator=g)[:k] for _ in range(t)]).to(torch.int32)
    w = torch.rand(t, k, generator=g)
    return (w / w.sum(-1, keepdim=True)).to(dev), ids.to(dev)


def _moe_dispatch(g, s, dev):
    _, ids = _routing(g, s["t"], s["e"], s["topk"], dev)
    return [_randn(g, s["t"], s["d"], dtype=torch.bfloat16, device=dev), ids, s["e"]]


def _moe_combine(g, s, dev):
    t, k = s["t"], s["topk"]
    w, ids = _routing(g, t, s["e"], k, dev)
    _, _, s2f = _ref("moe_dispatch", _randn(g, t, 8, device=dev), ids, s["e"])
    return [_randn(g, t * k, s["d"], dtype=torch.bfloat16, device=dev), w, s2f]


def _moe_experts(g, s, dev):
    t, d, inter, e, k, fmt = s["t"], s["d"], s["inter"], s["e"], s["topk"], s.get("fmt", "bf16")
    w, ids = _routing(g, t, e, k, dev)
    x = _randn(g, t, d, dtype=torch.bfloat16, device=dev)
    ws = [_randn(g, e, inter, d, device=dev, scale=d ** -0.5), _randn(g, e, d, inter, device=dev, scale=inter ** -0.5),
          _randn(g, e, inter, d, device=dev, scale=d ** -0.5)]
    if fmt == "bf16":
        return [x, w, ids, *[wi.to(torch.bfloat16) for wi in ws], None, None, None, 10.0]
    q = [_ref("quant_weight_fp8", wi, 128, "ue8m0") if fmt == "fp8" else _ref("quant_weight_fp4", wi, 32) for wi in ws]
    return [x, w, ids, q[0][0], q[1][0], q[2][0], q[0][1], q[1][1], q[2][1], 10.0]


def _hc_params(g, hc, dev, rows):
    return (_randn(g, 3, device=dev, scale=0.5), _randn(g, rows, device=dev, scale=0.5))


def _hc_split_sinkhorn(g, s, dev):
    hc = s.get("hc", 4)
    rows = (2 + hc) * hc
    scale, base = _hc_params(g, hc, dev, rows)
    return [_randn(g, s["t"], rows, device=dev), scale, base, hc, 20, 1e-6]


def _hc_pre(g, s, dev):
    hc, d = s.get("hc", 4), s["d"]
    rows = (2 + hc) * hc
    scale, base = _hc_params(g, hc, dev, rows)
    return [_randn(g, s["t"], hc, d, dtype=torch.bfloat16, device=dev),
            _randn(g, rows, hc * d, device=dev, scale=(hc * d) ** -0.5), scale, base, 1e-6, hc, 20, 1e-6]


def _hc_post(g, s, dev):
    hc, t, d = s.get("hc", 4), s["t"], s["d"]
    comb = torch.softmax(_randn(g, t, hc, hc, device=dev), -1)
    return [_randn(g, t, d, dtype=torch.bfloat16, device=dev), _randn(g, t, hc, d, dtype=torch.bfloat16, device=dev),
            2 * torch.sigmoid(_randn(g, t, hc, device=dev)), comb]


def _hc_head(g, s, dev):
    hc, d = s.get("hc", 4), s["d"]
    return [_randn(g, s["t"], hc, d, dtype=torch.bfloat16, device=dev),
            _randn(g, hc, hc * d, device=dev, scale=(hc * d) ** -0.5), _randn(g, 1, device=dev, scale=0.5),
            _randn(g, hc, device=dev, scale=0.5), 1e-6, 1e-6]


def _rms_norm(g, s, dev):
    return [_randn(g, s["t"], s["d"], dtype=torch.bfloat16, device=dev), _randn(g, s["d"], device=dev), 1e-6]


def _rotary_emb(g, s, dev):
    b, sl, h, rd = s["b"], s["s"], s["h"], s["rd"]
    angles = torch.rand(sl, rd // 2, generator=g) * 2 * math.pi
    return [_randn(g, b, sl, h, rd, dtype=torch.bfloat16, device=dev), torch.polar(torch.ones_like(angles), angles).to(dev),
            bool(s.get("inverse", False))]


def _hadamard(g, s, dev):
    return [_randn(g, s["t"], s["d"], dtype=torch.bfloat16, device=dev), None]


BUILDERS: dict[str, Callable[[torch.Generator, dict, str], list]] = {
    "act_quant": _act_quant, "fp4_act_quant": _fp4_act_quant, "dequant_fp8": _dequant_fp8,
    "dequant_fp4": _dequant_fp4, "quant_weight_fp8": _quant_weight_fp8, "quant_weight_fp4": _quant_weight_fp4,
    "fp8_gemm": _fp8_gemm, "fp4_gemm": _fp4_gemm, "grouped_gemm": _grouped_gemm,
    "sparse_attn": _sparse_attn, "index_scores": lambda g, s, d: _indexer_inputs(g, s, d),
    "indexer_topk": _indexer_topk, "compress_kv": _compress_kv,
    "moe_gate": _moe_gate, "moe_dispatch": _moe_dispatch, "moe_combine": _moe_combine, "moe_experts": _moe_experts,
    "hc_split_sinkhorn": _hc_split_sinkhorn, "hc_pre": _hc_pre, "hc_post": _hc_post, "hc_head": _hc_head,
    "rms_norm": _rms_norm, "rotary_emb": _rotary_emb, "hadamard_transform": _hadamard,
}

# CPU-sized parity cases: (op, shape). Odd sizes, -1 indices, an expert with no rows.
SMALL_SHAPES: list[tuple[str, dict[str, Any]]] = [
    ("act_quant", {"m": 3, "k": 256}), ("act_quant", {"m": 5, "k": 128, "fmt": "ue8m0"}),
    ("act_quant", {"m": 2, "k": 128, "scale_dtype": torch.float8_e8m0fnu}),
    ("fp4_act_quant", {"m": 3, "k": 96}), ("dequant_fp8", {"m": 3, "k": 256}), ("dequant_fp4", {"m": 3, "k": 64}),
    ("quant_weight_fp8", {"n": 200, "k": 256}), ("quant_weight_fp4", {"n": 7, "k": 64}),
    ("fp8_gemm", {"m": 5, "n": 200, "k": 256}), ("fp4_gemm", {"m": 3, "n": 64, "k": 256}),
    ("grouped_gemm", {"m": 33, "n": 64, "k": 128, "e": 4, "fmt": "fp32"}),
    ("grouped_gemm", {"m": 33, "n": 128, "k": 256, "e": 3, "fmt": "fp8"}),
    ("grouped_gemm", {"m": 17, "n": 64, "k": 128, "e": 3, "fmt": "fp4"}),
    ("sparse_attn", {"b": 2, "m": 3, "h": 5, "d": 64, "n": 40, "topk": 12, "dtype": torch.float32}),
    ("sparse_attn", {"b": 1, "m": 1, "h": 16, "d": 512, "n": 70, "topk": 24}),
    ("index_scores", {"b": 2, "m": 3, "h": 4, "d": 64, "t": 9, "dtype": torch.float32}),
    ("indexer_topk", {"b": 2, "m": 5, "h": 4, "d": 64, "t": 9, "topk": 4, "start_pos": 20, "dtype": torch.float32}),
    ("compress_kv", {"b": 2, "n": 16, "d": 32, "ratio": 4}), ("compress_kv", {"b": 1, "n": 256, "d": 16, "ratio": 128}),
    ("moe_gate", {"t": 7, "d": 64, "e": 16, "topk": 3}), ("moe_gate", {"t": 5, "d": 64, "e": 16, "topk": 2, "hash": True}),
    ("moe_dispatch", {"t": 9, "d": 32, "e": 6, "topk": 2}), ("moe_combine", {"t": 9, "d": 32, "e": 6, "topk": 2}),
    ("moe_experts", {"t": 9, "d": 128, "inter": 128, "e": 4, "topk": 2, "fmt": "bf16"}),
    ("moe_experts", {"t": 5, "d": 128, "inter": 256, "e": 4, "topk": 2, "fmt": "fp8"}),
    ("moe_experts", {"t": 5, "d": 128, "inter": 128, "e": 4, "topk": 2, "fmt": "fp4"}),
    ("hc_split_sinkhorn", {"t": 7}), ("hc_pre", {"t": 5, "d": 64}), ("hc_post", {"t": 5, "d": 64}),
    ("hc_head", {"t": 5, "d": 64}), ("rms_norm", {"t": 5, "d": 96}), ("rotary_emb", {"b": 2, "s": 3, "h": 2, "rd": 16}),
    ("hadamard_transform", {"t": 3, "d": 128}),
]


def make_case(op: str, shape: dict[str, Any], seed: int = 0, device: str | torch.device = "cpu") -> list[Any]:
    """Schema-ordered arguments of ``op`` for ``shape``; the same seed gives the same tensors."""
    return BUILDERS[op](_gen(seed), shape, str(torch.device(device)))


def describe_shape(shape: dict[str, Any]) -> str:
    """``m=3 k=256 dtype=bf16`` for tables."""
    def fmt(v: Any) -> str:
        return str(v).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "fp32") \
            .replace("float8_e8m0fnu", "e8m0")
    return " ".join(f"{k}={fmt(v)}" for k, v in shape.items())
