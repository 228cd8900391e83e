"""csa2_compressor_ragged with the value checks off, on the reference and Triton (interpreter) backends:
state block ids outside ``[0, blocks)`` and positions past a table row count as block 0 (never written,
read as block 0), and a rope table too short for an entry rotates it by its last row: no IndexError,
no out-of-bounds read, both backends alike."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import v4hal
from v4hal.hal import dispatch

D, H = 8, 16


@pytest.fixture(autouse=True)
def _checks_off(monkeypatch) -> None:
    monkeypatch.setenv("V4HAL_CHECK_VALUES", "0")
    dispatch.refresh()


def _call(backend: str, table: list[list[int]], start_pos: list[int], freq_rows: int = 16):
    """Ratio 2, two requests of 5 and 4 tokens, a random 4-block state cache of 4 rows; (outputs, state)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, H, generator=g)
    wkv, wgate = torch.randn(D, H, generator=g) * 0.3, torch.randn(D, H, generator=g) * 0.3
    norm = torch.rand(D, generator=g) + 0.5
    ang = torch.arange(freq_rows).float().view(-1, 1) * torch.tensor([1.0, 0.1])
    state = torch.randn(4, 4, 2 * D, generator=g)
    with v4hal.use_backend(backend):
        out = v4hal.csa2_compressor_ragged(x, wkv, wgate, norm, torch.polar(torch.ones_like(ang), ang), state,
                                           torch.tensor(table, dtype=torch.int32),
                                           torch.tensor([0, 5, 9], dtype=torch.int32),
                                           torch.tensor(start_pos, dtype=torch.int32), 2, 1e-6)
    return out, state


def _same(a, b) -> None:
    (out_a, st_a), (out_b, st_b) = a, b
    for x, y in zip(out_a, out_b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert torch.equal(st_a, st_b)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("table,same_as", [
    ([[-2, 2, 9], [2**31 - 1, 3, -7]], [[0, 2, 0], [0, 3, 0]]),
    ([[1, 2], [3, 2]], [[1, 2, 0], [3, 2, 0]]),
])
def test_ids_outside_the_cache_mean_not_kept(backend, table, same_as):
    _same(_call(backend, table, [5, 1]), _call(backend, same_as, [5, 1]))


def test_short_rope_table_uses_its_last_row_on_both_backends():
    ref = _call("reference", [[1, 2, 0], [3, 2, 0]], [5, 1], freq_rows=4)
    tri = _call("triton", [[1, 2, 0], [3, 2, 0]], [5, 1], freq_rows=4)
    _same(ref, tri)
