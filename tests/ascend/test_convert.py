"""Load-time conversions for A2/A3 (bf16, int8 W8A8) and 950 (FP4 -> MXFP8), and the measured cost."""
from __future__ import annotations

import torch

from v4hal.backends.ascend import convert, limits
from v4hal.backends.reference import gemm as ref_gemm
from v4hal.backends.reference import quant as ref_quant
from v4hal.hal import formats as F

BF16 = torch.bfloat16


def _w(n=96, k=256, seed=0):
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05).to(BF16)


def test_float_conversions_are_exact():
    wq, ws = ref_quant.quant_weight_fp8(_w(), 128, "ue8m0")
    w = convert.fp8_weight_to_float(wq, ws)
    assert w.dtype == BF16 and torch.equal(w.float(), ref_quant.dequant_fp8(wq, ws, 128))
    w4, s4 = ref_quant.quant_weight_fp4(_w())
    assert torch.equal(convert.fp4_weight_to_float(w4, s4).float(), ref_quant.dequant_fp4(w4, s4, 32))


def test_int8_per_channel_bounds():
    w = _w().float()
    q = convert.int8_per_channel(w)
    assert q.weight.dtype == torch.int8 and q.weight.shape == (256, 96) and q.weight.is_contiguous()
    back = q.weight.t().float() * q.scale.unsqueeze(1)
    assert bool(((back - w).abs() <= q.scale.unsqueeze(1) / 2 + 1e-7).all())           # half a step at most
    assert int(q.weight.abs().max()) == 127


def test_fp4_to_mxfp8_is_lossless():
    w4, s4 = ref_quant.quant_weight_fp4(_w(seed=2))
    w8, s8 = convert.fp4_weight_to_mxfp8(w4, s4)
    assert w8.dtype == F.FP8_DTYPE and w8.shape == (96, 256) and s8 is s4
    back = (w8.float().unflatten(-1, (-1, 32)) * F.e8m0_to_float(s8).unsqueeze(-1)).flatten(-2)
    assert torch.equal(back, ref_quant.dequant_fp4(w4, s4, 32))


def test_w8a8_linear_through_the_stand_ins(npu):
    x = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(3)).to(BF16)
    x[0, 0] = 0                                                    # a zero row: scale 0, output 0
    wq = convert.fp8_weight_to_int8(*ref_quant.quant_weight_fp8(_w(), 128, "ue8m0"))
    got = convert.w8a8_linear(x, wq)
    assert npu.called("npu_dynamic_quant") == ["torch_npu"] and npu.called("npu_quant_matmul") == ["torch_npu"]
    assert torch.equal(got, convert.w8a8_reference(x, wq))
    assert torch.equal(got[0, 0], torch.zeros_like(got[0, 0]))
    convert.w8a8_linear(x.float(), wq)                             # fp32 x: outside the op, emulated
    assert any(p.startswith("reference: x not bf16/fp16") for (op, _c, p) in limits.stats() if op == "w8a8_linear")


def test_measure_orders_the_options():
    rows = convert.measure(m=8, layers=(("tiny", 64, 256, "fp8"), ("tiny4", 64, 256, "fp4")), outliers=(False,))
    by = {(r["layer"], r["option"]): r for r in rows}
    for layer in ("tiny", "tiny4"):
        ref = by[(layer, "reference V4 (fp8 act_quant + fp8/fp4_gemm)")]
        deq = by[(layer, "dequant (contract op, runtime)")]
        bf16 = by[(layer, "bf16 weights, bf16 activations")]
        int8 = by[(layer, "int8 W8A8 (per-channel w, per-token x)")]
        assert ref["rel_l2"] == 0.0
        assert deq["rel_l2"] < 1e-3 and deq["calc_diff"] < 1e-6          # runtime dequant ~ the reference
        assert 1e-3 < int8["rel_l2"] < 0.1                                # W8A8 is lossy, by a few percent
        assert bf16["rel_l2_vs_exact"] < ref["rel_l2_vs_exact"]          # bf16 is closer to exact math than FP8
    text = convert.format_rows(rows)
    assert "int8 W8A8" in text and "vs_exact" in text


def test_reference_gemm_identity():
    """The measurement's 'reference' row really is the reference fp8_gemm."""
    a, a_s = ref_quant.act_quant(torch.randn(3, 256), 128, "ue8m0", F.E8M0_DTYPE)
    wq, ws = ref_quant.quant_weight_fp8(_w(), 128, "ue8m0")
    out = ref_gemm.fp8_gemm(a, a_s, wq, ws, F.E8M0_DTYPE, BF16)
    deq = torch.matmul(ref_quant.dequant_fp8(a, a_s, 128, BF16), convert.fp8_weight_to_float(wq, ws).t())
    assert torch.allclose(out.float(), deq.float(), atol=1e-2, rtol=1e-2)
