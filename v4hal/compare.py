"""The numerics policy: how an implementation's outputs are compared with the reference's.

One rules table, keyed by (op, output dtype), is read by ``v4hal parity``, the verification step of
``v4hal bench``, model-level parity and the tests' assert helpers:

- ``DTYPE_RULES``: the default per output dtype (floats: elementwise ``atol + rtol * |expected|``
  and a bound on the cosine-style distance ``calc_diff``, an infinity equal only to the same infinity;
  fp8 / uint8 (packed FP4) / e8m0: bit for bit; integers: exactly);
- ``OP_RULES``: per-op overrides, keyed by ``(op, dtype)`` or ``(op, None)`` for every floating
  output of the op (FP8/FP4 GEMMs by cosine distance, indexer top-k as a set per row, ...);
- ``SLOT_ORDER_FREE``: ops whose output slots have no specified order (``moe_gate``'s top-k slots),
  normalised before the rules apply;
- ``PEER_RULE``: other libraries computing the same function by another algorithm (bench peers).

``rule_for(op, dtype)`` resolves a rule; ``compare_outputs(op, actual, expected, args)`` applies it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch

__all__ = ["Rule", "Comparison", "calc_diff", "rule_for", "set_rule", "compare_tensor", "compare_outputs",
           "passed", "with_bound", "BITWISE", "EXACT", "DTYPE_RULES", "OP_RULES", "SLOT_ORDER_FREE", "PEER_RULE",
           "MODEL_HIDDEN", "MODEL_LOGITS"]

KINDS = ("close", "cosine", "bitwise", "exact", "set_per_row")


@dataclass(frozen=True)
class Rule:
    """How one output tensor passes.

    ``kind``: "close" (every element within ``atol + rtol * |expected|``, NaN where the reference
    has NaN, and ``calc_diff <= max_diff``), "cosine" (``calc_diff <= max_diff`` only), "bitwise"
    (the same bytes), "exact" (equal values) or "set_per_row" (integer rows equal as sets; with
    scores, a row that differs passes when the picked entries' scores sum the same within ``rtol``,
    i.e. it differs only by ties).
    """

    kind: str
    atol: float = 0.0
    rtol: float = 0.0
    max_diff: float = math.inf

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Rule: kind must be one of {KINDS}, got {self.kind!r}")

    def describe(self) -> str:
        """A short text for tables: ``atol 0.016 rtol 0.016 diff<=5e-05``."""
        if self.kind == "close":
            return f"atol {self.atol:g} rtol {self.rtol:g} diff<={self.max_diff:g}"
        if self.kind == "cosine":
            return f"calc_diff<={self.max_diff:g}"
        if self.kind == "set_per_row":
            return "same set per row" + (f" (ties: score sum rtol {self.rtol:g})" if self.rtol else "")
        return self.kind


BITWISE = Rule("bitwise")
EXACT = Rule("exact")

#: default rule per output dtype
DTYPE_RULES: dict[torch.dtype, Rule] = {
    torch.float64: Rule("close", 1e-10, 1e-10, 1e-12),
    torch.float32: Rule("close", 1e-5, 1e-5, 1e-7),
    torch.float16: Rule("close", 2e-3, 2e-3, 1e-5),
    torch.bfloat16: Rule("close", 1.6e-2, 1.6e-2, 5e-5),
    torch.float8_e4m3fn: BITWISE,
    torch.float8_e8m0fnu: BITWISE,
    torch.uint8: BITWISE,            # packed FP4 (e2m1) codes
    torch.int8: EXACT, torch.int16: EXACT, torch.int32: EXACT, torch.int64: EXACT, torch.bool: EXACT,
}

#: the v4-mini graph compared layer by layer (``v4hal parity --model``): activation quantization turns
#: a one-ulp bf16 difference upstream into a whole quantization step downstream, so two correct
#: backends drift apart by ~1e-3 over a few layers; a wrong kernel shows as 1e-1..1.
MODEL_HIDDEN = "model.hidden"
MODEL_LOGITS = "model.logits"

#: per-op overrides: (op, dtype) or (op, None) for every floating output of the op
OP_RULES: dict[tuple[str, torch.dtype | None], Rule] = {
    # FP8/FP4 GEMMs: the order of the fp32 accumulation over K differs between kernels, so the
    # products are compared by cosine distance (DeepGEMM's metric), not element by element
    ("fp8_gemm", None): Rule("cosine", max_diff=2e-4),
    ("fp4_gemm", None): Rule("cosine", max_diff=2e-4),
    ("grouped_gemm", None): Rule("cosine", max_diff=2e-4),
    # two GEMMs with the intermediate activation quantized: a rounding flip moves a whole FP8 step
    ("moe_experts", None): Rule("cosine", max_diff=1e-3),
    # a permutation copies rows: bit for bit
    ("moe_dispatch", None): BITWISE,
    # paged caches: the written bytes (a bf16 cache too) and the dequantized entries are fully specified
    ("paged_cache_write", None): BITWISE,
    ("paged_cache_read", None): BITWISE,
    # top-k order is unspecified: the same set per row (ties may pick either entry)
    ("indexer_topk", torch.int32): Rule("set_per_row", rtol=1e-5),
    ("indexer_topk_paged", torch.int32): Rule("set_per_row", rtol=1e-5),
    ("indexer_topk_paged_sparse", torch.int32): Rule("set_per_row", rtol=1e-5),
    (MODEL_HIDDEN, torch.float32): Rule("cosine", max_diff=2e-2),
    (MODEL_LOGITS, torch.float32): Rule("cosine", max_diff=2e-2),
    # sparse_attn_paged: out by the bf16 default (as sparse_attn); lse (fp32, +inf for a query with no pick:
    # equal only to +inf) elementwise, a little looser in atol for lse near 0
    ("sparse_attn_paged", torch.float32): Rule("close", 2e-5, 1e-5, 1e-7),
}

#: ops whose float outputs hold infinities by contract (logits past a context are -inf; the lse of a
#: query with no pick is +inf); any other infinity in a reference output marks a broken case
INFINITE_OUTPUTS: frozenset[str] = frozenset({"indexer_logits_paged", "indexer_logits_paged_sparse",
                                              "sparse_attn_paged"})

#: a peer (another library's algorithm for the same function, e.g. bf16 matmul on dequantized
#: operands, gather + SDPA) agrees in direction, not element by element
PEER_RULE = Rule("cosine", max_diff=1e-3)


def _by_expert_id(outputs: list[torch.Tensor], _args: Sequence[Any] | None) -> list[torch.Tensor]:
    """moe_gate's (weights, ids) with each row's slots sorted by expert id."""
    weights, ids = outputs
    ids_sorted, order = ids.sort(-1)
    return [weights.gather(-1, order), ids_sorted]


#: op -> normaliser of its outputs (slot order unspecified), applied to both sides before comparing
SLOT_ORDER_FREE: dict[str, Callable[[list[torch.Tensor], Sequence[Any] | None], list[torch.Tensor]]] = {
    "moe_gate": _by_expert_id,
}


def _indexer_scores(args: Sequence[Any]) -> tuple[torch.Tensor, int]:
    """indexer_topk's scores ``[b, m, t]`` (the reference's index_scores) and its index offset."""
    from v4hal.hal.dispatch import use_backend

    q, k, weights = args[0], args[1], args[2]
    offset = int(args[6]) if len(args) > 6 else 0
    with use_backend("reference"):
        return torch.ops.v4hal.index_scores(q, k, weights).float().cpu(), offset


def _paged_indexer_scores(args: Sequence[Any]) -> tuple[torch.Tensor, int]:
    """indexer_topk_paged's logits ``[b, next_n, max_blocks * block size]`` (the reference's) and its offset."""
    from v4hal.hal.dispatch import use_backend

    q, kv_cache, weights, context_lens, block_table = args[:5]
    layout = args[6] if len(args) > 6 else "indexer_fp4"
    offset = int(args[7]) if len(args) > 7 else 0
    width = block_table.shape[1] * kv_cache.shape[1]
    with use_backend("reference"):
        logits = torch.ops.v4hal.indexer_logits_paged(q, kv_cache, weights, context_lens, block_table, width, layout)
    return logits.view(q.shape[0], q.shape[1], width).float().cpu(), offset


def _sparse_indexer_scores(args: Sequence[Any]) -> tuple[torch.Tensor, int]:
    """indexer_topk_paged_sparse's scores by position: the reference's dense logits (those of the candidate
    positions are the same bits) and its offset."""
    q, kv_cache, weights, context_lens, block_table = args[:5]
    layout = args[8] if len(args) > 8 else "indexer_fp4"
    offset = int(args[9]) if len(args) > 9 else 0
    return _paged_indexer_scores([q, kv_cache, weights, context_lens, block_table, 0, layout, 0])[0], offset


#: op -> what a "set_per_row" rule needs to recognise ties: (scores [..., t], index offset)
TIE_SCORES: dict[str, Callable[[Sequence[Any]], tuple[torch.Tensor, int]]] = {
    "indexer_topk": _indexer_scores,
    "indexer_topk_paged": _paged_indexer_scores,
    "indexer_topk_paged_sparse": _sparse_indexer_scores,
}


def set_rule(op: str, dtype: torch.dtype | None, rule: Rule) -> None:
    """Add or replace the rule of ``op``'s outputs of ``dtype`` (None: every floating output)."""
    OP_RULES[(op, dtype)] = rule


def rule_for(op: str | None, dtype: torch.dtype) -> Rule:
    """The rule for an output of ``dtype`` of ``op`` (None: the dtype's default)."""
    if op is not None:
        rule = OP_RULES.get((op, dtype))
        if rule is None and (dtype.is_floating_point and dtype.itemsize >= 2):
            rule = OP_RULES.get((op, None))
        if rule is not None:
            return rule
    return DTYPE_RULES.get(dtype, DTYPE_RULES[torch.float32])


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


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _max_abs(a: torch.Tensor, e: torch.Tensor) -> float:
    if not a.numel():
        return 0.0
    err = (a.double() - e.double()).abs()
    return float(err.nan_to_num(nan=math.inf).max())


def compare_tensor(actual: torch.Tensor, expected: torch.Tensor, rule: Rule,
                   tie_scores: tuple[torch.Tensor, int] | None = None) -> Comparison:
    """Compare one output with ``rule``; ``tie_scores`` (scores, offset) lets "set_per_row" accept ties."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return Comparison(math.inf, math.inf, -1, False,
                          f"shape/dtype {list(actual.shape)} {actual.dtype} vs {list(expected.shape)} {expected.dtype}")
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if rule.kind == "bitwise":
        bad = int((_bits(a) != _bits(e)).sum())
        fa, fe = a.float(), e.float()
        return Comparison(_max_abs(fa, fe), calc_diff(fa.nan_to_num(), fe.nan_to_num()), bad, bad == 0,
                          rule.describe())
    if rule.kind == "exact":
        bad = int((a != e).sum())
        return Comparison(_max_abs(a, e) if a.numel() else 0.0, 0.0, bad, bad == 0, rule.describe())
    if rule.kind == "set_per_row":
        differs = (a.sort(-1).values != e.sort(-1).values).any(-1)
        if tie_scores is not None and bool(differs.any()):
            differs = differs & ~_same_score(a, e, *tie_scores, rule.rtol)
        bad = int(differs.sum())
        return Comparison(0.0, 0.0, bad, bad == 0, rule.describe())
    nan_mismatch = int((a.isnan() != e.isnan()).sum()) if a.is_floating_point() else 0
    af, ef = a.double().nan_to_num(), e.double().nan_to_num()
    err = (af - ef).abs()
    if rule.kind == "cosine":  # a direction: any NaN or inf fails (calc_diff is inf)
        diff = calc_diff(a, e)
        return Comparison(float(err.max()) if err.numel() else 0.0, diff, nan_mismatch,
                          nan_mismatch == 0 and diff <= rule.max_diff, rule.describe())
    if a.is_floating_point():  # "close": the same infinity on both sides (masked logits) is equal
        same_inf = a.isinf() & (a == e)
        if bool(same_inf.any()):
            af, ef = af.masked_fill(same_inf, 0.0), ef.masked_fill(same_inf, 0.0)
            err = (af - ef).abs()
    diff = calc_diff(af, ef)
    bad = int((err > rule.atol + rule.rtol * ef.abs()).sum()) + nan_mismatch
    return Comparison(float(err.max()) if err.numel() else 0.0, diff, bad,
                      bad == 0 and diff <= rule.max_diff, rule.describe())


def _same_score(a: torch.Tensor, e: torch.Tensor, scores: torch.Tensor, offset: int, rtol: float) -> torch.Tensor:
    """Rows where both index sets pick as many valid entries with the same total score (ties)."""
    def picked(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = idx >= 0
        pos = (idx.long() - offset).clamp(0, scores.shape[-1] - 1)
        return torch.where(valid, scores.gather(-1, pos), 0).double().sum(-1), valid.sum(-1)

    sa, na = picked(a)
    se, ne = picked(e)
    return (na == ne) & ((sa - se).abs() <= rtol * se.abs().clamp(min=1e-6))


def _as_list(out: Any) -> list[torch.Tensor]:
    if out is None:
        return []
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _as_list(o)]


def compare_outputs(op: str, actual: Any, expected: Any, args: Sequence[Any] | None = None,
                    rule: Rule | None = None) -> list[Comparison]:
    """Compare every output of ``op`` (a tensor or a tuple of them) with the rules table.

    ``args``: the op's schema arguments of the call, for rules that read the inputs (ties of
    ``indexer_topk``); ``rule``: one rule for every output instead of the table's (e.g. ``PEER_RULE``).
    """
    acts, exps = _as_list(actual), _as_list(expected)
    if len(acts) != len(exps):
        return [Comparison(math.inf, math.inf, -1, False, f"{len(acts)} outputs vs {len(exps)}")]
    normalise = SLOT_ORDER_FREE.get(op)
    if normalise is not None:
        acts, exps = normalise(acts, args), normalise(exps, args)
    ties = None
    out = []
    for a, e in zip(acts, exps):
        r = rule or rule_for(op, e.dtype)
        if r.kind == "set_per_row" and args is not None and op in TIE_SCORES and ties is None:
            ties = TIE_SCORES[op](args)
        out.append(compare_tensor(a, e, r, ties if r.kind == "set_per_row" else None))
    return out


def passed(results: Sequence[Comparison]) -> bool:
    """True when every output passed."""
    return all(r.passed for r in results)


def with_bound(rule: Rule, max_diff: float) -> Rule:
    """``rule`` with another ``calc_diff`` bound (a command-line tolerance)."""
    return replace(rule, max_diff=max_diff)
