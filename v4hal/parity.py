"""``v4hal parity``: every public op (and its variants) on every backend available here, on the tiny
cases of the catalogue (`v4hal.cases`), compared with the reference backend by the numerics table
(`v4hal.compare`). Prints a table (max error / cosine distance / pass) and saves JSON.

The op list is read live from the op table (``v4hal.public_ops()``; in-place variants through
``OpDef.variant_of``), so an op declared later (a plugin's, a test's) is covered once it has a case.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Sequence

import torch

from v4hal import cases, compare
from v4hal.cliargs import reports_errors, write_json
from v4hal.hal.dispatch import use_backend
from v4hal.hal.errors import BackendUnavailableError

__all__ = ["run_parity", "check_case", "parity_backends", "format_table", "summary", "add_arguments", "main"]


def _clone(args: list[Any]) -> list[Any]:
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def _call(backend: str, op: str, args: list[Any]) -> list[torch.Tensor]:
    """Run ``op`` on ``backend``; its outputs: the returned tensors, then the arguments it writes into."""
    with use_backend(backend):
        out = getattr(torch.ops.v4hal, op)(*args)
    returned = [] if out is None else [out] if isinstance(out, torch.Tensor) else list(out)
    return returned + [args[i] for i in cases.written_args(op)]


def parity_backends(device: str = "cpu", requested: Sequence[str] | None = None) -> list[str]:
    """The requested backends, or every backend other than the reference that serves some op on ``device``."""
    if requested:
        return [n for n in requested if n != "reference"]
    from v4hal.hal.info import available_backends

    return [n for n in available_backends(device) if n != "reference"]


def check_case(op: str, shape: dict[str, Any], backends: Sequence[str], device: str = "cpu",
               seed: int = 0) -> list[dict[str, Any]]:
    """One case of ``op`` (and of each of its variants) on each backend, against the reference.

    Rows: the reference's ("oracle"), then per (op or variant, backend) one of "pass", "FAIL"
    (outputs outside the rule, or the backend raised) or "skipped" (the backend cannot serve the
    call: `BackendUnavailableError`, with its reasons)."""
    args = cases.make_case(op, shape, seed=seed, device=device)
    desc = cases.describe_shape(shape)
    checks: list[tuple[str, list[Any], list[torch.Tensor]]] = []
    t0 = time.perf_counter()
    checks.append((op, args, _call("reference", op, _clone(args))))
    rows: list[dict[str, Any]] = [{"op": op, "shape": desc, "backend": "reference", "device": device,
                                   "status": "oracle", "seconds": time.perf_counter() - t0, "max_abs": 0.0,
                                   "diff": 0.0, "mismatches": 0, "rule": "the reference itself"}]
    for variant in cases.variants(op):
        vargs = cases.variant_args(variant, args)
        checks.append((variant, vargs, _call("reference", variant, _clone(vargs))))
    for backend in backends:
        for name, call_args, expected in checks:
            row: dict[str, Any] = {"op": name, "shape": desc, "backend": backend, "device": device}
            try:
                t0 = time.perf_counter()
                got = _call(backend, name, _clone(call_args))
                row["seconds"] = time.perf_counter() - t0
            except BackendUnavailableError as exc:
                rows.append({**row, "status": "skipped", "reason": str(exc)})
                continue
            except Exception as exc:  # a kernel that raises on valid input is a failure, reported with the rest
                rows.append({**row, "status": "FAIL", "reason": f"raised {type(exc).__name__}: {exc}",
                             "max_abs": float("inf"), "diff": float("inf"), "mismatches": -1, "rule": "-"})
                continue
            results = compare.compare_outputs(name, got, expected, call_args)
            row.update(status="pass" if compare.passed(results) else "FAIL",
                       max_abs=max((r.max_abs for r in results), default=0.0),
                       diff=max((r.diff for r in results), default=0.0),
                       mismatches=sum(max(r.mismatches, 0) for r in results),
                       rule="; ".join(sorted({r.rule for r in results})))
            rows.append(row)
    return rows


def run_parity(device: str = "cpu", backends: list[str] | None = None, ops: list[str] | None = None,
               seed: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """One row per (op, shape, backend): errors vs the reference and pass/fail; a public op without a
    case gets one "skipped" row saying so."""
    from v4hal.ops import public_ops

    rows: list[dict[str, Any]] = []
    names = parity_backends(device, backends)
    todo: list[tuple[str, dict[str, Any]]] = []
    for op in public_ops():
        if ops and op not in ops:
            continue
        if op not in cases.CASES:
            rows.append({"op": op, "shape": "-", "backend": "-", "device": device, "status": "skipped",
                         "reason": "no case in v4hal.cases (register_case adds one)"})
            continue
        todo += cases.tiny_cases(op)
    iterator: Any = todo
    if progress:
        from tqdm import tqdm
        iterator = tqdm(todo, desc="parity", unit="case", file=sys.stderr, leave=False)
    for op, shape in iterator:
        rows += check_case(op, shape, names, device, seed)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows as an aligned text table."""
    head = f"{'op':<22}{'backend':<10}{'shape':<44}{'max abs err':>12}{'calc_diff':>11}{'bad':>6}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] == "skipped" or "max_abs" not in r:
            lines.append(f"{r['op']:<22}{r['backend']:<10}{r['shape'][:43]:<44}{'':>29}  {r['status']}: "
                         f"{r.get('reason', '')[:80]}")
            continue
        reason = f" ({r['reason'][:80]})" if r.get("reason") else ""
        lines.append(f"{r['op']:<22}{r['backend']:<10}{r['shape'][:43]:<44}{r['max_abs']:>12.3g}{r['diff']:>11.2g}"
                     f"{r['mismatches']:>6}  {r['status']}{reason}")
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]], device: str = "cpu", seconds: float | None = None) -> str:
    """What a parity run compared, in words: ``compared N backend(s) against the reference (names): P passed,
    F failed, S skipped``, then each other backend that was not compared and why (its first reason on
    ``device``). With nothing compared it says so instead of a pass count."""
    from v4hal.cliargs import unavailable_reason
    from v4hal.hal import registry

    ran = [r for r in rows if r["status"] in ("pass", "FAIL")]
    failed = sum(r["status"] == "FAIL" for r in ran)
    skipped = sum(r["status"] == "skipped" for r in rows)
    compared = sorted({r["backend"] for r in ran})
    absent = [n for n in registry.BACKENDS if n != "reference" and n not in compared]
    why = "; ".join(f"{n} not compared: {unavailable_reason(n, device) or 'no case ran on it'}" for n in absent)
    oracle = sum(r["status"] == "oracle" for r in rows)
    took = f"; {len(rows)} rows in {seconds:.1f} s" if seconds is not None else ""
    if not ran:
        return (f"compared 0 backend(s) against the reference: nothing was checked (the reference ran {oracle} "
                f"case(s) alone, {skipped} skipped{took})" + (f"\n{why}" if why else ""))
    return (f"compared {len(compared)} backend(s) against the reference ({', '.join(compared)}): "
            f"{len(ran) - failed} passed, {failed} failed, {skipped} skipped{took}" + (f"\n{why}" if why else ""))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``v4hal parity`` (op level; with ``--model``, also `v4hal.model.parity`'s)."""
    from v4hal.cliargs import backend_names, choice_list, device, model_preset, seed, writable_path
    from v4hal.ops import public_ops

    parser.add_argument("--device", default="cpu", type=device,
                        help="device whose tensors the ops run on (cpu, cuda, npu)")
    parser.add_argument("--backends", default=None, type=choice_list(backend_names, "backend"),
                        help="comma-separated backends to compare with the reference (default: all available)")
    parser.add_argument("--ops", default=None, type=choice_list(public_ops, "op"),
                        help="comma-separated ops (default: all)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the case inputs (0 .. 2**32 - 1)")
    parser.add_argument("--json", default=None, type=writable_path, help="write the rows to this JSON file")
    parser.add_argument("--model", default=None, type=model_preset,
                        help="model-level parity instead (e.g. v4-mini): compare hidden states and logits per backend")
    from v4hal.model.parity import add_model_arguments
    group = parser.add_argument_group("with --model")
    add_model_arguments(group)


@reports_errors("parity")
def main(args: argparse.Namespace) -> int:
    """``v4hal parity``: 0 when every compared row passes, 1 otherwise, 2 on bad options (one line on stderr)."""
    from v4hal.cliargs import backends_on, split_list

    if args.model:
        from v4hal.model import parity as model_parity
        return model_parity.main(args)
    backends = split_list(args.backends) if args.backends else None
    ops = split_list(args.ops) if args.ops else None
    if backends:
        backends_on(backends, args.device)
    t0 = time.perf_counter()
    rows = run_parity(args.device, backends, ops, args.seed)
    print(format_table(rows))
    print()
    print(summary(rows, args.device, time.perf_counter() - t0))
    failed = [r for r in rows if r["status"] == "FAIL"]
    if args.json:
        write_json(args.json, {"device": args.device, "seed": args.seed, "rows": rows})
        print(f"wrote {args.json}")
    return 1 if failed else 0
