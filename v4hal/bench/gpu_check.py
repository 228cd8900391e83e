"""``python -m v4hal.bench.gpu_check``: the one GPU script.

On one CUDA GPU, within a time budget (default 7 minutes):
1. measures the ceilings (copy bandwidth; bf16, fp16, fp32 and FP8 matmul rates);
2. checks every GPU kernel (the backends other than the reference that serve CUDA tensors:
   Triton, and the CUDA-only paths) against the reference backend at V4-Flash and V4-Pro
   shapes (decode and prefill, plus the target cases below);
3. times them (warm-up, median, rotating inputs larger than L2) next to the baselines present
   (``torch._scaled_mm`` blockwise, bf16 matmul on dequantized weights, ``torch._grouped_mm``,
   gather + ``scaled_dot_product_attention``);
4. prints the table and the targets below, writes JSON (``--json``, default
   ``gpu_check.json``) and optionally a PNG (``--plot``).

Targets (H200): ``fp8_gemm`` >= 0.8x ``torch._scaled_mm`` blockwise at the V4-Flash projection
shapes (M in {128, 4096}); FP4-weight GEMM faster than bf16 matmul on dequantized weights at
M <= 128; ``sparse_attn`` decode (b=64, h=64, d=512, 640 keys per query) >= 60% of the copy
bandwidth on the bytes it must read; ``act_quant`` >= 80% of the copy bandwidth; grouped FP8
GEMM >= 50% of the measured FP8 ceiling at >= 512 rows per expert.

Goals for the paged decode kernels, at V4-Flash decode shapes, as a share of the copy bandwidth on the
bytes the case says each call must move (not yet measured on any GPU): ``sparse_attn_paged``
(``v4-flash/decode/csa``: 64 requests, 64 heads, 128 window + 512 compressed picks from ``model1_fp8``
caches; and ``v4-flash/decode/v41_csa``: V4.1-Flash's, 128 ``v41_window_fp8`` + 512 ``v41_compressed_fp4``
picks, 22 MB a call) >= 50%; ``indexer_logits_paged`` (``v4-flash/decode/fp4``: 64 requests, 64 heads, 16K FP4 keys
each) >= 50%; ``paged_cache_write`` (``v4-flash/decode/model1_fp8``: 128 tokens, 207 KB a call) >= 1%:
so few bytes make that figure a measure of the call's fixed cost (launch and op layer), and 1% of a
4 TB/s copy is about 5 us a call.

``--list`` prints the cases the script would check and time (op, case, shape), without a GPU.
Exit code: 0 when every checked kernel matched the reference, 1 otherwise, 2 without a GPU.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Sequence

import torch

from . import cases as casemod
from .ceilings import Ceilings, measure_ceilings
from .report import build_document, plot_rows, render_ceilings, render_table, write_json
from .runner import Row, default_backends, run_cases

SCALED_MM = "torch._scaled_mm blockwise"
BF16_MM = "bf16 matmul (dequantized)"


def target_cases() -> list[casemod.Case]:
    """Cases that exist for a target and are not in the preset sets."""
    return [
        casemod.bench_case("fp4_gemm", {"m": 16, "n": 2048, "k": 4096}, "target/v4-flash/expert_w1_m16"),
        casemod.bench_case("act_quant", {"m": 16384, "k": 7168, "fmt": "ue8m0"}, "target/act_quant_large"),
        casemod.bench_case("grouped_gemm", {"m": 8192, "n": 2048, "k": 4096, "e": 8, "fmt": "fp8"},
                           "target/grouped_fp8_1024_per_expert"),
    ]


def all_cases(presets: Sequence[str] = ("v4-flash", "v4-pro")) -> list[casemod.Case]:
    """Targets first, then decode for every preset, then prefill (the most important first, for the budget)."""
    out = target_cases()
    for mode in ("decode", "prefill"):
        for p in presets:
            out += casemod.preset_cases(p, mode)
    return out


def _rows(rows: Sequence[Row], op: str, prefix: str = "", backend: str | None = None) -> list[Row]:
    return [r for r in rows if r.op == op and r.case.startswith(prefix) and r.time_s is not None
            and (backend is None or r.backend == backend)]


def _named(rows: Sequence[Row], op: str, case: str, backend: str | None = None) -> list[Row]:
    """Timed rows of ``op`` whose case is exactly ``case`` (case names repeat across ops)."""
    return [r for r in _rows(rows, op, case, backend) if r.case == case]


def _pct_of_copy(r: Row, bw: float) -> float:
    """The case's bytes (what one call must move) over the row's time, in % of the copy bandwidth ``bw``."""
    return 100 * r.bytes / r.time_s / bw


#: (op, case, threshold in % of copy, target text) of the paged decode kernels
PAGED_TARGETS = (
    ("sparse_attn_paged", "v4-flash/decode/csa", 50.0,
     "sparse_attn_paged decode (V4-Flash csa: b=64, h=64, 128 window + 512 compressed model1_fp8 picks) "
     ">= 50% of copy bandwidth on the bytes it moves (goal)"),
    ("sparse_attn_paged", "v4-flash/decode/v41_csa", 50.0,
     "sparse_attn_paged decode (V4.1-Flash: b=64, h=64, 128 window v41_window_fp8 + 512 compressed "
     "v41_compressed_fp4 picks, 22 MB a call) >= 50% of copy bandwidth on the bytes it moves (goal)"),
    ("indexer_logits_paged", "v4-flash/decode/fp4", 50.0,
     "indexer_logits_paged decode (V4-Flash fp4: b=64, 64 heads, 16K FP4 keys per request) "
     ">= 50% of copy bandwidth on the bytes it moves (goal)"),
    ("paged_cache_write", "v4-flash/decode/model1_fp8", 1.0,
     "paged_cache_write decode (V4-Flash model1_fp8: 128 tokens, 207 KB a call, bound by the call's fixed cost) "
     ">= 1% of copy bandwidth on the bytes it moves (goal)"),
)


def _attn_read_bytes(p: dict[str, Any]) -> float:
    """Bytes a sparse_attn call must read: q (bf16), the gathered KV rows (bf16) and their int32 indices, the sink."""
    rows = p["b"] * p["m"]
    return rows * p["h"] * p["d"] * 2 + rows * p["topk"] * (2 * p["d"] + 4) + 4 * p["h"]


def evaluate_targets(rows: Sequence[Row], ceilings: Ceilings, backend: str = "triton") -> list[dict[str, Any]]:
    """Each target: measured value, threshold, pass / FAIL / not measured (with why)."""
    out: list[dict[str, Any]] = []

    def add(name: str, values: list[tuple[str, float]], threshold: float, unit: str, why_missing: str) -> None:
        if not values:
            out.append({"target": name, "status": "not measured", "note": why_missing})
            return
        worst_case, worst = min(values, key=lambda v: v[1])
        out.append({"target": name, "status": "pass" if worst >= threshold else "FAIL", "worst": worst,
                    "worst_case": worst_case, "threshold": threshold, "unit": unit,
                    "values": {c: v for c, v in values}})

    vals = []
    for r in _rows(rows, "fp8_gemm", "v4-flash/", backend):
        p = r.peers.get(SCALED_MM, {})
        if p.get("speedup") is not None and r.params["m"] in (128, 4096):
            vals.append((r.case, p["speedup"]))
    add("fp8_gemm >= 0.8x torch._scaled_mm blockwise (V4-Flash projections, M in {128, 4096})", vals, 0.8,
        "x (scaled_mm time / ours)", "no verified torch._scaled_mm blockwise timing or no timed fp8_gemm row")
    vals = [(r.case, r.peers[BF16_MM]["speedup"]) for r in _rows(rows, "fp4_gemm", "", backend)
            if r.params["m"] <= 128 and r.peers.get(BF16_MM, {}).get("speedup") is not None]
    add("fp4_gemm faster than bf16 matmul on dequantized weights (M <= 128)", vals, 1.0,
        "x (bf16 time / ours)", "no timed fp4_gemm row at M <= 128 with its bf16 baseline")
    bw = ceilings.copy_bytes_per_s
    vals = [(r.case, 100 * _attn_read_bytes(r.params) / r.time_s / bw)
            for r in _rows(rows, "sparse_attn", "v4-flash/decode/csa", backend)]
    add("sparse_attn decode (b=64, h=64, d=512, 640 keys) >= 60% of copy bandwidth on the bytes it reads", vals,
        60.0, "% of copy", "no timed sparse_attn decode row")
    for op, case, threshold, text in PAGED_TARGETS:
        vals = [(r.case, _pct_of_copy(r, bw)) for r in _named(rows, op, case, backend)]
        add(text, vals, threshold, "% of copy", f"no timed {op} row for {case}")
    vals = [(r.case, 100 * r.gbps * 1e9 / bw) for r in _rows(rows, "act_quant", "target/", backend)]
    add("act_quant >= 80% of copy bandwidth (16384 x 7168)", vals, 80.0, "% of copy", "no timed act_quant row")
    fp8 = ceilings.matmul_flops_per_s.get("fp8")
    vals = [(r.case, 100 * r.tflops * 1e12 / fp8) for r in _rows(rows, "grouped_gemm", "target/", backend)
            if fp8 and r.tflops]
    add("grouped FP8 GEMM >= 50% of the FP8 ceiling (>= 512 rows per expert)", vals, 50.0, "% of FP8 matmul",
        "no FP8 ceiling (torch._scaled_mm unsupported) or no timed grouped_gemm row")
    return out


def render_case_list(cases: Sequence[casemod.Case]) -> str:
    """One line per case, in run order: op, case name, shape; then the count."""
    w_op = max((len(c.op) for c in cases), default=0)
    w_name = max((len(c.name) for c in cases), default=0)
    lines = [f"{c.op:<{w_op}}  {c.name:<{w_name}}  {c.shape}" for c in cases]
    return "\n".join(lines + [f"{len(cases)} cases"])


def render_targets(targets: Sequence[dict[str, Any]]) -> str:
    lines = ["targets (worst case over the rows that count):"]
    for t in targets:
        if t["status"] == "not measured":
            lines.append(f"  [not measured] {t['target']}: {t['note']}")
        else:
            lines.append(f"  [{t['status']}] {t['target']}: {t['worst']:.3g} {t['unit']} (threshold "
                         f"{t['threshold']:g}; worst at {t['worst_case']})")
    return "\n".join(lines)


def _selected_cases(args: argparse.Namespace) -> list[casemod.Case]:
    """The cases of ``--quick`` / ``--presets``, kept to ``--ops`` when given."""
    cases = casemod.quick_cases() if args.quick else all_cases([p.strip() for p in args.presets.split(",")
                                                                if p.strip()])
    if args.ops:
        keep = {o.strip() for o in args.ops.split(",")}
        cases = [c for c in cases if c.op in keep]
    return cases


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m v4hal.bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="gpu_check.json", help="JSON output (default: %(default)s)")
    parser.add_argument("--plot", default=None, help="PNG chart")
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds after which remaining cases are skipped (default: %(default)s)")
    parser.add_argument("--presets", default="v4-flash,v4-pro", help="presets (default: %(default)s)")
    parser.add_argument("--ops", default=None, help="comma-separated ops to keep")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--backends", default=None, help="GPU backends to check (default: all but the reference)")
    parser.add_argument("--device", default="cuda",
                        help="cuda (default); 'cpu' with --quick is a dry run of the script's flow (no GPU figures)")
    parser.add_argument("--quick", action="store_true", help="the small case set instead of the V4 shapes")
    parser.add_argument("--list", action="store_true",
                        help="print the cases that would be checked and timed (op, case, shape), then exit")
    args = parser.parse_args(argv)
    if args.list:
        print(render_case_list(_selected_cases(args)))
        return 0
    device = args.device
    if device == "cuda" and (torch.version.cuda is None or not torch.cuda.is_available()):
        print("gpu_check: no CUDA GPU here (torch.version.cuda=%s); nothing to do" % torch.version.cuda,
              file=sys.stderr)
        return 2
    t0 = time.monotonic()
    deadline = t0 + args.budget
    available = default_backends(device)
    backends = [b.strip() for b in args.backends.split(",")] if args.backends else \
        [b for b in available if b != "reference"]
    if not backends or any(b not in available for b in backends):
        print(f"gpu_check: backends {backends or '(none)'} cannot all run on {device} here (available: {available})",
              file=sys.stderr)
        return 2
    ceilings = measure_ceilings(device, quick=args.quick)
    print(render_ceilings(ceilings), flush=True)
    cases = _selected_cases(args)
    print(f"{len(cases)} cases, backends {backends} (reference = oracle), budget {args.budget:.0f} s", flush=True)
    rows = run_cases(cases, backends, device, ceilings=ceilings, repeats=args.repeats, warmup=3,
                     max_case_s=1.0, deadline=deadline)
    print(render_table(rows))
    targets = evaluate_targets(rows, ceilings, backend="triton" if "triton" in backends else backends[0])
    print()
    print(render_targets(targets))
    elapsed = time.monotonic() - t0
    failed = [r for r in rows if r.status == "check-failed"]
    skipped = [r for r in rows if r.status == "skipped"]
    print(f"\n{len(rows)} rows, {len(failed)} failed checks, {len(skipped)} skipped (budget), {elapsed:.0f} s")
    meta = {"command": "python -m v4hal.bench.gpu_check", "argv": list(argv or sys.argv[1:]), "device": device,
            "backends": backends, "targets": targets, "elapsed_s": elapsed, "value_checks_while_timing": False}
    write_json(args.json, build_document(rows, ceilings, meta))
    print(f"wrote {args.json}")
    if args.plot:
        plot_rows(args.plot, rows, title=f"v4hal on {ceilings.device_name}")
        print(f"wrote {args.plot}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
