"""EP dispatch/combine measurements: bytes sent per token and time per MoE layer, bf16 vs FP8 payload.

``python -m v4hal.apps.ep_bench --ep 2 --tokens 256 --dim 4096 --experts 256 --topk 6`` (V4-Flash-like:
dim 4096, 256 routed experts, top-6; ``--model v41-flash`` takes V4.1-Flash's 5120, 384, 6) starts ``--ep``
local gloo ranks, routes ``--tokens`` random
bf16 tokens per rank to uniformly random top-k experts, and times `ep_dispatch` and `ep_combine`
(identity experts in between, so only the exchange and its packing are timed) for each payload:
bf16, FP8 with fp32 scales, FP8 with ue8m0 scales; the combine both ways (one row per copy, exact,
and one partial sum per token and rank, ``partial_sums=True``). Per iteration the slowest rank counts (a layer
waits for it); the table shows the median over iterations. Bytes per token: what the ranks sent to
*other* ranks (the part that crosses the wire), and in total including the share that stays local,
divided by the tokens dispatched. On this machine the numbers are gloo-over-loopback-TCP on a CPU:
they rank payloads and show the byte saving, they say nothing about NVLink/RDMA (DeepEP, HCCL).
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from v4hal.hal.errors import RangeError

from .ep import ep_combine, ep_dispatch
from .launch import spawn

__all__ = ["PAYLOADS", "measure_ep", "format_table"]

#: payload name -> (fp8, scale_fmt)
PAYLOADS: dict[str, tuple[bool, str | None]] = {"bf16": (False, None), "fp8": (True, None),
                                                 "fp8-ue8m0": (True, "ue8m0")}


def _rank_bench(rank: int, world: int, tokens: int, dim: int, experts: int, topk: int, payloads: list[str],
                iters: int, warmup: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed + 7919 * rank)
    x = torch.randn(tokens, dim, generator=g).to(torch.bfloat16)
    scores = torch.rand(tokens, experts, generator=g)
    w, idx = scores.topk(topk, dim=1)
    w = (w / w.sum(dim=1, keepdim=True)).float()
    idx = idx.to(torch.int32)
    out: dict[str, Any] = {}
    for name in payloads:
        fp8, fmt = PAYLOADS[name]
        disp, comb, part = [], [], []
        stats: dict[str, float] = {}
        for it in range(warmup + iters):
            dist.barrier()
            t0 = time.perf_counter()
            x_local, _, handle = ep_dispatch(x, w, idx, num_experts=experts, fp8=fp8, scale_fmt=fmt)
            t1 = time.perf_counter()
            y = ep_combine(x_local, handle)
            t2 = time.perf_counter()
            stats = dict(handle.stats)
            dist.barrier()
            t3 = time.perf_counter()
            ep_combine(x_local, handle, partial_sums=True)
            t4 = time.perf_counter()
            stats["partial_combine_bytes"] = handle.stats["combine_bytes"]
            stats["partial_combine_bytes_remote"] = handle.stats["combine_bytes_remote"]
            if it >= warmup:
                disp.append(t1 - t0)
                comb.append(t2 - t1)
                part.append(t4 - t3)
        if not fp8:       # identity experts, bf16: the round trip must give k * x exactly
            stats["identity_roundtrip_exact"] = float(torch.equal(y, (x.float() * topk).to(torch.bfloat16)))
        out[name] = {"dispatch_s": disp, "combine_s": comb, "partial_s": part, "stats": stats}
    return out


def measure_ep(world_size: int = 2, tokens: int = 256, dim: int = 4096, experts: int = 256, topk: int = 6, *,
               payloads: tuple[str, ...] = ("bf16", "fp8", "fp8-ue8m0"), iters: int = 5, warmup: int = 2,
               seed: int = 0, start_method: str = "fork", threads: int | None = None,
               timeout_s: float = 120.0) -> dict[str, Any]:
    """Time `ep_dispatch` / `ep_combine` on ``world_size`` local gloo ranks; one dict per payload.

    Returns ``{"config": {...}, "payloads": {name: {...}}}`` where each payload has ``dispatch_ms`` /
    ``combine_ms`` / ``layer_ms`` (median over iterations of the slowest rank), ``dispatch_bytes_per_token``
    and ``combine_bytes_per_token`` (sent to other ranks), ``*_total`` (including the local share),
    ``ranks_per_token`` (average destination ranks of a token) and ``dispatch_bytes_ratio`` (vs bf16).
    """
    bad = [p for p in payloads if p not in PAYLOADS]
    if bad:
        raise RangeError(f"measure_ep: payloads must be among {list(PAYLOADS)}, got {bad}")
    res = spawn(_rank_bench, world_size, tokens, dim, experts, topk, list(payloads), iters, warmup, seed,
                timeout_s=timeout_s, start_method=start_method, threads=threads)
    total_tokens = tokens * world_size
    summary: dict[str, Any] = {}
    for name in payloads:
        per = [r[name] for r in res]
        disp = [max(p["dispatch_s"][i] for p in per) for i in range(iters)]
        comb = [max(p["combine_s"][i] for p in per) for i in range(iters)]
        part = [max(p["partial_s"][i] for p in per) for i in range(iters)]
        lay = [a + b for a, b in zip(disp, comb)]

        def tot(key: str) -> float:
            return sum(p["stats"].get(key, 0.0) for p in per)

        summary[name] = {
            "dispatch_ms": 1e3 * statistics.median(disp), "combine_ms": 1e3 * statistics.median(comb),
            "layer_ms": 1e3 * statistics.median(lay),
            "partial_combine_ms": 1e3 * statistics.median(part),
            "dispatch_bytes_per_token": tot("dispatch_bytes_remote") / total_tokens,
            "dispatch_bytes_per_token_total": tot("dispatch_bytes") / total_tokens,
            "combine_bytes_per_token": tot("combine_bytes_remote") / total_tokens,
            "combine_bytes_per_token_total": tot("combine_bytes") / total_tokens,
            "partial_combine_bytes_per_token": tot("partial_combine_bytes_remote") / total_tokens,
            "partial_combine_bytes_per_token_total": tot("partial_combine_bytes") / total_tokens,
            "count_bytes_per_rank": per[0]["stats"].get("count_bytes", 0.0),
            "ranks_per_token": tot("dispatch_rows") / total_tokens,
        }
        if "identity_roundtrip_exact" in per[0]["stats"]:
            summary[name]["identity_roundtrip_exact"] = all(p["stats"]["identity_roundtrip_exact"] == 1.0 for p in per)
    if "bf16" in summary:
        base = summary["bf16"]["dispatch_bytes_per_token"]
        for v in summary.values():
            v["dispatch_bytes_ratio"] = v["dispatch_bytes_per_token"] / base if base else float("nan")
    return {"config": {"ep": world_size, "tokens_per_rank": tokens, "dim": dim, "experts": experts, "topk": topk,
                       "iters": iters, "warmup": warmup, "backend": "gloo", "device": "cpu",
                       "transport": "all_to_all", "note": "gloo over loopback TCP on a CPU"},
            "payloads": summary}


def format_table(result: dict[str, Any]) -> str:
    """The measurement as a text table."""
    c = result["config"]
    head = (f"EP {c['ep']} x {c['tokens_per_rank']} tokens/rank, dim {c['dim']}, {c['experts']} experts, "
            f"top-{c['topk']} ({c['backend']} on {c['device']}: {c['note']}; median of {c['iters']} iterations, "
            "slowest rank)")
    cols = ("payload", "ranks/tok", "dispatch B/tok", "(total)", "vs bf16", "combine B/tok", "(total)",
            "partial B/tok", "dispatch ms", "combine ms", "layer ms", "partial ms")
    rows = []
    for name, v in result["payloads"].items():
        rows.append((name, f"{v['ranks_per_token']:.2f}", f"{v['dispatch_bytes_per_token']:.0f}",
                     f"{v['dispatch_bytes_per_token_total']:.0f}", f"{v.get('dispatch_bytes_ratio', float('nan')):.3f}",
                     f"{v['combine_bytes_per_token']:.0f}", f"{v['combine_bytes_per_token_total']:.0f}",
                     f"{v['partial_combine_bytes_per_token']:.0f}", f"{v['dispatch_ms']:.2f}",
                     f"{v['combine_ms']:.2f}", f"{v['layer_ms']:.2f}", f"{v['partial_combine_ms']:.2f}"))
    widths = [max(len(str(r[i])) for r in [cols, *rows]) for i in range(len(cols))]

    def line(r: tuple | list) -> str:
        return "  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths)))

    notes = ("B/tok: bytes sent to other ranks per dispatched token ((total): including the local share); combine "
             "sends one bf16 row per copy (exact); partial: one bf16 partial sum per (token, rank), DeepEP-style; "
             "layer ms = dispatch + combine")
    return "\n".join([head, line(cols), line(["-" * w for w in widths]), *map(line, rows), notes])
