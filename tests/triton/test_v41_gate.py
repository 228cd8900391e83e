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


def test_model_parity_replays_an_expert_choice_through_the_triton_gate():
    """Model parity's replay (`v4hal.model.parity.Decisions`) re-routes a token whose experts differ from the
    recorded ones through the Triton gate's table routing: the recorded experts, weighted by the Triton
    gate's own scores as the reference weights them."""
    import v4hal
    from v4hal.hal.dispatch import use_backend
    from v4hal.model.parity import Decisions

    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 64, generator=g).to(torch.bfloat16)
    weight = (torch.randn(16, 64, generator=g) * 0.125).to(torch.bfloat16)
    bias = torch.zeros(16)
    kw = dict(topk=4, bias=bias, score_func="sqrtsoftplus", route_scale=1.5, gate_temp=0.7, norm_eps=1e-20)
    with use_backend("triton"):
        own_w, own_i = v4hal.moe_gate(x, weight, **kw)
        other = own_i.flip(0).contiguous()                  # another token's experts on every row
        play = Decisions([("moe_gate", other)])
        with play:
            got_w, got_i = v4hal.moe_gate(x, weight, **kw)
    assert torch.equal(got_i, other) and play.replayed == {"moe_gate": [4, 5]}   # the middle row is its own
    ids = torch.arange(5, dtype=torch.int32)
    want_w, _ = ref_moe.moe_gate(x, weight, 4, bias, "sqrtsoftplus", 1.5, other, ids, 0.7, None, None, 1e-20)
    torch.testing.assert_close(got_w, want_w, rtol=2e-7, atol=0)
    assert not torch.allclose(got_w, own_w)
