"""V4.1 weight formats in the Triton GEMMs (under the interpreter) against the reference backend:
FP8 weights with 32x32 tiles in ``fp8_gemm`` / ``grouped_gemm`` and packed FP4 weights with a scale
per 16 in ``fp4_gemm`` / ``grouped_gemm`` (the masked half-tile products), both scale dtypes."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import triton.language as tl

from tests.numerics import calc_diff, poisoned_empty  # noqa: F401  (fixture)
from tests.triton.test_quant_gemm import _offsets, check_gemm
from v4hal.backends.reference import gemm as ref_gemm
from v4hal.backends.reference import quant as ref_quant
from v4hal.backends.triton import gemm as tri_gemm
from v4hal.backends.triton import grouped as tri_grouped
from v4hal.hal import formats as F

E8M0 = F.E8M0_DTYPE
pytestmark = pytest.mark.usefixtures("poisoned_empty")


def _operands(lead, n, k, sd, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g)
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 0, k, base=2.0)   # the blocks' scales differ
    fmt = "ue8m0" if sd == E8M0 else None
    a, a_s = ref_quant.act_quant(x, 128, fmt, sd)
    b, b_s = ref_quant.quant_weight_fp8(w, 32, fmt)
    b4, b4_s = ref_quant.quant_weight_fp4(w, 16)
    return a, a_s, b, b_s, b4, b4_s


@pytest.mark.parametrize("lead,n,k", [((1,), 200, 256), ((3, 11), 72, 384), ((33,), 384, 256)])
@pytest.mark.parametrize("sd", [torch.float32, E8M0])
def test_small_block_gemms_match_reference(lead, n, k, sd):
    a, a_s, b, b_s, b4, b4_s = _operands(lead, n, k, sd, seed=n + k)
    assert b_s.shape == ((n + 31) // 32, k // 32) and b4_s.shape == (n, k // 16)
    assert tri_gemm.weight_block(tri_gemm.B_FP8, b_s, k) == 32
    assert tri_gemm.weight_block(tri_gemm.B_FP4, b4_s, k) == 16
    out_dtype = torch.bfloat16 if sd == torch.float32 else torch.float32
    check_gemm(tri_gemm.fp8_gemm(a, a_s, b, b_s, sd, out_dtype), ref_gemm.fp8_gemm(a, a_s, b, b_s, sd, out_dtype),
               f"fp8_gemm 32x32 {lead} {n} {k} {sd}", ref_gemm.fp8_gemm(a, a_s, b, b_s, sd, torch.float32))
    check_gemm(tri_gemm.fp4_gemm(a, a_s, b4, b4_s, sd, out_dtype),
               ref_gemm.fp4_gemm(a, a_s, b4, b4_s, sd, out_dtype), f"fp4_gemm per-16 {lead} {n} {k} {sd}",
               ref_gemm.fp4_gemm(a, a_s, b4, b4_s, sd, torch.float32))


def test_fp4_per16_other_mma_operands_and_split_k():
    """fp16 / fp32 MMA operands on the per-16 path, and split-K for both small-block recipes."""
    a, a_s, b, b_s, b4, b4_s = _operands((33,), 200, 512, torch.float32, seed=5)
    expected = ref_gemm.fp4_gemm(a, a_s, b4, b4_s, torch.float32, torch.float32)
    for dot in (tl.float16, tl.float32):
        out = tri_gemm.launch_gemm(a, a_s, b4, b4_s, torch.float32, tri_gemm.B_FP4, tri_gemm.INTERPRETER_CONFIG,
                                   dot=dot)
        check_gemm(out, expected, f"fp4 per-16 {dot} MMA")
    from dataclasses import replace
    cfg = replace(tri_gemm.INTERPRETER_CONFIG, block_n=128, split_k=3)
    check_gemm(tri_gemm.launch_gemm(a, a_s, b, b_s, torch.float32, tri_gemm.B_FP8, cfg),
               ref_gemm.fp8_gemm(a, a_s, b, b_s, torch.float32, torch.float32), "fp8 32x32 split 3")
    check_gemm(tri_gemm.launch_gemm(a, a_s, b4, b4_s, torch.float32, tri_gemm.B_FP4, cfg),
               expected, "fp4 per-16 split 3")


@pytest.mark.parametrize("counts", [[5, 0, 20, 0, 8], [33]])
def test_grouped_gemm_small_blocks(counts):
    e, m, n, k = len(counts), sum(counts), 200, 256
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(e, n, k, generator=g) * 0.05
    off = _offsets(counts)
    for sd, fmt in ((torch.float32, None), (E8M0, "ue8m0")):
        a, a_s = ref_quant.act_quant(x, 128, fmt, sd)
        b, b_s = ref_quant.quant_weight_fp8(w, 32, fmt)
        check_gemm(tri_grouped.grouped_gemm(a, b, off, a_s, b_s, torch.float32),
                   ref_gemm.grouped_gemm(a, b, off, a_s, b_s, torch.float32), f"grouped fp8 32x32 {counts} {sd}")
    b4, b4_s = ref_quant.quant_weight_fp4(w, 16)
    check_gemm(tri_grouped.grouped_gemm(a, b4, off, a_s, b4_s, torch.float32),
               ref_gemm.grouped_gemm(a, b4, off, a_s, b4_s, torch.float32), f"grouped fp4 per-16 {counts}")


def test_cublaslt_path_refuses_32x32_tiles():
    """torch._scaled_mm's Hopper blockwise recipe has 128x128 weight tiles only: a requirement names why
    32x32-tiled weights do not go there (the Triton kernel serves them)."""
    from v4hal.backends.cuda import scaled_mm
    from v4hal.hal import registry

    a, a_s, b, b_s, _, _ = _operands((4,), 256, 512, torch.float32, seed=2)
    args = {"a": a, "a_s": a_s, "b": b, "b_s": b_s, "scale_dtype": torch.float32, "out_dtype": torch.bfloat16}
    assert "128x128 weight tiles only" in scaled_mm.TILE_128.reason(args)
    b128, b128_s = ref_quant.quant_weight_fp8(torch.randn(256, 512), 128, None)
    assert scaled_mm.TILE_128.reason({**args, "b": b128, "b_s": b128_s}) is None
    assert scaled_mm.TILE_128 in registry.declarations("cuda")["fp8_gemm"].requires
