"""The V4.1 router in the Triton ``moe_gate`` (under the interpreter) against the reference: gate
temperature (IEEE division of the fp32 logits), image bias chosen per token, eps on the sum."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from tests.numerics import poisoned_empty  # noqa: F401  (fixture)
from tests.triton.test_moe_compress import _choice_gap, assert_same_routing
from v4hal.backends.reference import moe as ref_moe
from v4hal.backends.triton import moe as tri_moe

pytestmark = pytest.mark.usefixtures("poisoned_empty")


@pytest.mark.parametrize("gate_temp", [1.0, 0.6, 3.0])
@pytest.mark.parametrize("dtype,t,d,e", [(torch.float32, 9, 64, 24), (torch.bfloat16, 33, 96, 40)])
def test_v41_router_matches_reference(gate_temp, dtype, t, d, e):
    for seed in range(50):          # the first seed whose choices have no near-ties (deterministic)
        g = torch.Generator().manual_seed(1000 * seed + t + e)
        x = torch.randn(t, d, generator=g).to(dtype)
        weight = (torch.randn(e, d, generator=g) * d ** -0.5).to(dtype)
        bias, image_bias = torch.randn(e, generator=g) * 0.1, torch.randn(e, generator=g) * 0.1
        mask = torch.rand(t, generator=g) < 0.5
        if min(_choice_gap(x.float() / gate_temp, weight.float(), b, "sqrtsoftplus", 6)
               for b in (bias, image_bias)) > 1e-4:
            break
    else:
        pytest.fail("no tie-free inputs")
    args = (x, weight, 6, bias, "sqrtsoftplus", 1.5, None, None, gate_temp, image_bias, mask, 1e-20)
    got = tri_moe.moe_gate(*args)
    assert_same_routing(got, ref_moe.moe_gate(*args), f"v41 router {gate_temp} {dtype}")
    plain = tri_moe.moe_gate(x, weight, 6, bias, "sqrtsoftplus", 1.5, None, None, gate_temp)
    assert not torch.equal(plain[1][mask].sort(-1).values, got[1][mask].sort(-1).values), "image bias unused"


def test_v41_router_without_features():
    """D = 0 (no kernel launch): every logit 0, the image rows choose with image_bias."""
    x, weight = torch.zeros(4, 0), torch.zeros(8, 0)
    bias, image_bias = torch.arange(8.0), torch.arange(8.0).flip(0)
    mask = torch.tensor([True, False, True, False])
    args = (x, weight, 2, bias, "sqrtsoftplus", 1.0, None, None, 2.0, image_bias, mask, 1e-20)
    got = tri_moe.moe_gate(*args)
    assert_same_routing(got, ref_moe.moe_gate(*args), "v41 router D=0")
    assert set(got[1][0].tolist()) == {0, 1} and set(got[1][1].tolist()) == {6, 7}
