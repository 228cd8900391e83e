"""Quantization ops: FP8 e4m3 (128-blocks, fp32 or ue8m0 scales) and MXFP4 e2m1 (32-blocks, e8m0 scales).

FP4 values are packed two per uint8 byte, the low nibble holding the even-indexed element.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import _checks as C
from ._checks import E8M0, FLOATS, FP8, SCALE_DTYPES, ceil_div
from ._define import call, define_op

SCALE_FMTS = (None, "ue8m0")


# ---------------------------------------------------------------- act_quant
def _check_act_quant(x, block_size, scale_fmt, scale_dtype):
    op = "act_quant"
    C.dtype(op, "x", x, FLOATS)
    C.min_rank(op, "x", x, 1, "[..., K]")
    C.in_range(op, "block_size", block_size, 1, C.MAX_QUANT_BLOCK)
    C.divisible(op, "x.shape[-1]", x.shape[-1], block_size, "block_size")
    C.one_of(op, "scale_fmt", scale_fmt, SCALE_FMTS)
    C.dtype_arg(op, "scale_dtype", scale_dtype, SCALE_DTYPES)


def _fake_act_quant(x, block_size, scale_fmt, scale_dtype):
    s_shape = (*x.shape[:-1], x.shape[-1] // block_size)
    return x.new_empty(x.shape, dtype=FP8), x.new_empty(s_shape, dtype=scale_dtype)


def _finite_input(op: str, name: str) -> Callable[..., None]:
    """Value check of a quantizer: its input (the first argument) holds no inf or NaN."""
    def value_check(t: torch.Tensor, *_rest: object) -> None:
        C.finite(op, name, t)
    return value_check


define_op("act_quant",
          "(Tensor x, int block_size=128, str? scale_fmt=None, ScalarType scale_dtype=float32) -> (Tensor, Tensor)",
          check=_check_act_quant, fake=_fake_act_quant,
          doc=C.ranges_doc(block_size=C.interval(1, C.MAX_QUANT_BLOCK)), value_check=_finite_input("act_quant", "x"))


def _check_act_quant_inplace(x, block_size, scale_fmt):
    _check_act_quant(x, block_size, scale_fmt, torch.float32)


define_op("act_quant_inplace", "(Tensor(a!) x, int block_size=128, str? scale_fmt=None) -> ()",
          check=_check_act_quant_inplace, fake=lambda *a: None, variant_of="act_quant",
          value_check=_finite_input("act_quant", "x"))


def act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None,
              scale_dtype: torch.dtype = torch.float32, inplace: bool = False):
    """FP8 e4m3 quantization per ``block_size`` block of the last dim.

    x float ``[..., K]`` -> (y fp8 ``[..., K]``, s ``[..., K/block_size]`` in ``scale_dtype``).
    Scales are powers of two when ``scale_fmt`` is given or ``scale_dtype`` is e8m0.
    ``inplace=True`` writes the dequantized round trip ``y*s`` into ``x`` and returns ``x``.
    """
    if inplace:
        fmt = scale_fmt if scale_fmt is not None or scale_dtype != E8M0 else "ue8m0"
        call.act_quant_inplace(x, block_size, fmt)
        return x
    return call.act_quant(x, block_size, scale_fmt, scale_dtype)


# ---------------------------------------------------------------- fp4_act_quant
def _even_block(op: str, name: str, block: int) -> None:
    if block % 2:
        raise C.ShapeError(f"{op}: {name} must be even (two FP4 values per byte), got {block}")


def _check_fp4_act_quant(x, block_size):
    op = "fp4_act_quant"
    C.dtype(op, "x", x, FLOATS)
    C.min_rank(op, "x", x, 1, "[..., K]")
    C.in_range(op, "block_size", block_size, 1, C.MAX_QUANT_BLOCK)
    _even_block(op, "block_size", block_size)
    C.divisible(op, "x.shape[-1]", x.shape[-1], block_size, "block_size")


def _fake_fp4_act_quant(x, block_size):
    k = x.shape[-1]
    return (x.new_empty((*x.shape[:-1], k // 2), dtype=torch.uint8),
            x.new_empty((*x.shape[:-1], k // block_size), dtype=E8M0))


define_op("fp4_act_quant", "(Tensor x, int block_size=32) -> (Tensor, Tensor)",
          check=_check_fp4_act_quant, fake=_fake_fp4_act_quant,
          doc=C.ranges_doc(block_size=C.interval(1, C.MAX_QUANT_BLOCK) + " and even (an odd one: `ShapeError`)"),
          value_check=_finite_input("fp4_act_quant", "x"))
define_op("fp4_act_quant_inplace", "(Tensor(a!) x, int block_size=32) -> ()",
          check=_check_fp4_act_quant, fake=lambda *a: None, variant_of="fp4_act_quant",
          value_check=_finite_input("fp4_act_quant", "x"))


def fp4_act_quant(x: torch.Tensor, block_size: int = 32, inplace: bool = False):
    """MXFP4 e2m1 quantization per ``block_size`` block with power-of-two e8m0 scales.

    x float ``[..., K]`` -> (packed uint8 ``[..., K/2]``, e8m0 ``[..., K/block_size]``);
    ``inplace=True`` writes the dequantized round trip into ``x`` and returns ``x``.
    """
    if inplace:
        call.fp4_act_quant_inplace(x, block_size)
        return x
    return call.fp4_act_quant(x, block_size)


# ---------------------------------------------------------------- dequant
def fp8_scale_layout(op: str, y: torch.Tensor, s: torch.Tensor, block_size: int) -> str:
    """'row' (s ``[..., K/bs]``) or 'block' (y ``[..., N, K]``, s ``[..., ceil(N/bs), ceil(K/bs)]``)."""
    k = y.shape[-1]
    if s.dim() == y.dim() and tuple(s.shape[:-1]) == tuple(y.shape[:-1]) and k % block_size == 0 \
            and s.shape[-1] == k // block_size:
        return "row"
    if y.dim() >= 2 and s.dim() == y.dim() and tuple(s.shape[:-2]) == tuple(y.shape[:-2]) \
            and s.shape[-2] == ceil_div(y.shape[-2], block_size) and s.shape[-1] == ceil_div(k, block_size):
        return "block"
    raise C.ShapeError(
        f"{op}: s must be [..., K/{block_size}] (per-row blocks) or [..., ceil(N/{block_size}), "
        f"ceil(K/{block_size})] (2-D weight blocks) for y {C.describe(y)}, got {C.describe(s)}")


def _check_dequant_fp8(y, s, block_size, out_dtype):
    op = "dequant_fp8"
    C.dtype(op, "y", y, (FP8,))
    C.dtype(op, "s", s, SCALE_DTYPES)
    C.min_rank(op, "y", y, 1, "[..., K]")
    C.in_range(op, "block_size", block_size, 1, C.MAX_QUANT_BLOCK)
    C.same_device(op, y=y, s=s)
    C.one_of(op, "out_dtype", out_dtype, FLOATS)
    fp8_scale_layout(op, y, s, block_size)


define_op("dequant_fp8", "(Tensor y, Tensor s, int block_size=128, ScalarType out_dtype=float32) -> Tensor",
          check=_check_dequant_fp8, fake=lambda y, s, bs, od: y.new_empty(y.shape, dtype=od),
          doc=C.ranges_doc(block_size=C.interval(1, C.MAX_QUANT_BLOCK)),
          value_check=lambda y, s, bs, od: C.finite("dequant_fp8", "s", s))


def dequant_fp8(y: torch.Tensor, s: torch.Tensor, block_size: int = 128,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FP8 ``y`` times its block scales ``s`` (per-row ``[..., K/bs]`` or 2-D ``[..., N/bs, K/bs]``)."""
    return call.dequant_fp8(y, s, block_size, out_dtype)


def _check_dequant_fp4(y, s, block_size, out_dtype):
    op = "dequant_fp4"
    C.dtype(op, "y", y, (torch.uint8,))
    C.dtype(op, "s", s, SCALE_DTYPES)
    C.min_rank(op, "y", y, 1, "[..., K/2]")
    C.in_range(op, "block_size", block_size, 1, C.MAX_QUANT_BLOCK)
    C.same_device(op, y=y, s=s)
    C.one_of(op, "out_dtype", out_dtype, FLOATS)
    k = 2 * y.shape[-1]
    C.divisible(op, "K = 2*y.shape[-1]", k, block_size, "block_size")
    C.shape(op, "s", s, (*y.shape[:-1], k // block_size), "[..., K/block_size]")


define_op("dequant_fp4", "(Tensor y, Tensor s, int block_size=32, ScalarType out_dtype=float32) -> Tensor",
          check=_check_dequant_fp4, doc=C.ranges_doc(block_size=C.interval(1, C.MAX_QUANT_BLOCK)),
          fake=lambda y, s, bs, od: y.new_empty((*y.shape[:-1], 2 * y.shape[-1]), dtype=od),
          value_check=lambda y, s, bs, od: C.finite("dequant_fp4", "s", s))


def dequant_fp4(y: torch.Tensor, s: torch.Tensor, block_size: int = 32,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed e2m1 ``y [..., K/2]`` times its scales ``s [..., K/block_size]`` -> ``[..., K]``."""
    return call.dequant_fp4(y, s, block_size, out_dtype)


# ---------------------------------------------------------------- weight quantizers
def _check_quant_weight_fp8(w, block, scale_fmt):
    op = "quant_weight_fp8"
    C.dtype(op, "w", w, FLOATS)
    C.min_rank(op, "w", w, 2, "[..., N, K]")
    C.in_range(op, "block", block, 1, C.MAX_WEIGHT_BLOCK)
    C.one_of(op, "scale_fmt", scale_fmt, SCALE_FMTS)


def _fake_quant_weight_fp8(w, block, scale_fmt):
    s_shape = (*w.shape[:-2], ceil_div(w.shape[-2], block), ceil_div(w.shape[-1], block))
    return (w.new_empty(w.shape, dtype=FP8),
            w.new_empty(s_shape, dtype=E8M0 if scale_fmt == "ue8m0" else torch.float32))


define_op("quant_weight_fp8", "(Tensor w, int block=128, str? scale_fmt=\"ue8m0\") -> (Tensor, Tensor)",
          check=_check_quant_weight_fp8, fake=_fake_quant_weight_fp8,
          doc=C.ranges_doc(block=C.interval(1, C.MAX_WEIGHT_BLOCK)),
          value_check=_finite_input("quant_weight_fp8", "w"))


def quant_weight_fp8(w: torch.Tensor, block: int = 128, scale_fmt: str | None = "ue8m0"):
    """Weight FP8 quantization per ``block x block`` tile: w float ``[..., N, K]`` -> (fp8 ``[..., N, K]``,
    s ``[..., ceil(N/block), ceil(K/block)]``, e8m0 for ``scale_fmt="ue8m0"`` else float32)."""
    return call.quant_weight_fp8(w, block, scale_fmt)


def _check_quant_weight_fp4(w, block):
    op = "quant_weight_fp4"
    C.dtype(op, "w", w, FLOATS)
    C.min_rank(op, "w", w, 2, "[..., N, K]")
    C.in_range(op, "block", block, 1, C.MAX_QUANT_BLOCK)
    _even_block(op, "block", block)
    C.divisible(op, "w.shape[-1]", w.shape[-1], block, "block")


define_op("quant_weight_fp4", "(Tensor w, int block=32) -> (Tensor, Tensor)",
          check=_check_quant_weight_fp4, fake=lambda w, block: _fake_fp4_act_quant(w, block),
          doc=C.ranges_doc(block=C.interval(1, C.MAX_QUANT_BLOCK) + " and even (an odd one: `ShapeError`)"),
          value_check=_finite_input("quant_weight_fp4", "w"))


def quant_weight_fp4(w: torch.Tensor, block: int = 32):
    """Weight MXFP4 quantization: w float ``[..., N, K]`` -> (uint8 ``[..., N, K/2]``, e8m0 ``[..., N, K/block]``)."""
    return call.quant_weight_fp4(w, block)
