"""Registration of the Triton quantizers, GEMMs, grouped GEMM and MoE permutation kernels.

CUDA tensors: automatic candidates at priority 10 (above the reference's 0).
CPU tensors: served only when asked for (``use_backend("triton")``) and only while the Triton
interpreter is on; interpreter runs check numerics, not speed.
The limits the kernels keep are Requirements that say why a call is not served.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from v4hal.hal.devices import cuda_capability, triton_interpreter_on
from v4hal.hal.registry import Requirement, register_impl

CUDA_PRIORITY = 10
MAX_QUANT_BLOCK = 8192       # one quantization block per tile row (held in registers)
MAX_WEIGHT_TILE = 128        # quant_weight_fp8: one block x block tile per program
MAX_EXPERTS = 4096           # grouped_gemm: every program reads all E+1 offsets as one vector


def _interpreter(_: Mapping[str, Any]) -> str | None:
    if triton_interpreter_on():
        return None
    return "Triton on CPU tensors needs the interpreter: set TRITON_INTERPRET=1 before importing triton/v4hal"


INTERPRETER = Requirement("Triton interpreter on (TRITON_INTERPRET=1 before triton is imported)", _interpreter)


def _capability(args: Mapping[str, Any], names: tuple[str, ...], least: tuple[int, int],
                dtypes: tuple[torch.dtype, ...] | None) -> str | None:
    """Reason when a CUDA tensor among ``names`` (of ``dtypes``, None = any) sits on a GPU older than ``least``."""
    for name in names:
        t = args.get(name)
        if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
            continue
        if dtypes is not None and t.dtype not in dtypes:
            continue
        cap = cuda_capability(t.device)
        if cap is not None and cap < least:
            return (f"{name} ({t.dtype}) needs compute capability >= {least[0]}.{least[1]} for the Triton kernel, "
                    f"this GPU has {cap[0]}.{cap[1]}")
    return None


def _fp8_gpu(*names: str) -> Requirement:
    """FP8 e4m3 conversions / MMA need sm_89+ (Ada, Hopper and later)."""
    return Requirement(f"FP8 e4m3 ({', '.join(names)}) needs a GPU with compute capability >= 8.9",
                       lambda a: _capability(a, names, (8, 9), None))


def _grouped_gpu(args: Mapping[str, Any]) -> str | None:
    fp8 = _capability(args, ("x",), (8, 9), (torch.float8_e4m3fn,))
    return fp8 or _capability(args, ("x",), (8, 0), (torch.bfloat16,))


GROUPED_GPU = Requirement("grouped_gemm: fp8 x needs compute capability >= 8.9, bf16 x >= 8.0", _grouped_gpu)


def _block_at_most(name: str, most: int, what: str) -> Requirement:
    def check(args: Mapping[str, Any]) -> str | None:
        v = int(args.get(name, 0))
        return None if v <= most else f"{name} must be <= {most} for the Triton kernel ({what}), got {v}"
    return Requirement(f"{name} <= {most} ({what})", check)


def _pow2_block(name: str) -> Requirement:
    def check(args: Mapping[str, Any]) -> str | None:
        v = int(args.get(name, 0))
        if v >= 2 and v & (v - 1) == 0 and v <= MAX_QUANT_BLOCK:
            return None
        return f"{name} must be a power of two in [2, {MAX_QUANT_BLOCK}] for the Triton FP4 kernel, got {v}"
    return Requirement(f"{name} a power of two in [2, {MAX_QUANT_BLOCK}] (nibble pairs split in registers)", check)


def _experts_at_most(args: Mapping[str, Any]) -> str | None:
    w = args.get("w")
    e = int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() >= 1 else 0
    return None if e <= MAX_EXPERTS else f"grouped_gemm: the Triton kernel takes E <= {MAX_EXPERTS} experts, got {e}"


EXPERTS = Requirement(f"E <= {MAX_EXPERTS} experts (offsets read as one vector per program)", _experts_at_most)


def _requirements() -> dict[str, tuple[Requirement, ...]]:
    quant_block = _block_at_most("block_size", MAX_QUANT_BLOCK, "one block per tile row")
    return {
        "act_quant": (quant_block, _fp8_gpu("x")),
        "act_quant_inplace": (quant_block, _fp8_gpu("x")),
        "fp4_act_quant": (_pow2_block("block_size"),),
        "fp4_act_quant_inplace": (_pow2_block("block_size"),),
        "quant_weight_fp8": (_block_at_most("block", MAX_WEIGHT_TILE, "one block x block tile per program"),
                             _fp8_gpu("w")),
        "quant_weight_fp4": (_pow2_block("block"),),
        "dequant_fp8": (_fp8_gpu("y"),),
        "dequant_fp4": (),
        "fp8_gemm": (_fp8_gpu("a", "b"),),
        "fp4_gemm": (_fp8_gpu("a"),),
        "grouped_gemm": (EXPERTS, GROUPED_GPU),
        "moe_dispatch": (),
        "moe_combine": (),
    }


def load() -> None:
    """Register the kernels of quant.py, gemm.py, grouped.py and moe_permute.py for cuda and cpu tensors."""
    from . import gemm, grouped, moe_permute, quant

    fns = {
        "act_quant": quant.act_quant,
        "act_quant_inplace": quant.act_quant_inplace,
        "fp4_act_quant": quant.fp4_act_quant,
        "fp4_act_quant_inplace": quant.fp4_act_quant_inplace,
        "quant_weight_fp8": quant.quant_weight_fp8,
        "quant_weight_fp4": quant.quant_weight_fp4,
        "dequant_fp8": quant.dequant_fp8,
        "dequant_fp4": quant.dequant_fp4,
        "fp8_gemm": gemm.fp8_gemm,
        "fp4_gemm": gemm.fp4_gemm,
        "grouped_gemm": grouped.grouped_gemm,
        "moe_dispatch": moe_permute.moe_dispatch,
        "moe_combine": moe_permute.moe_combine,
    }
    reqs = _requirements()
    for op, fn in fns.items():
        register_impl(op, "triton", fn, devices=("cuda",), priority=CUDA_PRIORITY, requires=reqs[op], auto=True)
        register_impl(op, "triton", fn, devices=("cpu",), priority=CUDA_PRIORITY,
                      requires=(INTERPRETER,) + reqs[op], auto=False)
