"""V4 mixture of experts on v4hal ops: ``moe_gate`` (hash or score routing) + ``moe_experts``.

Public ``inference/model.py`` ``Gate`` / ``Expert`` / ``MoE``: the gate scores ``x @ Wg^T`` in
fp32 (``sqrtsoftplus``), picks the top-k of ``scores + bias`` (or ``tid2eid[token]`` in the first
``n_hash_layers`` layers), weights = chosen unbiased scores / their sum * ``route_scale``; each
routed expert is a SwiGLU with ``swiglu_limit`` clamps; one shared expert is added to every
token. The routed experts are stored stacked (``[E, I, D]``) for ``moe_experts``; the shared
expert runs through ``moe_experts`` too, as a single expert with weight 1 for every token, so
its SwiGLU (and its FP8 activation quantization) is the op's, not glue.
"""
from __future__ import annotations

import math

import torch
from torch import nn

import v4hal

from .config import ModelConfig
from .layers import KIND_DTYPES, Linear, act_scale_format
from .spec import expert_kind, linear_kind

__all__ = ["Gate", "Experts", "MoE"]

META = torch.device("meta")


class Gate(nn.Module):
    """Routing weights: ``weight [E, dim]`` (bf16), ``bias [E]`` fp32 or ``tid2eid [vocab, k]`` int32."""

    def __init__(self, layer_id: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.topk, self.score_func, self.route_scale = cfg.n_activated_experts, cfg.score_func, cfg.route_scale
        self.hash = layer_id < cfg.n_hash_layers
        self.register_buffer("weight", torch.empty(cfg.n_routed_experts, cfg.dim, dtype=torch.bfloat16, device=META))
        if self.hash:
            self.register_buffer("tid2eid", torch.empty(cfg.vocab_size, cfg.n_activated_experts, dtype=torch.int32,
                                                        device=META))
            self.bias = None
        else:
            self.register_buffer("bias", torch.empty(cfg.n_routed_experts, dtype=torch.float32, device=META))
            self.tid2eid = None

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[T, dim]``, input_ids ``[T]`` -> (fp32 weights ``[T, k]``, int32 indices ``[T, k]``)."""
        return v4hal.moe_gate(x, self.weight, topk=self.topk, bias=self.bias, score_func=self.score_func,
                              route_scale=self.route_scale, tid2eid=self.tid2eid,
                              input_ids=input_ids if self.hash else None)


class Experts(nn.Module):
    """The routed experts, stacked: ``w1/w3 [E, I, D]``, ``w2 [E, D, I]`` (+ scales when quantized)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = expert_kind(cfg)
        e, d, inter = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
        self.swiglu_limit = float(cfg.swiglu_limit)
        scale_dtype = act_scale_format(cfg)[1]
        for name, (n, k) in (("w1", (inter, d)), ("w2", (d, inter)), ("w3", (inter, d))):
            if self.kind == "fp4":
                self.register_buffer(name, torch.empty(e, n, k // 2, dtype=torch.uint8, device=META))
                self.register_buffer(f"{name}_scale", torch.empty(e, n, k // 32, dtype=torch.float8_e8m0fnu,
                                                                  device=META))
            elif self.kind == "fp8":
                self.register_buffer(name, torch.empty(e, n, k, dtype=torch.float8_e4m3fn, device=META))
                self.register_buffer(f"{name}_scale", torch.empty(e, math.ceil(n / 128), math.ceil(k / 128),
                                                                  dtype=scale_dtype, device=META))
            else:
                self.register_buffer(name, torch.empty(e, n, k, dtype=KIND_DTYPES[self.kind], device=META))
                setattr(self, f"{name}_scale", None)

    def fp4_to_fp8(self, scale_dtype: torch.dtype) -> bool:
        """Re-encode packed FP4 experts as FP8 with 128x128 block scales when that is lossless.

        The public converter's FP4 -> FP8 option: every e2m1 value times its power-of-two scale is
        exact in e4m3 under a per-tile power-of-two scale unless the 32-scales inside one 128x128
        tile span more than 2**14. Checked here by decoding both encodings (``dequant_fp4``,
        ``dequant_fp8``) and comparing bit for bit; returns False (and changes nothing) otherwise.
        """
        if self.kind != "fp4":
            return False
        new = {}
        for name in ("w1", "w2", "w3"):
            wf = v4hal.dequant_fp4(getattr(self, name), getattr(self, f"{name}_scale"), 32)
            q, sc = v4hal.quant_weight_fp8(wf, 128, "ue8m0")
            if not torch.equal(v4hal.dequant_fp8(q, sc, 128), wf):
                return False
            new[name] = (q, sc.float() if scale_dtype == torch.float32 else sc)
        for name, (q, sc) in new.items():
            self._buffers[name] = q
            self._buffers[f"{name}_scale"] = sc
        self.kind = "fp8"
        return True

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        scales = None if self.w1_scale is None else (self.w1_scale, self.w2_scale, self.w3_scale)
        return v4hal.moe_experts(x, weights, indices, self.w1, self.w2, self.w3, w_scales=scales,
                                 swiglu_limit=self.swiglu_limit)


class SharedExpert(nn.Module):
    """The shared SwiGLU expert (``w1``, ``w2``, ``w3`` Linear weights of the non-expert kind)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        lin = linear_kind(cfg)
        self.w1 = Linear(cfg.dim, cfg.moe_inter_dim, lin, cfg)
        self.w2 = Linear(cfg.moe_inter_dim, cfg.dim, lin, cfg)
        self.w3 = Linear(cfg.dim, cfg.moe_inter_dim, lin, cfg)
        self.swiglu_limit = float(cfg.swiglu_limit)
        self._route: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        if self._route is None or self._route[0].shape[0] != t or self._route[0].device != x.device:
            self._route = (torch.ones(t, 1, dtype=torch.float32, device=x.device),
                           torch.zeros(t, 1, dtype=torch.int32, device=x.device))
        w, idx = self._route

        def one(lin: Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
            return lin.weight.unsqueeze(0), (lin.scale.unsqueeze(0) if lin.scale is not None else None)

        (w1, s1), (w2, s2), (w3, s3) = one(self.w1), one(self.w2), one(self.w3)
        scales = None if s1 is None else (s1, s2, s3)
        return v4hal.moe_experts(x, w, idx, w1, w2, w3, w_scales=scales, swiglu_limit=self.swiglu_limit)


class MoE(nn.Module):
    """Gate + routed experts + shared expert: ``[b, s, dim]`` bf16 -> ``[b, s, dim]`` bf16.

    When the shared expert's weights have the routed experts' format (both FP8 with the same
    scale dtype, or both bf16), `prepare` appends it to the stacked experts as expert ``E`` and
    every token routes to it with weight 1: one ``moe_experts`` call computes both, and the sum
    of routed and shared outputs is taken in fp32 with one final cast, as the public ``MoE``
    does. Otherwise the shared expert is a second ``moe_experts`` call.
    """

    def __init__(self, layer_id: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.dim, self.n_experts = cfg.dim, cfg.n_routed_experts
        self.gate = Gate(layer_id, cfg)
        self.experts = Experts(cfg)
        self.shared_experts = SharedExpert(cfg) if cfg.n_shared_experts else None
        self.fused = False
        self._shared_slot: tuple[torch.Tensor, torch.Tensor] | None = None

    def prepare(self, experts_fp8: bool = False) -> None:
        """After loading: optionally re-encode FP4 experts as FP8 (lossless only, see
        `Experts.fp4_to_fp8`), then fuse the shared expert into the routed stack when the formats agree."""
        sh, ex = self.shared_experts, self.experts
        if experts_fp8 and sh is not None and sh.w1.kind == "fp8":
            ex.fp4_to_fp8(sh.w1.scale.dtype)
        if sh is None or sh.w1.kind != ex.kind:
            return
        if ex.kind == "fp8" and len({ex.w1_scale.dtype, sh.w1.scale.dtype, sh.w2.scale.dtype,
                                    sh.w3.scale.dtype}) != 1:
            return
        for name in ("w1", "w2", "w3"):
            lin = getattr(sh, name)
            stacked = torch.cat([getattr(ex, name), lin.weight.unsqueeze(0)], dim=0)
            ex._buffers[name] = stacked
            lin._buffers["weight"] = stacked[-1]
            if ex.kind == "fp8":
                sc = torch.cat([getattr(ex, f"{name}_scale"), lin.scale.unsqueeze(0)], dim=0)
                ex._buffers[f"{name}_scale"] = sc
                lin._buffers["scale"] = sc[-1]
        self.fused = True

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.dim)
        weights, indices = self.gate(x2, input_ids.reshape(-1))
        if self.fused:
            t = x2.shape[0]
            if self._shared_slot is None or self._shared_slot[0].shape[0] != t \
                    or self._shared_slot[0].device != x.device:
                self._shared_slot = (torch.ones(t, 1, dtype=torch.float32, device=x.device),
                                     torch.full((t, 1), self.n_experts, dtype=torch.int32, device=x.device))
            weights = torch.cat([weights, self._shared_slot[0]], dim=1)
            indices = torch.cat([indices, self._shared_slot[1]], dim=1)
            return self.experts(x2, weights, indices).view(shape)
        y = self.experts(x2, weights, indices)
        if self.shared_experts is not None:
            y = (y.float() + self.shared_experts(x2).float()).to(x.dtype)
        return y.view(shape)
