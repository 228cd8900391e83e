"""Adding an op: a declaration, a reference function and a case are all it takes to appear in
``v4hal parity``, ``v4hal info``, ``v4hal bench --quick`` and the generic backend test.

The op is declared inside the test. torch.library cannot undefine an op, so it is defined once per
process (a re-run puts the same declaration back into the op table); the fixture takes it out of
the op table and the catalogue afterwards, so the other tests see v4hal's own ops only.
"""
from __future__ import annotations

import argparse
import sys
import types
from typing import Iterator

import pytest
import torch

import v4hal
from tests.test_every_backend import backend_rows
from v4hal import cases
from v4hal.apps import bench as bench_cli
from v4hal.bench import cases as bench_cases
from v4hal.bench import runner
from v4hal.cases import REQUIRED, OpCase
from v4hal.hal import registry
from v4hal.hal.errors import DTypeError
from v4hal.ops import OPS
from v4hal.ops._define import define_op
from v4hal.parity import run_parity

OP = "demo_scale"
PLUGIN = "demo_scale_plugin"  # the module holding the public wrapper (outside v4hal: not in its contract)


def _declare() -> None:
    """Declare ``demo_scale(x, alpha) = x * alpha`` with its public wrapper, once per process."""
    module = sys.modules.get(PLUGIN)
    if module is None:
        module = types.ModuleType(PLUGIN, "a tiny element-wise op declared by a test")

        def check(x: torch.Tensor, alpha: float) -> None:
            if not x.is_floating_point():
                raise DTypeError(f"{OP}: x must be a floating tensor, got {x.dtype}")

        def fake(x: torch.Tensor, alpha: float) -> torch.Tensor:
            return torch.empty_like(x)

        def demo_scale(x: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
            """``x * alpha`` in x's dtype."""
            return torch.ops.v4hal.demo_scale(x, alpha)

        module.demo_scale = demo_scale
        sys.modules[PLUGIN] = module
        module.opdef = define_op(OP, "(Tensor x, float alpha=2.0) -> Tensor", check=check, fake=fake,
                                 doc="x * alpha", module=PLUGIN)
    OPS[OP] = module.opdef


def _reference(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return (x.float() * alpha).to(x.dtype)


@pytest.fixture
def declared_op() -> Iterator[str]:
    """The op declared with a reference function (no case yet); removed from the op table afterwards."""
    _declare()
    registry.register_impl(OP, "reference", _reference, devices=("cpu", "cuda", "npu"))
    try:
        yield OP
    finally:
        cases.unregister_case(OP)
        OPS.pop(OP, None)


@pytest.fixture
def demo_op(declared_op: str) -> str:
    """The op declared, with a reference function and a case."""
    cases.register_case(OpCase(
        OP, lambda g, s: [g.randn(s["t"], s["d"], dtype=s["dtype"]), 1.5],
        {"t": REQUIRED, "d": REQUIRED, "dtype": "bf16"},
        tiny=[{"t": 3, "d": 5}, {"t": 1, "d": 7, "dtype": "fp32"}], flops=lambda s: s["t"] * s["d"]))
    return declared_op


def test_parity_says_when_an_op_has_no_case(declared_op: str) -> None:
    rows = run_parity("cpu", ops=[declared_op], progress=False)
    assert [(r["op"], r["status"]) for r in rows] == [(declared_op, "skipped")] and "no case" in rows[0]["reason"]


def test_the_op_is_public(demo_op: str) -> None:
    assert demo_op in v4hal.public_ops() and demo_op not in v4hal.PUBLIC_OPS
    x = torch.arange(4.0)
    assert torch.equal(v4hal.demo_scale(x, 3.0), x * 3)
    with pytest.raises(DTypeError, match="floating"):
        v4hal.demo_scale(torch.arange(4))


def test_parity_lists_it(demo_op: str) -> None:
    rows = [r for r in run_parity("cpu", ops=[demo_op], progress=False) if r["op"] == demo_op]
    assert [r["shape"] for r in rows if r["status"] == "oracle"] == ["t=3 d=5", "t=1 d=7 dtype=fp32"]
    # the other backends here have no implementation of it: skipped with the reason, not failed
    others = [r for r in rows if r["backend"] != "reference"]
    assert all(r["status"] == "skipped" and demo_op in r["reason"] for r in others)


def test_info_lists_it(demo_op: str) -> None:
    cells = v4hal.info(["cpu"])["ops"][demo_op]["cpu"]
    reference = next(c for c in cells if c["backend"] == "reference")
    assert reference["status"] == "yes", cells


def test_bench_quick_runs_it(demo_op: str, capsys: pytest.CaptureFixture[str]) -> None:
    case = next(c for c in bench_cases.quick_cases() if c.op == demo_op)
    assert case.params == {"t": 3, "d": 5, "dtype": "bf16"} and case.flops == 15
    assert case.bytes == 2 * (2 * 3 * 5)  # x read, the output written (bf16)
    rows = runner.run_cases([case], ["reference"], "cpu", repeats=2, warmup=1, progress=False)
    assert rows[0].status == "ok" and rows[0].verified == "oracle" and rows[0].time_s > 0
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    args = parser.parse_args(["--quick", "--device", "cpu", "--backends", "reference", "--ops", demo_op,
                              "--repeats", "2", "--warmup", "1", "--no-progress"])
    assert bench_cli.main(args) == 0
    assert f"{demo_op}  quick/tiny" in capsys.readouterr().out


def test_generic_backend_test_covers_it(demo_op: str) -> None:
    # every backend here: none implements it, so the generic check skips (and fails nothing)
    for name in v4hal.available_backends("cpu"):
        if name != "reference":
            for _, shape in cases.tiny_cases(demo_op):
                assert {r["status"] for r in backend_rows(demo_op, shape, name)} == {"skipped"}
    # a second implementation is checked against the reference by the same function ...
    registry.register_impl(demo_op, "cuda", _reference, devices=("cpu",), auto=False)
    try:
        for _, shape in cases.tiny_cases(demo_op):
            assert [r["status"] for r in backend_rows(demo_op, shape, "cuda")] == ["pass"]
        # ... and a wrong one fails it
        registry.register_impl(demo_op, "cuda", lambda x, alpha: x * (alpha + 0.5), devices=("cpu",), auto=False)
        with pytest.raises(AssertionError, match="cuda vs reference"):
            backend_rows(demo_op, cases.tiny_cases(demo_op)[0][1], "cuda")
    finally:
        registry.unregister_backend("cuda", devices=("cpu",))
