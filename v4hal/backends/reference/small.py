"""Reference (pure PyTorch, fp32 math) small ops of DeepSeek-V4: RMSNorm, rotary embedding, Hadamard.

Signatures follow ``docs/op_contract.md`` (schema argument order and names); semantics follow
``V4_OPS.md`` section 9 and the public ``inference/model.py`` (``RMSNorm``, ``apply_rotary_emb``,
``rotate_activation``). Every function returns a fresh tensor in the input's dtype.
"""
from __future__ import annotations

import torch

from v4hal.hal import formats
from v4hal.hal.errors import DTypeError, RangeError, ShapeError


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim.

    Args:
        x: ``[..., D]`` float.
        weight: ``[D]``, fp32 or x's dtype.
        eps: added to the mean square.

    Returns:
        ``[..., D]`` in x's dtype: ``weight * x * rsqrt(mean(x**2) + eps)`` computed in fp32 and cast
        once at the end (as the public ``RMSNorm``, which keeps its weight in fp32).
    """
    if weight.shape != x.shape[-1:]:
        raise ShapeError(f"rms_norm: weight must be [D] = [{x.shape[-1]}], got {list(weight.shape)}")
    xf = x.float()
    inv = xf.square().mean(dim=-1, keepdim=True).add_(formats.operand(eps, xf)).rsqrt_()
    # weight * (x * inv): fp32 products (a bf16 weight is widened exactly by the in-place multiply)
    return (xf * inv).mul_(weight).to(x.dtype)


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
    if x.dim() not in (3, 4):
        raise ShapeError(f"rotary_emb: x must be [b, s, rd] or [b, s, h, rd], got {list(x.shape)}")
    if freqs_cis.dtype != torch.complex64:
        raise DTypeError(f"rotary_emb: freqs_cis must be complex64, got {freqs_cis.dtype}")
    b, s, rd = x.shape[0], x.shape[1], x.shape[-1]
    if rd % 2:
        raise ShapeError(f"rotary_emb: rotary dim of x must be even, got {rd}")
    half = rd // 2
    if tuple(freqs_cis.shape) == (s, half):
        f = freqs_cis.unsqueeze(0)                 # [1, s, rd/2]
    elif tuple(freqs_cis.shape) == (b, s, half):
        f = freqs_cis
    else:
        raise ShapeError(f"rotary_emb: freqs_cis must be [s, rd/2] = {[s, half]} or [b, s, rd/2] = "
                         f"{[b, s, half]}, got {list(freqs_cis.shape)}")
    if inverse:
        f = f.conj()
    if x.dim() == 4:
        f = f.unsqueeze(2)                         # broadcast over heads
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], half, 2).contiguous())
    y = torch.view_as_real(xc * f).flatten(-2)
    return y.to(x.dtype)


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
    if dd < 1 or dd & (dd - 1):
        raise ShapeError(f"hadamard_transform: last dim of x must be a power of 2, got {dd}")
    if scale is None:
        scale = dd ** -0.5
    elif not torch.isfinite(torch.tensor(float(scale))):
        raise RangeError(f"hadamard_transform: scale must be finite, got {scale}")
    lead = x.shape[:-1]
    y = x.float().reshape(-1, dd)
    h = 1
    while h < dd:
        pairs = y.view(-1, dd // (2 * h), 2, h)
        a, c = pairs[:, :, 0], pairs[:, :, 1]
        y = torch.stack((a + c, a - c), dim=2).view(-1, dd)
        h *= 2
    return (y * formats.operand(float(scale), y)).reshape(*lead, dd).to(x.dtype)
