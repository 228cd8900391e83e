"""The model hands its FP8 linear weights and expert stacks to the backend once after loading
(``prepare_gemm_weight``, ``prepare_moe_experts``): on the reference backend the forward passes then decode
no quantized weight in their calls, with the logits of an unprepared model bit for bit."""
from __future__ import annotations

import pytest
import torch

from v4hal.backends.reference import gemm as G
from v4hal.hal.errors import RangeError
from v4hal.model import V4Model


def logits(model: V4Model) -> list[torch.Tensor]:
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        out = [model(ids, 0)]
        for i in range(3):
            out.append(model(out[-1].argmax(-1, keepdim=True), 20 + i))
    return out


@pytest.mark.parametrize("experts_fp8", [True, False])
def test_loaded_weights_are_prepared_and_change_no_bit(mini_fp8, monkeypatch, experts_fp8: bool) -> None:
    model = V4Model.from_pretrained(mini_fp8, experts_fp8=experts_fp8)
    ffn = model.layers[0].ffn
    assert G._prepared(ffn.experts.w1, ffn.experts.w1_scale, 128) is not None
    assert G._prepared(model.layers[0].attn.wo_b.weight, model.layers[0].attn.wo_b.scale, 128) is not None
    decodes = []
    real = G._decode_weights
    quantized = (torch.float8_e4m3fn, torch.uint8)          # float weights are widened per call, not prepared
    monkeypatch.setattr(G, "_decode_weights", lambda w, *a: decodes.append(w.dtype in quantized) or real(w, *a))
    prepared = logits(model)
    if ffn.fused:               # every quantized weight prepared (an unfused shared expert passes fresh views)
        assert decodes and not any(decodes)
    G._PREPARED.clear()         # the same model decoding in every call
    decodes.clear()
    unprepared = logits(model)
    assert any(decodes)
    assert all(torch.equal(a, b) for a, b in zip(prepared, unprepared))


def test_prepare_weights_can_be_left_off(mini_fp8) -> None:
    model = V4Model.from_pretrained(mini_fp8, experts_fp8=True, prepare_weights=False)
    assert G._prepared(model.layers[0].ffn.experts.w1, model.layers[0].ffn.experts.w1_scale, 128) is None
    model = V4Model.from_pretrained(mini_fp8, experts_fp8=True, mmap=True)       # mmap: little memory, by default
    assert G._prepared(model.layers[0].attn.wo_b.weight, model.layers[0].attn.wo_b.scale, 128) is None
    model.prepare_weights()
    assert G._prepared(model.layers[0].attn.wo_b.weight, model.layers[0].attn.wo_b.scale, 128) is not None
    shared = model.layers[0].ffn.shared_experts.w1                  # reaches moe_experts, never fp8_gemm
    assert G._prepared(shared.weight, shared.scale, 128) is None
    with pytest.raises(RangeError, match="prepare_weights must be True or False"):
        V4Model.from_pretrained(mini_fp8, prepare_weights=1)
