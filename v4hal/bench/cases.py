"""Benchmark cases: one op at one shape of the case catalogue (`v4hal.cases`), named for tables.

A `Case` builds its inputs on a device (``make(device, seed)``: the op's schema arguments), calls
the op (``run``), and carries its work (``flops``, ``bytes``: every input read once and every output
written once unless the op's case says less), the ceiling that may bind (``compute_dtype``) and the
peers that compute the same thing. How an output is verified is the numerics table's
(`v4hal.compare`). The shape is checked by the op's own checks when the case is made (on fake
tensors: nothing is allocated).

Case sets:
- ``quick_cases()``: every public op with a case at each of its quick shapes (``v4-mini`` dims, CPU-friendly;
  one per layout, weight format or variant the op serves);
- ``preset_cases(preset, mode)``: the ops of one layer of ``v4-flash`` / ``v4-pro``. ``decode``: a
  batch of 128 tokens for the token-wise ops and 64 sequences of one query at a 64K-token context
  for the per-sequence ops; ``prefill``: a chunk of 4096 tokens (2048 queries for the indexer);
- ``cases_from_yaml(path)``: a list of ``{op: <name>, name: <label>, <param>: <value>, ...}``
  whose parameters are the op case's shape keys (``OpCase.params``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from v4hal import cases as catalogue
from v4hal.extras import require
from v4hal.hal.errors import RangeError

from . import peers as peermod

__all__ = ["Case", "bench_case", "quick_cases", "preset_cases", "cases_from_yaml", "cases_from_specs",
           "known_ops"]


@dataclass
class Case:
    """One benchmark case: ``op`` at ``params`` (a complete shape of its `v4hal.cases.OpCase`)."""

    op: str
    name: str
    params: dict[str, Any]
    dtype: str
    flops: float
    bytes: float
    compute_dtype: str | None = None
    peers: list[peermod.Peer] = field(default_factory=list)

    @property
    def shape(self) -> str:
        return catalogue.describe_shape(self.params)

    def make(self, device: str | torch.device, seed: int) -> list[Any]:
        """The op's schema-ordered arguments on ``device``."""
        return catalogue.make_case(self.op, self.params, seed=seed, device=device)

    def run(self, args: list[Any]) -> Any:
        """One call of the op (the backend in force)."""
        return getattr(torch.ops.v4hal, self.op)(*args)

    def named(self, args: list[Any]) -> dict[str, Any]:
        """``args`` by schema name (what peers read)."""
        from v4hal.ops import OPS

        return dict(zip(OPS[self.op].arg_names, args))


def known_ops() -> list[str]:
    """Ops that have a case."""
    return catalogue.case_ops()


def bench_case(op: str, shape: dict[str, Any], name: str) -> Case:
    """The case of ``op`` at ``shape``; the op's checks reject a shape it cannot take (`ShapeError`, ...)."""
    oc = catalogue.get_case(op)
    params = oc.complete(shape)
    flops, nbytes, label = oc.work(shape)
    return Case(op, name, params, label, flops, nbytes, oc.matmul_dtype(shape), [make() for make in oc.peers])


def quick_cases() -> list[Case]:
    """Every public op that has a case, at each of its quick shapes (``v4-mini``-sized; an op that serves several
    layouts, weight formats or model generations has one per variant, so each is timed and verified)."""
    return [bench_case(op, shape, f"quick/{label}") for op in catalogue.case_ops()
            for label, shape in catalogue.get_case(op).shape_set("quick")]


def preset_cases(preset: str, mode: str) -> list[Case]:
    """The ops of one V4 layer at ``preset``'s shapes, for ``mode`` "decode" or "prefill" (see module doc)."""
    if mode not in catalogue.MODES:
        raise RangeError(f"preset_cases: mode must be 'decode' or 'prefill', got {mode!r}")
    if preset not in catalogue.PRESETS:
        raise RangeError(f"preset_cases: preset must be one of {catalogue.PRESETS}, got {preset!r}")
    out = []
    for op in catalogue.case_ops():
        for label, shape in catalogue.get_case(op).shape_set(f"{preset}/{mode}"):
            out.append(bench_case(op, shape, f"{preset}/{mode}/{label}"))
    return out


def cases_from_specs(specs: list[dict[str, Any]], where: str = "shapes") -> list[Case]:
    """Cases from ``[{op: name, param: value, ...}, ...]`` (the ``--shapes`` YAML's content)."""
    if not isinstance(specs, list):
        raise RangeError(f"{where}: expected a list of {{op: ..., <params>}} entries, got {type(specs).__name__}")
    out = []
    for n, spec in enumerate(specs):
        if not isinstance(spec, dict) or "op" not in spec:
            raise RangeError(f"{where}[{n}]: each entry needs an 'op' key, got {spec!r}")
        op = spec["op"]
        if op not in known_ops():
            raise RangeError(f"{where}[{n}]: op must be one of {known_ops()}, got {op!r}")
        shape = {k: v for k, v in spec.items() if k not in ("op", "name")}
        try:
            out.append(bench_case(op, shape, str(spec.get("name", f"custom/{op}/{n}"))))
        except RangeError as e:
            raise RangeError(f"{where}[{n}]: {e}") from e
    return out


def cases_from_yaml(path: str) -> list[Case]:
    """Cases from a YAML file: a list of ``{op: <name>, <param>: <value>}`` (or ``{cases: [...]}``)."""
    yaml = require("yaml", "cases_from_yaml")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if isinstance(data, dict) and "cases" in data:
        data = data["cases"]
    return cases_from_specs(data, where=path)
