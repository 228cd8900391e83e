"""Reference moe_experts against a float64 per-token loop (the test loops, the implementation may
not): float, FP8 (e8m0 and fp32 scales) and FP4 weights, bf16/fp32/fp16 activations, SwiGLU limit
0 and 10 with values that hit the clamps, experts without tokens (their weights are poisoned)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as Fn

from tests.numerics import assert_close, calc_diff
from tests.reference.test_gemm import fp4_weight_f64, fp8_weight_f64
from v4hal.backends.reference import quant as Q
from v4hal.backends.reference.moe_experts import moe_experts
from v4hal.hal.errors import DTypeError, RangeError, ShapeError

FP8 = torch.float8_e4m3fn
E8M0 = torch.float8_e8m0fnu


# ------------------------------------------------------------------ float64 oracle
def qdq_f64(v: torch.Tensor, pow2: bool) -> torch.Tensor:
    """FP8 act quant + dequant of one row in float64 (blocks of 128, amax floor 1e-4)."""
    b = v.double().reshape(-1, 128)
    amax = b.abs().amax(dim=1, keepdim=True).clamp_min(1e-4)
    if pow2:
        s = torch.exp2(torch.ceil(torch.log2(amax / 448)))
    else:  # the fp32 scale is amax * fp32(1/448) and x / s an fp32 division (kernel.py act_quant_kernel)
        s = (amax.float() * torch.tensor(1 / 448, dtype=torch.float32)).double()
    q = (b.float() / s.float()).clamp(-448, 448).to(FP8).double()
    return (q * s).reshape(-1)


def oracle(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w1: torch.Tensor,
           w2: torch.Tensor, w3: torch.Tensor, limit: float, act: str | None) -> tuple[torch.Tensor, int]:
    """Per (token, slot) SwiGLU in float64, rounding where the op rounds (GEMM outputs and the
    weighted intermediate to x's dtype); ``act`` None (float weights), 'pow2' or 'fp32' act quant.
    Returns the float64 output and how many gate/up entries the limit clamped."""
    t_count, k = indices.shape
    out = torch.zeros(t_count, x.shape[1], dtype=torch.float64)
    clamped = 0

    def rnd(v: torch.Tensor) -> torch.Tensor:
        return v.to(x.dtype).double()

    def prep(v: torch.Tensor) -> torch.Tensor:
        return v.double() if act is None else qdq_f64(v, act == "pow2")

    for t in range(t_count):
        xin = prep(x[t])
        for j in range(k):
            e = int(indices[t, j])
            gate, up = rnd(w1[e] @ xin), rnd(w3[e] @ xin)
            if limit > 0:
                clamped += int((gate > limit).sum() + (up.abs() > limit).sum())
                up, gate = up.clamp(-limit, limit), gate.clamp(max=limit)
            h = rnd(float(weights[t, j]) * (Fn.silu(gate) * up))
            out[t] += rnd(w2[e] @ prep(h.to(x.dtype)))
    return out, clamped


# ------------------------------------------------------------------ setup
def make_case(t: int, k: int, e: int, d: int, inter: int, dtype: torch.dtype, seed: int,
              used: list[int] | None = None) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g).to(dtype)
    choices = torch.tensor(used if used is not None else list(range(e)))
    # distinct experts per token (as top-k), drawn from `choices`
    perm = torch.argsort(torch.rand(t, len(choices), generator=g), dim=1)[:, :k]
    indices = choices[perm].to(torch.int32)
    weights = torch.rand(t, k, generator=g) + 0.1
    weights = weights / weights.sum(1, keepdim=True) * 1.5
    gain = 8.0                                           # gate/up ~ N(0, 64): |v| > 10 happens often
    w1 = torch.randn(e, inter, d, generator=g) * gain / d ** 0.5
    w3 = torch.randn(e, inter, d, generator=g) * gain / d ** 0.5
    w2 = torch.randn(e, d, inter, generator=g) / inter ** 0.5
    return x, weights, indices, w1, w2, w3


def quantize(fmt: str, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor):
    """-> (w1q, w2q, w3q, scales, float64 dequantized weights, act mode)."""
    if fmt.startswith("fp8"):
        sfmt = "ue8m0" if fmt == "fp8-e8m0" else None
        qs = [Q.quant_weight_fp8(w, 128, sfmt) for w in (w1, w2, w3)]
        deq = [fp8_weight_f64(q, s) for q, s in qs]
        act = "pow2" if sfmt else "fp32"
    else:
        qs = [Q.quant_weight_fp4(w, 32) for w in (w1, w2, w3)]
        deq = [fp4_weight_f64(q, s) for q, s in qs]
        act = "pow2"
    return [q for q, _ in qs], [s for _, s in qs], deq, act


def poison_experts(ws: list[torch.Tensor], scales: list[torch.Tensor] | None, unused: list[int]) -> None:
    """NaN everything an expert without tokens owns: a leak into the output would show."""
    for w in ws:
        if w.dtype == FP8:
            w.view(torch.uint8)[unused] = 0x7F          # e4m3fn NaN
        elif w.is_floating_point():
            w[unused] = float("nan")
    for s in scales or []:
        if s.dtype == E8M0:
            s.view(torch.uint8)[unused] = 0xFF          # e8m0 NaN
        else:
            s[unused] = float("nan")


# calc_diff bounds against the rounding-mirrored oracle rounded to x's dtype: what remains are
# rare flips of intermediate roundings (fp32 vs float64 accumulation), measured ~1e-10 for bf16
# and ~1e-13 for fp32; a wrong order of operations or activation scale format gives >= 1e-7
DIFF = {torch.float32: 1e-11, torch.bfloat16: 1e-8, torch.float16: 1e-9}


@pytest.mark.parametrize("fmt", ["float", "fp8-e8m0", "fp8-fp32", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("limit", [0.0, 10.0])
def test_moe_experts_matches_loop(fmt: str, dtype: torch.dtype, limit: float) -> None:
    e, used = 8, [0, 2, 3, 5, 6]                          # experts 1, 4, 7 get no tokens
    x, weights, indices, w1, w2, w3 = make_case(24, 3, e, 256, 128, dtype, seed=len(fmt) + int(limit),
                                                used=used)
    unused = [i for i in range(e) if i not in used]
    if fmt == "float":
        ws, scales = [w.to(dtype) for w in (w1, w2, w3)], None
        deq, act = [w.double() for w in ws], None
    else:
        ws, scales, deq, act = quantize(fmt, w1, w2, w3)
    want, clamped = oracle(x, weights, indices, *deq, limit=limit, act=act)
    if limit > 0:
        assert clamped > 100                                # the clamps really bite
    poison_experts(ws, scales, unused)
    args = (x, weights, indices, *ws) + (tuple(scales) if scales else ())
    out = moe_experts(*args, swiglu_limit=limit)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.isfinite(out).all()
    diff = calc_diff(out, want.to(dtype))
    assert diff < DIFF[dtype], diff
    scale = want.abs().max().item()
    assert_close(out, want, dtype=dtype, atol=(2e-2 if dtype == torch.bfloat16 else 1e-4) * scale)


@pytest.mark.parametrize("fmt", ["float", "fp8-e8m0", "fp4"])
def test_swiglu_limit_changes_the_result(fmt: str) -> None:
    x, weights, indices, w1, w2, w3 = make_case(16, 2, 4, 128, 128, torch.float32, seed=3)
    if fmt == "float":
        args = (x, weights, indices, w1, w2, w3)
    else:
        ws, scales, _, _ = quantize(fmt, w1, w2, w3)
        args = (x, weights, indices, *ws, *scales)
    free, limited = moe_experts(*args, swiglu_limit=0.0), moe_experts(*args, swiglu_limit=10.0)
    assert calc_diff(free, limited) > 1e-3
    assert moe_experts(*args, swiglu_limit=1e9).equal(free)


def test_fp16_single_token_and_repeated_expert() -> None:
    x, weights, indices, w1, w2, w3 = make_case(1, 1, 3, 128, 256, torch.float16, seed=4)
    ws = [w.half() for w in (w1, w2, w3)]
    want, _ = oracle(x, weights, indices, *[w.double() for w in ws], limit=10.0, act=None)
    out = moe_experts(x, weights, indices, *ws, swiglu_limit=10.0)
    assert calc_diff(out, want.half()) < DIFF[torch.float16]
    # the same expert twice for one token (hash routing may repeat): both slots count
    x, weights, _, w1, w2, w3 = make_case(5, 2, 3, 128, 128, torch.float32, seed=5)
    indices = torch.tensor([[1, 1], [0, 2], [2, 2], [1, 0], [0, 0]], dtype=torch.int32)
    want, _ = oracle(x, weights, indices, w1.double(), w2.double(), w3.double(), limit=0.0, act=None)
    out = moe_experts(x, weights, indices.long(), w1, w2, w3)
    assert calc_diff(out, want.float()) < DIFF[torch.float32]


def test_weight_applied_before_w2() -> None:
    # with bf16 rounding of the intermediate, weight * (silu(g)*u) before w2 differs from after;
    # exactness against the loop already pins the order, here the linear part of it: scaling the
    # gate weights scales the output (fp32, no clamp)
    x, weights, indices, w1, w2, w3 = make_case(6, 2, 4, 128, 128, torch.float32, seed=6)
    a = moe_experts(x, weights, indices, w1, w2, w3)
    b = moe_experts(x, 2 * weights, indices, w1, w2, w3)
    assert_close(b, 2 * a, dtype=torch.float32)


def test_empty_tokens() -> None:
    x, weights, indices, w1, w2, w3 = make_case(3, 2, 4, 128, 128, torch.bfloat16, seed=7)
    out = moe_experts(x[:0], weights[:0], indices[:0], w1.bfloat16(), w2.bfloat16(), w3.bfloat16())
    assert out.shape == (0, 128) and out.dtype == torch.bfloat16
    ws, scales, _, _ = quantize("fp4", w1, w2, w3)
    out = moe_experts(x[:0], weights[:0], indices[:0], *ws, *scales)
    assert out.shape == (0, 128)


def test_errors() -> None:
    x, weights, indices, w1, w2, w3 = make_case(4, 2, 4, 128, 128, torch.float32, seed=8)
    with pytest.raises(DTypeError, match="x's dtype"):
        torch.ops.v4hal.moe_experts(x, weights, indices, w1.bfloat16(), w2.bfloat16(), w3.bfloat16())
    with pytest.raises(RangeError, match="indices"):
        torch.ops.v4hal.moe_experts(x, weights, indices + 4, w1, w2, w3)
    with pytest.raises(ShapeError, match="weights must be"):
        torch.ops.v4hal.moe_experts(x, weights[:, :1], indices, w1, w2, w3)
    with pytest.raises(ShapeError, match="w2"):
        torch.ops.v4hal.moe_experts(x, weights, indices, w1, w2[:, :64], w3)
    ws, scales, _, _ = quantize("fp8-e8m0", w1, w2, w3)
    with pytest.raises(DTypeError, match="need w1_scale"):
        torch.ops.v4hal.moe_experts(x, weights, indices, *ws)
    with pytest.raises(DTypeError, match="share one dtype"):
        torch.ops.v4hal.moe_experts(x, weights, indices, *ws, scales[0], Q.quant_weight_fp8(w2, 128, None)[1],
                                    scales[2])
    x2, weights2, indices2, v1, v2, v3 = make_case(4, 2, 4, 96, 128, torch.float32, seed=9)
    q = [Q.quant_weight_fp4(w, 32) for w in (v1, v2, v3)]
    with pytest.raises(ShapeError, match="divisible by 128"):
        torch.ops.v4hal.moe_experts(x2, weights2, indices2, *[a for a, _ in q], *[b for _, b in q])
