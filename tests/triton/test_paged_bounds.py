"""The bounds and non-finite rules of ``tests/reference/test_paged_bounds.py`` on the Triton kernels (under the
interpreter; the kernels mask every out-of-range slot and block id explicitly, so a GPU addresses nothing
outside the cache either), plus the two backends side by side on non-finite input."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from tests.reference.test_paged_bounds import (  # noqa: F401  (the tests, run again with backend = "triton")
    ATTN_LAYOUTS,
    _attn,
    _checks_off,
    _logits,
    _topk,
    attn_inputs,
    indexer_inputs,
    test_attention_ignores_picks_outside_the_cache,
    test_attention_lengths_out_of_range,
    test_attention_nan_rule,
    test_attention_no_pick_stays_zero_and_inf_whatever_q_holds,
    test_indexer_block_ids_outside_the_cache_have_no_key,
    test_indexer_context_lengths_out_of_range,
    test_indexer_nan_rule,
    test_paged_slots_without_a_slot_give_minus_one,
    test_read_of_slots_outside_the_cache_gives_zeros,
    test_write_skips_slots_outside_the_cache,
)


@pytest.fixture
def backend() -> str:
    return "triton"


def _same_nans_and_values(a: torch.Tensor, b: torch.Tensor, exact: bool) -> None:
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(a.isinf(), b.isinf()) and torch.equal(a[a.isinf()], b[b.isinf()])
    fin = torch.isfinite(a)
    if exact:
        assert torch.equal(a[fin], b[fin])
    else:
        torch.testing.assert_close(a[fin].float(), b[fin].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("layout", ATTN_LAYOUTS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_attention_backends_agree_on_non_finite_q(layout, value) -> None:
    """NaN, +inf or -inf in a query row: the same NaN / inf pattern of out and lse on both backends (before,
    a NaN q gave lse NaN on the reference and +inf on Triton)."""
    a = attn_inputs(layout)
    q = a["q"].clone()
    q[0, 1, 2, 3] = value
    q[1, 0, :, 7] = value
    ref = _attn("reference", dict(a, q=q))
    tri = _attn("triton", dict(a, q=q))
    assert ref[1][0, 2, 1].isnan() or ref[1][0, 2, 1].isposinf()
    for r, t in zip(ref, tri):
        _same_nans_and_values(r, t, exact=False)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("layout", ["indexer_fp4", "indexer_fp8"])
def test_indexer_backends_agree_on_a_nan_page(layout) -> None:
    """A NaN in a page (here a NaN scale byte of every key of block 0): NaN logits at its positions on both
    backends (before, NaN on the reference and finite on Triton), and the same picks."""
    a = indexer_inputs(layout)
    cache = indexer_inputs(layout)["kv_cache"]
    u8 = cache.view(torch.uint8)
    flat = u8.as_strided((u8.shape[0] * u8.stride(0),), (1,), u8.storage_offset())
    if layout == "indexer_fp4":      # the ue8m0 scales of block 0 (after 4 * 32 packed bytes): 0xFF is NaN
        flat[4 * 32:4 * 32 + 4 * 4] = 255
    else:                            # the fp32 scales of block 0 (after 4 * 64 e4m3 bytes)
        flat[4 * 64:4 * 64 + 16] = torch.full((4,), float("nan")).view(torch.uint8)
    b = dict(a, kv_cache=cache)
    ref, tri = _logits("reference", b), _logits("triton", b)
    assert ref[0:2, 4:8].isnan().all()              # request 0 reads block 0 at positions 4..7
    _same_nans_and_values(ref, tri, exact=False)
    assert torch.equal(_topk("reference", b), _topk("triton", b))
