"""RMSNorm, rotary embedding and the Hadamard transform on Ascend.

- ``rms_norm`` -> ``torch_npu.npu_rms_norm(x, gamma, epsilon)`` (returns ``(y, rstd)``). The op takes
  x with 2-8 dims and gamma in x's dtype or fp32 for bf16/fp16 x (the op-plugin doc's table); a
  1-D x is viewed as ``[1, D]``.
- ``rotary_emb`` -> ``torch_npu.npu_rotary_mul(x, r1=cos, r2=sin, rotary_mode="interleave")`` in
  the TND layout (x ``[T, N, D]``, r1/r2 ``[T, 1, D]``), which is the only interleave layout that
  takes a different angle per token, so per-sequence frequencies (``[b, s, rd/2]``) fit too.
  cos/sin are each angle repeated for both members of a pair; ``inverse`` negates sin. The
  call runs in fp32 (x upcast, fp32 cos/sin) and casts once, as the reference does, instead of
  rounding cos/sin to bf16. Limits (doc): N < 1000, D < 896 and even.
- ``hadamard_transform``: no CANN op; vllm-ascend itself does it as a torch matmul. Reference.
"""
from __future__ import annotations

import torch

from v4hal.backends.reference import small as ref
from v4hal.hal.registry import implements

from . import limits
from ._route import always_reference, route
from .limits import ALL, always, fallback_when

RMS_NORM = (("torch_npu", "npu_rms_norm"),)
ROTARY_MUL = (("torch_npu", "npu_rotary_mul"),)
_FLOATS = (torch.bfloat16, torch.float16, torch.float32)

limits.plan("rms_norm", {c: "torch_npu.npu_rms_norm" for c in ALL},
            note="950 is not in the npu_rms_norm doc's product table; vllm-ascend calls it on A5 as well.")
RMS_NORM_LIMITS = (
    fallback_when("x is not bf16/fp16/fp32, or weight is neither fp32 nor x's dtype",
                  lambda a: a["x"].dtype not in _FLOATS or a["weight"].dtype not in (torch.float32, a["x"].dtype)),
    fallback_when("x has more than 8 dims", lambda a: a["x"].dim() > 8),
    fallback_when("empty tensor", lambda a: a["x"].numel() == 0),
)

limits.plan("rotary_emb", {c: "torch_npu.npu_rotary_mul(rotary_mode='interleave'), TND" for c in ALL})
ROTARY_LIMITS = (
    fallback_when("rotary dim >= 896 (npu_rotary_mul interleave: D < 896)", lambda a: a["x"].shape[-1] >= 896),
    fallback_when("heads >= 1000 (npu_rotary_mul interleave: N < 1000)",
                  lambda a: a["x"].dim() == 4 and a["x"].shape[2] >= 1000),
    fallback_when("empty tensor", lambda a: a["x"].numel() == 0),
)

limits.plan("hadamard_transform", {})
NO_HADAMARD = (always("no CANN Hadamard op (vllm-ascend uses a torch matmul too)"),)


@implements("rms_norm", "ascend", requires=RMS_NORM_LIMITS)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x ``[..., D]`` float, weight ``[D]`` (fp32 or x's dtype) -> ``[..., D]`` in x's dtype."""
    chip, op, why = route("rms_norm", RMS_NORM, x, weight, eps)
    if op is None:
        return limits.fallback("rms_norm", chip, why, ref.rms_norm, x, weight, eps)
    x2 = x.reshape(1, -1) if x.dim() == 1 else x
    y, _rstd = op(x2.contiguous(), weight, epsilon=eps)
    return y.reshape(x.shape)


@implements("rotary_emb", "ascend", requires=ROTARY_LIMITS)
def rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x ``[b, s, rd]`` or ``[b, s, h, rd]``, freqs_cis complex64 ``[s, rd/2]`` or ``[b, s, rd/2]``
    -> x rotated on interleaved pairs (conjugate angles when ``inverse``), x's shape and dtype."""
    b, s, rd = x.shape[0], x.shape[1], x.shape[-1]
    h = x.shape[2] if x.dim() == 4 else 1
    chip, op, why = route("rotary_emb", ROTARY_MUL, x, freqs_cis, inverse)
    if op is None:
        return limits.fallback("rotary_emb", chip, why, ref.rotary_emb, x, freqs_cis, inverse)
    f = freqs_cis if freqs_cis.dim() == 3 else freqs_cis.unsqueeze(0).expand(b, s, rd // 2)
    cos = f.real.float().repeat_interleave(2, dim=-1).reshape(b * s, 1, rd).contiguous()
    sin = f.imag.float().repeat_interleave(2, dim=-1).reshape(b * s, 1, rd)
    sin = (-sin if inverse else sin).contiguous()
    xt = x.float().reshape(b * s, h, rd).contiguous()                 # TND
    y = op(xt, cos, sin, rotary_mode="interleave")
    return y.reshape(x.shape).to(x.dtype)


@implements("hadamard_transform", "ascend", requires=NO_HADAMARD)
def hadamard_transform(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Reference Walsh-Hadamard (no CANN op): x ``[..., D]`` -> same shape and dtype."""
    return always_reference("hadamard_transform", ref.hadamard_transform, x, scale)
