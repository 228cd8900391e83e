"""Small ops of the V4 graph: RMSNorm, interleaved rotary embedding, Hadamard transform."""
from __future__ import annotations

import torch

from . import _checks as C
from ._checks import FLOATS
from ._define import call, define_op


def _check_rms_norm(x, weight, eps):
    op = "rms_norm"
    C.dtype(op, "x", x, FLOATS)
    C.min_rank(op, "x", x, 1, "[..., D]")
    C.dtype(op, "weight", weight, FLOATS)
    C.shape(op, "weight", weight, (x.shape[-1],), "[D]")
    C.eps_arg(op, "eps", eps)
    C.same_device(op, x=x, weight=weight)


define_op("rms_norm", "(Tensor x, Tensor weight, float eps=1e-6) -> Tensor",
          check=_check_rms_norm, fake=lambda x, w, eps: torch.empty_like(x), doc=C.ranges_doc(eps=C.EPS_RANGE))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * weight`` in fp32, returned in x's dtype. x ``[..., D]``, weight ``[D]``."""
    return call.rms_norm(x, weight, float(eps))


def _check_rotary(x, freqs_cis, inverse):
    op = "rotary_emb"
    C.dtype(op, "x", x, FLOATS)
    C.rank(op, "x", x, (3, 4), "[b, s, rd] or [b, s, h, rd]")
    if x.shape[-1] % 2:
        raise C.ShapeError(f"{op}: the rotary dim x.shape[-1] must be even (interleaved pairs), got {C.describe(x)}")
    C.dtype(op, "freqs_cis", freqs_cis, (torch.complex64,))
    b, s, half = x.shape[0], x.shape[1], x.shape[-1] // 2
    if tuple(freqs_cis.shape) not in ((s, half), (b, s, half)):
        raise C.ShapeError(f"{op}: freqs_cis must be [s, rd/2] = [{s}, {half}] or [b, s, rd/2], "
                           f"got {C.describe(freqs_cis)}")
    C.same_device(op, x=x, freqs_cis=freqs_cis)


define_op("rotary_emb", "(Tensor x, Tensor freqs_cis, bool inverse=False) -> Tensor",
          check=_check_rotary, fake=lambda x, f, inv: torch.empty_like(x))


def rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate interleaved pairs ``(x[2i], x[2i+1])`` of ``x [b, s, (h,) rd]`` by complex ``freqs_cis``
    ``[s, rd/2]`` or ``[b, s, rd/2]`` (by its conjugate when ``inverse``). Out like x."""
    return call.rotary_emb(x, freqs_cis, bool(inverse))


def _check_hadamard(x, scale):
    op = "hadamard_transform"
    C.dtype(op, "x", x, FLOATS)
    C.min_rank(op, "x", x, 1, "[..., D]")
    C.power_of_two(op, "x.shape[-1]", x.shape[-1])
    if scale is not None:
        C.float_arg(op, "scale", scale)


define_op("hadamard_transform", "(Tensor x, float? scale=None) -> Tensor",
          check=_check_hadamard, fake=lambda x, scale: torch.empty_like(x),
          doc=C.ranges_doc(scale=C.FLOAT_ARG_RANGE + " or None"))


def hadamard_transform(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Walsh-Hadamard transform (Sylvester order) of the last dim (a power of two) times ``scale``
    (default ``D**-0.5``, orthonormal). Out like x."""
    return call.hadamard_transform(x, None if scale is None else float(scale))
