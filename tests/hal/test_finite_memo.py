"""The finite check remembers a tensor that passed (a weight, a weight scale) until its contents may change:
an in-place write bumps its version counter and the next call reads it again."""
from __future__ import annotations

import pytest
import torch

import v4hal
from v4hal.hal.errors import NonFiniteError
from v4hal.ops import _checks as C


def test_a_checked_weight_is_read_again_after_an_in_place_change() -> None:
    w = torch.ones(4, 4)
    C.finite("op", "w", w)
    w[1, 2] = float("nan")                                   # in place: the version counter moves
    with pytest.raises(NonFiniteError, match="op: w must be finite"):
        C.finite("op", "w", w)
    w.fill_(2.0)
    C.finite("op", "w", w)
    w.view(-1)[3] = float("inf")                             # through a view: the same counter
    with pytest.raises(NonFiniteError):
        C.finite("op", "w", w)


def test_inference_tensors_are_read_every_time() -> None:
    with torch.inference_mode():
        x = torch.ones(8)
        C.finite("op", "x", x)
        x[0] = float("nan")
        with pytest.raises(NonFiniteError):
            C.finite("op", "x", x)


def test_a_gemm_sees_a_weight_scale_corrupted_after_its_first_call() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 256, generator=g).bfloat16()
    a, a_s = v4hal.act_quant(x, 128)
    w, w_s = v4hal.quant_weight_fp8(torch.randn(128, 256, generator=g) * 0.05, 128)
    with v4hal.use_backend("reference"):
        v4hal.fp8_gemm(a, a_s, w, w_s)
        w_s[0, 0] = float("nan")
        with pytest.raises(NonFiniteError, match="b_s"):
            v4hal.fp8_gemm(a, a_s, w, w_s)
