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

Signatures follow ``docs/op_contract.md`` (schema names and order). The ops layer has already
checked dtypes and shapes; what is checked here is what the reference itself relies on.
"""
from __future__ import annotations

import torch

from v4hal.hal import formats as F
from v4hal.hal.errors import DTypeError, RangeError, ShapeError

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_SCALE_FMTS = (None, "ue8m0")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOATS:
        raise DTypeError(f"{op}: {name} must be float32, bfloat16 or float16, got {t.dtype} {list(t.shape)}")


def _check_blocks(op: str, x: torch.Tensor, block_size: int, *, even: bool = False) -> None:
    if x.dim() < 1:
        raise ShapeError(f"{op}: x must be [..., K], got a 0-d tensor")
    if block_size <= 0:
        raise RangeError(f"{op}: block_size must be > 0, got {block_size}")
    if even and block_size % 2:
        raise ShapeError(f"{op}: block_size must be even (two FP4 values per byte), got {block_size}")
    if x.shape[-1] % block_size:
        raise ShapeError(f"{op}: x.shape[-1] ({x.shape[-1]}) must be divisible by block_size ({block_size})")


def _check_scale_fmt(op: str, scale_fmt: str | None) -> None:
    if scale_fmt not in _SCALE_FMTS:
        raise RangeError(f"{op}: scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")


def _fp8_quant_rows(x: torch.Tensor, block_size: int, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x float ``[..., K]`` -> (fp8 ``[..., K]``, fp32 scales ``[..., K/bs]``)."""
    xb = x.float().unflatten(-1, (-1, block_size))                        # [..., K/bs, bs]
    s = F.fp8_block_scale(xb.abs().amax(dim=-1), pow2)                     # [..., K/bs]
    q = (xb / s.unsqueeze(-1)).clamp_(-F.FP8_MAX, F.FP8_MAX)               # F.fp8_round, in place
    return q.to(F.FP8_DTYPE).flatten(-2), s


def _fp4_quant_rows(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x float ``[..., K]`` -> (e2m1 codes uint8 ``[..., K]``, fp32 power-of-two scales ``[..., K/bs]``)."""
    xb = x.float().unflatten(-1, (-1, block_size))
    s = F.fp4_block_scale(xb.abs().amax(dim=-1))
    codes = F.e2m1_encode((xb / s.unsqueeze(-1)).clamp_(-F.FP4_MAX, F.FP4_MAX)).flatten(-2)
    return codes, s


def act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None,
              scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 quantization per block of ``block_size`` along the last dim.

    x float ``[..., K]`` (``K % block_size == 0``) -> y fp8 e4m3 ``[..., K]`` and s
    ``[..., K/block_size]`` in ``scale_dtype`` (float32 or e8m0). Scales are powers of two when
    ``scale_fmt`` is given ("ue8m0") or ``scale_dtype`` is e8m0.
    """
    _check_float("act_quant", "x", x)
    _check_blocks("act_quant", x, block_size)
    _check_scale_fmt("act_quant", scale_fmt)
    if scale_dtype not in (torch.float32, F.E8M0_DTYPE):
        raise DTypeError(f"act_quant: scale_dtype must be float32 or float8_e8m0fnu, got {scale_dtype}")
    pow2 = scale_fmt is not None or scale_dtype == F.E8M0_DTYPE
    y, s = _fp8_quant_rows(x, block_size, pow2)
    return y, (F.block_scale_to_e8m0(s) if scale_dtype == F.E8M0_DTYPE else s)


def act_quant_inplace(x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None) -> None:
    """FP8 round trip in place: ``x <- fp32(y) * s`` in x's dtype, (y, s) as :func:`act_quant` with
    float32 scales (powers of two when ``scale_fmt`` is given)."""
    _check_float("act_quant_inplace", "x", x)
    _check_blocks("act_quant_inplace", x, block_size)
    _check_scale_fmt("act_quant_inplace", scale_fmt)
    y, s = _fp8_quant_rows(x, block_size, scale_fmt is not None)
    deq = F.fp8_to_float(y).unflatten(-1, (-1, block_size)) * s.unsqueeze(-1)
    x.copy_(deq.flatten(-2).to(x.dtype))


def fp4_act_quant(x: torch.Tensor, block_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 quantization per block of ``block_size`` (even) along the last dim.

    x float ``[..., K]`` -> packed e2m1 uint8 ``[..., K/2]`` (low nibble = even element) and
    e8m0 scales ``[..., K/block_size]``.
    """
    _check_float("fp4_act_quant", "x", x)
    _check_blocks("fp4_act_quant", x, block_size, even=True)
    codes, s = _fp4_quant_rows(x, block_size)
    return F.pack_fp4(codes), F.block_scale_to_e8m0(s)


def fp4_act_quant_inplace(x: torch.Tensor, block_size: int = 32) -> None:
    """MXFP4 round trip in place: ``x <- e2m1_value * s`` in x's dtype (signed zeros kept)."""
    _check_float("fp4_act_quant_inplace", "x", x)
    _check_blocks("fp4_act_quant_inplace", x, block_size, even=True)
    codes, s = _fp4_quant_rows(x, block_size)
    deq = F.e2m1_decode(codes).unflatten(-1, (-1, block_size)) * s.unsqueeze(-1)
    x.copy_(deq.flatten(-2).to(x.dtype))


def _expand_block_scales(s: torch.Tensor, shape: torch.Size | tuple[int, ...], block_size: int) -> torch.Tensor:
    """fp32 FP8 scales -> fp32 ``shape``-sized factors.

    Two layouts, told apart by s's shape: per-row blocks (``s.shape == shape[:-1] + (K/bs,)``)
    or 2-D weight tiles (``s.shape == shape[:-2] + (ceil(N/bs), ceil(K/bs))``, partial edge tiles).
    """
    sf = F.scale_to_float(s)
    k = shape[-1]
    if sf.dim() == len(shape) and tuple(sf.shape[:-1]) == tuple(shape[:-1]) and k % block_size == 0 \
            and sf.shape[-1] == k // block_size:
        return sf.repeat_interleave(block_size, dim=-1)
    if len(shape) >= 2 and sf.dim() == len(shape) and tuple(sf.shape[:-2]) == tuple(shape[:-2]) \
            and sf.shape[-2] == _ceil_div(shape[-2], block_size) and sf.shape[-1] == _ceil_div(k, block_size):
        full = sf.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)
        return full[..., :shape[-2], :k]
    raise ShapeError(
        f"dequant_fp8: s must be [..., K/{block_size}] (per-row blocks) or [..., ceil(N/{block_size}), "
        f"ceil(K/{block_size})] (2-D weight blocks) for y {list(shape)}, got {s.dtype} {list(s.shape)}")


def dequant_fp8(y: torch.Tensor, s: torch.Tensor, block_size: int = 128,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``fp32(y) * s`` cast to ``out_dtype``.

    y fp8 ``[..., K]`` with s per-row ``[..., K/bs]``, or y ``[..., N, K]`` with 2-D tile scales
    ``[..., ceil(N/bs), ceil(K/bs)]``; s float32 or e8m0.
    """
    if y.dtype != F.FP8_DTYPE:
        raise DTypeError(f"dequant_fp8: y must be float8_e4m3fn, got {y.dtype} {list(y.shape)}")
    if y.dim() < 1:
        raise ShapeError("dequant_fp8: y must be [..., K], got a 0-d tensor")
    return (F.fp8_to_float(y) * _expand_block_scales(s, y.shape, block_size)).to(out_dtype)


def dequant_fp4(y: torch.Tensor, s: torch.Tensor, block_size: int = 32,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed e2m1 uint8 ``[..., K/2]`` with scales ``[..., K/block_size]`` (e8m0 or float32) ->
    ``[..., K]`` in ``out_dtype``."""
    if y.dtype != torch.uint8:
        raise DTypeError(f"dequant_fp4: y must be uint8 (packed e2m1), got {y.dtype} {list(y.shape)}")
    k = 2 * y.shape[-1] if y.dim() else 0
    if y.dim() < 1 or block_size <= 0 or k % block_size or tuple(s.shape) != (*y.shape[:-1], k // block_size):
        raise ShapeError(f"dequant_fp4: s must be [..., K/block_size] = {[*y.shape[:-1], k // max(block_size, 1)]} "
                         f"for y {list(y.shape)} and block_size {block_size}, got {list(s.shape)}")
    vals = F.e2m1_decode(F.unpack_fp4(y)).unflatten(-1, (-1, block_size))
    return (vals * F.scale_to_float(s).unsqueeze(-1)).flatten(-2).to(out_dtype)


def quant_weight_fp8(w: torch.Tensor, block: int = 128,
                     scale_fmt: str | None = "ue8m0") -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 quantization per ``block x block`` tile of the last two dims.

    w float ``[..., N, K]`` -> fp8 ``[..., N, K]`` and s ``[..., ceil(N/block), ceil(K/block)]``
    (e8m0 when ``scale_fmt == "ue8m0"``, else float32). Same scale rule as :func:`act_quant`
    (amax floor 1e-4, ``s = amax * fp32(1/448)``, power of two for ue8m0); edge tiles use their
    real elements only.
    """
    _check_float("quant_weight_fp8", "w", w)
    _check_scale_fmt("quant_weight_fp8", scale_fmt)
    if w.dim() < 2:
        raise ShapeError(f"quant_weight_fp8: w must be [..., N, K], got {list(w.shape)}")
    if block <= 0:
        raise RangeError(f"quant_weight_fp8: block must be > 0, got {block}")
    n, k = w.shape[-2:]
    nb, kb = _ceil_div(n, block), _ceil_div(k, block)
    wf = torch.nn.functional.pad(w.float(), (0, kb * block - k, 0, nb * block - n))   # zeros: |0| never raises amax
    tiles = wf.unflatten(-1, (kb, block)).unflatten(-3, (nb, block))              # [..., nb, bs, kb, bs]
    s = F.fp8_block_scale(tiles.abs().amax(dim=(-3, -1)), scale_fmt is not None)  # [..., nb, kb]
    y = F.fp8_round(tiles / s[..., :, None, :, None]).flatten(-4, -3).flatten(-2)[..., :n, :k]
    return y.contiguous(), (F.block_scale_to_e8m0(s) if scale_fmt == "ue8m0" else s)


def quant_weight_fp4(w: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 weight quantization along K: w float ``[..., N, K]`` -> packed uint8 ``[..., N, K/2]``
    and e8m0 ``[..., N, K/block]``; the rule of :func:`fp4_act_quant` applied to every row."""
    _check_float("quant_weight_fp4", "w", w)
    if w.dim() < 2:
        raise ShapeError(f"quant_weight_fp4: w must be [..., N, K], got {list(w.shape)}")
    _check_blocks("quant_weight_fp4", w, block, even=True)
    codes, s = _fp4_quant_rows(w, block)
    return F.pack_fp4(codes), F.block_scale_to_e8m0(s)
