"""``v4hal cost``: the analytic cost model on screen, in JSON and as a PNG; ``--measure`` times v4-mini.

Wiring (in ``v4hal/cli.py``)::

    p = sub.add_parser("cost", help=...)
    cost_cli.add_arguments(p)
    p.set_defaults(func=cost_cli.main)
"""
from __future__ import annotations

import argparse
import io
import math
import re
import sys
from typing import IO, Any, Sequence

from v4hal.apps.args import reports_errors, write_bytes, write_json
from v4hal.bench import cost as costmod
from v4hal.bench.report import text_table
from v4hal.extras import require
from v4hal.hal.errors import RangeError

_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


#: the longest context ``--context`` takes (16M tokens, 16 x V4's; ``--pool`` lays out page tables this long)
MAX_CONTEXT = 1 << 24
#: the longest context ``--measure-contexts`` takes (the dense control allocates a window this long)
MAX_MEASURE_CONTEXT = 1 << 18
#: the most timed decode steps per context ``--repeats`` takes
MAX_REPEATS = 10_000


def parse_length(text: str, least: int = 1, most: int = MAX_CONTEXT) -> int:
    """``"1048576"``, ``"1M"``, ``"128k"`` -> int (binary suffixes: 1K = 1024), in ``[least, most]``."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"context length must be an integer like 4096, 128K or 1M, got {text!r}")
    value = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
    if not value.is_integer() or not least <= value <= most:
        raise argparse.ArgumentTypeError(f"context length must be a whole number in [{least}, {_fmt_len(most)}], "
                                         f"got {text!r}")
    return int(value)


def measure_length(text: str) -> int:
    """A `parse_length` for ``--measure-contexts``: in ``[2, MAX_MEASURE_CONTEXT]``."""
    return parse_length(text, 2, MAX_MEASURE_CONTEXT)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``v4hal cost``."""
    from v4hal.apps.args import int_in, plot_path, seed, writable_path

    parser.add_argument("--context", nargs="+", type=parse_length,
                        default=[4096, 32768, 131072, costmod.ONE_M],
                        help="context lengths (tokens; 128K / 1M suffixes accepted)")
    parser.add_argument("--models", default=",".join(costmod.MODELS),
                        help="comma-separated models among v3.2, v4-flash, v4-pro, v41-flash, v4-mini, v41-mini "
                             "(default: %(default)s)")
    parser.add_argument("--breakdown", action="store_true", help="also print the FLOPs and bytes per component")
    parser.add_argument("--json", metavar="PATH", type=writable_path,
                        help="write the table, breakdowns and ratios as JSON")
    parser.add_argument("--plot", metavar="PATH", type=plot_path,
                        help="write a PNG of FLOPs/token and KV bytes vs context (log axes)")
    parser.add_argument("--measure", action="store_true",
                        help="also time one v4-mini decode step at growing contexts (hybrid vs dense attention)")
    parser.add_argument("--measure-contexts", nargs="+", type=measure_length, default=None,
                        help="contexts for --measure (default: 256 2K 16K 128K; each at least 2)")
    parser.add_argument("--measure-weights", choices=("bf16", "fp8"), default="bf16",
                        help="v4-mini weights for --measure: bf16 (default) or the preset's FP8 / FP4 experts")
    parser.add_argument("--repeats", type=int_in(1, MAX_REPEATS), default=3,
                        help="timed decode steps per context for --measure")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the v4-mini weights for --measure")
    parser.add_argument("--pool", action="store_true",
                        help="also print the paged cache pool's KV bytes per token at the largest --context for "
                             "V4-Flash, V4-Pro and V4.1-Flash (page tables only, no tensors) and v4-mini / v41-mini "
                             "(allocated pools), "
                             "per layout pair, next to this cost model, FlashMLA's 584 B entries and the contiguous "
                             "bf16 caches")


def _fmt_si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _fmt_len(n: int) -> str:
    for scale, suffix in ((1 << 20, "M"), (1 << 10, "K")):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{suffix}"
    return str(n)


def build_report(contexts: Sequence[int], models: Sequence[str]) -> dict[str, Any]:
    """Every model at every context, ratios to V3.2 when it is among the models, and the check at 1M."""
    baseline = "v3.2"
    per_context = [costmod.compare(L, models, baseline) for L in contexts]
    at_1m = costmod.compare(costmod.ONE_M, list(dict.fromkeys([baseline, "v4-flash", "v4-pro"])), baseline)
    return {
        "unit_flops": "FLOPs per decoded token (2 per multiply-add)",
        "unit_kv_bytes": "bytes of cache held for one sequence of `context` tokens",
        "contexts": per_context,
        "at_1m": {"ratios": at_1m["ratios"], "check": costmod.report_check(at_1m["ratios"])},
        "report_targets": costmod.REPORT_RATIOS,
    }


def render(report: dict[str, Any], breakdown: bool = False) -> str:
    """The screen table of `build_report`'s result."""
    rows = []
    for entry in report["contexts"]:
        L = entry["context"]
        for model, c in entry["costs"].items():
            r = entry["ratios"].get(model)
            rows.append([
                _fmt_len(L), model, _fmt_si(c["total_flops"], "FLOP"), _fmt_si(c["total_kv_bytes"], "B"),
                f"{c['kv_bytes_per_token']:.1f}",
                f"{100 * r['flops']:.1f}%" if r else "-", f"{100 * r['kv_bytes']:.1f}%" if r else "-",
                _fmt_si(c["total_host_bytes"], "B") if c.get("total_host_bytes") else "-",
            ])
    out = [text_table(["context", "model", "FLOPs/token", "KV cache", "KV B/token", "FLOPs vs V3.2", "KV vs V3.2",
                       "host mem (Engram)"], rows)]
    if breakdown:
        for entry in report["contexts"]:
            for model, c in entry["costs"].items():
                parts = ", ".join(f"{k} {_fmt_si(v)}" for k, v in sorted(c["flops"].items(), key=lambda kv: -kv[1]))
                kv_sorted = sorted(c["kv_bytes"].items(), key=lambda kv: -kv[1])
                kvp = ", ".join(f"{k} {_fmt_si(v, 'B')}" for k, v in kv_sorted)
                out.append(f"\n{model} @ {_fmt_len(entry['context'])}\n  FLOPs: {parts}\n  KV:    {kvp}")
                if c.get("host_bytes"):
                    host = ", ".join(f"{k} {_fmt_si(v, 'B')}" for k, v in c["host_bytes"].items())
                    out.append(f"  host memory (not KV): {host}; {c['engram_rows_per_token']} Engram rows "
                               f"gathered per token")
    out.append("\nAt 1M tokens (1,048,576), V4 / V3.2 against the technical report (pass = within 25% relative):")
    rows = [[k, f"{100 * v['value']:.1f}%", f"{100 * v['target']:.0f}%", f"{100 * v['rel_err']:.1f}%",
             "pass" if v["ok"] else "FAIL"] for k, v in report["at_1m"]["check"].items()]
    out.append(text_table(["ratio", "V4 / V3.2", "report", "rel. error", "check"], rows))
    return "\n".join(out)


def plot_curves(path: str | IO[bytes], models: Sequence[str], marks: Sequence[int] = (), points: int = 61,
                measured: dict[str, Any] | None = None) -> None:
    """PNG: FLOPs per token and KV bytes versus context on log-log axes, one curve per model.

    With ``measured`` (the result of `measure`), a third panel shows the timed v4-mini decode steps.
    """
    require("matplotlib", "plot_curves").use("Agg")
    plt = require("matplotlib.pyplot", "plot_curves")

    lo, hi = 10.0, math.log2(max(costmod.ONE_M, *marks) if marks else costmod.ONE_M)
    grid = sorted({int(round(2 ** (lo + (hi - lo) * i / (points - 1)))) for i in range(points)})
    panels = 3 if measured else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5))
    for model in models:
        costs = [costmod.model_cost(model, L) for L in grid]
        axes[0].plot(grid, [c.total_flops for c in costs], label=model)
        axes[1].plot(grid, [c.total_kv_bytes for c in costs], label=model)
    for ax, title, unit in ((axes[0], "decode FLOPs per token", "FLOPs"),
                            (axes[1], "KV cache per sequence", "bytes")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        for m in marks:
            ax.axvline(m, color="0.85", lw=0.8, zorder=0)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend()
    if measured:
        ax = axes[2]
        for variant in ("hybrid", "dense"):
            xs = [r["context"] for r in measured["rows"]]
            ax.plot(xs, [r[f"{variant}_ms"] for r in measured["rows"]], marker="o", label=f"v4-mini {variant}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("ms per decode step (CPU)")
        ax.set_title("measured: v4-mini decode step")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@reports_errors("cost")
def main(args: argparse.Namespace) -> int:
    """Run ``v4hal cost``; returns the exit code (1 when a ratio at 1M misses the report by > 25%). 2 on bad options
    (one line on stderr, before anything is computed)."""
    models = [m.strip() for m in str(args.models).split(",") if m.strip()]
    if not models:
        raise RangeError(f"--models: expected a comma-separated list of models, got {args.models!r}")
    for m in models:
        try:
            costmod.model_cost(m, 1)
        except RangeError as e:
            raise RangeError(f"--models: {e}") from e
    if "v3.2" not in models:
        models = ["v3.2", *models]
    report = build_report(list(args.context), models)
    print(render(report, breakdown=getattr(args, "breakdown", False)))
    if getattr(args, "pool", False):
        from v4hal.serve.memory import format_memory_table, memory_rows
        report["pool"] = memory_rows(max(args.context))
        print(f"\nKV bytes per token of one request on the paged cache pool, at {max(args.context)} tokens "
              f"(v4-mini and v41-mini at most their max_seq_len):")
        print(format_memory_table(report["pool"]))
    measured = None
    if getattr(args, "measure", False):
        from v4hal.bench.measure import measure, render_measure
        measured = measure(contexts=args.measure_contexts, repeats=args.repeats, seed=args.seed,
                           weights=args.measure_weights)
        print()
        print(render_measure(measured))
        report["measured"] = measured
    if args.json:
        write_json(args.json, report, indent=2)
        print(f"\nwrote {args.json}")
    if args.plot:
        png = io.BytesIO()                       # savefig does not report a failed write: write it ourselves
        plot_curves(png, models, marks=list(args.context), measured=measured)
        write_bytes(args.plot, png.getvalue(), "--plot")
        print(f"wrote {args.plot}")
    return 0 if all(v["ok"] for v in report["at_1m"]["check"].values()) else 1


if __name__ == "__main__":  # python -m v4hal.apps.cost: the same as ``v4hal cost``
    from v4hal.apps.main import cli

    sys.exit(cli(["cost", *sys.argv[1:]]))
