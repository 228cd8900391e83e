"""Row invariance of the reference GEMMs: a row's bits do not depend on how many rows share the call
(what serving a token beside others, or alone, needs)."""
from __future__ import annotations

import pytest
import torch

import v4hal
from v4hal.backends.reference import quant as Q
from v4hal.backends.reference._rows import row_matmul
from v4hal.hal.dispatch import use_backend

SIZES = (1, 2, 3, 5, 7, 9, 13)


@pytest.mark.parametrize("threads", [1, 2])
def test_row_matmul_rows_do_not_depend_on_the_row_count(threads: int) -> None:
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        for k, n in ((256, 512), (1024, 24), (128, 4)):
            a, b = torch.randn(40, k, generator=g), torch.randn(k, n, generator=g)
            full = row_matmul(a, b)
            for m in SIZES:
                for off in (0, 3):
                    assert torch.equal(row_matmul(a[off:off + m], b), full[off:off + m]), (k, n, m, off)
    finally:
        torch.set_num_threads(prev)


def test_ops_give_a_row_the_same_bits_alone_and_in_a_batch() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(13, 256, generator=g).bfloat16()
    a, a_s = Q.act_quant(x, 128, "ue8m0", torch.float8_e8m0fnu)
    w, w_s = Q.quant_weight_fp8(torch.randn(384, 256, generator=g) * 0.05, 128, "ue8m0")
    gate_w = torch.randn(8, 256, generator=g)
    h = torch.randn(13, 4, 256, generator=g).bfloat16()
    hc_fn, hc_scale, hc_base = torch.randn(24, 1024, generator=g) * 0.01, torch.ones(3), torch.zeros(24)
    with use_backend("reference"):
        full = [v4hal.fp8_gemm(a, a_s, w, w_s, scale_dtype=a_s.dtype), v4hal.moe_gate(x, gate_w, topk=2)[0],
                v4hal.hc_pre(h, hc_fn, hc_scale, hc_base)[0]]
        for m in SIZES:
            part = [v4hal.fp8_gemm(a[:m], a_s[:m], w, w_s, scale_dtype=a_s.dtype),
                    v4hal.moe_gate(x[:m], gate_w, topk=2)[0], v4hal.hc_pre(h[:m], hc_fn, hc_scale, hc_base)[0]]
            for p, f in zip(part, full):
                assert torch.equal(p, f[:m]), m


def test_pointwise_outputs_do_not_depend_on_a_rows_offset() -> None:
    """mHC weights (sigmoid of 4-wide rows) and gate scores (softplus, sigmoid) of a row keep their bits at
    any offset in any row count: CPU vector kernels compute a tensor's tail with another formula."""
    g = torch.Generator().manual_seed(2)
    n = 40
    h = torch.randn(n, 4, 64, generator=g).bfloat16()
    hc_fn, hc_scale, hc_base = torch.randn(24, 256, generator=g), torch.randn(3, generator=g), torch.randn(24,
                                                                                                          generator=g)
    head_fn, head_scale, head_base = torch.randn(4, 256, generator=g), torch.randn(1, generator=g), torch.randn(
        4, generator=g)
    x, gate_w = torch.randn(n, 64, generator=g).bfloat16(), torch.randn(6, 64, generator=g)
    with use_backend("reference"):
        def outs(lo: int, hi: int) -> list[torch.Tensor]:
            return [*v4hal.hc_pre(h[lo:hi], hc_fn, hc_scale, hc_base),
                    v4hal.hc_head(h[lo:hi], head_fn, head_scale, head_base),
                    *[v4hal.moe_gate(x[lo:hi], gate_w, topk=2, score_func=f)[0] for f in ("sqrtsoftplus", "sigmoid")]]

        full = outs(0, n)
        for m in SIZES:
            for off in range(0, n - m, 3):
                for p, f in zip(outs(off, off + m), full):
                    assert torch.equal(p, f[off:off + m]), (m, off)
