"""``v4hal parity``: every public op (and its variants) on every backend available here, on the tiny
cases of the catalogue (`v4hal.cases`), compared with the reference backend by the numerics table
(`v4hal.compare`). Prints a table (max error / cosine distance / pass) and saves JSON.

The op list is read live from the op table (``v4hal.public_ops()``; in-place variants through
``OpDef.variant_of``), so an op declared later (a plugin's, a test's) is covered once it has a case.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Sequence

import torch

from v4hal import cases, compare
from v4hal.hal.dispatch import use_backend
from v4hal.hal.errors import BackendUnavailableError

__all__ = ["run_parity", "check_case", "parity_backends", "format_table"]


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
