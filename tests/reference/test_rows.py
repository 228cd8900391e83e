"""Row invariance of the reference GEMMs: a row's bits do not depend on how many rows share the call
(what serving a token beside others, or alone, needs). Every op of the graph, at each CPU capability level:
``test_batch_invariance.py``."""
from __future__ import annotations

import pytest
import torch

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
