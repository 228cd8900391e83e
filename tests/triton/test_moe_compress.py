"""Triton moe_gate / moe_experts / compress_kv against the reference backend, under the interpreter.

Operands: fp32/fp16 wherever a ``tl.dot`` takes them in their own dtype; bf16 where the kernels
convert to fp32 before the MMA (the gate GEMM, the bf16 grouped GEMM under the interpreter) or
where there is no MMA (compress_kv, the SwiGLU kernel), FP8/FP4 expert weights (FP8 MMA).
Output buffers start poisoned (every ``torch.empty`` returns NaN / integer max), so an element a
kernel forgets to write fails the comparison. Distances: ``calc_diff`` plus per-dtype tolerances;
expert choices are compared as sets per row (inputs are checked to be free of near-ties).
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import v4hal
from tests.numerics import assert_close, calc_diff, poisoned_empty  # noqa: F401  (fixture)
from v4hal.backends import triton as tri_backend
from v4hal.backends.reference import attention as ref_attn
from v4hal.backends.reference import moe as ref_moe
from v4hal.backends.reference import moe_experts as ref_experts
from v4hal.backends.reference import quant as ref_quant
from v4hal.backends.triton import compress as tri_compress
from v4hal.backends.triton import moe as tri_moe
from v4hal.hal import formats as F
from v4hal.hal.errors import BackendUnavailableError, DTypeError, RangeError, ShapeError

MAX_DIFF = {torch.float32: 1e-10, torch.float16: 1e-6, torch.bfloat16: 1e-5}


pytestmark = pytest.mark.usefixtures("poisoned_empty")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_close(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape, what
    assert not out.isnan().any(), f"{what}: unwritten (NaN) elements"
    assert_close(out, ref, out.dtype, msg=what)
    assert calc_diff(out, ref) <= MAX_DIFF[out.dtype], f"{what}: calc_diff {calc_diff(out, ref)}"


# ============================================================================ compress_kv
COMPRESS_CASES = [  # b, n, d, ratio, overlap, kv dtype
    (2, 16, 32, 4, True, torch.bfloat16),     # V4 ratio-4 layout, several entries
    (1, 4, 24, 4, True, torch.float32),       # one entry: no previous block at all
    (1, 8, 20, 2, True, torch.float16),       # overlap at another ratio, d not a power of two
    (1, 256, 16, 128, False, torch.float32),  # V4 ratio 128
    (2, 384, 40, 128, False, torch.bfloat16), # ratio 128, channel blocks with a ragged edge
    (2, 9, 24, 3, False, torch.float16),      # ratio not a power of two (padded window rows)
]


@pytest.mark.parametrize("b,n,d,ratio,overlap,dtype", COMPRESS_CASES)
def test_compress_kv_matches_reference(b, n, d, ratio, overlap, dtype):
    g = gen(n * 7 + d)
    c = 2 if overlap else 1
    kv = torch.randn(b, n, c * d, generator=g).to(dtype)
    score = torch.randn(b, n, c * d, generator=g) * 3.0
    ape = torch.randn(ratio, c * d, generator=g)
    out = tri_compress.compress_kv(kv, score, ape, ratio, overlap)
    check_close(out, ref_attn.compress_kv(kv, score, ape, ratio, overlap), f"compress_kv r={ratio} ov={overlap}")


def test_compress_kv_strided_score_and_peaked_softmax():
    """A score view with a row stride wider than c*d, logits far apart (one position dominates)."""
    g = gen(3)
    big = torch.randn(2, 16, 100, generator=g) * 40.0
    score = big[..., 10:74]                          # [2, 16, 64], row stride 100
    kv = torch.randn(2, 16, 64, generator=g)
    ape = torch.randn(4, 64, generator=g)
    out = tri_compress.compress_kv(kv, score, ape, 4, True)
    check_close(out, ref_attn.compress_kv(kv, score, ape, 4, True), "compress_kv strided")


def test_compress_kv_errors():
    """Invalid calls fail in the op layer; a ratio above the kernel's window is refused by the backend."""
    kv, score, ape = torch.zeros(1, 6, 8), torch.zeros(1, 6, 8), torch.zeros(4, 8)
    big = tri_compress.MAX_RATIO + 1
    with v4hal.use_backend("triton"):
        with pytest.raises(ShapeError, match=r"kv.*ratio \(4\)"):
            v4hal.compress_kv(kv, score, ape, 4, False)
        with pytest.raises(ShapeError, match="ape must be"):
            v4hal.compress_kv(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), torch.zeros(2, 8), 4, False)
        with pytest.raises(BackendUnavailableError, match=f"ratio must be <= {tri_compress.MAX_RATIO}"):
            v4hal.compress_kv(torch.zeros(1, big, 8), torch.zeros(1, big, 8), torch.zeros(big, 8), big, False)


# ============================================================================ moe_gate
def _choice_gap(x, weight, bias, score_func, topk) -> float:
    """Smallest gap between the k-th and (k+1)-th reference choice score over the rows (ties: 0)."""
    logits = torch.nn.functional.linear(x.double(), weight.double())
    scores = {"softmax": lambda v: v.softmax(-1), "sigmoid": torch.sigmoid,
              "sqrtsoftplus": lambda v: torch.nn.functional.softplus(v).sqrt()}[score_func](logits)
    choice = scores if bias is None else scores + bias.double()
    if topk == choice.shape[1]:
        return float("inf")
    top = choice.topk(topk + 1, dim=-1).values
    return float((top[:, topk - 1] - top[:, topk]).min())


def assert_same_routing(got, exp, what: str) -> None:
    """Indices equal as sets per row; the weights equal after aligning both rows by expert id."""
    (w, i), (w_ref, i_ref) = got, exp
    assert w.dtype == torch.float32 and i.dtype == torch.int32 and w.shape == w_ref.shape == i.shape, what
    i_sorted, order = i.long().sort(-1)
    i_ref_sorted, order_ref = i_ref.long().sort(-1)
    assert torch.equal(i_sorted, i_ref_sorted), f"{what}: different experts chosen"
    w_al, w_ref_al = w.gather(1, order), w_ref.gather(1, order_ref)
    assert_close(w_al, w_ref_al, torch.float32, msg=what)
    assert calc_diff(w_al, w_ref_al) <= 1e-12, what


GATE_CASES = [  # T, D, E, topk, with bias
    (7, 64, 16, 3, True),
    (1, 48, 8, 2, False),      # T = 1
    (33, 100, 40, 6, True),    # odd T over several token tiles, D not a tile multiple
    (5, 32, 1, 1, False),      # E = 1
]


@pytest.mark.parametrize("score_func", ["sqrtsoftplus", "softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t,d,e,topk,with_bias", GATE_CASES)
def test_moe_gate_matches_reference(score_func, dtype, t, d, e, topk, with_bias):
    g = gen(t * 100 + e)
    x = torch.randn(t, d, generator=g).to(dtype)
    weight = (torch.randn(e, d, generator=g) * d ** -0.5).to(dtype)
    bias = torch.randn(e, generator=g) * 0.1 if with_bias else None
    assert _choice_gap(x, weight, bias, score_func, topk) > 1e-4, "test inputs have near-ties"
    got = tri_moe.moe_gate(x, weight, topk, bias, score_func, 1.5)
    assert_same_routing(got, ref_moe.moe_gate(x, weight, topk, bias, score_func, 1.5), f"moe_gate {score_func}")


def test_moe_gate_bias_changes_the_choice_and_wide_logits():
    """The bias steers the choice (some rows differ from the unbiased top-k) while weights stay unbiased;
    logits span both sides of the softplus threshold (> 20 and < -17, where log1p accuracy matters)."""
    g = gen(11)
    x = torch.randn(24, 64, generator=g)
    weight = torch.randn(32, 64, generator=g) * 3.0
    bias = torch.randn(32, generator=g)
    logits = x @ weight.T
    assert (logits > 20).any() and (logits < -17).any()
    assert _choice_gap(x, weight, bias, "sqrtsoftplus", 4) > 1e-4
    got = tri_moe.moe_gate(x, weight, 4, bias, "sqrtsoftplus", 2.5)
    unbiased = ref_moe.moe_gate(x, weight, 4, None, "sqrtsoftplus", 2.5)[1]
    assert not torch.equal(got[1].sort(-1).values, unbiased.sort(-1).values)
    assert_same_routing(got, ref_moe.moe_gate(x, weight, 4, bias, "sqrtsoftplus", 2.5), "moe_gate biased")


def test_moe_gate_softplus_tails():
    """topk = E with logits in [-30, 30]: every score enters the weights, including the log1p tail
    (softplus of -30 is 9e-14) and the linear branch above the threshold 20."""
    t, e = 4, 8
    x = torch.eye(t)                                            # logits[t, e] = weight[e, t]
    weight = torch.linspace(-30.0, 30.0, t * e)[torch.randperm(t * e, generator=gen(1))].reshape(e, t)
    for func in ("sqrtsoftplus", "sigmoid"):
        got = tri_moe.moe_gate(x, weight, e, None, func, 1.0)
        assert_same_routing(got, ref_moe.moe_gate(x, weight, e, None, func, 1.0), f"moe_gate tails {func}")


@pytest.mark.parametrize("score_func,ids_dtype", [("sqrtsoftplus", torch.int64), ("softmax", torch.int32),
                                                  ("sigmoid", torch.int64)])
def test_moe_gate_hash_routing(score_func, ids_dtype):
    g = gen(5)
    t, d, e, k, vocab = 19, 64, 16, 3, 50
    x = torch.randn(t, d, generator=g).to(torch.bfloat16)
    weight = (torch.randn(e, d, generator=g) * 0.2).to(torch.bfloat16)
    tid2eid = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(vocab)]).to(torch.int32)
    ids = torch.randint(0, vocab, (t,), generator=g).to(ids_dtype)
    bias = torch.randn(e, generator=g)            # unused by hash routing
    w, i = tri_moe.moe_gate(x, weight, k, bias, score_func, 1.5, tid2eid, ids)
    w_ref, i_ref = ref_moe.moe_gate(x, weight, k, bias, score_func, 1.5, tid2eid, ids)
    assert torch.equal(i, i_ref), "hash routing must keep the table's order"
    assert_close(w, w_ref, torch.float32)
    assert calc_diff(w, w_ref) <= 1e-12


def test_moe_gate_no_tokens_and_errors():
    w, i = tri_moe.moe_gate(torch.zeros(0, 8), torch.zeros(4, 8), 2)
    assert w.shape == i.shape == (0, 2) and i.dtype == torch.int32
    x = torch.zeros(2, 8)
    with v4hal.use_backend("triton"):
        with pytest.raises(RangeError, match="score_func"):
            v4hal.moe_gate(x, torch.zeros(4, 8), topk=2, score_func="relu")
        with pytest.raises(RangeError, match="topk"):
            v4hal.moe_gate(x, torch.zeros(4, 8), topk=5)
        with pytest.raises(ShapeError, match="both tid2eid and input_ids"):
            v4hal.moe_gate(x, torch.zeros(4, 8), topk=2, tid2eid=torch.zeros(3, 2, dtype=torch.int32))
        with pytest.raises(BackendUnavailableError, match="softmax"):
            v4hal.moe_gate(x, torch.zeros(tri_moe.MAX_SOFTMAX_EXPERTS + 1, 8), topk=2, score_func="softmax")


# ============================================================================ moe_experts
def _routing(t: int, e: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token; expert e-1 gets no token when there is room, expert 1 neither when E > k+1."""
    banned = {e - 1, 1} if e > k + 2 else ({e - 1} if e > k else set())
    pool = torch.tensor([i for i in range(e) if i not in banned])
    ids = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(t)]).to(torch.int32)
    w = torch.rand(t, k, generator=g) + 0.1
    return w / w.sum(-1, keepdim=True), ids


def _experts_case(t, d, inter, e, k, fmt, dtype, x_scale, seed, scale_fmt="ue8m0"):
    g = gen(seed)
    x = (torch.randn(t, d, generator=g) * x_scale).to(dtype)
    weights, ids = _routing(t, e, k, g)
    ws = [torch.randn(e, inter, d, generator=g) * d ** -0.5, torch.randn(e, d, inter, generator=g) * inter ** -0.5,
          torch.randn(e, inter, d, generator=g) * d ** -0.5]
    if fmt == "float":
        return x, weights, ids, [w.to(dtype) for w in ws] + [None, None, None], ws
    if fmt == "fp8":
        q = [ref_quant.quant_weight_fp8(w, 128, scale_fmt) for w in ws]
    else:
        q = [ref_quant.quant_weight_fp4(w, 32) for w in ws]
    return x, weights, ids, [q[0][0], q[1][0], q[2][0], q[0][1], q[1][1], q[2][1]], ws


def _clamps(x, ids, ws, limit) -> tuple[bool, bool]:
    """Whether some routed gate pre-activation exceeds the limit and some |up| does (float weights)."""
    xf = x.float()
    gate = torch.einsum("td,tkid->tki", xf, ws[0][ids.long()])
    up = torch.einsum("td,tkid->tki", xf, ws[2][ids.long()])
    return bool((gate > limit).any()), bool((up.abs() > limit).any())


EXPERT_CASES = [  # T, D, I, E, k, fmt, dtype, swiglu_limit, x scale, scale_fmt
    (9, 64, 96, 6, 2, "float", torch.float32, 10.0, 4.0, None),    # clamped values, empty experts
    (7, 64, 32, 5, 3, "float", torch.float16, 0.0, 1.0, None),     # odd T, no clamp
    (1, 64, 64, 1, 1, "float", torch.float16, 10.0, 4.0, None),    # T = 1, E = 1
    (9, 128, 128, 4, 2, "float", torch.bfloat16, 10.0, 4.0, None),
    (5, 128, 256, 6, 2, "fp8", torch.bfloat16, 10.0, 4.0, "ue8m0"),  # e8m0 scales, clamped
    (7, 128, 128, 4, 2, "fp8", torch.float32, 0.0, 1.0, None),     # fp32 scales (plain activation scales)
    (5, 128, 128, 6, 2, "fp4", torch.bfloat16, 10.0, 4.0, None),
    (1, 128, 128, 1, 1, "fp4", torch.float16, 0.0, 1.0, None),     # T = 1, E = 1
]


@pytest.mark.parametrize("t,d,inter,e,k,fmt,dtype,limit,x_scale,scale_fmt", EXPERT_CASES)
def test_moe_experts_matches_reference(t, d, inter, e, k, fmt, dtype, limit, x_scale, scale_fmt):
    x, weights, ids, wargs, ws = _experts_case(t, d, inter, e, k, fmt, dtype, x_scale, seed=t * 13 + e,
                                               scale_fmt=scale_fmt)
    if limit > 0:
        assert _clamps(x, ids, ws, limit) == (True, True), "the inputs must exercise both clamps"
    if e > k + 2:
        assert not bool(((ids == 1) | (ids == e - 1)).any()), "experts 1 and E-1 must receive no tokens"
    out = tri_moe.moe_experts(x, weights, ids, *wargs, limit)
    exp = ref_experts.moe_experts(x, weights, ids, *wargs, limit)
    check_close(out, exp, f"moe_experts {fmt} {dtype} limit={limit}")


def test_moe_experts_clamp_matters_and_no_tokens():
    x, weights, ids, wargs, _ = _experts_case(6, 64, 64, 4, 2, "float", torch.float32, 4.0, seed=9)
    clamped = tri_moe.moe_experts(x, weights, ids, *wargs, 10.0)
    free = tri_moe.moe_experts(x, weights, ids, *wargs, 0.0)
    assert calc_diff(clamped, free) > 1e-6, "swiglu_limit had no effect"
    empty = tri_moe.moe_experts(x[:0], weights[:0], ids[:0], *wargs, 10.0)
    assert empty.shape == (0, 64) and empty.dtype == torch.float32


def test_no_host_sync(monkeypatch):
    """moe_gate and moe_experts never read a tensor value on the host."""
    x, weights, ids, wargs, _ = _experts_case(5, 128, 128, 4, 2, "fp8", torch.bfloat16, 1.0, seed=4)
    gw = torch.randn(8, 128) * 0.1
    bias = torch.randn(8)

    def forbidden(*_args, **_kwargs):
        raise AssertionError("host synchronisation inside a Triton MoE wrapper")

    for name in ("item", "tolist", "__int__", "__bool__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    tri_moe.moe_gate(x.float(), gw, 2, bias)
    tri_moe.moe_experts(x, weights, ids, *wargs, 10.0)


def test_moe_experts_errors():
    x = torch.zeros(2, 64)
    w = torch.zeros(2, 32, 64)
    w2 = torch.zeros(2, 64, 32)
    ids = torch.zeros(2, 1, dtype=torch.int32)
    wt = torch.ones(2, 1)
    q = torch.zeros(2, 32, 64, dtype=F.FP8_DTYPE)
    s = torch.ones(2, 1, 1)
    with v4hal.use_backend("triton"):
        with pytest.raises(DTypeError, match="share one"):
            v4hal.moe_experts(x, wt, ids, w, w2.half(), w)
        with pytest.raises(DTypeError, match="x's dtype"):
            v4hal.moe_experts(x, wt, ids, w.half(), w2.half(), w.half())
        with pytest.raises(ShapeError, match="divisible by"):
            v4hal.moe_experts(x, wt, ids, q, torch.zeros(2, 64, 32, dtype=F.FP8_DTYPE), q, w_scales=(s, s, s))
        with pytest.raises(RangeError, match="swiglu_limit"):
            v4hal.moe_experts(x, wt, ids, w, w2, w, swiglu_limit=-1.0)


# ============================================================================ registration, public API
def test_registration_and_public_ops(monkeypatch):
    from v4hal.hal import dispatch, registry

    registry.ensure_device_backends("cpu")
    for op in ("moe_gate", "moe_experts", "compress_kv"):
        cpu = {i.backend: i for i in registry.implementations(op, "cpu")}["triton"]
        assert not cpu.auto, op
        cuda = {i.backend: i for i in registry.implementations(op, "cuda")}["triton"]
        assert cuda.auto and cuda.priority == tri_backend.PRIORITY, op
    gate = {i.backend: i for i in registry.implementations("moe_gate", "cpu")}["triton"]
    wide = torch.zeros(tri_moe.MAX_SOFTMAX_EXPERTS + 1, 8)
    assert any("softmax" in r for r in gate.why_not({"x": torch.zeros(2, 8), "weight": wide, "score_func": "softmax"}))
    assert gate.why_not({"x": torch.zeros(2, 8), "weight": wide, "score_func": "sigmoid"}) == []
    comp = {i.backend: i for i in registry.implementations("compress_kv", "cpu")}["triton"]
    assert any("ratio must be <=" in r for r in comp.why_not({"kv": torch.zeros(1, 1, 1), "ratio": 4096}))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert any("TRITON_INTERPRET=1" in r for r in comp.why_not({"kv": torch.zeros(1, 1, 1), "ratio": 4}))
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    g = gen(21)
    x = torch.randn(6, 64, generator=g)
    gw = torch.randn(8, 64, generator=g) * 0.125
    bias = torch.randn(8, generator=g) * 0.1
    kv, score, ape = (torch.randn(1, 8, 32, generator=g), torch.randn(1, 8, 32, generator=g),
                      torch.randn(4, 32, generator=g))
    xe, weights, ids, wargs, _ = _experts_case(5, 128, 128, 4, 2, "fp4", torch.bfloat16, 1.0, seed=2)
    with v4hal.use_backend("triton"):
        assert dispatch.select("compress_kv", "cpu", {"kv": kv, "score": score, "ape": ape, "ratio": 4,
                                                      "overlap": True}).backend == "triton"
        routed = v4hal.moe_gate(x, gw, topk=3, bias=bias)
        pooled = v4hal.compress_kv(kv, score, ape, 4, True)
        mixed = v4hal.moe_experts(xe, weights, ids, *wargs[:3], w_scales=tuple(wargs[3:]), swiglu_limit=10.0)
    assert_same_routing(routed, ref_moe.moe_gate(x, gw, 3, bias), "public moe_gate")
    check_close(pooled, ref_attn.compress_kv(kv, score, ape, 4, True), "public compress_kv")
    check_close(mixed, ref_experts.moe_experts(xe, weights, ids, *wargs, 10.0), "public moe_experts")
