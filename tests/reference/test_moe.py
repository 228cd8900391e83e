"""Reference MoE routing (moe_gate, moe_dispatch, moe_combine) against independent float64 formulas.

These tests are the oracle for every later backend: the expectations are written here from the
spec (V4_OPS.md section 8, public ``inference/model.py`` ``Gate``) with Python loops in float64,
never by calling the code under test.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from v4hal.backends.reference.moe import moe_combine, moe_dispatch, moe_gate
from v4hal.hal.errors import DTypeError, RangeError, ShapeError

try:
    from tests.numerics import assert_close
except ImportError:  # pytest put tests/ itself on sys.path
    from numerics import assert_close

D = 32


def _score64(logit: float, score_func: str, row: list[float]) -> float:
    """One expert's float64 score; ``row`` = all logits of the token (for softmax)."""
    if score_func == "sqrtsoftplus":
        return math.sqrt(math.log1p(math.exp(logit)) if logit < 30 else logit)
    if score_func == "sigmoid":
        return 1.0 / (1.0 + math.exp(-logit))
    mx = max(row)
    return math.exp(logit - mx) / sum(math.exp(v - mx) for v in row)


def _gate64(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, score_func: str):
    """float64 scores [T][E] and biased choice scores [T][E], as Python lists (loops over t, e)."""
    x64, w64 = x.double().tolist(), w.double().tolist()
    scores, choice = [], []
    for t in range(len(x64)):
        logits = [sum(a * b for a, b in zip(x64[t], w64[e])) for e in range(len(w64))]
        s = [_score64(v, score_func, logits) for v in logits]
        scores.append(s)
        choice.append([v + (0.0 if bias is None else float(bias[e])) for e, v in enumerate(s)])
    return scores, choice


def _expected_weights(scores: list[list[float]], idx: torch.Tensor, score_func: str, route_scale: float):
    out = []
    for t, row in enumerate(idx.tolist()):
        picked = [scores[t][e] for e in row]
        denom = sum(picked) if score_func != "softmax" else 1.0
        out.append([p / denom * route_scale for p in picked])
    return torch.tensor(out, dtype=torch.float64).reshape(idx.shape)


def _check_choice(idx: torch.Tensor, choice: list[list[float]], topk: int, tol: float = 1e-5) -> None:
    """idx holds a top-k of ``choice`` (float64), listed in descending order; near ties may swap."""
    for t, row in enumerate(idx.tolist()):
        assert len(set(row)) == topk, f"token {t}: duplicate experts {row}"
        want = sorted(range(len(choice[t])), key=lambda e: -choice[t][e])[:topk]
        got_vals = [choice[t][e] for e in row]
        want_vals = [choice[t][e] for e in want]
        for g, w in zip(got_vals, want_vals):
            assert abs(g - w) <= tol * max(1.0, abs(w)), f"token {t}: picked {row}, expected {want}"
        for a, b in zip(got_vals, got_vals[1:]):
            assert a >= b - tol, f"token {t}: not in descending order {row}"


def _make_gate_inputs(t: int, e: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, D, generator=g).to(dtype)
    w = (torch.randn(e, D, generator=g) / math.sqrt(D)).to(dtype)
    bias = torch.randn(e, generator=g) * 0.1
    return x, w, bias


@pytest.mark.parametrize("score_func", ["sqrtsoftplus", "softmax", "sigmoid"])
@pytest.mark.parametrize("num_experts,topk", [(1, 1), (8, 1), (8, 6), (256, 1), (256, 6)])
@pytest.mark.parametrize("tokens", [0, 1, 7, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_bias", [False, True])
def test_moe_gate_vs_float64(score_func, num_experts, topk, tokens, dtype, use_bias) -> None:
    seed = zlib.crc32(repr((score_func, num_experts, topk, tokens, dtype, use_bias)).encode())
    x, w, bias = _make_gate_inputs(tokens, num_experts, dtype, seed)
    bias = bias if use_bias else None
    route_scale = 1.5
    weights, idx = moe_gate(x, w, topk, bias, score_func, route_scale)
    assert weights.dtype == torch.float32 and idx.dtype == torch.int32
    assert weights.shape == (tokens, topk) and idx.shape == (tokens, topk)
    assert bool(((idx >= 0) & (idx < num_experts)).all())
    scores, choice = _gate64(x, w, bias, score_func)
    _check_choice(idx, choice, topk)
    expected = _expected_weights(scores, idx, score_func, route_scale)
    assert_close(weights, expected, torch.float32, atol=2e-6, rtol=2e-6)
    if score_func != "softmax" and tokens:
        torch.testing.assert_close(weights.double().sum(-1), torch.full((tokens,), route_scale, dtype=torch.float64))


def test_moe_gate_softmax_not_renormalised() -> None:
    x, w, _ = _make_gate_inputs(5, 8, torch.float32, 1)
    weights, idx = moe_gate(x, w, 2, score_func="softmax", route_scale=2.0)
    probs = torch.softmax(x.double() @ w.double().T, dim=-1)
    torch.testing.assert_close(weights.double(), 2.0 * probs.gather(1, idx.long()), atol=1e-6, rtol=1e-6)
    assert bool((weights.sum(-1) < 2.0 - 1e-3).all())


def test_moe_gate_bias_changes_choice_not_weights() -> None:
    x, w, _ = _make_gate_inputs(16, 8, torch.float32, 2)
    _, idx_plain = moe_gate(x, w, 2)
    bias = torch.zeros(8)
    bias[[5, 3]] = torch.tensor([10.0, 9.0])  # forces experts 5 then 3 for every token
    weights, idx = moe_gate(x, w, 2, bias=bias, route_scale=1.5)
    assert idx.tolist() == [[5, 3]] * 16
    assert not torch.equal(idx_plain.sort(-1).values, idx.sort(-1).values)
    s = torch.nn.functional.softplus(x.double() @ w.double().T).sqrt()[:, [5, 3]]
    torch.testing.assert_close(weights.double(), 1.5 * s / s.sum(-1, keepdim=True), atol=1e-6, rtol=1e-6)
    biased = s + bias[[5, 3]].double()
    assert not torch.allclose(weights.double(), 1.5 * biased / biased.sum(-1, keepdim=True), atol=1e-3)


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("score_func", ["sqrtsoftplus", "sigmoid", "softmax"])
def test_moe_gate_hash_routing(ids_dtype, score_func) -> None:
    g = torch.Generator().manual_seed(3)
    vocab, e, k, t = 50, 16, 6, 9
    x, w, bias = _make_gate_inputs(t, e, torch.bfloat16, 4)
    tid2eid = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(vocab)]).to(torch.int32)
    input_ids = torch.randint(0, vocab, (t,), generator=g, dtype=ids_dtype)
    weights, idx = moe_gate(x, w, k, bias, score_func, 2.5, tid2eid, input_ids)
    assert torch.equal(idx, tid2eid[input_ids.long()])  # table order kept, bias unused
    scores, _ = _gate64(x, w, None, score_func)
    assert_close(weights, _expected_weights(scores, idx, score_func, 2.5), torch.float32, atol=2e-6, rtol=2e-6)


def test_moe_gate_route_scale_is_linear() -> None:
    x, w, bias = _make_gate_inputs(6, 8, torch.float32, 5)
    w1, i1 = moe_gate(x, w, 3, bias, route_scale=1.0)
    w2, i2 = moe_gate(x, w, 3, bias, route_scale=2.5)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(w2, 2.5 * w1)


def test_moe_gate_errors() -> None:
    x, w, bias = _make_gate_inputs(4, 8, torch.float32, 6)
    tid2eid = torch.zeros(10, 2, dtype=torch.int32)
    ids = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(RangeError, match="score_func"):
        torch.ops.v4hal.moe_gate(x, w, 2, score_func="relu")
    with pytest.raises(RangeError, match="topk"):
        torch.ops.v4hal.moe_gate(x, w, 9)
    with pytest.raises(ShapeError, match="tid2eid"):
        torch.ops.v4hal.moe_gate(x, w, 2, tid2eid=tid2eid)
    with pytest.raises(RangeError, match="input_ids"):
        torch.ops.v4hal.moe_gate(x, w, 2, tid2eid=tid2eid, input_ids=torch.full((4,), 10))
    with pytest.raises(RangeError, match="tid2eid"):
        torch.ops.v4hal.moe_gate(x, w, 2, tid2eid=torch.full((10, 2), 8, dtype=torch.int32), input_ids=ids)
    with pytest.raises(DTypeError, match="bias"):
        torch.ops.v4hal.moe_gate(x, w, 2, bias=bias.double())
    with pytest.raises(ShapeError, match="bias"):
        torch.ops.v4hal.moe_gate(x, w, 2, bias=bias[:4])
    with pytest.raises(ShapeError, match="tid2eid"):
        torch.ops.v4hal.moe_gate(x, w, 3, tid2eid=tid2eid, input_ids=ids)
    with pytest.raises(ShapeError, match="weight"):
        torch.ops.v4hal.moe_gate(x, w[:, :5], 2)


# ---------------------------------------------------------------- dispatch / combine

def _expected_dispatch(indices: torch.Tensor, num_experts: int):
    """Loop formula: flat slots grouped by expert, ascending flat index inside each expert."""
    rows = indices.tolist()
    k = indices.shape[1]
    order, offsets = [], [0]
    for e in range(num_experts):
        for t, row in enumerate(rows):
            for j, ex in enumerate(row):
                if ex == e:
                    order.append(t * k + j)
        offsets.append(len(order))
    return order, offsets


def _random_indices(t: int, k: int, e: int, g: torch.Generator, distinct: bool = True) -> torch.Tensor:
    if distinct and k <= e:
        rows = [torch.randperm(e, generator=g)[:k] for _ in range(t)]
        return (torch.stack(rows) if rows else torch.empty(0, k, dtype=torch.int64)).to(torch.int32)
    return torch.randint(0, e, (t, k), generator=g, dtype=torch.int32)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _check_dispatch(x: torch.Tensor, indices: torch.Tensor, num_experts: int) -> tuple:
    x_sorted, offsets, s2f = moe_dispatch(x, indices, num_experts)
    t, k = indices.shape
    order, exp_offsets = _expected_dispatch(indices, num_experts)
    assert x_sorted.dtype == x.dtype and x_sorted.shape == (t * k, x.shape[1])
    assert offsets.dtype == torch.int64 and offsets.tolist() == exp_offsets
    assert s2f.dtype == torch.int64 and s2f.tolist() == order
    assert sorted(order) == list(range(t * k))  # a permutation of the flat slots
    expected_rows = torch.stack([x[f // k] for f in order]) if order else x.new_empty(0, x.shape[1])
    assert torch.equal(_bits(x_sorted), _bits(expected_rows))  # a bitwise copy
    return x_sorted, offsets, s2f


@pytest.mark.parametrize("num_experts", [1, 8, 256])
@pytest.mark.parametrize("topk", [1, 6])
@pytest.mark.parametrize("tokens", [0, 1, 7, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_moe_dispatch_vs_loop(num_experts, topk, tokens, dtype) -> None:
    g = torch.Generator().manual_seed(num_experts * 1000 + topk * 100 + tokens)
    x = torch.randn(tokens, D, generator=g).to(dtype)
    indices = _random_indices(tokens, topk, num_experts, g, distinct=topk <= num_experts)
    x_sorted, offsets, s2f = _check_dispatch(x, indices, num_experts)
    again = moe_dispatch(x, indices, num_experts)
    assert torch.equal(again[1], offsets) and torch.equal(again[2], s2f)  # deterministic


def test_moe_dispatch_empty_experts_and_repeats() -> None:
    x = torch.randn(5, 4)
    # experts 0, 1, 3, 4, 6, 7 get nothing; token 2 sends both slots to expert 5 (not distinct)
    indices = torch.tensor([[5, 2], [2, 5], [5, 5], [2, 2], [5, 2]], dtype=torch.int32)
    _, offsets, s2f = _check_dispatch(x, indices, 8)
    assert offsets.tolist() == [0, 0, 0, 5, 5, 5, 10, 10, 10]
    assert s2f.tolist() == [1, 2, 6, 7, 9, 0, 3, 4, 5, 8]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens,topk,num_experts", [(0, 6, 8), (1, 1, 1), (7, 6, 8), (33, 6, 256), (20, 1, 8)])
def test_moe_combine_vs_float64(dtype, tokens, topk, num_experts) -> None:
    g = torch.Generator().manual_seed(tokens * 7 + topk)
    x = torch.randn(tokens, D, generator=g).to(dtype)
    indices = _random_indices(tokens, topk, num_experts, g)
    x_sorted, _, s2f = moe_dispatch(x, indices, num_experts)
    y = (torch.randn(tokens * topk, D, generator=g)).to(dtype)  # arbitrary expert outputs
    weights = torch.rand(tokens, topk, generator=g) + 0.1
    out = moe_combine(y, weights, s2f)
    assert out.dtype == dtype and out.shape == (tokens, D)
    # float64 loop: find the sorted row of each (t, j) through sorted_to_flat
    pos = {f: r for r, f in enumerate(s2f.tolist())}
    y64, w64 = y.double(), weights.double()
    expected = torch.zeros(tokens, D, dtype=torch.float64)
    for t in range(tokens):
        for j in range(topk):
            expected[t] += w64[t, j] * y64[pos[t * topk + j]]
    assert_close(out, expected, dtype)
    # fp32 in slot order j = 0..k-1 from zero, then one cast: the bitwise contract
    acc = torch.zeros(tokens, D)
    for j in range(topk):
        rows = torch.stack([y[pos[t * topk + j]] for t in range(tokens)]) if tokens else y.new_empty(0, D)
        acc = acc + weights[:, j:j + 1] * rows.float()
    assert torch.equal(out, acc.to(dtype))


@pytest.mark.parametrize("topk", [1, 2, 6])
def test_moe_round_trip_unit_weights(topk) -> None:
    g = torch.Generator().manual_seed(topk)
    x = torch.randn(13, D, generator=g).to(torch.bfloat16)
    indices = _random_indices(13, topk, 8, g)
    x_sorted, _, s2f = moe_dispatch(x, indices, 8)
    out = moe_combine(x_sorted, torch.ones(13, topk), s2f)
    # bf16 values have 8 significant bits: 1x..6x are exact in fp32, so the result is bitwise k*x
    assert torch.equal(out, (topk * x.float()).to(torch.bfloat16))
    xf = torch.randn(13, D, generator=g)
    xs, _, s2f = moe_dispatch(xf, indices, 8)
    assert_close(moe_combine(xs, torch.ones(13, topk), s2f), topk * xf.double(), torch.float32)


def test_routing_reads_no_tensor_data_on_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gate (score and hash routing), dispatch and combine leave the id checks to the op: no host sync."""
    x, w, bias = _make_gate_inputs(6, 8, torch.float32, 3)
    tid2eid = torch.randint(0, 8, (20, 2), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    ids = torch.arange(6) * 3
    want_hash = tid2eid[ids]
    def forbidden(*_args, **_kwargs):
        raise AssertionError("a reference kernel read tensor data on the host")

    for name in ("item", "tolist", "__int__", "__bool__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    weights, indices = moe_gate(x, w, 2, bias)
    _, hashed = moe_gate(x, w, 2, tid2eid=tid2eid, input_ids=ids)
    x_sorted, offsets, s2f = moe_dispatch(x, indices, 8)
    out = moe_combine(x_sorted, weights, s2f)
    monkeypatch.undo()
    assert torch.equal(hashed, want_hash)
    assert torch.equal(offsets[-1], torch.tensor(12))
    assert_close(out, x.double() * weights.double().sum(dim=1, keepdim=True), torch.float32)


def test_moe_dispatch_combine_errors() -> None:
    x = torch.randn(4, D)
    idx = torch.zeros(4, 2, dtype=torch.int32)
    with pytest.raises(DTypeError, match="indices"):
        torch.ops.v4hal.moe_dispatch(x, idx.long(), 8)
    with pytest.raises(ShapeError, match="indices"):
        torch.ops.v4hal.moe_dispatch(x, idx[:3], 8)
    with pytest.raises(RangeError, match="indices"):
        torch.ops.v4hal.moe_dispatch(x, idx + 8, 8)
    with pytest.raises(RangeError, match="indices"):
        torch.ops.v4hal.moe_dispatch(x, idx - 1, 8)
    with pytest.raises(RangeError, match="num_experts"):
        torch.ops.v4hal.moe_dispatch(x, idx, 0)
    y = torch.randn(8, D)
    with pytest.raises(RangeError, match="permutation"):
        torch.ops.v4hal.moe_combine(y, torch.ones(4, 2), torch.zeros(8, dtype=torch.int64))
    with pytest.raises(RangeError, match="permutation"):
        torch.ops.v4hal.moe_combine(y, torch.ones(4, 2), torch.arange(8) + 1)
    with pytest.raises(DTypeError, match="weights"):
        torch.ops.v4hal.moe_combine(y, torch.ones(4, 2, dtype=torch.bfloat16), torch.arange(8))
    with pytest.raises(ShapeError, match="y"):
        torch.ops.v4hal.moe_combine(y[:7], torch.ones(4, 2), torch.arange(8))
    with pytest.raises(DTypeError, match="sorted_to_flat"):
        torch.ops.v4hal.moe_combine(y, torch.ones(4, 2), torch.arange(8, dtype=torch.int32))


@settings(max_examples=60, deadline=None)
@given(tokens=st.integers(0, 24), topk=st.integers(1, 8), num_experts=st.integers(1, 20),
       dim=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_moe_dispatch_combine_property(tokens, topk, num_experts, dim, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=g)
    indices = torch.randint(0, num_experts, (tokens, topk), generator=g, dtype=torch.int32)
    x_sorted, offsets, s2f = moe_dispatch(x, indices, num_experts)
    n = tokens * topk
    assert sorted(s2f.tolist()) == list(range(n))
    assert offsets[0] == 0 and offsets[-1] == n and bool((offsets[1:] >= offsets[:-1]).all())
    flat = indices.reshape(-1).long()
    for e in range(num_experts):  # each group holds exactly its expert's slots, ascending
        group = s2f[offsets[e]:offsets[e + 1]]
        assert bool((flat[group] == e).all()) and bool((group[1:] > group[:-1]).all())
        assert int((flat == e).sum()) == len(group)
    assert torch.equal(x_sorted, x[s2f // topk])
    weights = torch.rand(tokens, topk, generator=g)
    out = moe_combine(x_sorted, weights, s2f)
    expected = (weights.double().unsqueeze(-1) * x.double().unsqueeze(1)).sum(1)
    assert_close(out, expected, torch.float32)
