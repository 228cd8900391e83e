"""Registration of the Triton attention / indexer / mHC / small-op kernels.

CUDA tensors: automatic candidates at priority 10 (above the reference's 0).
CPU tensors: served only when asked for (``use_backend("triton")``) and only while the Triton
interpreter is on; interpreter runs check numerics, not speed.
The limits the kernels keep are Requirements that say why a call is not served.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from v4hal.hal.devices import cuda_capability, triton_interpreter_on
from v4hal.hal.registry import Requirement, register_impl

CUDA_PRIORITY = 10
MAX_INDEX_HEADS = 128
MAX_HC = 8


def _interpreter(_: Mapping[str, Any]) -> str | None:
    if triton_interpreter_on():
        return None
    return "Triton on CPU tensors needs the interpreter: set TRITON_INTERPRET=1 before importing triton/v4hal"


INTERPRETER = Requirement("Triton interpreter on (TRITON_INTERPRET=1 before triton is imported)", _interpreter)


def _bf16_mma(tensor_arg: str) -> Requirement:
    def check(args: Mapping[str, Any]) -> str | None:
        t = args.get(tensor_arg)
        if not isinstance(t, torch.Tensor) or t.dtype != torch.bfloat16 or t.device.type != "cuda":
            return None
        cap = cuda_capability(t.device)
        if cap is not None and cap < (8, 0):
            return f"bf16 tl.dot needs compute capability >= 8.0, this GPU has {cap[0]}.{cap[1]}"
        return None
    return Requirement(f"bf16 {tensor_arg} needs a GPU with compute capability >= 8.0", check)


def _limit(description: str, value: Callable[[Mapping[str, Any]], int], most: int, what: str) -> Requirement:
    def check(args: Mapping[str, Any]) -> str | None:
        v = value(args)
        return None if v <= most else f"{what} must be <= {most} for the Triton kernel, got {v}"
    return Requirement(description, check)


def _requirements(device: str) -> dict[str, tuple[Requirement, ...]]:
    """Per op, what the kernels need on ``device`` ("cuda" adds the bf16-MMA capability check)."""
    from .attention import MAX_HEAD_DIM
    from .small import MAX_HADAMARD_DIM

    head_dim = _limit(f"head dim <= {MAX_HEAD_DIM} (one [BLOCK_N, d] KV tile per step)",
                      lambda a: int(a["q"].shape[-1]), MAX_HEAD_DIM, "head dim d")
    index_heads = _limit(f"indexer heads H <= {MAX_INDEX_HEADS} (all heads of a query in one MMA tile)",
                         lambda a: int(a["q"].shape[2]), MAX_INDEX_HEADS, "indexer heads H")
    hadamard_dim = _limit(f"Hadamard size D <= {MAX_HADAMARD_DIM} (one row per program in registers)",
                          lambda a: int(a["x"].shape[-1]), MAX_HADAMARD_DIM, "Hadamard size D")

    def hc(arg: Callable[[Mapping[str, Any]], int]) -> Requirement:
        return _limit(f"hc <= {MAX_HC} (the (2+hc)*hc mixes padded to <= 128 MMA columns; [hc, hc] Sinkhorn tile)",
                      arg, MAX_HC, "hc")

    def bf16(*names: str) -> tuple[Requirement, ...]:
        return tuple(_bf16_mma(n) for n in names) if device == "cuda" else ()

    return {
        "sparse_attn": (head_dim, *bf16("q")),
        "index_scores": (index_heads, *bf16("q", "k")),
        "indexer_topk": (index_heads, *bf16("q", "k")),
        "hc_split_sinkhorn": (hc(lambda a: int(a["hc_mult"])),),
        "hc_pre": (hc(lambda a: int(a["hc_mult"])),),
        "hc_post": (hc(lambda a: int(a["residual"].shape[-2])),),
        "hc_head": (hc(lambda a: int(a["x"].shape[-2])),),
        "rms_norm": (),
        "rotary_emb": (),
        "hadamard_transform": (hadamard_dim, *bf16("x")),
    }


def load() -> None:
    """Register the kernels of attention.py, indexer.py, mhc.py and small.py for cuda and cpu tensors."""
    from . import attention, indexer, mhc, small

    fns = {
        "sparse_attn": attention.sparse_attn,
        "index_scores": indexer.index_scores,
        "indexer_topk": indexer.indexer_topk,
        "hc_split_sinkhorn": mhc.hc_split_sinkhorn,
        "hc_pre": mhc.hc_pre,
        "hc_post": mhc.hc_post,
        "hc_head": mhc.hc_head,
        "rms_norm": small.rms_norm,
        "rotary_emb": small.rotary_emb,
        "hadamard_transform": small.hadamard_transform,
    }
    cuda, cpu = _requirements("cuda"), _requirements("cpu")
    for op, fn in fns.items():
        register_impl(op, "triton", fn, devices=("cuda",), priority=CUDA_PRIORITY, requires=cuda[op], auto=True)
        register_impl(op, "triton", fn, devices=("cpu",), priority=CUDA_PRIORITY, requires=(INTERPRETER,) + cpu[op],
                      auto=False)
