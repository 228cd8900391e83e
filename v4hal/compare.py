"""Comparing one backend's outputs with the reference's: the rules every parity check uses.

- floating outputs: max abs error, cosine-style distance ``calc_diff``, and a pass rule per dtype;
- fp8 / uint8 (packed FP4) / e8m0 outputs of quantizers: bit for bit;
- integer index outputs: equal as sets per row (top-k tie order is unspecified) or exactly (permutations).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# (atol, rtol, max calc_diff) per floating dtype of the output
FLOAT_RULES: dict[torch.dtype, tuple[float, float, float]] = {
    torch.float32: (1e-4, 1e-4, 1e-7),
    torch.float16: (2e-3, 5e-3, 1e-5),
    torch.bfloat16: (2e-2, 2e-2, 5e-5),
}
BITWISE = (torch.float8_e4m3fn, torch.uint8, torch.float8_e8m0fnu)
SET_COMPARED_OPS = ("indexer_topk",)


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """``1 - 2<x,y> / (|x|^2 + |y|^2)`` in float64; 0 for identical tensors, inf when either holds NaN/inf."""
    x64, y64 = x.double().flatten(), y.double().flatten()
    if not (bool(torch.isfinite(x64).all()) and bool(torch.isfinite(y64).all())):
        return float("inf")
    denom = float((x64 * x64 + y64 * y64).sum())
    return 0.0 if denom == 0 else float(1 - 2 * (x64 * y64).sum() / denom)


@dataclass
class Comparison:
    """The outcome of comparing one output tensor."""

    max_abs: float
    diff: float
    mismatches: int
    passed: bool
    rule: str


def _as_list(out: Any) -> list[torch.Tensor]:
    if out is None:
        return []
    return list(out) if isinstance(out, (tuple, list)) else [out]


def compare_tensor(actual: torch.Tensor, expected: torch.Tensor, *, as_sets: bool = False) -> Comparison:
    """Compare one output with the rule of its dtype."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return Comparison(float("inf"), 1.0, -1, False,
                          f"shape/dtype {list(actual.shape)} {actual.dtype} vs {list(expected.shape)} {expected.dtype}")
    a, e = actual.cpu(), expected.cpu()
    if a.dtype in BITWISE:
        ab, eb = a.view(torch.uint8), e.view(torch.uint8)
        bad = int((ab != eb).sum())
        return Comparison(float((a.float() - e.float()).abs().max()) if a.numel() else 0.0,
                          calc_diff(a.float(), e.float()), bad, bad == 0, "bitwise")
    if not a.is_floating_point():
        if as_sets:
            bad = int((a.sort(-1).values != e.sort(-1).values).any(-1).sum())
            return Comparison(0.0, 0.0, bad, bad == 0, "same set per row")
        bad = int((a != e).sum())
        return Comparison(0.0, 0.0, bad, bad == 0, "exact")
    nan_mismatch = int((a.isnan() != e.isnan()).sum())
    atol, rtol, max_diff = FLOAT_RULES.get(a.dtype, FLOAT_RULES[torch.float32])
    af, ef = a.double().nan_to_num(), e.double().nan_to_num()
    err = (af - ef).abs()
    bad = int((err > atol + rtol * ef.abs()).sum()) + nan_mismatch
    diff = calc_diff(af, ef)
    return Comparison(float(err.max()) if err.numel() else 0.0, diff, bad,
                      bad == 0 and diff <= max_diff, f"atol {atol:g} rtol {rtol:g} diff<={max_diff:g}")


def _by_expert_id(out: Any) -> list[torch.Tensor]:
    """moe_gate's (weights, ids) with each row's slots sorted by expert id (slot order is unspecified)."""
    weights, ids = out
    ids_sorted, order = ids.sort(-1)
    return [weights.gather(-1, order), ids_sorted]


def compare_outputs(op: str, actual: Any, expected: Any) -> list[Comparison]:
    """Compare every output of ``op``."""
    if op == "moe_gate":
        actual, expected = _by_expert_id(actual), _by_expert_id(expected)
    acts, exps = _as_list(actual), _as_list(expected)
    if len(acts) != len(exps):
        return [Comparison(float("inf"), 1.0, -1, False, f"{len(acts)} outputs vs {len(exps)}")]
    return [compare_tensor(a, e, as_sets=op in SET_COMPARED_OPS) for a, e in zip(acts, exps)]
