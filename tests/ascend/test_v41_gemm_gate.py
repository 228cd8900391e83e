"""V4.1 weight formats and router on the Ascend backend (fake NPU stand-ins) against the reference:
32x32 FP8 tiles through MX mode on 950 (exact expansion to per-32 scales), FP4 per 16 on the dequant
path with its reason, the router's temperature and image bias through the gating op."""
from __future__ import annotations

import pytest
import torch

import v4hal
from tests.numerics import assert_close, calc_diff
from v4hal.hal import formats as F

from .conftest import both, native, paths, same_sets

BF16 = torch.bfloat16


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("scale_dtype", [F.E8M0_DTYPE, torch.float32])
def test_fp8_gemm_32x32_tiles(npu, scale_dtype):
    g = gen()
    a, a_s = v4hal.act_quant(torch.randn(2, 5, 256, generator=g), 128, None, scale_dtype)
    w = torch.randn(72, 256, generator=g) * torch.logspace(-3, 3, 256, base=2.0)
    b, b_s = v4hal.quant_weight_fp8(w, 32, "ue8m0" if scale_dtype == F.E8M0_DTYPE else None)
    got, want = both(v4hal.fp8_gemm, a, a_s, b, b_s, scale_dtype, BF16)
    assert bool(npu.called("npu_quant_matmul")) == (npu.chip == "950" and scale_dtype == F.E8M0_DTYPE)
    assert_close(got, want, BF16)
    assert calc_diff(got, want) < 1e-5


def test_fp4_gemm_per16_dequantizes_with_reason(npu):
    g = gen(1)
    a, a_s = v4hal.act_quant(torch.randn(4, 256, generator=g), 128, None, F.E8M0_DTYPE)
    b, b_s = v4hal.quant_weight_fp4(torch.randn(96, 256, generator=g) * torch.logspace(-3, 3, 256, base=2.0), 16)
    got, want = both(v4hal.fp4_gemm, a, a_s, b, b_s, F.E8M0_DTYPE, BF16)
    assert not npu.called("npu_quant_matmul")
    if npu.chip == "950":
        assert any("per 16" in p for p in paths("fp4_gemm")), paths("fp4_gemm")
    assert_close(got, want, BF16)
    assert calc_diff(got, want) < 1e-5


@pytest.mark.parametrize("fmt", ["fp8_32", "fp4_16"])
def test_grouped_gemm_small_blocks(npu, fmt):
    g = gen(2)
    x, x_s = v4hal.act_quant(torch.randn(9, 256, generator=g), 128, "ue8m0", F.E8M0_DTYPE)
    wf = torch.randn(4, 64, 256, generator=g) * 0.05
    w, w_s = v4hal.quant_weight_fp8(wf, 32) if fmt == "fp8_32" else v4hal.quant_weight_fp4(wf, 16)
    off = torch.tensor([0, 3, 3, 7, 9])
    got, want = both(v4hal.grouped_gemm, x, w, off, x_scale=x_s, w_scale=w_s, out_dtype=torch.float32)
    assert native("grouped_gemm")
    assert_close(got, want, torch.float32)
    assert calc_diff(got, want) < 1e-6


def test_v41_router(npu):
    g = gen(3)
    x = torch.randn(10, 32, generator=g).to(BF16)
    weight = torch.randn(24, 32, generator=g).to(BF16)
    bias, image_bias = torch.randn(24, generator=g) * 0.3, torch.randn(24, generator=g) * 0.3
    mask = torch.arange(10) % 2 == 0
    kw = dict(topk=6, bias=bias, route_scale=1.5, gate_temp=0.8, image_bias=image_bias, image_mask=mask,
              norm_eps=1e-20)
    (gw, gi), (rw, ri) = both(v4hal.moe_gate, x, weight, **kw)
    assert native("moe_gate") and npu.called("moe_gating_top_k_hash")
    same_sets(gi, ri)
    order, order_ref = gi.long().sort(-1).indices, ri.long().sort(-1).indices
    assert_close(gw.gather(1, order), rw.gather(1, order_ref), torch.float32)
