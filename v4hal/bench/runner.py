"""Running benchmark cases: verify against the reference, then time, for every backend and peer.

For each case: build rotating input sets (enough that their total size exceeds the caches,
so a timed call does not find its operands in the cache), compute the reference output,
then per backend: call once and compare with the reference by the numerics table's rules
(`v4hal.compare`; an op that writes into an argument is compared by what it wrote, `outputs_of`; a
backend that fails the check is reported and not timed), then time with
value checks off (they read tensors back to the host). Peers are verified (by ``PEER_RULE``)
and timed the same way.
"""
from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

import v4hal
from v4hal import compare
from v4hal.hal import registry
from v4hal.hal.errors import BackendUnavailableError
from v4hal.hal.platform import platform_of

from .cases import Case
from .ceilings import Ceilings
from .timing import time_fn, value_checks_off

__all__ = ["Row", "run_cases", "rotation_count", "default_backends", "verify", "outputs_of"]


@dataclass
class Row:
    """One (case, backend) measurement. Times in seconds; ``pct_of_ceiling`` of the ceiling that binds."""

    op: str
    case: str
    backend: str
    device: str
    dtype: str
    shape: str
    params: dict[str, Any]
    status: str = "ok"              # ok | check-failed | unavailable | error | skipped
    verified: str = ""              # "vs reference" | "oracle" | ""
    check: dict[str, float] = field(default_factory=dict)
    time_s: float | None = None
    p10_s: float | None = None
    p90_s: float | None = None
    n_timed: int = 0
    timer: str = ""
    flops: float = 0.0
    bytes: float = 0.0
    tflops: float | None = None
    gbps: float | None = None
    bound: str = ""
    pct_of_ceiling: float | None = None
    interpreter: bool = False
    rotation_sets: int = 1
    peers: dict[str, dict[str, Any]] = field(default_factory=dict)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @property
    def best_peer(self) -> tuple[str, float] | None:
        """(name, our speedup = peer time / our time) of the fastest verified peer."""
        timed = [(n, p["speedup"]) for n, p in self.peers.items() if p.get("speedup") is not None]
        return min(timed, key=lambda x: x[1]) if timed else None


def default_backends(device: str) -> list[str]:
    """Backends that serve at least one op on ``device`` here (Triton on the CPU only under its interpreter)."""
    return v4hal.available_backends(device)


def rotation_count(case: Case, device: str) -> int:
    """Input sets to rotate through: enough to span ``ROTATE_BYTES``, within ``ROTATE_BUDGET`` and ``MAX_SETS``
    (``case.bytes`` per set; the runner also caps by the bytes a built set really holds and its build time)."""
    per_set = max(case.bytes, 1.0)
    sizes = platform_of(device).bench
    want = math.ceil(sizes.rotate_bytes / per_set)
    fit = int(sizes.rotate_budget // per_set)
    return max(1, min(want, fit, sizes.max_sets))


def _nbytes(obj: Any) -> int:
    """Bytes held by the tensors in an input set (dicts, tuples, handles)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(v) for v in obj)
    if hasattr(obj, "sorted_to_flat"):
        return _nbytes(obj.sorted_to_flat)
    return 0


def _free(device: str) -> None:
    gc.collect()
    platform_of(device).empty_cache()


def verify(case: Case, out: Any, ref: Any, args: Sequence[Any],
           rule: compare.Rule | None = None) -> tuple[bool, dict[str, float]]:
    """``out`` against the reference's ``ref`` for ``case`` (the numerics table, or one ``rule`` for every
    output): (passed, metrics: max_abs_err, calc_diff, mismatches)."""
    results = compare.compare_outputs(case.op, out, ref, args, rule=rule)
    metrics = {"max_abs_err": max((r.max_abs for r in results), default=0.0),
               "calc_diff": max((r.diff for r in results), default=0.0),
               "mismatches": float(sum(max(r.mismatches, 0) for r in results))}
    return compare.passed(results), metrics


def _copy_in_place(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` over a copy of its whole storage: the same strides and offset (a paged cache's
    padded pages stay padded), every byte the same."""
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    return out.set_(t.untyped_storage().clone(), t.storage_offset(), t.size(), t.stride())


def outputs_of(case: Case, args: Sequence[Any]) -> list[Any]:
    """One call of ``case`` (the backend in force) and what it produced: the returned tensors, then the
    arguments the op writes into (``Tensor(a!)``, e.g. ``paged_cache_write``'s cache), so an in-place op is
    verified by the bytes it wrote. Those arguments are copied first: ``args`` stays as built."""
    from v4hal import cases as catalogue

    written = catalogue.written_args(case.op)
    call_args = [_copy_in_place(a) if i in written else a for i, a in enumerate(args)]
    out = case.run(call_args)
    returned = [] if out is None else [out] if isinstance(out, torch.Tensor) else list(out)
    return returned + [call_args[i] for i in written]


def _bound_and_pct(case: Case, seconds: float, ceilings: Ceilings | None) -> tuple[str, float | None]:
    if ceilings is None:
        return "", None
    bw = ceilings.copy_bytes_per_s
    mm = ceilings.matmul(case.compute_dtype) if case.compute_dtype else None
    if mm is not None and case.bytes > 0 and case.flops / case.bytes >= mm / bw:
        return f"compute ({case.compute_dtype})", 100.0 * case.flops / seconds / mm
    return "memory", 100.0 * case.bytes / seconds / bw


def _serves(op: str, backend: str, device: str) -> bool:
    return any(i.backend == backend for i in registry.implementations(op, device))


def run_cases(cases: Sequence[Case], backends: Sequence[str], device: str = "cpu", *,
              ceilings: Ceilings | None = None, repeats: int = 20, warmup: int = 3,
              max_case_s: float = 2.0, peers: bool = True, time_reference: bool = True,
              deadline: float | None = None, progress: bool = True, report_missing: bool = False,
              on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """Verify and time every case on every backend (and peer) on ``device``; returns one `Row` per pair.

    ``time_reference=False`` uses the reference only as the oracle; ``deadline`` (a
    ``time.monotonic()`` value) marks the remaining cases "skipped" once passed;
    ``report_missing`` adds an "unavailable" row where a backend has no implementation of the op.
    """
    dev = torch.device(device)
    registry.ensure_device_backends(device)
    rows: list[Row] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cases) * len(backends), desc="v4hal bench", unit="run", leave=False, dynamic_ncols=True)
    try:
        for case in cases:
            _run_case(case, backends, device, dev, rows, ceilings, repeats, warmup, max_case_s, peers,
                      time_reference, deadline, bar, on_row, report_missing)
            _free(device)
    finally:
        if bar is not None:
            bar.close()
    return rows


def _run_case(case: Case, backends: Sequence[str], device: str, dev: torch.device, rows: list[Row],
              ceilings: Ceilings | None, repeats: int, warmup: int, max_case_s: float, use_peers: bool,
              time_reference: bool, deadline: float | None, bar: Any, on_row: Callable[[Row], None] | None,
              report_missing: bool) -> None:
    def new_row(backend: str, **kw: Any) -> Row:
        return Row(case.op, case.name, backend, device, case.dtype, case.shape, dict(case.params),
                   flops=case.flops, bytes=case.bytes,
                   interpreter=(backend == "triton" and device == "cpu"), **kw)

    def emit(row: Row) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{case.op} {row.backend}", refresh=False)

    wanted = [b for b in backends if b == "reference" or _serves(case.op, b, device)]
    try:
        _run_wanted(case, wanted, device, dev, ceilings, repeats, warmup, max_case_s, use_peers, time_reference,
                    deadline, new_row, emit)
    finally:
        for b in backends:
            if b in wanted:
                continue
            if report_missing:
                emit(new_row(b, status="unavailable",
                             note=f"backend {b!r} has no implementation of {case.op} on {device}"))
            elif bar is not None:
                bar.update(1)


def _run_wanted(case: Case, wanted: Sequence[str], device: str, dev: torch.device, ceilings: Ceilings | None,
                repeats: int, warmup: int, max_case_s: float, use_peers: bool, time_reference: bool,
                deadline: float | None, new_row: Callable[..., Row], emit: Callable[[Row], None]) -> None:
    if deadline is not None and time.monotonic() > deadline:
        for b in wanted:
            emit(new_row(b, status="skipped", note="time budget spent"))
        return
    n_sets = rotation_count(case, device)
    try:
        t_make = time.perf_counter()
        inputs = [case.make(dev, 1000)]
        t_make = time.perf_counter() - t_make
        # building a set can cost more than timing the op (weights quantized by the reference), and a
        # set can hold more than the op touches (a whole KV cache): keep within time and memory budgets
        held = max(_nbytes(inputs[0]), 1)
        sizes = platform_of(device).bench
        n_sets = max(1, min(n_sets, int(sizes.make_budget_s / max(t_make, 1e-6)),
                            int(sizes.rotate_budget // held)))
        inputs += [case.make(dev, 1000 + s) for s in range(1, n_sets)]
        with v4hal.use_backend("reference"):
            ref = outputs_of(case, inputs[0])
    except Exception as exc:  # a case that cannot be built here is reported, not fatal
        for b in wanted:
            emit(new_row(b, status="error", note=f"building inputs / reference failed: {type(exc).__name__}: {exc}"))
        return
    peer_results: dict[str, dict[str, Any]] = {}
    peer_done = False
    for backend in wanted:
        row = new_row(backend, rotation_sets=n_sets)
        try:
            with v4hal.use_backend(backend):
                out = outputs_of(case, inputs[0])
        except BackendUnavailableError as exc:
            row.status, row.note = "unavailable", str(exc)
            emit(row)
            continue
        except Exception as exc:
            row.status, row.note = "error", f"{type(exc).__name__}: {exc}"
            emit(row)
            continue
        if backend == "reference":
            ok, metrics = _self_check(case, out, ref, inputs[0])
            row.verified = "oracle"
        else:
            ok, metrics = verify(case, out, ref, inputs[0])
            row.verified = "vs reference"
        row.check = metrics
        del out
        if not ok:
            row.status = "check-failed"
            row.note = "output differs from the reference beyond tolerance; not timed"
            emit(row)
            continue
        if backend == "reference" and not time_reference:
            row.note = "oracle only (not timed here)"
            emit(row)
            continue
        interp = row.interpreter
        with v4hal.use_backend(backend), value_checks_off():
            t = time_fn(lambda i: case.run(inputs[i % n_sets]), device,
                        warmup=1 if interp else warmup, repeats=3 if interp else repeats,
                        max_time_s=max_case_s)
        _fill_timing(row, case, t, ceilings)
        if interp:
            row.note = "Triton interpreter timing: checks correctness only, says nothing about GPU speed"
        if use_peers and not interp:
            if not peer_done:
                peer_results = _run_peers(case, inputs, ref, device, repeats, warmup, max_case_s, n_sets)
                peer_done = True
            for name, pr in peer_results.items():
                entry = dict(pr)
                if pr.get("time_s") and row.time_s:
                    entry["speedup"] = pr["time_s"] / row.time_s
                row.peers[name] = entry
        emit(row)


def _self_check(case: Case, out: Any, ref: Any, inputs: list[Any]) -> tuple[bool, dict[str, float]]:
    """The reference against itself on a second call: within its own pass rule, and finite (no NaN; an
    infinity only in the ops whose outputs hold them by contract, ``compare.INFINITE_OUTPUTS``)."""
    ok, metrics = verify(case, out, ref, inputs)
    finite = True
    inf_ok = case.op in compare.INFINITE_OUTPUTS
    for t in _flat(out):
        if t.is_floating_point() and t.dtype.itemsize >= 2:
            finite = finite and not bool((t.isnan() if inf_ok else ~torch.isfinite(t)).any())
    metrics["finite"] = float(finite)
    return ok and finite, metrics


def _flat(out: Any) -> Iterable[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for o in out:
            yield from _flat(o)


def _fill_timing(row: Row, case: Case, t: Any, ceilings: Ceilings | None) -> None:
    row.time_s, row.p10_s, row.p90_s, row.n_timed, row.timer = t.median, t.p10, t.p90, t.n, t.timer
    row.tflops = case.flops / t.median / 1e12 if case.flops else None
    row.gbps = case.bytes / t.median / 1e9
    row.bound, row.pct_of_ceiling = _bound_and_pct(case, t.median, ceilings)


def _run_peers(case: Case, inputs: list[list[Any]], ref: Any, device: str, repeats: int, warmup: int,
               max_case_s: float, n_sets: int) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for peer in case.peers:
        reason = peer.reason(device)
        if reason is not None:
            out[peer.name] = {"status": "unavailable", "note": reason}
            continue
        try:
            states = [peer.prepare(case.named(i)) for i in inputs]
            res = peer.run(states[0])
            ok, metrics = verify(case, res, ref, inputs[0], rule=compare.PEER_RULE)
            if not ok:
                out[peer.name] = {"status": "check-failed", "check": metrics}
                continue
            t = time_fn(lambda i: peer.run(states[i % n_sets]), device, warmup=warmup, repeats=repeats,
                        max_time_s=max_case_s)
            out[peer.name] = {"status": "ok", "check": metrics, "time_s": t.median,
                              "tflops": case.flops / t.median / 1e12 if case.flops else None}
        except Exception as exc:
            out[peer.name] = {"status": "error", "note": f"{type(exc).__name__}: {exc}"}
    return out
