"""Reference quantizers: FP8 e4m3 block quantization (activations and 2-D weight tiles), MXFP4 e2m1
block quantization, and their dequantizers. Pure PyTorch, fp32 math, bit exact.

The rounding recipe is the public DeepSeek-V4 ``inference/kernel.py`` (``act_quant_kernel`` and
``fp4_quant_kernel``), see :mod:`v4hal.hal.formats`:

* FP8: ``amax = max(|x_block|, 1e-4)``; ``s = amax * fp32(1/448)``, rounded up to a power of two
  when ``scale_fmt`` is given or the scales are e8m0; ``y = fp8(clamp(x / s, -448, 448))`` with
  ``x / s`` an fp32 division (one rounding) followed by the RNE cast to e4m3.
* FP4: ``amax = max(|x_block|, 6*2**-126)``; ``s = pow2_ceil(amax * fp32(1/6))`` (e8m0);
  ``y = e2m1(clamp(x / s, -6, 6))`` (exact division, RNE on the e2m1 grid).
* In-place variants write ``fp32(y) * s`` back in x's dtype (one rounding).
* A block holding an inf or a NaN (reached only with value checks off: the op layer refuses
  non-finite input otherwise) gets a NaN scale (fp32 NaN, e8m0 byte 0xFF) and a NaN payload:
  e4m3 ``0x7F`` for every element, e2m1 code 7 (e2m1 has no NaN); the round trips write NaN.

Signatures follow ``docs/op_contract.md`` (schema names and order). Inputs arrive validated by
the op declarations in :mod:`v4hal.ops.quant`.
"""
from __future__ import annotations

import torch

from v4hal.hal import formats as F
from v4hal.hal.registry import implements


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _fp8_quant_rows(x: torch.Tensor, block_size: int, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x float ``[..., K]`` -> (fp8 ``[..., K]``, fp32 scales ``[..., K/bs]``)."""
    xb = x.float().unflatten(-1, (-1, block_size))                        # [..., K/bs, bs]
    amax = xb.abs().amax(dim=-1)                                           # [..., K/bs]
    bad = F.nonfinite_blocks(amax)
    s = F.mark_nonfinite_blocks(F.fp8_block_scale(amax, pow2), bad)
    q = (xb / s.unsqueeze(-1)).clamp_(-F.FP8_MAX, F.FP8_MAX)               # F.fp8_round, in place
    y = q.to(F.FP8_DTYPE)
    y.view(torch.uint8).masked_fill_(bad.unsqueeze(-1), F.FP8_NAN_BYTE)    # one NaN for the whole block
    return y.flatten(-2), s


def _fp4_quant_rows(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x float ``[..., K]`` -> (e2m1 codes uint8 ``[..., K]``, fp32 power-of-two scales ``[..., K/bs]``)."""
    xb = x.float().unflatten(-1, (-1, block_size))
    amax = xb.abs().amax(dim=-1)
    bad = F.nonfinite_blocks(amax)
    s = F.mark_nonfinite_blocks(F.fp4_block_scale(amax), bad)
    codes = F.e2m1_encode((xb / s.unsqueeze(-1)).clamp_(-F.FP4_MAX, F.FP4_MAX))
    return codes.masked_fill_(bad.unsqueeze(-1), F.FP4_NAN_CODE).flatten(-2), s


@implements("act_quant", "reference")
def act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None,
              scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 quantization per block of ``block_size`` along the last dim.

    x float ``[..., K]`` (``K % block_size == 0``) -> y fp8 e4m3 ``[..., K]`` and s
    ``[..., K/block_size]`` in ``scale_dtype`` (float32 or e8m0). Scales are powers of two when
    ``scale_fmt`` is given ("ue8m0") or ``scale_dtype`` is e8m0.
    """
    pow2 = scale_fmt is not None or scale_dtype == F.E8M0_DTYPE
    y, s = _fp8_quant_rows(x, block_size, pow2)
    return y, (F.block_scale_to_e8m0(s, nan=True) if scale_dtype == F.E8M0_DTYPE else s)


@implements("act_quant_inplace", "reference")
def act_quant_inplace(x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None) -> None:
    """FP8 round trip in place: ``x <- fp32(y) * s`` in x's dtype, (y, s) as :func:`act_quant` with
    float32 scales (powers of two when ``scale_fmt`` is given)."""
    y, s = _fp8_quant_rows(x, block_size, scale_fmt is not None)
    deq = F.fp8_to_float(y).unflatten(-1, (-1, block_size)) * s.unsqueeze(-1)
    x.copy_(deq.flatten(-2).to(x.dtype))


@implements("fp4_act_quant", "reference")
def fp4_act_quant(x: torch.Tensor, block_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 quantization per block of ``block_size`` (even) along the last dim.

    x float ``[..., K]`` -> packed e2m1 uint8 ``[..., K/2]`` (low nibble = even element) and
    e8m0 scales ``[..., K/block_size]``.
    """
    codes, s = _fp4_quant_rows(x, block_size)
    return F.pack_fp4(codes), F.block_scale_to_e8m0(s, nan=True)


@implements("fp4_act_quant_inplace", "reference")
def fp4_act_quant_inplace(x: torch.Tensor, block_size: int = 32) -> None:
    """MXFP4 round trip in place: ``x <- e2m1_value * s`` in x's dtype (signed zeros kept)."""
    codes, s = _fp4_quant_rows(x, block_size)
    deq = F.e2m1_decode(codes).unflatten(-1, (-1, block_size)) * s.unsqueeze(-1)
    x.copy_(deq.flatten(-2).to(x.dtype))


def _expand_block_scales(s: torch.Tensor, shape: torch.Size | tuple[int, ...], block_size: int) -> torch.Tensor:
    """fp32 FP8 scales -> fp32 ``shape``-sized factors.

    Two layouts, told apart by s's shape: per-row blocks (``s.shape == shape[:-1] + (K/bs,)``),
    else 2-D weight tiles (``s.shape == shape[:-2] + (ceil(N/bs), ceil(K/bs))``, partial edge tiles).
    """
    sf = F.scale_to_float(s)
    k = shape[-1]
    if sf.dim() == len(shape) and tuple(sf.shape[:-1]) == tuple(shape[:-1]) and k % block_size == 0 \
            and sf.shape[-1] == k // block_size:
        return sf.repeat_interleave(block_size, dim=-1)
    full = sf.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)
    return full[..., :shape[-2], :k]


@implements("dequant_fp8", "reference")
def dequant_fp8(y: torch.Tensor, s: torch.Tensor, block_size: int = 128,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``fp32(y) * s`` cast to ``out_dtype``.

    y fp8 ``[..., K]`` with s per-row ``[..., K/bs]``, or y ``[..., N, K]`` with 2-D tile scales
    ``[..., ceil(N/bs), ceil(K/bs)]``; s float32 or e8m0.
    """
    return (F.fp8_to_float(y) * _expand_block_scales(s, y.shape, block_size)).to(out_dtype)


@implements("dequant_fp4", "reference")
def dequant_fp4(y: torch.Tensor, s: torch.Tensor, block_size: int = 32,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed e2m1 uint8 ``[..., K/2]`` with scales ``[..., K/block_size]`` (e8m0 or float32) ->
    ``[..., K]`` in ``out_dtype``."""
    vals = F.e2m1_decode(F.unpack_fp4(y)).unflatten(-1, (-1, block_size))
    return (vals * F.scale_to_float(s).unsqueeze(-1)).flatten(-2).to(out_dtype)


@implements("quant_weight_fp8", "reference")
def quant_weight_fp8(w: torch.Tensor, block: int = 128,
                     scale_fmt: str | None = "ue8m0") -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 quantization per ``block x block`` tile of the last two dims.

    w float ``[..., N, K]`` -> fp8 ``[..., N, K]`` and s ``[..., ceil(N/block), ceil(K/block)]``
    (e8m0 when ``scale_fmt == "ue8m0"``, else float32). Same scale rule as :func:`act_quant`
    (amax floor 1e-4, ``s = amax * fp32(1/448)``, power of two for ue8m0); edge tiles use their
    real elements only.
    """
    n, k = w.shape[-2:]
    nb, kb = _ceil_div(n, block), _ceil_div(k, block)
    wf = torch.nn.functional.pad(w.float(), (0, kb * block - k, 0, nb * block - n))   # zero padding never lifts amax
    tiles = wf.unflatten(-1, (kb, block)).unflatten(-3, (nb, block))              # [..., nb, bs, kb, bs]
    amax = tiles.abs().amax(dim=(-3, -1))                                         # [..., nb, kb]
    bad = F.nonfinite_blocks(amax)
    s = F.mark_nonfinite_blocks(F.fp8_block_scale(amax, scale_fmt is not None), bad)
    y = F.fp8_round(tiles / s[..., :, None, :, None])
    y.view(torch.uint8).masked_fill_(bad[..., :, None, :, None], F.FP8_NAN_BYTE)
    y = y.flatten(-4, -3).flatten(-2)[..., :n, :k]
    return y.contiguous(), (F.block_scale_to_e8m0(s, nan=True) if scale_fmt == "ue8m0" else s)


@implements("quant_weight_fp4", "reference")
def quant_weight_fp4(w: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 weight quantization along K: w float ``[..., N, K]`` -> packed uint8 ``[..., N, K/2]``
    and e8m0 ``[..., N, K/block]``; the rule of :func:`fp4_act_quant` applied to every row."""
    codes, s = _fp4_quant_rows(w, block)
    return F.pack_fp4(codes), F.block_scale_to_e8m0(s, nan=True)
