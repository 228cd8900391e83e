"""Building blocks of the V4 graph: Linear (FP8 / bf16 / fp32 weights), RMSNorm, rotary tables.

Every GEMM runs through a v4hal op: an FP8 weight takes ``act_quant`` + ``fp8_gemm`` (the
public ``linear()`` recipe), a float weight takes ``grouped_gemm`` with a single group (the
op's float recipe; the public code calls ``F.linear`` there). Tensors are registered as
buffers named like the checkpoint (``weight``, ``scale``) and start on the ``meta`` device:
`V4Model` fills them from a checkpoint.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import nn

import v4hal

from .config import ModelConfig

__all__ = ["Linear", "FusedLinear", "RMSNorm", "act_scale_format", "precompute_freqs_cis", "float_gemm",
           "KIND_DTYPES"]

E8M0 = torch.float8_e8m0fnu
FP8 = torch.float8_e4m3fn

# dtype the model keeps for each weight kind of `spec.py`
KIND_DTYPES: dict[str, torch.dtype] = {
    "f32": torch.float32, "bf16": torch.bfloat16, "fp8": FP8, "fp8_scale": torch.float32,
    "fp4": torch.uint8, "fp4_scale": E8M0, "i32": torch.int32, "table": FP8, "table_scale": E8M0,
}


def act_scale_format(cfg: ModelConfig) -> tuple[str | None, torch.dtype]:
    """(scale_fmt, scale_dtype) of activation quantization, as the public ``Transformer`` sets them:
    e8m0 scales (``scale_dtype == "fp8"``) force power-of-two ``"ue8m0"`` rounding."""
    if cfg.scale_dtype == "fp8":
        return "ue8m0", E8M0
    return cfg.scale_fmt, torch.float32


_OFFSETS: dict[tuple[int, str], torch.Tensor] = {}


def _single_group(m: int, device: torch.device) -> torch.Tensor:
    key = (m, str(device))
    t = _OFFSETS.get(key)
    if t is None:
        t = torch.tensor([0, m], dtype=torch.int64, device=device)
        if len(_OFFSETS) > 256:
            _OFFSETS.clear()
        _OFFSETS[key] = t
    return t


def float_gemm(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x [..., K] @ w[N, K]^T`` for float weights through ``v4hal.grouped_gemm`` (one group).

    x and w share a float dtype; the result is ``[..., N]`` in ``out_dtype`` (default x's dtype).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = v4hal.grouped_gemm(x2, w.unsqueeze(0), _single_group(x2.shape[0], x2.device),
                           out_dtype=out_dtype or x.dtype)
    return y.view(*lead, w.shape[0])


class Linear(nn.Module):
    """``y = x @ W^T`` with W FP8 (+ block scales over ``cfg.weight_block_size`` square tiles: 128 in V4,
    32 in V4.1), bf16 or fp32.

    Args:
        in_features, out_features: K and N.
        kind: ``"fp8"`` (FP8 weight, activations quantized per 128 with ``act_quant``),
            ``"bf16"`` or ``"f32"`` (float weight, ``grouped_gemm``; x must have the weight's dtype).
        cfg: gives the activation scale format and the weight tile for FP8.
    Input ``[..., K]``; output ``[..., N]`` bf16 for FP8 weights, else the weight's dtype.
    """

    def __init__(self, in_features: int, out_features: int, kind: str, cfg: ModelConfig) -> None:
        super().__init__()
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        self.scale_fmt, self.scale_dtype = act_scale_format(cfg)
        self.block = cfg.weight_block_size
        meta = torch.device("meta")
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=KIND_DTYPES[kind], device=meta))
        if kind == "fp8":
            b = self.block
            self.register_buffer("scale", torch.empty(math.ceil(out_features / b), math.ceil(in_features / b),
                                                      dtype=self.scale_dtype, device=meta))
        else:
            self.scale = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "fp8":
            a, a_s = v4hal.act_quant(x, 128, self.scale_fmt, self.scale_dtype)
            return v4hal.fp8_gemm(a, a_s, self.weight, self.scale, scale_dtype=a_s.dtype, out_dtype=torch.bfloat16)
        return float_gemm(x, self.weight)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kind={self.kind}"


class FusedLinear(nn.Module):
    """Several `Linear` of one input run as a single GEMM (weights concatenated along N).

    Exactly the separate products up to fp32 summation order: each output block only sees its
    own weight rows, FP8 activations are quantized per row (the same for every part), and FP8
    block scales stay aligned because every part but the last has ``N`` a multiple of the weight tile. Parts must
    share a kind, except that bf16 parts may join fp32 ones: their weights are widened to fp32
    (exact) and their outputs rounded back to bf16, which is what a bf16 GEMM with fp32
    accumulation returns. After `fuse`, the same-kind parts' ``weight`` / ``scale`` buffers are
    views into the fused tensors (no extra memory).
    """

    def __init__(self, parts: list[Linear]) -> None:
        super().__init__()
        self._parts = parts          # plain list: the parts stay registered where the checkpoint names them
        self.sizes = [p.out_features for p in parts]
        self.kind = "f32" if any(p.kind == "f32" for p in parts) else parts[0].kind
        self.widened = [p.kind != self.kind for p in parts]
        self.scale_fmt, self.scale_dtype = parts[0].scale_fmt, parts[0].scale_dtype
        self.register_buffer("weight", None, persistent=False)
        self.register_buffer("scale", None, persistent=False)

    @staticmethod
    def can_fuse(parts: list[Linear]) -> bool:
        kinds = {p.kind for p in parts}
        if len({p.in_features for p in parts}) != 1:
            return False
        if kinds == {"fp8"}:
            return (len({p.block for p in parts}) == 1 and all(p.out_features % p.block == 0 for p in parts[:-1])
                    and len({p.scale.dtype for p in parts}) == 1)
        return kinds <= {"f32", "bf16"} and (len(kinds) == 1 or "f32" in kinds)

    def fuse(self) -> None:
        """Concatenate the loaded weights (call once the parts hold real tensors)."""
        dtype = KIND_DTYPES[self.kind]
        self.weight = torch.cat([p.weight.to(dtype) for p in self._parts], dim=0)
        offs = 0
        for p, n, wide in zip(self._parts, self.sizes, self.widened):
            if not wide:
                p._buffers["weight"] = self.weight[offs:offs + n]
            offs += n
        if self.kind == "fp8":
            self.scale = torch.cat([p.scale for p in self._parts], dim=0)
            offs = 0
            for p in self._parts:
                rows = p.scale.shape[0]
                p._buffers["scale"] = self.scale[offs:offs + rows]
                offs += rows

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x ``[..., K]`` (fp32 when any part is fp32) -> one output per part."""
        if self.kind == "fp8":
            a, a_s = v4hal.act_quant(x, 128, self.scale_fmt, self.scale_dtype)
            y = v4hal.fp8_gemm(a, a_s, self.weight, self.scale, scale_dtype=a_s.dtype, out_dtype=torch.bfloat16)
        else:
            y = float_gemm(x.to(self.weight.dtype), self.weight)
        outs = y.split(self.sizes, dim=-1)
        return tuple(o.to(torch.bfloat16) if wide else o for o, wide in zip(outs, self.widened))


class RMSNorm(nn.Module):
    """RMSNorm with an fp32 weight (``v4hal.rms_norm``); output in the input's dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.empty(dim, dtype=torch.float32, device=torch.device("meta")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return v4hal.rms_norm(x, self.weight, self.eps)


@lru_cache(maxsize=8)
def _freqs_cpu(dim: int, seqlen: int, original_seq_len: int, base: float, factor: float,
               beta_fast: float, beta_slow: float) -> torch.Tensor:
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))          # [dim/2]
    if original_seq_len > 0:
        # YaRN: dims that turn fewer than beta_slow times over the original context are
        # interpolated by 1/factor, dims turning more than beta_fast times are kept, a
        # linear ramp in between.
        def turning_dim(rotations: float) -> float:
            return dim * math.log(original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        lo = max(math.floor(turning_dim(beta_fast)), 0)
        hi = min(math.ceil(turning_dim(beta_slow)), dim - 1)
        span = (hi - lo) if hi != lo else 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / span).clamp(0, 1)
        inv = inv * (1 - ramp) + (inv / factor) * ramp
    angles = torch.outer(torch.arange(seqlen, dtype=torch.float32), inv)
    return torch.polar(torch.ones_like(angles), angles)


def precompute_freqs_cis(cfg: ModelConfig, compressed: bool, device: torch.device | str | None = None) -> torch.Tensor:
    """complex64 ``[max_seq_len, rope_head_dim/2]`` rotary table of one layer.

    Compressed layers (ratio 4 or 128) use ``compress_rope_theta`` with YaRN scaling; window-only
    layers use ``rope_theta`` without YaRN (public ``Attention.__init__``).
    """
    if compressed:
        t = _freqs_cpu(cfg.rope_head_dim, cfg.max_seq_len, cfg.original_seq_len, float(cfg.compress_rope_theta),
                       float(cfg.rope_factor), float(cfg.beta_fast), float(cfg.beta_slow))
    else:
        t = _freqs_cpu(cfg.rope_head_dim, cfg.max_seq_len, 0, float(cfg.rope_theta), float(cfg.rope_factor),
                       float(cfg.beta_fast), float(cfg.beta_slow))
    return t.to(device) if device is not None else t.clone()
