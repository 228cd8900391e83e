"""``v4hal parity``: every op on every backend available here, on seeded random inputs, compared
with the reference backend. Prints a table (max error / cosine distance / pass) and saves JSON."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from v4hal import cases, compare
from v4hal.hal import registry
from v4hal.hal.dispatch import use_backend
from v4hal.hal.errors import BackendUnavailableError

INPLACE = {"act_quant": "act_quant_inplace", "fp4_act_quant": "fp4_act_quant_inplace"}


def _clone(args: list[Any]) -> list[Any]:
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def _run(backend: str, op: str, args: list[Any]) -> Any:
    with use_backend(backend):
        return getattr(torch.ops.v4hal, op)(*args)


def _backends_for(device: str, requested: list[str] | None) -> list[str]:
    """The requested backends, or every non-reference backend with an implementation on ``device``."""
    if requested:
        return [n for n in requested if n != "reference"]
    registry.ensure_device_backends(device)
    return [n for n in registry.BACKENDS if n != "reference"
            and any(i.backend == n for op in cases.BUILDERS for i in registry.implementations(op, device))]


def _inplace_args(op: str, args: list[Any]) -> list[Any]:
    """The in-place variant's arguments: (x, block_size[, scale_fmt]) from the out-of-place case."""
    return _clone(args[:3] if op == "act_quant" else args[:2])


def run_parity(device: str = "cpu", backends: list[str] | None = None, ops: list[str] | None = None,
               seed: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """One row per (op, shape, backend, output): errors vs the reference and pass/fail."""
    rows: list[dict[str, Any]] = []
    todo = [(op, shape) for op, shape in cases.SMALL_SHAPES if not ops or op in ops]
    names = _backends_for(device, backends)
    iterator = todo
    if progress:
        from tqdm import tqdm
        iterator = tqdm(todo, desc="parity", unit="case", file=sys.stderr, leave=False)
    for op, shape in iterator:
        args = cases.make_case(op, shape, seed=seed, device=device)
        t0 = time.perf_counter()
        expected = _run("reference", op, _clone(args))
        rows.append({"op": op, "shape": cases.describe_shape(shape), "backend": "reference", "device": device,
                     "status": "oracle", "seconds": time.perf_counter() - t0, "max_abs": 0.0, "diff": 0.0,
                     "mismatches": 0, "rule": "the reference itself"})
        checks = [(op, expected)]
        if op in INPLACE:  # the in-place round trip of the same quantizer
            ref_args = _inplace_args(op, args)
            _run("reference", INPLACE[op], ref_args)
            checks.append((INPLACE[op], ref_args[0]))
        for backend in names:
            for op_name, exp in checks:
                row = {"op": op_name, "shape": cases.describe_shape(shape), "backend": backend, "device": device}
                call = _clone(args) if op_name == op else _inplace_args(op, args)
                try:
                    t0 = time.perf_counter()
                    out = _run(backend, op_name, call)
                    row["seconds"] = time.perf_counter() - t0
                except BackendUnavailableError as exc:
                    rows.append({**row, "status": "skipped", "reason": str(exc)})
                    continue
                got = out if op_name == op else call[0]
                results = compare.compare_outputs(op_name, got, exp)
                row.update(status="pass" if all(r.passed for r in results) else "FAIL",
                           max_abs=max(r.max_abs for r in results), diff=max(r.diff for r in results),
                           mismatches=sum(max(r.mismatches, 0) for r in results),
                           rule="; ".join(sorted({r.rule for r in results})))
                rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows as an aligned text table."""
    head = f"{'op':<22}{'backend':<10}{'shape':<44}{'max abs err':>12}{'calc_diff':>11}{'bad':>6}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] == "skipped":
            lines.append(f"{r['op']:<22}{r['backend']:<10}{r['shape'][:43]:<44}{'':>29}  skipped: {r['reason'][:80]}")
            continue
        lines.append(f"{r['op']:<22}{r['backend']:<10}{r['shape'][:43]:<44}{r['max_abs']:>12.3g}{r['diff']:>11.2g}"
                     f"{r['mismatches']:>6}  {r['status']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="device whose tensors the ops run on (cpu, cuda, npu)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated backends to compare with the reference (default: all available)")
    parser.add_argument("--ops", default=None, help="comma-separated ops (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    parser.add_argument("--model", default=None,
                        help="model-level parity instead (e.g. v4-mini): compare hidden states and logits per backend")
    from v4hal.model.parity import add_model_arguments
    group = parser.add_argument_group("with --model")
    add_model_arguments(group)


def main(args: argparse.Namespace) -> int:
    if args.model:
        from v4hal.model import parity as model_parity
        return model_parity.main(args)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else None
    ops = [o.strip() for o in args.ops.split(",") if o.strip()] if args.ops else None
    rows = run_parity(args.device, backends, ops, args.seed)
    print(format_table(rows))
    ran = [r for r in rows if r["status"] in ("pass", "FAIL")]
    failed = [r for r in ran if r["status"] == "FAIL"]
    backends_seen = sorted({r["backend"] for r in ran})
    print(f"\n{len(ran) - len(failed)} passed, {len(failed)} failed, "
          f"{sum(r['status'] == 'skipped' for r in rows)} skipped (backends compared with the reference: {', '.join(backends_seen) or 'none'})")
    if not ran:
        print("only the reference backend is available here; set TRITON_INTERPRET=1 to check the Triton kernels "
              "on the CPU")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": args.device, "seed": args.seed, "rows": rows}, fh, indent=1)
        print(f"wrote {args.json}")
    return 1 if failed else 0
