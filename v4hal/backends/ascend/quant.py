"""Activation / weight quantization on Ascend.

- ``fp4_act_quant`` (+ in place): on 950 -> ``torch_npu.npu_dynamic_mx_quant(x, dst_type=
  float4_e2m1fn_x2, block_size=32, scale_alg=1, max_low_bound=6*2**-126)``. ``scale_alg=1`` maps the
  block max onto the FP4 range and rounds the e8m0 exponent up (vllm-ascend's description), which
  is V4's rule ``2**ceil(log2(amax/6))``; ``max_low_bound`` is taken as V4's amax floor (our reading
  of the parameter: to verify on hardware). The op returns ``mxscale [M, ceil(K/64), 2]``, reshaped
  to our ``[..., K/32]``. A2/A3 have no MX quantizer: reference.
- ``act_quant`` (+ in place): reference on every chip. ``npu_dynamic_quant`` quantizes whole rows
  (no 1x128 blocks, no 1e-4 amax floor, no power-of-two scales) and ``npu_dynamic_block_quant`` is
  int8-only, so no CANN op reproduces V4's FP8 activation recipe; reshaping rows into 128-blocks
  would still miss the floor and the ue8m0 rounding.
- ``dequant_fp8`` / ``dequant_fp4`` / ``quant_weight_fp8`` / ``quant_weight_fp4``: load-time helpers
  with no CANN counterpart: reference.
"""
from __future__ import annotations

import torch

from v4hal.backends.reference import quant as ref
from v4hal.hal import formats as F
from v4hal.hal.registry import implements

from . import limits, runtime
from ._route import always_reference, route
from .limits import always, fallback_when

MX_QUANT = (("torch_npu", "npu_dynamic_mx_quant"),)

FP4_ACT_QUANT_LIMITS = (
    always("no MX quantizer on A2/A3", ("A2", "A3")),
    fallback_when("block_size != 32 (MX block)", lambda a: a["block_size"] != 32, ("950",)),
    fallback_when("x not bf16/fp16", lambda a: a["x"].dtype not in (torch.bfloat16, torch.float16), ("950",)),
    fallback_when("empty tensor", lambda a: a["x"].numel() == 0, ("950",)),
)
_MX_NATIVE = {"950": "torch_npu.npu_dynamic_mx_quant (FP4 e2m1, block 32, scale_alg=1)"}
limits.plan("fp4_act_quant", _MX_NATIVE)
limits.plan("fp4_act_quant_inplace", _MX_NATIVE)

NO_FP8_BLOCK = (always("no CANN op reproduces V4's 1x128 FP8 recipe (amax floor 1e-4, ue8m0 rounding)"),)
LOAD_TIME = (always("load-time helper without a CANN counterpart"),)
for _op in ("act_quant", "act_quant_inplace", "dequant_fp8", "dequant_fp4", "quant_weight_fp8", "quant_weight_fp4"):
    limits.plan(_op, {})


@implements("act_quant", "ascend", requires=NO_FP8_BLOCK)
def act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None,
              scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference FP8 block quantization (see the module doc for why no CANN op fits)."""
    return always_reference("act_quant", ref.act_quant, x, block_size, scale_fmt, scale_dtype)


@implements("act_quant_inplace", "ascend", requires=NO_FP8_BLOCK)
def act_quant_inplace(x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None) -> None:
    """Reference FP8 round trip in place."""
    return always_reference("act_quant_inplace", ref.act_quant_inplace, x, block_size, scale_fmt)


def _mx_fp4(op, x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    y, mxscale = op(x2, axis=-1, round_mode="rint", dst_type=runtime.dtype_code("float4_e2m1fn_x2"),
                    block_size=block_size, scale_alg=1, dst_type_max=0.0, max_low_bound=F.FP4_AMAX_FLOOR)
    s = mxscale.view(torch.uint8).reshape(x2.shape[0], -1)[:, : k // block_size]
    return (y.view(torch.uint8).reshape(*x.shape[:-1], k // 2),
            s.reshape(*x.shape[:-1], k // block_size).contiguous().view(F.E8M0_DTYPE))


@implements("fp4_act_quant", "ascend", requires=FP4_ACT_QUANT_LIMITS)
def fp4_act_quant(x: torch.Tensor, block_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """x float ``[..., K]`` -> packed e2m1 uint8 ``[..., K/2]`` (low nibble = even element) and e8m0
    ``[..., K/block_size]``."""
    chip, op, why = route("fp4_act_quant", MX_QUANT, x, block_size)
    if op is None:
        return limits.fallback("fp4_act_quant", chip, why, ref.fp4_act_quant, x, block_size)
    return _mx_fp4(op, x, block_size)


@implements("fp4_act_quant_inplace", "ascend", requires=FP4_ACT_QUANT_LIMITS)
def fp4_act_quant_inplace(x: torch.Tensor, block_size: int = 32) -> None:
    """MXFP4 round trip in place (x's dtype)."""
    chip, op, why = route("fp4_act_quant_inplace", MX_QUANT, x, block_size)
    if op is None:
        return limits.fallback("fp4_act_quant_inplace", chip, why, ref.fp4_act_quant_inplace, x, block_size)
    y, s = _mx_fp4(op, x, block_size)
    deq = F.e2m1_decode(F.unpack_fp4(y)).unflatten(-1, (-1, block_size)) * F.e8m0_to_float(s).unsqueeze(-1)
    x.copy_(deq.flatten(-2).to(x.dtype))
    return None


@implements("dequant_fp8", "ascend", requires=LOAD_TIME)
def dequant_fp8(y: torch.Tensor, s: torch.Tensor, block_size: int = 128,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference FP8 dequantization."""
    return always_reference("dequant_fp8", ref.dequant_fp8, y, s, block_size, out_dtype)


@implements("dequant_fp4", "ascend", requires=LOAD_TIME)
def dequant_fp4(y: torch.Tensor, s: torch.Tensor, block_size: int = 32,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference FP4 dequantization."""
    return always_reference("dequant_fp4", ref.dequant_fp4, y, s, block_size, out_dtype)


@implements("quant_weight_fp8", "ascend", requires=LOAD_TIME)
def quant_weight_fp8(w: torch.Tensor, block: int = 128,
                     scale_fmt: str | None = "ue8m0") -> tuple[torch.Tensor, torch.Tensor]:
    """Reference FP8 weight quantization (load time)."""
    return always_reference("quant_weight_fp8", ref.quant_weight_fp8, w, block, scale_fmt)


@implements("quant_weight_fp4", "ascend", requires=LOAD_TIME)
def quant_weight_fp4(w: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference FP4 weight quantization (load time)."""
    return always_reference("quant_weight_fp4", ref.quant_weight_fp4, w, block)
