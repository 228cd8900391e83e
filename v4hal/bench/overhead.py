"""``v4hal bench --overhead``: what the op layer adds to each call, per public op on its tiny case.

For every op (its first tiny case, value checks off, the implementation chosen automatically):

- ``public_us``: median time of the public call ``v4hal.<op>(...)``;
- ``impl_us``: median time of the chosen implementation function called directly;
- ``diff_us``: their difference: the op layer's cost plus the jitter of two kernel timings (for
  kernels of hundreds of microseconds that jitter is several microseconds either way);
- ``added_us``: what the op layer adds per call, measured with the implementation replaced by a
  function that returns its precomputed result, so the kernel's own time and jitter drop out
  (public wrapper, the eager path or ``torch.ops`` dispatch, the dispatching kernel);
- ``kernel_us``: the part of ``added_us`` spent in v4hal's dispatching kernel (signature lookup,
  cached selection) rather than in the wrapper;
- ``value_checks_us``: what the value checks add when on (the CPU default), on the same stub.

The table also gives the floor: a no-op Python kernel called through ``torch.ops``. Calls are
timed one by one with ``time.perf_counter_ns``, the variants interleaved, and medians taken.
"""
from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from v4hal.hal.errors import RangeError

__all__ = ["OverheadRow", "measure_overhead", "torch_ops_floor_us", "render_overhead"]


@dataclass
class OverheadRow:
    """One op's figures in microseconds (medians); see the module docstring."""

    op: str
    case: str
    backend: str
    public_us: float
    impl_us: float
    diff_us: float
    added_us: float
    kernel_us: float
    value_checks_us: float
    calls: int


def _time(fns: dict[str, Callable[[], Any]], max_calls: int, budget_s: float, min_calls: int = 5) -> dict[str, float]:
    """Median microseconds per call of each function, calls interleaved, within ``budget_s``."""
    clock = time.perf_counter_ns
    samples: dict[str, list[int]] = {name: [] for name in fns}
    items = list(fns.items())
    for _, fn in items:   # warm-up
        fn()
        fn()
    deadline = clock() + int(budget_s * 1e9)
    n = 0
    while n < max_calls and (n < min_calls or clock() < deadline):
        for name, fn in items:
            t0 = clock()
            fn()
            samples[name].append(clock() - t0)
        n += 1
    return {name: statistics.median(v) / 1000 for name, v in samples.items()} | {"_calls": float(n)}


def _public_call(op: str, args: list[Any]) -> Callable[[], Any]:
    """``v4hal.<op>`` called with the case's schema arguments mapped onto its public signature."""
    from v4hal.ops import OPS
    from v4hal.ops.moe import MoEHandle

    opdef = OPS[op]
    wrapper = opdef.wrapper
    by_name = dict(zip(opdef.arg_names, args))
    # public parameters that bundle schema arguments: name -> (the schema argument it needs, builder)
    adapted: dict[str, tuple[str, Callable[[], Any]]] = {
        "handle": ("sorted_to_flat", lambda: MoEHandle(by_name["sorted_to_flat"], by_name["weights"].shape[0],
                                                       by_name["weights"].shape[1])),
        "w_scales": ("w1_scale", lambda: None if by_name["w1_scale"] is None else
                     (by_name["w1_scale"], by_name["w2_scale"], by_name["w3_scale"])),
    }
    packet = getattr(torch.ops.v4hal, op)
    if wrapper is None:
        return lambda: packet(*args)
    kwargs: dict[str, Any] = {}
    for p in inspect.signature(wrapper).parameters.values():
        if p.name in by_name:
            kwargs[p.name] = by_name[p.name]
        elif p.name in adapted and adapted[p.name][0] in by_name:
            kwargs[p.name] = adapted[p.name][1]()
        elif p.default is inspect.Parameter.empty:
            return lambda: packet(*args)   # a public signature this table cannot fill
    return lambda: wrapper(**kwargs)


_FLOOR_LIB: torch.library.Library | None = None


def torch_ops_floor_us(device: str = "cpu", max_calls: int = 5000, budget_s: float = 0.5) -> float:
    """Median microseconds of a no-op Python kernel called through ``torch.ops`` (the floor of any
    op registered with torch.library and implemented in Python)."""
    global _FLOOR_LIB
    if _FLOOR_LIB is None:
        from v4hal.hal.devices import registered_devices

        lib = torch.library.Library("v4hal_overhead_probe", "DEF")
        lib.define("noop(Tensor x, Tensor weight, float eps=1e-6) -> Tensor")
        for d in registered_devices().values():
            lib.impl("noop", lambda x, weight, eps=1e-6: x, d.dispatch_key)
        _FLOOR_LIB = lib
    x = torch.zeros(4, 256, device=device)
    w = torch.zeros(256, device=device)
    noop = torch.ops.v4hal_overhead_probe.noop
    return _time({"floor": lambda: noop(x, w, 1e-5)}, max_calls, budget_s)["floor"]


def measure_overhead(ops: list[str] | None = None, device: str = "cpu", *, max_calls: int = 2000,
                     budget_s: float = 0.4) -> list[OverheadRow]:
    """One :class:`OverheadRow` per op (default: every public op with a case), timed with one
    intra-op thread."""
    from v4hal.cases import tiny_cases

    rows = []
    names = ops if ops is not None else [op for op, _ in tiny_cases()]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny cases gain nothing from more; one thread keeps a busy machine's figures stable
    try:
        for op in dict.fromkeys(names):
            rows.append(_measure_op(op, device, max_calls, budget_s))
    finally:
        torch.set_num_threads(threads)
    return rows


def _measure_op(op: str, device: str, max_calls: int, budget_s: float) -> OverheadRow:
    """The figures of ``op`` on its first tiny case (see the module docstring)."""
    from v4hal.bench.timing import synchronize, value_checks_forced, value_checks_off
    from v4hal.cases import describe_shape, make_case, tiny_cases
    from v4hal.hal import dispatch, registry
    from v4hal.ops import OPS

    cases = tiny_cases(op)
    if not cases:
        raise RangeError(f"v4hal bench --overhead: op {op!r} has no tiny case")
    shape = cases[0][1]
    args = make_case(op, shape, device=device)
    opdef = OPS[op]
    impl = dispatch.select(op, device, dict(zip(opdef.arg_names, args)))
    public = _public_call(op, args)
    result = impl.fn(*args)

    def stub(*_a: Any, _r: Any = result) -> Any:
        return _r

    saved = [i for i in registry.implementations(op, device) if i.backend == impl.backend][0]

    def swap(fn: Callable[..., Any]) -> None:
        registry.register_impl(op, saved.backend, fn, devices=(device,), priority=saved.priority,
                               requires=saved.requires, auto=saved.auto)

    synchronize(device)
    with value_checks_off():
        real = _time({"public": public, "impl": lambda: impl.fn(*args)}, max_calls, budget_s)
        synchronize(device)
        swap(stub)
        try:
            layer = _time({"public": public, "kernel": lambda: opdef.kernel(*args), "stub": lambda: stub(*args)},
                          max_calls, budget_s)
        finally:
            swap(saved.fn)
    with value_checks_forced(True):
        swap(stub)
        try:
            checked = _time({"public": public}, max_calls, budget_s / 2)
        finally:
            swap(saved.fn)
    return OverheadRow(
        op, describe_shape(shape), impl.backend, real["public"], real["impl"], real["public"] - real["impl"],
        layer["public"] - layer["stub"], layer["kernel"] - layer["stub"],
        max(0.0, checked["public"] - layer["public"]), int(real["_calls"]))


def render_overhead(rows: list[OverheadRow], floor_us: float, device: str) -> str:
    """The table, then the medians over ops and the torch.ops floor."""
    head = (f"{'op':<20} {'case':<44} {'backend':<10} {'public':>9} {'impl':>9} {'diff':>8} {'added':>7} "
            f"{'kernel':>7} {'vchecks':>8}")
    lines = [f"v4hal op-layer overhead on {device} (us per call, medians; value checks off unless noted)", head,
             "-" * len(head)]
    for r in rows:
        lines.append(f"{r.op:<20} {r.case[:44]:<44} {r.backend:<10} {r.public_us:9.1f} {r.impl_us:9.1f} "
                     f"{r.diff_us:8.1f} {r.added_us:7.2f} {r.kernel_us:7.2f} {r.value_checks_us:8.1f}")
    if rows:
        med = statistics.median
        lines += ["", f"median over {len(rows)} ops: added {med(r.added_us for r in rows):.2f} us "
                      f"(max {max(r.added_us for r in rows):.2f} us, {max(rows, key=lambda r: r.added_us).op}), "
                      f"kernel {med(r.kernel_us for r in rows):.2f} us, diff {med(r.diff_us for r in rows):.1f} us"]
    lines += [f"torch.ops floor (a no-op Python kernel through torch.ops): {floor_us:.2f} us",
              "added = public - impl with the implementation stubbed out (the op layer alone); diff = public - impl",
              "with the real kernel (includes its timing jitter); kernel = v4hal's dispatching kernel inside added;",
              "vchecks = added by value checks when on (CPU default)"]
    return "\n".join(lines)
