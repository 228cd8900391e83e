"""Helpers shared by the attention / indexer / mHC / small-op Triton kernels of this backend.

Nothing here launches a kernel (`softmax_tile` and `softmax_output` are ``@triton.jit`` functions the
attention kernels call). The interpreter switch is read when a kernel is launched
(``TRITON_INTERPRET=1`` must be set before ``triton`` is imported, which the test suite does).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4hal.hal.devices import triton_interpreter_on

# tl.dot input precision per operand dtype. fp32 operands use three TF32 products on a GPU
# (about fp32 accuracy; plain TF32 would miss the fp32 tolerance); 16-bit operands ignore it.
FP32_DOT_PRECISION = "tf32x3"


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    n = max(int(n), 1)
    return 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceil division of non-negative ints."""
    return -(-a // b)


def dot_upcast(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether kernels must convert 16-bit ``tl.dot`` operands to fp32 before the product.

    Only bf16 under the interpreter: its bf16 ``tl.dot`` is wrong. On a GPU the
    MMA runs in the operands' own dtype.
    """
    return dtype == torch.bfloat16 and (device.type == "cpu" or triton_interpreter_on())


def dot_precision(dtype: torch.dtype) -> str:
    """The ``input_precision`` passed to ``tl.dot`` for operands of ``dtype``."""
    return FP32_DOT_PRECISION if dtype == torch.float32 else "tf32"


def on_interpreter(t: torch.Tensor) -> bool:
    """True when a kernel launched on ``t`` runs under the Triton CPU interpreter."""
    return t.device.type == "cpu" or triton_interpreter_on()


@triton.jit
def softmax_tile(q, kv, valid, m_i, l_i, acc, qk_scale, PREC: tl.constexpr):
    """One key tile of the online softmax in base 2: scores ``q [BH, D] . kv [BN, D]`` times ``qk_scale``
    (log2(e) folded in), ``-inf`` where ``valid [BN]`` is False; running max ``m_i [BH]``, sum ``l_i [BH]``
    and weighted value sum ``acc [BH, D]`` (keys = values) -> their updates (fp32)."""
    s = tl.dot(q, tl.trans(kv), input_precision=PREC) * qk_scale
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def softmax_output(m_i, l_i, acc, sink):
    """The normalized output ``[BH, D]`` of an online softmax (`softmax_tile` state, base 2) with the sink
    (natural-log ``sink [BH]``, -inf: none) in the denominator only; a row with no valid key and no finite
    sink gives 0."""
    sink = sink * 1.4426950408889634
    m_fin = tl.maximum(m_i, sink)
    m_fin = tl.where(m_fin == float("-inf"), 0.0, m_fin)
    keep = tl.exp2(m_i - m_fin)
    denom = l_i * keep + tl.exp2(sink - m_fin)
    factor = tl.where(denom > 0.0, keep / tl.where(denom > 0.0, denom, 1.0), 0.0)
    return acc * factor[:, None]
