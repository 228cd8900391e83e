"""Weights prepared once for the reference GEMMs (``prepare_moe_experts`` for the grouped expert GEMMs,
``prepare_gemm_weight`` for ``fp8_gemm`` / ``fp4_gemm``): the calls that follow give the same bits without
decoding the weights again; an in-place change of a weight or its scales, other tensors and inference
tensors fall back to decoding in the call."""
from __future__ import annotations

import pytest
import torch

from tests.reference.test_moe_experts import make_case, quantize
from v4hal.backends.reference import gemm as G
from v4hal.backends.reference import quant as Q
from v4hal.backends.reference.moe_experts import moe_experts
from v4hal.hal.errors import DTypeError, ShapeError
from v4hal.ops.gemm import prepare_gemm_weight
from v4hal.ops.moe import prepare_moe_experts

FMTS = ["bf16", "fp8-e8m0", "fp8-fp32", "fp4"]


def stacks(fmt: str, seed: int):
    """(x, weights, indices, [w1, w2, w3], scales or None) with experts 1 and 4 unused."""
    dtype = torch.bfloat16
    x, weights, indices, w1, w2, w3 = make_case(12, 3, 6, 256, 128, dtype, seed=seed, used=[0, 2, 3, 5])
    if fmt == "bf16":
        return x, weights, indices, [w.to(dtype) for w in (w1, w2, w3)], None
    ws, scales, _, _ = quantize(fmt, w1, w2, w3)
    return x, weights, indices, ws, tuple(scales)


def run(x, weights, indices, ws, scales) -> torch.Tensor:
    return moe_experts(x, weights, indices, *ws, *(scales or ()), swiglu_limit=10.0)


@pytest.fixture
def decodes(monkeypatch):
    """Counts the per-call weight decodes of the grouped GEMMs."""
    seen = []
    real = G._decode_weights

    def counting(*a, **k):
        seen.append(1)
        return real(*a, **k)
    monkeypatch.setattr(G, "_decode_weights", counting)
    return seen


@pytest.mark.parametrize("fmt", FMTS)
def test_prepared_stacks_give_the_same_bits_without_decoding(fmt: str, decodes: list) -> None:
    x, weights, indices, ws, scales = stacks(fmt, seed=11)
    sizes = (12, 1, 5)                                   # other bucket shapes
    want = [run(x[:t], weights[:t], indices[:t], ws, scales) for t in sizes]
    assert decodes                                       # unprepared: every call decodes the picked experts
    assert prepare_moe_experts(*ws, w_scales=scales)
    decodes.clear()
    for t, w in zip(sizes, want):
        assert torch.equal(run(x[:t], weights[:t], indices[:t], ws, scales), w)
    assert not decodes


def run_fresh(x, weights, indices, ws, scales) -> torch.Tensor:
    """The result without a prepared stack: copies of the weights are other tensors."""
    return run(x, weights, indices, [w.clone() for w in ws], None if scales is None else [s.clone() for s in scales])


@pytest.mark.parametrize("fmt", ["bf16", "fp8-e8m0", "fp4"])
def test_an_in_place_change_is_not_served_stale(fmt: str) -> None:
    x, weights, indices, ws, scales = stacks(fmt, seed=12)
    assert prepare_moe_experts(*ws, w_scales=scales)
    before = run(x, weights, indices, ws, scales)
    flip = 0x88 if fmt == "fp4" else 0x80                # sign bits (fp8, FP4 nibbles), a mantissa bit (bf16)
    ws[0][indices[0, 0].item()].view(torch.uint8).bitwise_xor_(flip)   # an in-place change of a used expert
    after = run(x, weights, indices, ws, scales)
    assert not torch.equal(after, before)
    assert torch.equal(after, run_fresh(x, weights, indices, ws, scales))
    if scales is not None:                                # the scales are watched too
        assert prepare_moe_experts(*ws, w_scales=scales)
        scales[2].view(torch.uint8)[indices[0, 0].item()] += 1 if scales[2].dtype != torch.float32 else 0
        if scales[2].dtype == torch.float32:
            scales[2][indices[0, 0].item()] *= 2
        changed = run(x, weights, indices, ws, scales)
        assert not torch.equal(changed, after)
        assert torch.equal(changed, run_fresh(x, weights, indices, ws, scales))


def test_inference_tensors_are_not_kept() -> None:
    x, weights, indices, ws, scales = stacks("fp8-e8m0", seed=13)
    with torch.inference_mode():
        ws, scales = [w.clone() for w in ws], tuple(s.clone() for s in scales)
    assert not prepare_moe_experts(*ws, w_scales=scales)
    assert torch.equal(run(x, weights, indices, ws, scales), run_fresh(x, weights, indices, ws, scales))


def test_fp32_weights_are_not_kept() -> None:
    x, weights, indices, ws, _ = stacks("bf16", seed=15)
    x, ws = x.float(), [w.float() for w in ws]
    assert not prepare_moe_experts(*ws)                  # the calls use fp32 stacks as they are: nothing to keep
    assert not any(G._PREPARED.get(w) for w in ws)


def test_prepare_errors() -> None:
    _, _, _, ws, scales = stacks("fp8-e8m0", seed=14)
    with pytest.raises(DTypeError, match="prepare_moe_experts: a quantized w1 .* needs w1_scale"):
        prepare_moe_experts(*ws)
    with pytest.raises(ShapeError, match="w_scales must be"):
        prepare_moe_experts(*ws, w_scales=scales[:2])
    with pytest.raises(ShapeError, match="prepare_moe_experts: w2"):
        prepare_moe_experts(ws[0], ws[1][0], ws[2], w_scales=scales)
    with pytest.raises(ShapeError, match="prepare_moe_experts: w3 must have w1's shape"):
        prepare_moe_experts(ws[0], ws[1], ws[2][:1], w_scales=(scales[0], scales[1], scales[2][:1]))
    with pytest.raises(DTypeError, match="prepare_moe_experts: w1 must be"):
        prepare_moe_experts(ws[0].view(torch.int8), *ws[1:], w_scales=scales)


# ------------------------------------------------------------------ fp8_gemm / fp4_gemm weights
def dense(fmt: str, seed: int):
    """(a, a_s, b, b_s) for fp8_gemm ('fp8-128', 'fp8-32': 32x32 tiles) or fp4_gemm ('fp4', 'fp4-16')."""
    g = torch.Generator().manual_seed(seed)
    a, a_s = Q.act_quant(torch.randn(5, 256, generator=g), 128, "ue8m0", torch.float8_e8m0fnu)
    w = torch.randn(384, 256, generator=g)
    if fmt.startswith("fp8"):
        b, b_s = Q.quant_weight_fp8(w, int(fmt.split("-")[1]), "ue8m0")
    else:
        b, b_s = Q.quant_weight_fp4(w, 16 if fmt == "fp4-16" else 32)
    return a, a_s, b, b_s


def gemm(a, a_s, b, b_s) -> torch.Tensor:
    fn = torch.ops.v4hal.fp8_gemm if b.dtype == torch.float8_e4m3fn else torch.ops.v4hal.fp4_gemm
    return fn(a, a_s, b, b_s, a_s.dtype, torch.bfloat16)


@pytest.mark.parametrize("fmt", ["fp8-128", "fp8-32", "fp4", "fp4-16"])
def test_prepared_gemm_weight_gives_the_same_bits_without_decoding(fmt: str, decodes: list) -> None:
    a, a_s, b, b_s = dense(fmt, seed=21)
    want = [gemm(a[:m], a_s[:m], b, b_s) for m in (5, 1)]
    assert decodes
    assert prepare_gemm_weight(b, b_s)
    decodes.clear()
    for m, w in zip((5, 1), want):
        assert torch.equal(gemm(a[:m], a_s[:m], b, b_s), w)
    assert not decodes
    b.view(torch.uint8)[3].bitwise_xor_(0x88 if b.dtype == torch.uint8 else 0x80)   # in place: not served stale
    changed = gemm(a, a_s, b, b_s)
    assert not torch.equal(changed, want[0])
    assert torch.equal(changed, gemm(a, a_s, b.clone(), b_s.clone()))


def test_prepare_gemm_weight_errors() -> None:
    _, _, b, b_s = dense("fp8-128", seed=22)
    with pytest.raises(DTypeError, match="prepare_gemm_weight: b must be"):
        prepare_gemm_weight(b.view(torch.int8), b_s)
    with pytest.raises(ShapeError, match="prepare_gemm_weight: b_s must be"):
        prepare_gemm_weight(b, b_s[:1])
    with pytest.raises(ShapeError, match="prepare_gemm_weight: b must be"):
        prepare_gemm_weight(b[0], b_s)
