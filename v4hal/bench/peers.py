"""Peers: other implementations present on the machine that compute what a v4hal op computes.

Each `Peer` prepares its own operands from the case's inputs (the op's arguments by name;
untimed: layout changes, dequantized copies), then runs (timed). A peer is verified against the
reference output (by the numerics table's ``PEER_RULE``) before its time is used; a peer that
cannot run here says why.

- ``torch._scaled_mm`` blockwise (1x128 activation scales, 128x128 weight scales; cuBLASLt on
  Hopper with CUDA >= 12.9) for ``fp8_gemm``;
- bf16 ``torch.matmul`` on dequantized operands for ``fp8_gemm`` / ``fp4_gemm`` (what a
  framework without FP8/FP4 kernels does);
- ``torch._grouped_mm`` (bf16, dequantized weights) for ``grouped_gemm``;
- gather + ``scaled_dot_product_attention`` (the sink as an extra zero-valued key whose
  logit is the sink) for ``sparse_attn``.

`installed_libraries()` lists the kernel libraries of the field that are importable here
(FlashMLA, DeepGEMM, FlashInfer, torch_npu); their entry points are not called by this
module (their layouts differ per version), the listing goes into the JSON.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from v4hal.compare import PEER_RULE, calc_diff
from v4hal.hal import formats

__all__ = ["Peer", "scaled_mm_blockwise", "bf16_dequant_matmul", "torch_grouped_mm", "gather_sdpa",
           "installed_libraries"]


@dataclass
class Peer:
    """``reason(device)``: None when it can run there; ``prepare(inputs)`` (untimed) -> state;
    ``run(state)`` (timed)."""

    name: str
    reason: Callable[[str], str | None]
    prepare: Callable[[dict[str, Any]], Any]
    run: Callable[[Any], Any]


def _deq_rows(y: torch.Tensor, s: torch.Tensor, bs: int = 128) -> torch.Tensor:
    return (y.float().unflatten(-1, (-1, bs)) * formats.scale_to_float(s).unsqueeze(-1)).flatten(-2)


def _deq_2d(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """FP8 weights with square tile scales (128x128, or V4.1's 32x32: told apart by s's shape)."""
    n, k = y.shape[-2:]
    bs = 128 if s.shape[-1] == -(-k // 128) else 32
    sf = formats.scale_to_float(s).repeat_interleave(bs, -2)[..., :n, :].repeat_interleave(bs, -1)[..., :k]
    return y.float() * sf


def _deq_fp4(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Packed FP4 weights with a scale per 32 (or V4.1's per 16) along K."""
    v = formats.e2m1_decode(formats.unpack_fp4(y))
    bs = v.shape[-1] // s.shape[-1]
    return (v.unflatten(-1, (-1, bs)) * formats.scale_to_float(s).unsqueeze(-1)).flatten(-2)


def _deq_weight(b: torch.Tensor, b_s: torch.Tensor) -> torch.Tensor:
    return _deq_fp4(b, b_s) if b.dtype == torch.uint8 else _deq_2d(b, b_s)


# --------------------------------------------------------------------------- torch._scaled_mm
def _scaled_mm_reason(device: str) -> str | None:
    if device != "cuda":
        return "torch._scaled_mm blockwise needs a CUDA GPU"
    if not hasattr(torch, "_scaled_mm"):
        return "this torch has no torch._scaled_mm"
    if torch.cuda.get_device_capability() < (9, 0):
        return "blockwise FP8 scaling needs SM90 or newer"
    return None


def _scaled_mm_variants(a2: torch.Tensor, a_s: torch.Tensor, bt: torch.Tensor, b_s: torch.Tensor
                        ) -> list[tuple[str, Callable[[], torch.Tensor]]]:
    """The ways torch has spelled blockwise FP8 (1x128 x 128x128) across versions, newest first.

    a2 fp8 [M, K]; a_s fp32 [M, K/128]; bt fp8 [K, N] column-major; b_s fp32 [N/128, K/128].
    """
    m, kb = a_s.shape
    nb = b_s.shape[0]
    a_s_mmajor = a_s.t().contiguous().t()                      # [M, K/128], stride (1, M)
    l4 = (kb + 3) // 4 * 4
    padded = b_s.new_zeros(nb, l4)
    padded[:, :kb] = b_s
    b_s_l4 = padded.t()                                        # [L4, N/128], stride (1, L4)
    b_s_cm = b_s.t()                                           # [K/128, N/128], stride (1, K/128)
    out: list[tuple[str, Callable[[], torch.Tensor]]] = []
    fn = getattr(F, "scaled_mm", None)
    st = getattr(F, "ScalingType", None)
    if fn is not None and st is not None:
        out.append(("F.scaled_mm", lambda: fn(a2, bt, a_s_mmajor, st.BlockWise1x128, b_s_l4, st.BlockWise128x128,
                                               output_dtype=torch.bfloat16)))
    out.append(("torch._scaled_mm", lambda: torch._scaled_mm(a2, bt, scale_a=a_s_mmajor, scale_b=b_s_cm,
                                                             out_dtype=torch.bfloat16)))
    out.append(("torch._scaled_mm (L4-padded scales)", lambda: torch._scaled_mm(
        a2, bt, scale_a=a_s_mmajor, scale_b=b_s_l4, out_dtype=torch.bfloat16)))
    return out


_SCALED_MM_CHOICE: dict[str, str] = {}


def _scaled_mm_prepare(i: dict[str, Any]) -> Any:
    """Pick the first spelling that runs and agrees with a dequantized product (else raise with every error)."""
    a, b = i["a"], i["b"]
    a2 = a.reshape(-1, a.shape[-1])
    a_s = formats.scale_to_float(i["a_s"]).reshape(-1, i["a_s"].shape[-1]).float()
    b_s = formats.scale_to_float(i["b_s"]).float()
    if b.shape[0] % 128:
        raise RuntimeError(f"blockwise scaled_mm needs N % 128 == 0, got N={b.shape[0]}")
    if b_s.shape[-1] != -(-b.shape[1] // 128):
        raise RuntimeError("blockwise scaled_mm has 128x128 weight tiles only, these weights have 32x32 tiles")
    want = (_deq_rows(a2, a_s) @ _deq_2d(b, b_s).t()).float()
    errors = []
    variants = sorted(_scaled_mm_variants(a2, a_s, b.t(), b_s), key=lambda v: v[0] != _SCALED_MM_CHOICE.get("name"))
    for name, call in variants:
        try:
            got = call().float()
        except Exception as exc:  # this spelling is not supported by this torch / GPU
            errors.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            continue
        if calc_diff(got, want) <= PEER_RULE.max_diff:
            _SCALED_MM_CHOICE["name"] = name
            return {"call": call, "variant": name, "shape": a.shape[:-1]}
        errors.append(f"{name}: runs but disagrees with the dequantized product")
    raise RuntimeError("no blockwise scaled_mm spelling works here: " + " | ".join(errors))


def _scaled_mm_run(st: Any) -> torch.Tensor:
    return st["call"]().reshape(*st["shape"], -1)


def scaled_mm_blockwise() -> Peer:
    return Peer("torch._scaled_mm blockwise", _scaled_mm_reason, _scaled_mm_prepare, _scaled_mm_run)


# --------------------------------------------------------------------------- bf16 matmul
def _bf16_prepare(i: dict[str, Any]) -> Any:
    a = _deq_rows(i["a"], i["a_s"]).to(torch.bfloat16)
    w = _deq_weight(i["b"], i["b_s"]).to(torch.bfloat16)
    return {"a": a, "wt": w.t()}


def bf16_dequant_matmul() -> Peer:
    return Peer("bf16 matmul (dequantized)", lambda device: None, _bf16_prepare,
                lambda st: torch.matmul(st["a"], st["wt"]))


# --------------------------------------------------------------------------- torch._grouped_mm
def _grouped_reason(device: str) -> str | None:
    if device != "cuda":
        return "torch._grouped_mm runs on CUDA GPUs only"
    if not hasattr(torch, "_grouped_mm"):
        return "this torch has no torch._grouped_mm"
    if torch.cuda.get_device_capability() < (9, 0):
        return "torch._grouped_mm needs SM90 or newer"
    return None


def _grouped_prepare(i: dict[str, Any]) -> Any:
    x, w = i["x"], i["w"]
    if i["x_scale"] is not None:
        x = _deq_rows(x, i["x_scale"])
        w = _deq_fp4(w, i["w_scale"]) if w.dtype == torch.uint8 else _deq_2d(w, i["w_scale"])
    return {"x": x.to(torch.bfloat16).contiguous(), "wt": w.to(torch.bfloat16).transpose(-2, -1),
            "offs": i["group_offsets"][1:].to(torch.int32)}


def torch_grouped_mm() -> Peer:
    return Peer("torch._grouped_mm (bf16, dequantized)", _grouped_reason, _grouped_prepare,
                lambda st: torch._grouped_mm(st["x"], st["wt"], offs=st["offs"], out_dtype=torch.bfloat16))


# --------------------------------------------------------------------------- gather + SDPA
SDPA_MAX_EXPANDED_BYTES = 8 << 30


def _sdpa_prepare(i: dict[str, Any]) -> Any:
    b, m, h, d = i["q"].shape
    k = i["topk_idxs"].shape[-1]
    expanded = b * m * h * (k + 1) * d * i["q"].element_size()
    if expanded > SDPA_MAX_EXPANDED_BYTES:
        # SDPA's math fallback (head dim 512 has no fused kernel) materializes keys per head
        raise RuntimeError(f"gather + SDPA would expand keys to {expanded / 2**30:.1f} GiB across heads; skipped")
    return {"q": i["q"], "kv": i["kv"], "sink": i["attn_sink"], "idx": i["topk_idxs"], "scale": i["softmax_scale"]}


def _sdpa_run(st: Any) -> torch.Tensor:
    q, kv, sink, idx, scale = st["q"], st["kv"], st["sink"], st["idx"], st["scale"]
    b, m, h, d = q.shape
    k = idx.shape[-1]
    safe = idx.clamp(min=0).long()
    rows = torch.gather(kv.unsqueeze(1).expand(b, m, kv.shape[1], d), 2,
                        safe.unsqueeze(-1).expand(b, m, k, d))                       # [b, m, k, d]
    keys = torch.cat([rows, rows.new_zeros(b, m, 1, d)], dim=2).reshape(b * m, 1, k + 1, d)
    bias = torch.where(idx >= 0, 0.0, float("-inf")).to(q.dtype)                     # [b, m, k]
    bias = torch.cat([bias.unsqueeze(2).expand(b, m, h, k),
                      sink.to(q.dtype).view(1, 1, h, 1).expand(b, m, h, 1)], dim=-1)
    out = F.scaled_dot_product_attention(q.reshape(b * m, h, 1, d).contiguous(), keys, keys,
                                         attn_mask=bias.reshape(b * m, h, 1, k + 1), scale=scale, enable_gqa=True)
    return out.reshape(b, m, h, d)


def gather_sdpa() -> Peer:
    return Peer("gather + SDPA", lambda device: None, _sdpa_prepare, _sdpa_run)


def installed_libraries() -> dict[str, bool]:
    """Which kernel libraries of the field can be imported here (FlashMLA, DeepGEMM, FlashInfer, torch_npu)."""
    names = {"FlashMLA": "flash_mla", "DeepGEMM": "deep_gemm", "FlashInfer": "flashinfer", "torch_npu": "torch_npu"}
    return {label: importlib.util.find_spec(mod) is not None for label, mod in names.items()}
