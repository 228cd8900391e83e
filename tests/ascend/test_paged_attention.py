"""sparse_attn_paged on the Ascend code path (stand-ins, each chip): every call runs the reference on the
device tensors (no CANN op returns the lse over paged caches), with the reason recorded and listed."""
from __future__ import annotations

import pytest
import torch

import v4hal
from v4hal import cases
from v4hal.backends import ascend

from .conftest import paths

TINY = [s for _, s in cases.tiny_cases("sparse_attn_paged")]


@pytest.mark.parametrize("shape", [TINY[1], TINY[2], TINY[4]], ids=["bf16", "model1_fp8", "model1_fp8 D=128"])
def test_paged_attention_falls_back_to_the_reference_with_its_reason(npu, shape):
    args = cases.make_case("sparse_attn_paged", shape, seed=6)
    with v4hal.use_backend("reference"):
        expected = torch.ops.v4hal.sparse_attn_paged(*args)
    with v4hal.use_backend("ascend"):
        got = torch.ops.v4hal.sparse_attn_paged(*args)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    recorded = paths("sparse_attn_paged")
    assert len(recorded) == 1 and recorded[0].startswith("reference: ")
    assert "log-sum-exp" in recorded[0] and "model1_fp8" in recorded[0]
    assert not [op for _tier, op in npu.calls if "attn" in op or "attention" in op]     # no CANN op was called


def test_paged_attention_reasons_are_listed_for_every_chip():
    rows = [r for r in ascend.fallback_table() if r.get("op") == "sparse_attn_paged"]
    text = " ".join(str(r) for r in rows)
    assert {r["chip"] for r in rows} == {"A2", "A3", "950"}
    assert "log-sum-exp" in text and "model1_fp8" in text
