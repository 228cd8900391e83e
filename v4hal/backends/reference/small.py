"""Reference (pure PyTorch, fp32 math) small ops of DeepSeek-V4: RMSNorm, rotary embedding, Hadamard.

Signatures follow ``docs/op_contract.md`` (schema argument order and names); semantics follow
``docs/ops.md`` (small ops) and the public ``inference/model.py`` (``RMSNorm``, ``apply_rotary_emb``,
``rotate_activation``). Every function returns a fresh tensor in the input's dtype.
"""
from __future__ import annotations

import torch

from v4hal.hal import formats
from v4hal.hal.registry import implements


@implements("rms_norm", "reference")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim.

    Args:
        x: ``[..., D]`` float.
        weight: ``[D]``, fp32 or x's dtype.
        eps: added to the mean square.

    Returns:
        ``[..., D]`` in x's dtype: ``weight * x * rsqrt(mean(x**2) + eps)`` computed in fp32 and cast
        once at the end (as the public ``RMSNorm``, which keeps its weight in fp32). Rows whose
        max-abs reaches ``2**32`` are first divided by a power of two (:func:`rms_scale`), so the
        squares cannot overflow; other rows are computed exactly as the formula reads (both forms give
        the same bits on such rows; CPU tensors take the plain form unless a square overflowed, other
        devices the rescaled form, which needs no host sync).
    """
    if x.shape[-1] == 0:
        return x.new_empty(x.shape)
    xf = x.float()
    if xf.device.type == "cpu":
        # on the CPU a look at the result is free: the plain formula unless a square overflowed
        ms = xf.square().mean(dim=-1, keepdim=True)
        if bool(torch.isfinite(ms).all()):
            inv = ms.add_(formats.operand(eps, xf)).rsqrt_()
            return (xf * inv).mul_(weight).to(x.dtype)
    m_inv = rms_scale(xf.abs().amax(dim=-1, keepdim=True))                    # [..., 1]: 1 or 2**-k
    u = xf * m_inv                                                            # exact (power of two)
    ms = u.square().mean(dim=-1, keepdim=True)
    inv = ms.add_(m_inv.square().mul_(formats.operand(eps, xf))).rsqrt_()     # rsqrt(mean(u^2) + eps/m^2)
    # weight * (u * inv): fp32 products (a bf16 weight is widened exactly by the in-place multiply)
    return (u * inv).mul_(weight).to(x.dtype)


RMS_SCALE_MIN_EXP = 32      # rows with max-abs >= 2**32 are rescaled before squaring
RMS_SCALE_MAX_EXP = 126     # largest k of the 2**-k factor (2**-126 is the smallest normal fp32)


def rms_scale(amax: torch.Tensor) -> torch.Tensor:
    """fp32 row max-abs ``[..., 1]`` -> fp32 ``2**-k`` ``[..., 1]``: 1 below ``2**32``, else ``k`` =
    min(exponent of amax, 126), so ``|x| * 2**-k < 4`` and the squares of ``x * 2**-k`` cannot overflow.

    Multiplying by a power of two is exact, and ``rsqrt(m^2 * z) = rsqrt(z) / m`` for ``m = 2**k``,
    so a rescaled row gives the bits the unscaled formula gives wherever that one does not overflow
    (up to subnormal rounding of the tiniest squares). inf and NaN rows take ``k = 126`` and stay
    non-finite.
    """
    bits = amax.view(torch.int32)
    e = bits.bitwise_right_shift(formats.operand(23, bits)).bitwise_and_(formats.operand(0xFF, bits))  # biased
    k = (e - 127).clamp_(max=RMS_SCALE_MAX_EXP)
    k = torch.where(k >= RMS_SCALE_MIN_EXP, k, torch.zeros_like(k))
    return (127 - k).bitwise_left_shift_(formats.operand(23, bits)).view(torch.float32)


@implements("rotary_emb", "reference")
def rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotary embedding on interleaved pairs.

    Args:
        x: ``[b, s, rd]`` or ``[b, s, h, rd]`` float, ``rd`` even.
        freqs_cis: complex64 ``[s, rd/2]`` (shared by the batch) or ``[b, s, rd/2]`` (per sequence).
        inverse: rotate by the conjugate (de-rotation of the attention output).

    Returns:
        Same shape and dtype as ``x``: pair ``(x[2i], x[2i+1])`` read as the complex number
        ``x[2i] + 1j*x[2i+1]``, multiplied by ``freqs_cis[..., i]`` (or its conjugate) in
        complex64, written back as (real, imag). Heads share the frequencies of their position.
    """
    half = x.shape[-1] // 2
    f = freqs_cis if freqs_cis.dim() == 3 else freqs_cis.unsqueeze(0)     # [b or 1, s, rd/2]
    if inverse:
        f = f.conj()
    if x.dim() == 4:
        f = f.unsqueeze(2)                         # broadcast over heads
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], half, 2).contiguous())
    y = torch.view_as_real(xc * f).flatten(-2)
    return y.to(x.dtype)


@implements("hadamard_transform", "reference")
def hadamard_transform(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Scaled Walsh-Hadamard transform over the last dim, Sylvester (natural) order.

    Args:
        x: ``[..., D]`` float, ``D`` a power of two.
        scale: output multiplier, default ``D**-0.5`` (orthonormal transform).

    Returns:
        ``[..., D]`` in x's dtype: ``scale * x @ H_D`` with ``H_1 = [1]``,
        ``H_2n = [[H_n, H_n], [H_n, -H_n]]`` (symmetric, so ``x @ H == H @ x``), computed in fp32 by
        ``log2(D)`` butterfly stages, each a vectorized ``(a, b) -> (a + b, a - b)`` over pairs
        ``h`` apart. This is what ``fast_hadamard_transform.hadamard_transform`` (the public
        ``rotate_activation``) computes.
    """
    dd = x.shape[-1]
    if scale is None:
        scale = dd ** -0.5
    lead = x.shape[:-1]
    y = x.float().reshape(-1, dd)
    h = 1
    while h < dd:
        pairs = y.view(-1, dd // (2 * h), 2, h)
        a, c = pairs[:, :, 0], pairs[:, :, 1]
        y = torch.stack((a + c, a - c), dim=2).view(-1, dd)
        h *= 2
    return (y * formats.operand(float(scale), y)).reshape(*lead, dd).to(x.dtype)
