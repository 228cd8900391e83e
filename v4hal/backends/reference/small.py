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
        once at the end (as the public ``RMSNorm``, which keeps its weight in fp32).
    """
    xf = x.float()
    inv = xf.square().mean(dim=-1, keepdim=True).add_(formats.operand(eps, xf)).rsqrt_()
    # weight * (x * inv): fp32 products (a bf16 weight is widened exactly by the in-place multiply)
    return (xf * inv).mul_(weight).to(x.dtype)


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
