"""Correctly rounded fp32 -> bf16 / fp16 output conversion for every Triton kernel of this backend.

On a GPU ``v.to(tl.bfloat16)`` (and ``tl.store`` of an fp32 value into a bf16 pointer) is the
hardware's round-to-nearest-even conversion (``cvt.rn.bf16.f32``), bit-identical to torch's.
The Triton interpreter (of the CPU test lane's Triton, see the README) implements the same cast
by dropping the low 16 bits, i.e. it truncates toward zero: about half of all outputs come out
one bf16 ulp too small in magnitude, a bias that FP8 activation quantization downstream turns
into whole quantization steps. Its fp32 -> fp16 cast is numpy's ``astype``, which rounds correctly.

So every kernel stores its float outputs through :func:`cast_out` with a constexpr ``SOFT``
flag: ``SOFT=True`` (the launcher passes it when the kernel runs under the interpreter)
rounds bf16 with integer arithmetic (:func:`bf16_rne`); ``SOFT=False`` compiles to the plain
``.to()``, so the GPU code is exactly the hardware cast, at no cost.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def bf16_rne(v):
    """fp32 ``v`` -> bf16, round to nearest even, by integer arithmetic (the interpreter's path).

    Adding ``0x7FFF`` plus the lowest kept bit to the fp32 bits and dropping the low 16 bits is
    RNE for every finite value (subnormals included; values past the largest bf16 round to inf)
    and keeps +-inf. NaN becomes the quiet NaN ``0x7FC0``, as torch's CPU conversion gives.
    """
    bits = v.to(tl.int32, bitcast=True)
    r = bits + 0x7FFF + ((bits >> 16) & 1)
    h = tl.where(v != v, 0x7FC0, r >> 16)
    return h.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def cast_out(v, OUT: tl.constexpr, SOFT: tl.constexpr):
    """fp32 ``v`` -> ``OUT`` (fp32 / bf16 / fp16), round to nearest even also under the interpreter.

    ``OUT`` may be a pointer's ``dtype.element_ty``. ``SOFT`` is True only under the interpreter;
    without it this is ``v.to(OUT)``.
    """
    if OUT == tl.float32:
        return v
    elif OUT == tl.bfloat16:
        if SOFT:
            return bf16_rne(v)
        else:
            return v.to(tl.bfloat16)
    else:
        return v.to(OUT)


__all__ = ["bf16_rne", "cast_out"]
