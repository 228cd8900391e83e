"""Row invariance of the reference GEMMs: a row's bits do not depend on how many rows share the call
(what serving a token beside others, or alone, needs). Every op of the graph, at each CPU capability level:
``test_batch_invariance.py``."""
from __future__ import annotations

import pytest
import torch

import v4hal
from v4hal import use_backend
from v4hal.backends.reference._rows import row_matmul

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
