"""Benchmark cases: one per (op, shape), with seeded inputs, work counts, a check and peers.

A `Case` knows how to build its inputs on a device (``make(device, seed)``), how to call the
public op on them (``run``), how much work the call is (``flops``: 2 per multiply-add, plus
the elementwise counts of ``docs/cost_model.md``; ``bytes``: the least traffic the op must
move: every input read once, every output written once), which ceiling binds it, how to
compare its output with the reference backend, and which peers (other implementations
present on the machine) compute the same thing.

Case sets:
- ``quick_cases()``: every public op at small shapes (the ``v4-mini`` dims), CPU-friendly;
- ``preset_cases(preset, mode)``: shapes of ``v4-flash`` / ``v4-pro``. ``decode``: a decode
  batch of 128 tokens for the token-wise ops (projections, quantizers, mHC, MoE, norms) and
  64 sequences of one query at a 64K-token context for the per-sequence ops (sparse
  attention over window + top-k, the indexer over 16K compressed entries); ``prefill``: a
  chunk of 4096 tokens (2048 queries for the indexer) of one sequence;
- ``cases_from_yaml(path)``: a list of ``{op: <name>, <param>: <value>, ...}`` entries whose
  parameters are those of the builder (``build_<op>``) of that op.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import v4hal
from v4hal.compare import calc_diff
from v4hal.hal import formats
from v4hal.hal.errors import RangeError, ShapeError
from v4hal.model.config import ModelConfig

from . import peers as peermod

__all__ = ["Case", "BUILDERS", "quick_cases", "preset_cases", "cases_from_yaml", "cases_from_specs",
           "compare_outputs"]

Inputs = dict[str, Any]
E8M0 = torch.float8_e8m0fnu
FP8 = torch.float8_e4m3fn


@dataclass
class Case:
    """One benchmark case. ``bound`` is "matmul" (compute may bind) or "memory" (always bandwidth-bound)."""

    op: str
    name: str
    params: dict[str, Any]
    dtype: str
    make: Callable[[torch.device, int], Inputs]
    run: Callable[[Inputs], Any]
    flops: float
    bytes: float
    check: str = "float"
    tol: float = 2e-4
    compute_dtype: str | None = None
    peers: list[peermod.Peer] = field(default_factory=list)

    @property
    def shape(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.params.items())


# --------------------------------------------------------------------------- helpers
def _gen(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _randn(g: torch.Generator, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32,
           scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=g, device=device) * scale).to(dtype)


def _ref():
    return v4hal.use_backend("reference")


def _fp8_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with _ref():
        return v4hal.act_quant(x, 128, "ue8m0", torch.float32)


def _fp8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with _ref():
        return v4hal.quant_weight_fp8(w, 128, "ue8m0")


def _fp4_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with _ref():
        return v4hal.quant_weight_fp4(w, 32)


def _routing(g: torch.Generator, t: int, k: int, e: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct expert ids per token (int32 [t, k]) and normalised fp32 weights."""
    idx = torch.rand((t, e), generator=g, device=device).topk(k, dim=-1).indices.to(torch.int32)
    w = torch.rand((t, k), generator=g, device=device) + 0.1
    return w / w.sum(-1, keepdim=True), idx


def _offsets(g: torch.Generator, rows: int, e: int, device: torch.device) -> torch.Tensor:
    """Random group sizes summing to ``rows`` (some experts may get none): int64 [e+1]."""
    assign = torch.randint(0, e, (rows,), generator=g, device=device)
    counts = torch.bincount(assign, minlength=e)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _freqs(s: int, rd: int, device: torch.device, base: float = 10000.0, batch: int | None = None,
           start: int = 0) -> torch.Tensor:
    inv = 1.0 / (base ** (torch.arange(0, rd, 2, device=device, dtype=torch.float32) / rd))
    if batch is None:
        pos = torch.arange(start, start + s, device=device, dtype=torch.float32)
        return torch.polar(torch.ones(s, rd // 2, device=device), torch.outer(pos, inv))
    pos = torch.arange(batch * s, device=device, dtype=torch.float32).view(batch, s) * 37 + start
    ang = pos[..., None] * inv
    return torch.polar(torch.ones_like(ang), ang)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ShapeError(msg)


# --------------------------------------------------------------------------- builders
def build_act_quant(name: str, m: int, k: int, scale_fmt: str | None = "ue8m0", e8m0: bool = False) -> Case:
    _need(k % 128 == 0, f"act_quant case {name}: k must be a multiple of 128, got {k}")
    sdt = E8M0 if e8m0 else torch.float32

    def make(dev, seed):
        g = _gen(dev, seed)
        return {"x": _randn(g, (m, k), dev, torch.bfloat16)}

    return Case("act_quant", name, {"m": m, "k": k, "scale": "e8m0" if e8m0 else (scale_fmt or "fp32")}, "bf16->fp8",
                make, lambda i: v4hal.act_quant(i["x"], 128, scale_fmt, sdt),
                flops=3 * m * k, bytes=2 * m * k + m * k + (1 if e8m0 else 4) * m * k // 128, check="quant_fp8",
                tol=1e-6)


def build_fp4_act_quant(name: str, m: int, k: int) -> Case:
    _need(k % 32 == 0, f"fp4_act_quant case {name}: k must be a multiple of 32, got {k}")

    def make(dev, seed):
        g = _gen(dev, seed)
        return {"x": _randn(g, (m, k), dev, torch.bfloat16)}

    return Case("fp4_act_quant", name, {"m": m, "k": k}, "bf16->fp4", make,
                lambda i: v4hal.fp4_act_quant(i["x"], 32), flops=3 * m * k, bytes=2 * m * k + m * k // 2 + m * k // 32,
                check="quant_fp4", tol=1e-6)


def build_dequant_fp8(name: str, m: int, k: int) -> Case:
    def make(dev, seed):
        g = _gen(dev, seed)
        y, s = _fp8_act(_randn(g, (m, k), dev, torch.bfloat16))
        return {"y": y, "s": s}

    return Case("dequant_fp8", name, {"m": m, "k": k}, "fp8->bf16", make,
                lambda i: v4hal.dequant_fp8(i["y"], i["s"], 128, torch.bfloat16),
                flops=m * k, bytes=m * k + 4 * m * k // 128 + 2 * m * k, tol=1e-6)


def build_dequant_fp4(name: str, m: int, k: int) -> Case:
    def make(dev, seed):
        g = _gen(dev, seed)
        y, s = _fp4_weight(_randn(g, (m, k), dev))
        return {"y": y, "s": s}

    return Case("dequant_fp4", name, {"m": m, "k": k}, "fp4->bf16", make,
                lambda i: v4hal.dequant_fp4(i["y"], i["s"], 32, torch.bfloat16),
                flops=m * k, bytes=m * k // 2 + m * k // 32 + 2 * m * k, tol=1e-6)


def build_quant_weight_fp8(name: str, n: int, k: int) -> Case:
    def make(dev, seed):
        g = _gen(dev, seed)
        return {"w": _randn(g, (n, k), dev, torch.bfloat16, 0.02)}

    return Case("quant_weight_fp8", name, {"n": n, "k": k}, "bf16->fp8", make,
                lambda i: v4hal.quant_weight_fp8(i["w"], 128, "ue8m0"),
                flops=3 * n * k, bytes=2 * n * k + n * k + math.ceil(n / 128) * math.ceil(k / 128),
                check="quant_w8", tol=1e-6)


def build_quant_weight_fp4(name: str, n: int, k: int) -> Case:
    def make(dev, seed):
        g = _gen(dev, seed)
        return {"w": _randn(g, (n, k), dev, torch.bfloat16, 0.02)}

    return Case("quant_weight_fp4", name, {"n": n, "k": k}, "bf16->fp4", make,
                lambda i: v4hal.quant_weight_fp4(i["w"], 32),
                flops=3 * n * k, bytes=2 * n * k + n * k // 2 + n * k // 32, check="quant_fp4", tol=1e-6)


def build_fp8_gemm(name: str, m: int, n: int, k: int) -> Case:
    _need(k % 128 == 0, f"fp8_gemm case {name}: k must be a multiple of 128, got {k}")

    def make(dev, seed):
        g = _gen(dev, seed)
        a, a_s = _fp8_act(_randn(g, (m, k), dev, torch.bfloat16))
        b, b_s = _fp8_weight(_randn(g, (n, k), dev, torch.bfloat16, k ** -0.5))
        return {"a": a, "a_s": a_s, "b": b, "b_s": b_s}

    return Case("fp8_gemm", name, {"m": m, "n": n, "k": k}, "fp8", make,
                lambda i: v4hal.fp8_gemm(i["a"], i["a_s"], i["b"], i["b_s"], torch.float32, torch.bfloat16),
                flops=2 * m * n * k, bytes=m * k + n * k + 2 * m * n + 4 * m * k // 128 + 4 * n * k // 16384,
                compute_dtype="fp8", peers=[peermod.scaled_mm_blockwise(), peermod.bf16_dequant_matmul()])


def build_fp4_gemm(name: str, m: int, n: int, k: int) -> Case:
    _need(k % 128 == 0, f"fp4_gemm case {name}: k must be a multiple of 128, got {k}")

    def make(dev, seed):
        g = _gen(dev, seed)
        a, a_s = _fp8_act(_randn(g, (m, k), dev, torch.bfloat16))
        b, b_s = _fp4_weight(_randn(g, (n, k), dev, torch.bfloat16, k ** -0.5))
        return {"a": a, "a_s": a_s, "b": b, "b_s": b_s}

    return Case("fp4_gemm", name, {"m": m, "n": n, "k": k}, "fp8xfp4", make,
                lambda i: v4hal.fp4_gemm(i["a"], i["a_s"], i["b"], i["b_s"], torch.float32, torch.bfloat16),
                flops=2 * m * n * k, bytes=m * k + n * k // 2 + n * k // 32 + 2 * m * n + 4 * m * k // 128,
                compute_dtype="fp8", peers=[peermod.bf16_dequant_matmul()])


def build_grouped_gemm(name: str, rows: int, experts: int, n: int, k: int, recipe: str = "fp8") -> Case:
    _need(recipe in ("bf16", "fp8", "fp4"), f"grouped_gemm case {name}: recipe must be bf16, fp8 or fp4, got {recipe!r}")

    def make(dev, seed):
        g = _gen(dev, seed)
        x = _randn(g, (rows, k), dev, torch.bfloat16)
        w = _randn(g, (experts, n, k), dev, torch.bfloat16, k ** -0.5)
        out = {"offs": _offsets(g, rows, experts, dev)}
        if recipe == "bf16":
            out.update(x=x, w=w, xs=None, ws=None)
        else:
            out["x"], out["xs"] = _fp8_act(x)
            out["w"], out["ws"] = _fp8_weight(w) if recipe == "fp8" else _fp4_weight(w)
        return out

    wbytes = {"bf16": 2.0, "fp8": 1.0, "fp4": 0.5 + 1 / 32}[recipe] * experts * n * k
    return Case("grouped_gemm", name, {"rows": rows, "experts": experts, "n": n, "k": k, "recipe": recipe}, recipe,
                make, lambda i: v4hal.grouped_gemm(i["x"], i["w"], i["offs"], x_scale=i["xs"], w_scale=i["ws"]),
                flops=2 * rows * n * k, bytes=(2 if recipe == "bf16" else 1) * rows * k + wbytes + 2 * rows * n,
                compute_dtype="bf16" if recipe == "bf16" else "fp8", peers=[peermod.torch_grouped_mm()])


def build_sparse_attn(name: str, b: int, m: int, h: int, d: int, n: int, topk: int, masked: float = 0.0) -> Case:
    def make(dev, seed):
        g = _gen(dev, seed)
        idx = torch.randint(0, n, (b, m, topk), generator=g, device=dev, dtype=torch.int32)
        if masked > 0:
            drop = torch.rand((b, m, topk), generator=g, device=dev) < masked
            idx = torch.where(drop, torch.full_like(idx, -1), idx)
            idx[0, 0] = -1  # one fully masked row
        return {"q": _randn(g, (b, m, h, d), dev, torch.bfloat16), "kv": _randn(g, (b, n, d), dev, torch.bfloat16),
                "sink": _randn(g, (h,), dev), "idx": idx, "scale": d ** -0.5}

    rows = b * m
    return Case("sparse_attn", name, {"b": b, "m": m, "h": h, "d": d, "n": n, "topk": topk}, "bf16", make,
                lambda i: v4hal.sparse_attn(i["q"], i["kv"], i["sink"], i["idx"], i["scale"]),
                flops=rows * h * topk * (4 * d + 5),
                bytes=2 * rows * h * d * 2 + rows * topk * (2 * d + 4) + 4 * h,
                compute_dtype="bf16", peers=[peermod.gather_sdpa()])


def _indexer_inputs(dev, seed, b, s, heads, dim, t):
    g = _gen(dev, seed)
    return {"q": _randn(g, (b, s, heads, dim), dev, torch.bfloat16), "k": _randn(g, (b, t, dim), dev, torch.bfloat16),
            "w": _randn(g, (b, s, heads), dev, torch.bfloat16, (dim * heads) ** -0.5)}


def build_index_scores(name: str, b: int, s: int, heads: int, dim: int, t: int) -> Case:
    return Case("index_scores", name, {"b": b, "s": s, "H": heads, "D": dim, "t": t}, "bf16",
                lambda dev, seed: _indexer_inputs(dev, seed, b, s, heads, dim, t),
                lambda i: v4hal.index_scores(i["q"], i["k"], i["w"]),
                flops=b * s * t * heads * (2 * dim + 3),
                bytes=2 * b * (s * heads * dim + t * dim + s * heads) + 4 * b * s * t, tol=1e-5,
                compute_dtype="bf16")


def build_indexer_topk(name: str, b: int, s: int, heads: int, dim: int, t: int, topk: int, start_pos: int = 0,
                       ratio: int = 4) -> Case:
    return Case("indexer_topk", name,
                {"b": b, "s": s, "H": heads, "D": dim, "t": t, "topk": topk, "start_pos": start_pos}, "bf16",
                lambda dev, seed: _indexer_inputs(dev, seed, b, s, heads, dim, t),
                lambda i: v4hal.indexer_topk(i["q"], i["k"], i["w"], topk, start_pos=start_pos, ratio=ratio,
                                             offset=128),
                flops=b * s * t * heads * (2 * dim + 3),
                bytes=2 * b * (s * heads * dim + t * dim + s * heads) + 4 * b * s * min(topk, t), check="topk",
                tol=1e-4, compute_dtype="bf16")


def build_compress_kv(name: str, b: int, n: int, d: int, ratio: int) -> Case:
    c = 2 if ratio == 4 else 1

    def make(dev, seed):
        g = _gen(dev, seed)
        return {"kv": _randn(g, (b, n, c * d), dev, torch.bfloat16), "score": _randn(g, (b, n, c * d), dev),
                "ape": _randn(g, (ratio, c * d), dev, scale=0.1)}

    return Case("compress_kv", name, {"b": b, "n": n, "d": d, "ratio": ratio}, "bf16", make,
                lambda i: v4hal.compress_kv(i["kv"], i["score"], i["ape"], ratio, c == 2),
                flops=b * n * c * d * 7, bytes=b * n * c * d * 6 + 4 * ratio * c * d + 2 * b * (n // ratio) * d)


def build_moe_gate(name: str, t: int, dim: int, experts: int, topk: int, hashed: bool = False,
                   vocab: int = 1024) -> Case:
    def make(dev, seed):
        g = _gen(dev, seed)
        out = {"x": _randn(g, (t, dim), dev, torch.bfloat16), "w": _randn(g, (experts, dim), dev, torch.bfloat16,
                                                                          dim ** -0.5),
               "bias": _randn(g, (experts,), dev, scale=0.1), "tid2eid": None, "ids": None}
        if hashed:
            out["bias"] = None
            out["tid2eid"] = torch.rand((vocab, experts), generator=g, device=dev).topk(topk, -1).indices.int()
            out["ids"] = torch.randint(0, vocab, (t,), generator=g, device=dev)
        return out

    return Case("moe_gate", name, {"t": t, "dim": dim, "E": experts, "topk": topk, "hash": hashed}, "bf16", make,
                lambda i: v4hal.moe_gate(i["x"], i["w"], topk=topk, bias=i["bias"], route_scale=1.5,
                                         tid2eid=i["tid2eid"], input_ids=i["ids"]),
                flops=2 * t * dim * experts + 4 * t * experts, bytes=2 * t * dim + 2 * experts * dim + 8 * t * topk,
                check="gate", tol=1e-5, compute_dtype="bf16")


def build_moe_dispatch(name: str, t: int, dim: int, experts: int, topk: int) -> Case:
    def make(dev, seed):
        g = _gen(dev, seed)
        w, idx = _routing(g, t, topk, experts, dev)
        return {"x": _randn(g, (t, dim), dev, torch.bfloat16), "idx": idx}

    return Case("moe_dispatch", name, {"t": t, "dim": dim, "E": experts, "topk": topk}, "bf16", make,
                lambda i: v4hal.moe_dispatch(i["x"], i["idx"], experts), flops=0,
                bytes=2 * t * dim + 2 * t * topk * dim + 4 * t * topk + 8 * t * topk + 8 * (experts + 1),
                check="exact", tol=0.0)


def build_moe_combine(name: str, t: int, dim: int, experts: int, topk: int) -> Case:
    def make(dev, seed):
        g = _gen(dev, seed)
        w, idx = _routing(g, t, topk, experts, dev)
        with _ref():
            _, _, handle = v4hal.moe_dispatch(torch.zeros(t, 1, device=dev), idx, experts)
        return {"y": _randn(g, (t * topk, dim), dev, torch.bfloat16), "w": w, "handle": handle}

    return Case("moe_combine", name, {"t": t, "dim": dim, "E": experts, "topk": topk}, "bf16", make,
                lambda i: v4hal.moe_combine(i["y"], i["w"], i["handle"]), flops=2 * t * topk * dim,
                bytes=2 * t * topk * dim + 4 * t * topk + 8 * t * topk + 2 * t * dim)


def build_moe_experts(name: str, t: int, dim: int, inter: int, experts: int, topk: int, recipe: str = "fp4") -> Case:
    _need(recipe in ("bf16", "fp8", "fp4"), f"moe_experts case {name}: recipe must be bf16, fp8 or fp4")

    def make(dev, seed):
        g = _gen(dev, seed)
        w, idx = _routing(g, t, topk, experts, dev)
        ws = [_randn(g, shape, dev, torch.bfloat16, shape[-1] ** -0.5)
              for shape in ((experts, inter, dim), (experts, dim, inter), (experts, inter, dim))]
        out: Inputs = {"x": _randn(g, (t, dim), dev, torch.bfloat16), "w": w, "idx": idx, "scales": None}
        if recipe == "bf16":
            out["w1"], out["w2"], out["w3"] = ws
        else:
            q = [(_fp8_weight if recipe == "fp8" else _fp4_weight)(x) for x in ws]
            out["w1"], out["w2"], out["w3"] = (p[0] for p in q)
            out["scales"] = tuple(p[1] for p in q)
        return out

    wb = {"bf16": 2.0, "fp8": 1.0, "fp4": 0.5 + 1 / 32}[recipe]
    used = min(experts, t * topk)
    return Case("moe_experts", name, {"t": t, "dim": dim, "inter": inter, "E": experts, "topk": topk,
                                      "recipe": recipe}, recipe, make,
                lambda i: v4hal.moe_experts(i["x"], i["w"], i["idx"], i["w1"], i["w2"], i["w3"], w_scales=i["scales"],
                                            swiglu_limit=10.0),
                flops=t * topk * (6 * dim * inter + 5 * inter + 2 * dim),
                bytes=4 * t * dim + wb * used * 3 * dim * inter + 8 * t * topk, tol=1e-3,
                compute_dtype="bf16" if recipe == "bf16" else "fp8")


def _hc_params(g, dev, hc, dim, rows, n_scale):
    return {"fn": _randn(g, (rows, hc * dim), dev, scale=(hc * dim) ** -0.5),
            "scale": _randn(g, (n_scale,), dev, scale=0.5).abs() + 0.5, "base": _randn(g, (rows,), dev, scale=0.5)}


def build_hc_split_sinkhorn(name: str, t: int, hc: int = 4, iters: int = 20) -> Case:
    width = (2 + hc) * hc

    def make(dev, seed):
        g = _gen(dev, seed)
        p = _hc_params(g, dev, hc, 1, width, 3)
        return {"mixes": _randn(g, (t, width), dev), "scale": p["scale"], "base": p["base"]}

    return Case("hc_split_sinkhorn", name, {"t": t, "hc": hc, "iters": iters}, "fp32", make,
                lambda i: v4hal.hc_split_sinkhorn(i["mixes"], i["scale"], i["base"], hc, iters, 1e-6),
                flops=t * (10 * width + 4 * hc * hc * iters), bytes=4 * t * (width + 2 * hc + hc * hc), tol=1e-6)


def build_hc_pre(name: str, t: int, dim: int, hc: int = 4, iters: int = 20) -> Case:
    width = (2 + hc) * hc

    def make(dev, seed):
        g = _gen(dev, seed)
        return {"x": _randn(g, (t, hc, dim), dev, torch.bfloat16), **_hc_params(g, dev, hc, dim, width, 3)}

    return Case("hc_pre", name, {"t": t, "dim": dim, "hc": hc}, "bf16", make,
                lambda i: v4hal.hc_pre(i["x"], i["fn"], i["scale"], i["base"], hc_mult=hc, sinkhorn_iters=iters),
                flops=t * (2 * width * hc * dim + 5 * hc * dim + 4 * hc * hc * iters),
                bytes=2 * t * hc * dim + 4 * width * hc * dim + 2 * t * dim + 4 * t * (hc + hc * hc), tol=1e-4)


def build_hc_post(name: str, t: int, dim: int, hc: int = 4) -> Case:
    def make(dev, seed):
        g = _gen(dev, seed)
        return {"x": _randn(g, (t, dim), dev, torch.bfloat16), "res": _randn(g, (t, hc, dim), dev, torch.bfloat16),
                "post": _randn(g, (t, hc), dev).sigmoid() * 2, "comb": _randn(g, (t, hc, hc), dev).softmax(-1)}

    return Case("hc_post", name, {"t": t, "dim": dim, "hc": hc}, "bf16", make,
                lambda i: v4hal.hc_post(i["x"], i["res"], i["post"], i["comb"]),
                flops=t * hc * dim * (2 + 2 * hc), bytes=2 * t * dim + 4 * t * hc * dim + 4 * t * (hc + hc * hc))


def build_hc_head(name: str, t: int, dim: int, hc: int = 4) -> Case:
    def make(dev, seed):
        g = _gen(dev, seed)
        return {"x": _randn(g, (t, hc, dim), dev, torch.bfloat16), **_hc_params(g, dev, hc, dim, hc, 1)}

    return Case("hc_head", name, {"t": t, "dim": dim, "hc": hc}, "bf16", make,
                lambda i: v4hal.hc_head(i["x"], i["fn"], i["scale"], i["base"]),
                flops=t * (2 * hc * hc * dim + 5 * hc * dim), bytes=2 * t * hc * dim + 4 * hc * hc * dim + 2 * t * dim,
                tol=1e-4)


def build_rms_norm(name: str, t: int, dim: int) -> Case:
    def make(dev, seed):
        g = _gen(dev, seed)
        return {"x": _randn(g, (t, dim), dev, torch.bfloat16), "w": _randn(g, (dim,), dev, scale=0.1) + 1}

    return Case("rms_norm", name, {"t": t, "dim": dim}, "bf16", make,
                lambda i: v4hal.rms_norm(i["x"], i["w"], 1e-6), flops=4 * t * dim, bytes=4 * t * dim + 4 * dim)


def build_rotary_emb(name: str, b: int, s: int, h: int, rd: int = 64) -> Case:
    def make(dev, seed):
        g = _gen(dev, seed)
        return {"x": _randn(g, (b, s, h, rd), dev, torch.bfloat16),
                "f": _freqs(s, rd, dev, batch=b if s == 1 else None, start=seed)}

    return Case("rotary_emb", name, {"b": b, "s": s, "h": h, "rd": rd}, "bf16", make,
                lambda i: v4hal.rotary_emb(i["x"], i["f"]), flops=3 * b * s * h * rd,
                bytes=4 * b * s * h * rd + 4 * (b if s == 1 else 1) * s * rd, tol=1e-5)


def build_hadamard_transform(name: str, t: int, dim: int) -> Case:
    _need(dim & (dim - 1) == 0, f"hadamard_transform case {name}: dim must be a power of two, got {dim}")

    def make(dev, seed):
        g = _gen(dev, seed)
        return {"x": _randn(g, (t, dim), dev, torch.bfloat16)}

    return Case("hadamard_transform", name, {"t": t, "dim": dim}, "bf16", make,
                lambda i: v4hal.hadamard_transform(i["x"]), flops=t * dim * math.log2(dim), bytes=4 * t * dim,
                tol=1e-5)


BUILDERS: dict[str, Callable[..., Case]] = {
    "act_quant": build_act_quant, "fp4_act_quant": build_fp4_act_quant, "dequant_fp8": build_dequant_fp8,
    "dequant_fp4": build_dequant_fp4, "quant_weight_fp8": build_quant_weight_fp8,
    "quant_weight_fp4": build_quant_weight_fp4, "fp8_gemm": build_fp8_gemm, "fp4_gemm": build_fp4_gemm,
    "grouped_gemm": build_grouped_gemm, "sparse_attn": build_sparse_attn, "index_scores": build_index_scores,
    "indexer_topk": build_indexer_topk, "compress_kv": build_compress_kv, "moe_gate": build_moe_gate,
    "moe_dispatch": build_moe_dispatch, "moe_combine": build_moe_combine, "moe_experts": build_moe_experts,
    "hc_split_sinkhorn": build_hc_split_sinkhorn, "hc_pre": build_hc_pre, "hc_post": build_hc_post,
    "hc_head": build_hc_head, "rms_norm": build_rms_norm, "rotary_emb": build_rotary_emb,
    "hadamard_transform": build_hadamard_transform,
}


# --------------------------------------------------------------------------- case sets
def quick_cases() -> list[Case]:
    """Every public op once, at ``v4-mini``-sized shapes (small enough for the CPU and the Triton interpreter)."""
    c = ModelConfig.preset("v4-mini")
    t, d, hd = 16, c.dim, c.head_dim
    p = "quick"
    return [
        build_act_quant(f"{p}/act", t, d),
        build_fp4_act_quant(f"{p}/index_q", t * c.index_n_heads, c.index_head_dim),
        build_dequant_fp8(f"{p}/act", t, d),
        build_dequant_fp4(f"{p}/expert_w1", c.moe_inter_dim, d),
        build_quant_weight_fp8(f"{p}/wq_b", c.n_heads * hd, c.q_lora_rank),
        build_quant_weight_fp4(f"{p}/expert_w1", c.moe_inter_dim, d),
        build_fp8_gemm(f"{p}/wq_b", t, c.n_heads * hd, c.q_lora_rank),
        build_fp4_gemm(f"{p}/expert_w1", t, c.moe_inter_dim, d),
        build_grouped_gemm(f"{p}/experts_w1", t * c.n_activated_experts, c.n_routed_experts, c.moe_inter_dim, d, "fp8"),
        build_sparse_attn(f"{p}/decode", 2, 2, c.n_heads, hd, 96, c.window_size + c.index_topk, masked=0.1),
        build_index_scores(f"{p}/decode", 2, 2, c.index_n_heads, c.index_head_dim, 64),
        build_indexer_topk(f"{p}/prefill", 1, 32, c.index_n_heads, c.index_head_dim, 8, c.index_topk),
        build_compress_kv(f"{p}/ratio4", 1, 32, hd, 4),
        build_moe_gate(f"{p}/score", t, d, c.n_routed_experts, c.n_activated_experts),
        build_moe_dispatch(f"{p}/dispatch", t, d, c.n_routed_experts, c.n_activated_experts),
        build_moe_combine(f"{p}/combine", t, d, c.n_routed_experts, c.n_activated_experts),
        build_moe_experts(f"{p}/fp4", t, d, c.moe_inter_dim, c.n_routed_experts, c.n_activated_experts, "fp4"),
        build_hc_split_sinkhorn(f"{p}/mixes", t, c.hc_mult, c.hc_sinkhorn_iters),
        build_hc_pre(f"{p}/attn", t, d, c.hc_mult, c.hc_sinkhorn_iters),
        build_hc_post(f"{p}/attn", t, d, c.hc_mult),
        build_hc_head(f"{p}/head", t, d, c.hc_mult),
        build_rms_norm(f"{p}/attn_norm", t, d),
        build_rotary_emb(f"{p}/q", 2, 8, c.n_heads, c.rope_head_dim),
        build_hadamard_transform(f"{p}/index_q", t * c.index_n_heads, c.index_head_dim),
    ]


DECODE_TOKENS = 128
DECODE_SEQS = 64
DECODE_CONTEXT = 65536
PREFILL_TOKENS = 4096
PREFILL_INDEX_QUERIES = 2048


def preset_cases(preset: str, mode: str) -> list[Case]:
    """The ops of one V4 layer at ``preset``'s shapes, for ``mode`` "decode" or "prefill" (see module doc)."""
    if mode not in ("decode", "prefill"):
        raise RangeError(f"preset_cases: mode must be 'decode' or 'prefill', got {mode!r}")
    c = ModelConfig.preset(preset)
    dec = mode == "decode"
    t = DECODE_TOKENS if dec else PREFILL_TOKENS
    d, hd, h = c.dim, c.head_dim, c.n_heads
    ep = 8  # routed experts per rank: an EP-8 shard
    e_local = c.n_routed_experts // ep
    rows_local = t * c.n_activated_experts // ep
    p = f"{preset}/{mode}"
    n_comp = DECODE_CONTEXT // 4
    cases = [
        build_act_quant(f"{p}/x", t, d),
        build_fp4_act_quant(f"{p}/index_q", t * c.index_n_heads, c.index_head_dim),
        build_dequant_fp8(f"{p}/x", t, d),
        build_dequant_fp4(f"{p}/expert_w1", c.moe_inter_dim, d),
        build_fp8_gemm(f"{p}/wq_a", t, c.q_lora_rank, d),
        build_fp8_gemm(f"{p}/wq_b", t, h * hd, c.q_lora_rank),
        build_fp8_gemm(f"{p}/wkv", t, hd, d),
        build_fp8_gemm(f"{p}/wo_b", t, d, c.o_groups * c.o_lora_rank),
        build_fp8_gemm(f"{p}/shared_w1", t, c.moe_inter_dim, d),
        build_fp8_gemm(f"{p}/shared_w2", t, d, c.moe_inter_dim),
        build_fp4_gemm(f"{p}/expert_w1", t, c.moe_inter_dim, d),
        build_fp4_gemm(f"{p}/expert_w2", t, d, c.moe_inter_dim),
        build_grouped_gemm(f"{p}/ep8_w1_fp8", rows_local, e_local, c.moe_inter_dim, d, "fp8"),
        build_grouped_gemm(f"{p}/ep8_w1_fp4", rows_local, e_local, c.moe_inter_dim, d, "fp4"),
        build_moe_gate(f"{p}/gate", t, d, c.n_routed_experts, c.n_activated_experts),
        build_moe_dispatch(f"{p}/dispatch", t, d, c.n_routed_experts, c.n_activated_experts),
        build_moe_combine(f"{p}/combine", t, d, c.n_routed_experts, c.n_activated_experts),
        build_moe_experts(f"{p}/ep8_fp4", t, d, c.moe_inter_dim, e_local, c.n_activated_experts, "fp4"),
        build_hc_split_sinkhorn(f"{p}/mixes", t, c.hc_mult, c.hc_sinkhorn_iters),
        build_hc_pre(f"{p}/attn", t, d, c.hc_mult, c.hc_sinkhorn_iters),
        build_hc_post(f"{p}/attn", t, d, c.hc_mult),
        build_hc_head(f"{p}/head", t, d, c.hc_mult),
        build_rms_norm(f"{p}/attn_norm", t, d),
        build_hadamard_transform(f"{p}/index_q", t * c.index_n_heads, c.index_head_dim),
    ]
    if dec:
        keys = c.window_size + c.index_topk
        cases += [
            build_sparse_attn(f"{p}/csa", DECODE_SEQS, 1, h, hd, c.window_size + n_comp, keys),
            build_sparse_attn(f"{p}/hca", DECODE_SEQS, 1, h, hd, c.window_size + DECODE_CONTEXT // 128,
                              c.window_size + DECODE_CONTEXT // 128),
            build_index_scores(f"{p}/index", DECODE_SEQS, 1, c.index_n_heads, c.index_head_dim, n_comp),
            build_indexer_topk(f"{p}/index", DECODE_SEQS, 1, c.index_n_heads, c.index_head_dim, n_comp,
                               c.index_topk, start_pos=DECODE_CONTEXT - 1),
            build_compress_kv(f"{p}/ratio4", DECODE_TOKENS, 4, hd, 4),
            build_rotary_emb(f"{p}/q", DECODE_TOKENS, 1, h, c.rope_head_dim),
        ]
    else:
        s = PREFILL_TOKENS
        cases += [
            build_quant_weight_fp8(f"{p}/wq_b", h * hd, c.q_lora_rank),
            build_quant_weight_fp4(f"{p}/expert_w1", c.moe_inter_dim, d),
            build_sparse_attn(f"{p}/csa", 1, s, h, hd, c.window_size + s, c.window_size + c.index_topk),
            build_index_scores(f"{p}/index", 1, PREFILL_INDEX_QUERIES, c.index_n_heads, c.index_head_dim, n_comp),
            build_indexer_topk(f"{p}/index", 1, PREFILL_INDEX_QUERIES, c.index_n_heads, c.index_head_dim,
                               PREFILL_INDEX_QUERIES // 4, c.index_topk),
            build_compress_kv(f"{p}/ratio4", 1, s, hd, 4),
            build_compress_kv(f"{p}/ratio128", 1, s, hd, 128),
            build_rotary_emb(f"{p}/q", 1, s, h, c.rope_head_dim),
        ]
    return cases


def cases_from_specs(specs: list[dict[str, Any]], where: str = "shapes") -> list[Case]:
    """Cases from ``[{op: name, param: value, ...}, ...]`` (the ``--shapes`` YAML's content)."""
    import inspect

    if not isinstance(specs, list):
        raise RangeError(f"{where}: expected a list of {{op: ..., <params>}} entries, got {type(specs).__name__}")
    out = []
    for n, spec in enumerate(specs):
        if not isinstance(spec, dict) or "op" not in spec:
            raise RangeError(f"{where}[{n}]: each entry needs an 'op' key, got {spec!r}")
        op = spec["op"]
        if op not in BUILDERS:
            raise RangeError(f"{where}[{n}]: op must be one of {sorted(BUILDERS)}, got {op!r}")
        params = {k: v for k, v in spec.items() if k not in ("op", "name")}
        builder = BUILDERS[op]
        accepted = [p for p in inspect.signature(builder).parameters if p != "name"]
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise RangeError(f"{where}[{n}] ({op}): unknown parameters {unknown}; {op} takes {accepted}")
        try:
            out.append(builder(str(spec.get("name", f"custom/{op}/{n}")), **params))
        except TypeError as e:
            raise RangeError(f"{where}[{n}] ({op}): {e}; {op} takes {accepted}") from e
    return out


def cases_from_yaml(path: str) -> list[Case]:
    """Cases from a YAML file: a list of ``{op: <name>, <param>: <value>}`` (or ``{cases: [...]}``)."""
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if isinstance(data, dict) and "cases" in data:
        data = data["cases"]
    return cases_from_specs(data, where=path)


# --------------------------------------------------------------------------- comparison
def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if hasattr(out, "sorted_to_flat"):  # MoEHandle
        return [out.sorted_to_flat]
    raise TypeError(f"cannot compare an output of type {type(out).__name__}")


def _float_metrics(a: torch.Tensor, b: torch.Tensor, tol: float) -> tuple[bool, dict[str, float]]:
    if a.shape != b.shape:
        return False, {"shape_mismatch": 1.0}
    a32, b32 = a.float(), b.float()
    nan_ok = bool(torch.equal(torch.isnan(a32), torch.isnan(b32)))
    fin = torch.isfinite(a32) & torch.isfinite(b32)
    a32, b32 = torch.where(fin, a32, 0), torch.where(fin, b32, 0)
    diff = calc_diff(a32, b32)
    err = float((a32 - b32).abs().max()) if a32.numel() else 0.0
    return nan_ok and diff <= tol, {"calc_diff": diff, "max_abs_err": err}


def _dequant_fp8_rows(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    bs = y.shape[-1] // s.shape[-1]
    return (y.float().unflatten(-1, (-1, bs)) * formats.scale_to_float(s).unsqueeze(-1)).flatten(-2)


def _dequant_fp8_2d(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    n, k = y.shape[-2:]
    sf = formats.scale_to_float(s).repeat_interleave(128, -2)[..., :n, :].repeat_interleave(128, -1)[..., :k]
    return y.float() * sf


def _dequant_fp4(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    v = formats.e2m1_decode(formats.unpack_fp4(y))
    return (v.unflatten(-1, (-1, 32)) * formats.scale_to_float(s).unsqueeze(-1)).flatten(-2)


def compare_outputs(case: Case, out: Any, ref: Any, inputs: Inputs, tol: float | None = None
                    ) -> tuple[bool, dict[str, float]]:
    """Compare an implementation's output with the reference's: (ok, metrics)."""
    tol = case.tol if tol is None else tol
    kind = case.check
    if kind in ("quant_fp8", "quant_w8", "quant_fp4"):
        (y, s), (ry, rs) = out, ref
        deq = {"quant_fp8": _dequant_fp8_rows, "quant_w8": _dequant_fp8_2d, "quant_fp4": _dequant_fp4}[kind]
        ok, m = _float_metrics(deq(y, s), deq(ry, rs), tol)
        m["code_mismatch"] = float((y.view(torch.uint8) != ry.view(torch.uint8)).float().mean())
        return ok and y.shape == ry.shape and s.dtype == rs.dtype, m
    if kind == "topk":
        with _ref():
            scores = v4hal.index_scores(inputs["q"], inputs["k"], inputs["w"])
        offset = 128

        def picked(idx):
            valid = idx >= 0
            t = (idx - offset).clamp(min=0).long()
            return torch.where(valid, scores.gather(-1, t), 0).sum(-1), valid.sum(-1)

        if out.shape != ref.shape:
            return False, {"shape_mismatch": 1.0}
        s_out, n_out = picked(out)
        s_ref, n_ref = picked(ref)
        rel = float(((s_out - s_ref).abs() / s_ref.abs().clamp(min=1e-6)).max()) if s_ref.numel() else 0.0
        same = float((out.sort(-1).values == ref.sort(-1).values).all(-1).float().mean())
        return bool(torch.equal(n_out, n_ref)) and rel <= tol, {"picked_score_rel_err": rel, "rows_identical": same}
    if kind == "gate":
        (w, i), (rw, ri) = out, ref
        i_s, order = i.sort(-1)
        ri_s, rorder = ri.sort(-1)
        same = float((i_s == ri_s).all(-1).float().mean())
        ok, m = _float_metrics(w.gather(-1, order), rw.gather(-1, rorder), tol)
        m["rows_identical"] = same
        return ok and same >= 0.999, m
    outs, refs = _tensors(out), _tensors(ref)
    if len(outs) != len(refs):
        return False, {"output_count_mismatch": 1.0}
    ok_all, metrics = True, {}
    for n, (a, b) in enumerate(zip(outs, refs)):
        if kind == "exact" or not (a.is_floating_point() or a.is_complex()):
            ok = a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
            metrics[f"out{n}_exact"] = float(ok)
        else:
            ok, m = _float_metrics(a, b, tol)
            metrics.update({f"out{n}_{k}" if len(outs) > 1 else k: v for k, v in m.items()})
        ok_all = ok_all and ok
    return ok_all, metrics
