"""The case catalogue (`v4hal.cases`) and the numerics table (`v4hal.compare`)."""
from __future__ import annotations

import pytest
import torch

import v4hal
from tests.numerics import TOLERANCES, assert_op_matches
from v4hal import cases, compare
from v4hal.bench import cases as bench_cases
from v4hal.hal.errors import RangeError, ShapeError


def test_every_public_op_has_tiny_cases_and_every_shape_set_passes_the_op_checks() -> None:
    assert set(v4hal.PUBLIC_OPS) <= set(cases.case_ops())
    for op in cases.case_ops():
        case = cases.get_case(op)
        assert case.tiny and case.bound in ("matmul", "memory")
        for name in cases.SHAPE_SETS:
            for label, shape in case.shape_set(name):
                flops, nbytes, dtype = case.work(shape)  # fake tensors: runs the op's structural checks only
                assert nbytes > 0 and flops >= 0 and dtype, (op, name, label)
    # the V4 presets: every op of a layer appears in decode or prefill
    flash = {op for op in cases.case_ops() for m in cases.MODES if cases.get_case(op).shape_set(f"v4-flash/{m}")}
    assert flash == set(v4hal.PUBLIC_OPS)


def test_tiny_cases_hold_odd_sizes_masked_indices_and_empty_experts() -> None:
    q, kv, sink, idx, scale = cases.make_case("sparse_attn", cases.tiny_cases("sparse_attn")[0][1])
    assert bool((idx == -1).any()) and bool((idx[0, 0] == -1).all()) and q.shape[2] == 5
    _, _, offsets, *_ = cases.make_case("grouped_gemm", cases.tiny_cases("grouped_gemm")[0][1])
    assert int(offsets[-1] - offsets[-2]) == 0 and int(offsets[-1]) == 33
    _, ids, e = cases.make_case("moe_dispatch", cases.tiny_cases("moe_dispatch")[0][1])
    assert not bool((ids == e - 1).any())


def test_make_case_is_seeded() -> None:
    shape = {"m": 3, "k": 256}
    a, b, c = (cases.make_case("act_quant", shape, seed=s)[0] for s in (4, 4, 5))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.bfloat16 and list(a.shape) == [3, 256]


def test_shapes_are_checked_by_the_op() -> None:
    with pytest.raises(RangeError, match="unknown parameters"):
        cases.make_case("rms_norm", {"t": 2, "d": 8, "dim": 8})
    with pytest.raises(RangeError, match="missing parameters"):
        cases.make_case("rms_norm", {"t": 2})
    with pytest.raises(RangeError, match="no case for op"):
        cases.make_case("conv2d", {})
    # K = 192 is not a whole number of 128-blocks: refused by the op's own check, nothing allocated
    with pytest.raises(ShapeError, match="divisible by block_size"):
        bench_cases.bench_case("fp8_gemm", {"m": 4, "n": 128, "k": 192}, "k192")
    with pytest.raises(RangeError, match="declared"):
        cases.register_case(cases.OpCase("no_such_op", lambda g, s: [], {}, tiny=[{}]))


def test_rules_table() -> None:
    assert compare.rule_for("act_quant", torch.float8_e4m3fn).kind == "bitwise"
    assert compare.rule_for("fp4_act_quant", torch.uint8).kind == "bitwise"
    assert compare.rule_for("act_quant", torch.float8_e8m0fnu).kind == "bitwise"
    assert compare.rule_for("indexer_topk", torch.int32).kind == "set_per_row"
    assert compare.rule_for("fp8_gemm", torch.bfloat16).kind == "cosine"
    assert compare.rule_for("fp8_gemm", torch.float32).kind == "cosine"
    assert compare.rule_for("rms_norm", torch.bfloat16) == compare.DTYPE_RULES[torch.bfloat16]
    assert compare.rule_for(None, torch.int64).kind == "exact"
    assert TOLERANCES[torch.bfloat16] == (1.6e-2, 1.6e-2) and TOLERANCES[torch.float32] == (1e-5, 1e-5)


def test_close_bitwise_and_cosine_rules() -> None:
    x = torch.randn(64, generator=torch.Generator().manual_seed(0))
    bf16 = compare.DTYPE_RULES[torch.bfloat16]
    assert compare.compare_tensor(x.bfloat16(), x.bfloat16(), bf16).passed
    assert not compare.compare_tensor((x * 1.1).bfloat16(), x.bfloat16(), bf16).passed
    zeros = torch.zeros(4).to(torch.float8_e4m3fn)
    assert not compare.compare_tensor((-torch.zeros(4)).to(torch.float8_e4m3fn), zeros, compare.BITWISE).passed
    cosine = compare.Rule("cosine", max_diff=1e-4)
    assert compare.compare_tensor(x + 1e-4, x, cosine).passed
    assert not compare.compare_tensor(torch.where(x > 2, float("nan"), x), x, cosine).passed
    assert not compare.compare_tensor(x[:3], x[:4], cosine).passed  # shape mismatch


def test_moe_gate_slots_are_order_free() -> None:
    weights = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    ids = torch.tensor([[3, 1], [0, 2]], dtype=torch.int32)
    assert_op_matches("moe_gate", (weights.flip(-1), ids.flip(-1)), (weights, ids))
    with pytest.raises(AssertionError, match="moe_gate"):
        assert_op_matches("moe_gate", (weights, torch.tensor([[3, 2], [0, 2]], dtype=torch.int32)), (weights, ids))


def test_topk_sets_per_row_accept_ties_only() -> None:
    rule = compare.rule_for("indexer_topk", torch.int32)
    expected = torch.tensor([[[0, 2, -1]]], dtype=torch.int32)
    reordered = torch.tensor([[[2, 0, -1]]], dtype=torch.int32)
    other = torch.tensor([[[0, 1, -1]]], dtype=torch.int32)
    assert compare.compare_tensor(reordered, expected, rule).passed
    assert not compare.compare_tensor(other, expected, rule).passed
    tie = torch.tensor([[[5.0, 3.0, 3.0]]])
    assert compare.compare_tensor(other, expected, rule, (tie, 0)).passed          # entries 1 and 2 tie
    no_tie = torch.tensor([[[5.0, 2.0, 3.0]]])
    assert not compare.compare_tensor(other, expected, rule, (no_tie, 0)).passed
