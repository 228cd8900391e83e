"""Registration of the Triton ``moe_gate``, ``moe_experts`` (:mod:`.moe`) and ``compress_kv`` (:mod:`.compress`).

CUDA tensors: automatic candidates at priority 10 (above the reference's 0).
CPU tensors: served only when asked for (``use_backend("triton")``) and only while the Triton
interpreter is on; interpreter runs check numerics, not speed.
The limits the kernels keep are Requirements that say why a call is not served.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from v4hal.hal import formats as F
from v4hal.hal.devices import cuda_capability
from v4hal.hal.registry import Requirement, register_impl

from .register_quant_gemm import CUDA_PRIORITY, INTERPRETER, MAX_EXPERTS


def _gpu_below(t: Any, least: tuple[int, int]) -> tuple[int, int] | None:
    """The capability of ``t``'s GPU when it is older than ``least`` (None otherwise or off CUDA)."""
    if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
        return None
    cap = cuda_capability(t.device)
    return cap if cap is not None and cap < least else None


def _gate_gpu(args: Mapping[str, Any]) -> str | None:
    cap = _gpu_below(args.get("x"), (8, 0))
    return None if cap is None else (f"moe_gate: the Triton gate GEMM runs TF32 MMAs (compute capability >= 8.0), "
                                     f"this GPU has {cap[0]}.{cap[1]}")


def _softmax_width(args: Mapping[str, Any]) -> str | None:
    from .moe import MAX_SOFTMAX_EXPERTS

    w = args.get("weight")
    e = int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() >= 1 else 0
    if args.get("score_func") == "softmax" and e > MAX_SOFTMAX_EXPERTS:
        return f"moe_gate: the Triton softmax gate holds a whole row: E <= {MAX_SOFTMAX_EXPERTS}, got {e}"
    return None


def _experts_count(args: Mapping[str, Any]) -> str | None:
    w1 = args.get("w1")
    e = int(w1.shape[0]) if isinstance(w1, torch.Tensor) and w1.dim() >= 1 else 0
    return None if e <= MAX_EXPERTS else f"moe_experts: the Triton grouped GEMM takes E <= {MAX_EXPERTS}, got {e}"


def _experts_gpu(args: Mapping[str, Any]) -> str | None:
    w1 = args.get("w1")
    if not isinstance(w1, torch.Tensor):
        return None
    if w1.dtype in (F.FP8_DTYPE, torch.uint8):
        cap = _gpu_below(args.get("x"), (8, 9))
        need = "FP8 activations and MMA need compute capability >= 8.9"
    elif w1.dtype == torch.bfloat16:
        cap = _gpu_below(args.get("x"), (8, 0))
        need = "bf16 MMA needs compute capability >= 8.0"
    else:
        return None
    return None if cap is None else f"moe_experts: {need}, this GPU has {cap[0]}.{cap[1]}"


def _ratio_limit(args: Mapping[str, Any]) -> str | None:
    from .compress import MAX_RATIO

    r = int(args.get("ratio", 0))
    return None if r <= MAX_RATIO else f"compress_kv: the Triton kernel holds a whole window: ratio <= {MAX_RATIO}, got {r}"


def _requirements() -> dict[str, tuple[Requirement, ...]]:
    from .compress import MAX_RATIO
    from .moe import MAX_SOFTMAX_EXPERTS

    return {
        "moe_gate": (Requirement(f"softmax scores: E <= {MAX_SOFTMAX_EXPERTS} (a whole row per program)",
                                 _softmax_width),
                     Requirement("TF32 MMA for the gate GEMM: compute capability >= 8.0", _gate_gpu)),
        "moe_experts": (Requirement(f"E <= {MAX_EXPERTS} experts (grouped GEMM offsets read as one vector)",
                                    _experts_count),
                        Requirement("FP8/FP4 weights: compute capability >= 8.9; bf16: >= 8.0", _experts_gpu)),
        "compress_kv": (Requirement(f"ratio <= {MAX_RATIO} (the window of a channel block sits in registers)",
                                    _ratio_limit),),
    }


def load() -> None:
    """Register moe_gate, moe_experts and compress_kv for cuda (auto) and cpu (interpreter, explicit only)."""
    from . import compress, moe

    fns = {"moe_gate": moe.moe_gate, "moe_experts": moe.moe_experts, "compress_kv": compress.compress_kv}
    reqs = _requirements()
    for op, fn in fns.items():
        register_impl(op, "triton", fn, devices=("cuda",), priority=CUDA_PRIORITY, requires=reqs[op], auto=True)
        register_impl(op, "triton", fn, devices=("cpu",), priority=CUDA_PRIORITY,
                      requires=(INTERPRETER,) + reqs[op], auto=False)
