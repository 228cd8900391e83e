"""``v4hal bench``: every op on every backend available here, verified then timed against ceilings and peers
(`v4hal.bench.runner`); ``--overhead``: the op layer's own cost per call (`v4hal.bench.overhead`)."""
from __future__ import annotations

import argparse
import io
import sys
import time
from dataclasses import asdict
from typing import Any

import torch

from v4hal.apps.args import output_errors, reports_errors, write_bytes
from v4hal.apps.args import write_json as write_json_file
from v4hal.bench import cases as casemod
from v4hal.bench.ceilings import measure_ceilings
from v4hal.bench.overhead import measure_overhead, render_overhead, torch_ops_floor_us
from v4hal.bench.report import build_document, plot_rows, render_ceilings, render_table, write_json
from v4hal.bench.runner import default_backends, run_cases
from v4hal.extras import require, require_type
from v4hal.hal.errors import RangeError
from v4hal.hal.platform import platform_of

#: upper bounds of the numeric flags
MAX_REPEATS = 1_000_000          # --repeats (timed calls per case; per op with --overhead)
MAX_WARMUP = 10_000              # --warmup
MAX_CASE_SECONDS = 3600.0        # --max-case-seconds


def _default_device() -> str:
    if torch.version.cuda is not None and torch.cuda.is_available():
        return "cuda"
    npu = getattr(torch, "npu", None)
    if npu is not None and getattr(npu, "is_available", lambda: False)():
        return "npu"
    return "cpu"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``v4hal bench``."""
    from v4hal.apps import args as ca
    from v4hal.cases import MODES, PRESETS

    parser.add_argument("--overhead", action="store_true",
                        help="what the op layer adds per call, every op on its tiny case (us; CPU by default)")
    parser.add_argument("--quick", action="store_true",
                        help="every public op with a case once, at small (v4-mini) shapes; about a minute on a CPU")
    parser.add_argument("--preset", default=None, type=ca.choice_list(PRESETS, "preset"),
                        help="comma-separated presets (default v4-flash,v4-pro; ignored with --quick)")
    parser.add_argument("--mode", default="decode,prefill", type=ca.choice_list(MODES, "mode"),
                        help="decode, prefill or both (default: %(default)s)")
    parser.add_argument("--shapes", metavar="FILE.yaml",
                        type=require_type("yaml", "a YAML cases file", ca.readable_file),
                        help="custom cases: a YAML list of {op: <name>, <param>: <value>, ...} (replaces the presets)")
    parser.add_argument("--ops", default=None, help="comma-separated op names to keep (default: all)")
    parser.add_argument("--backends", default=None, type=ca.choice_list(ca.backend_names, "backend"),
                        help="comma-separated backends (default: every backend available on the device)")
    parser.add_argument("--device", default=None, type=ca.device,
                        help="cpu, cuda or npu (default: the accelerator if present)")
    parser.add_argument("--repeats", type=ca.int_in(1, MAX_REPEATS), default=None,
                        help="timed calls per case (default 20 GPU, 7 CPU; with --overhead: calls per op, "
                             "default 2000)")
    parser.add_argument("--warmup", type=ca.int_in(0, MAX_WARMUP), default=3,
                        help="untimed calls before timing (default: %(default)s)")
    parser.add_argument("--max-case-seconds", type=ca.float_in(0, MAX_CASE_SECONDS), default=2.0,
                        help="stop timing a case after this many seconds (at least 3 calls are kept)")
    parser.add_argument("--no-peers", action="store_true", help="do not time the peers")
    parser.add_argument("--json", metavar="PATH", type=ca.writable_path,
                        help="write every row, the ceilings and the environment as JSON")
    parser.add_argument("--plot", metavar="PATH", type=ca.plot_path,
                        help="write a PNG chart (%% of ceiling, speedup over peers)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def select_cases(args: argparse.Namespace) -> list[casemod.Case]:
    """The case list the options ask for."""
    if args.shapes:
        yaml = require("yaml", "--shapes")
        try:
            cases = casemod.cases_from_yaml(args.shapes)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise RangeError(f"--shapes: cannot read {args.shapes} as YAML: {type(e).__name__}: {e}") from e
    elif args.quick:
        cases = casemod.quick_cases()
    else:
        presets = [p.strip() for p in (args.preset or "v4-flash,v4-pro").split(",") if p.strip()]
        modes = [m.strip() for m in args.mode.split(",") if m.strip()]
        cases = [c for p in presets for m in modes for c in casemod.preset_cases(p, m)]
    if args.ops is not None:
        keep = {o.strip() for o in args.ops.split(",") if o.strip()}
        if not keep:
            raise RangeError(f"--ops: expected a comma-separated list of ops, got {args.ops!r}")
        known = casemod.known_ops()
        unknown = keep - set(known)
        if unknown:
            raise RangeError(f"--ops names ops without a case {sorted(unknown)}; known: {sorted(known)}")
        cases = [c for c in cases if c.op in keep]
    return cases


def overhead_main(args: argparse.Namespace) -> int:
    """``v4hal bench --overhead`` (from `main`; uses ``--ops``, ``--device``, ``--repeats``, ``--json``); raises
    `RangeError` on an unknown op."""
    from v4hal.cases import case_ops

    device = args.device or "cpu"
    ops = None
    if args.ops is not None:
        ops = [o.strip() for o in args.ops.split(",") if o.strip()]
        if not ops:
            raise RangeError(f"--ops: expected a comma-separated list of ops, got {args.ops!r}")
        unknown = sorted(set(ops) - set(case_ops()))
        if unknown:
            raise RangeError(f"--ops names ops without a case {unknown}; known: {case_ops()}")
    max_calls = args.repeats or 2000
    rows = measure_overhead(ops, device, max_calls=max_calls)
    floor = torch_ops_floor_us(device)
    print(render_overhead(rows, floor, device))
    if args.json:
        doc = {"command": "v4hal bench --overhead", "argv": sys.argv[1:], "device": device,
               "torch": torch.__version__, "torch_ops_floor_us": floor, "rows": [asdict(r) for r in rows]}
        write_json_file(args.json, doc, indent=2)
        print(f"wrote {args.json}")
    return 0


@reports_errors("bench")
def main(args: argparse.Namespace) -> int:
    """Run ``v4hal bench``; exit code 1 when any backend failed its check against the reference. 2 on bad options
    (one line on stderr, before anything is timed)."""
    from v4hal.apps.args import backends_on, split_list

    if getattr(args, "overhead", False):
        return overhead_main(args)
    device = args.device or _default_device()
    cases = select_cases(args)
    available = default_backends(device)
    backends = split_list(args.backends) if args.backends else available
    backends_on(backends, device)
    sizes = platform_of(device).bench
    if not sizes.gpu_like and not (args.quick or args.shapes):
        print("v4hal bench: note: full V4 shapes on the CPU take long; --quick runs the small set", file=sys.stderr)
    repeats = args.repeats or sizes.repeats
    t0 = time.monotonic()
    ceilings = measure_ceilings(device, quick=args.quick)
    print(render_ceilings(ceilings))
    print(f"{len(cases)} cases x backends {backends} on {device}\n")
    rows = run_cases(cases, backends, device, ceilings=ceilings, repeats=repeats, warmup=args.warmup,
                     max_case_s=args.max_case_seconds, peers=not args.no_peers, progress=not args.no_progress,
                     report_missing=True)
    print(render_table(rows))
    elapsed = time.monotonic() - t0
    print(f"\n{len(rows)} rows in {elapsed:.1f} s")
    meta: dict[str, Any] = {"command": "v4hal bench", "argv": sys.argv[1:], "device": device, "backends": backends,
                            "set": "shapes" if args.shapes else ("quick" if args.quick else "presets"),
                            "elapsed_s": elapsed, "value_checks_while_timing": False}
    if args.json:
        with output_errors(args.json, "--json"):
            write_json(args.json, build_document(rows, ceilings, meta))
        print(f"wrote {args.json}")
    if args.plot:
        png = io.BytesIO()                       # savefig does not report a failed write: write it ourselves
        plot_rows(png, rows, title=f"v4hal bench on {ceilings.device_name}")
        write_bytes(args.plot, png.getvalue(), "--plot")
        print(f"wrote {args.plot}")
    return 1 if any(r.status == "check-failed" for r in rows) else 0


if __name__ == "__main__":  # python -m v4hal.apps.bench: the same as ``v4hal bench``
    from v4hal.apps.main import cli

    sys.exit(cli(["bench", *sys.argv[1:]]))
