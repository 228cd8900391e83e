"""Registration of the Ascend implementations, CPU emulation for contract tests, and the tables
``v4hal info`` prints (fallbacks per op and chip, the Triton-on-NPU allowlist)."""
from __future__ import annotations

import importlib
from typing import Any, Callable

from v4hal.hal.registry import Requirement, register_impl, unregister_backend

from . import limits, runtime

#: Contract op -> module of this package that implements it (same function name as the op).
IMPLS: dict[str, str] = {
    "act_quant": "quant", "act_quant_inplace": "quant", "fp4_act_quant": "quant", "fp4_act_quant_inplace": "quant",
    "dequant_fp8": "quant", "dequant_fp4": "quant", "quant_weight_fp8": "quant", "quant_weight_fp4": "quant",
    "fp8_gemm": "gemm", "fp4_gemm": "gemm", "grouped_gemm": "gemm",
    "sparse_attn": "attention", "index_scores": "attention", "indexer_topk": "attention", "compress_kv": "attention",
    "moe_gate": "moe", "moe_dispatch": "moe", "moe_combine": "moe", "moe_experts": "moe",
    "hc_split_sinkhorn": "mhc", "hc_pre": "mhc", "hc_post": "mhc", "hc_head": "mhc",
    "rms_norm": "small", "rotary_emb": "small", "hadamard_transform": "small",
}

PRIORITY = 20

#: Ops whose Triton kernels passed ``v4hal parity`` on an NPU through triton-ascend. Only these are
#: registered as Triton implementations for ``npu`` tensors. Empty: no NPU has run the parity gate
#: yet (triton-ascend 3.2 needs CANN 8.5 and cannot coexist with community Triton). Add an op here
#: only together with the parity record (command, chip, numbers) in docs/ascend.md.
TRITON_NPU_ALLOWLIST: frozenset[str] = frozenset()


def import_op_modules() -> None:
    """Import every implementation module (each declares its limits on import)."""
    for mod in sorted(set(IMPLS.values())):
        importlib.import_module(f"{__package__}.{mod}")


def implementations() -> dict[str, Callable[..., Any]]:
    """Contract op -> the Ascend implementation function."""
    return {op: getattr(importlib.import_module(f"{__package__}.{mod}"), op) for op, mod in IMPLS.items()}


def _usable(_args: Any) -> str | None:
    return runtime.probe_reason()


REQUIRES = (Requirement("torch_npu with CANN and an A2/A3/950 NPU", _usable),)


def load() -> None:
    """Register every Ascend implementation for ``npu`` tensors (priority 20) and mirror the
    allowlisted Triton kernels onto ``npu``."""
    for op, fn in implementations().items():
        register_impl(op, "ascend", fn, devices=("npu",), priority=PRIORITY, requires=REQUIRES)
    mirror_triton(TRITON_NPU_ALLOWLIST)


def mirror_triton(ops: frozenset[str] | set[str], ensure: Callable[[str], str | None] | None = None) -> list[str]:
    """Register the Triton backend's CUDA implementation of each op in ``ops`` for ``npu`` tensors
    (triton-ascend compiles the same kernels for the NPU). Returns the ops mirrored."""
    if not ops:
        return []
    from v4hal.hal import registry

    reason = (ensure or registry.ensure_loaded)("triton")
    if reason is not None:
        return []
    done = []
    for op in sorted(ops):
        impl = next((i for i in registry.implementations(op, "cuda") if i.backend == "triton"), None)
        if impl is not None:
            register_impl(op, "triton", impl.fn, devices=("npu",), priority=impl.priority, requires=impl.requires)
            done.append(op)
    return done


def enable_cpu_emulation() -> None:
    """Register the same functions for ``cpu`` tensors, explicit-only (``auto=False``), so that
    ``with v4hal.use_backend("ascend"):`` runs the Ascend code path on CPU tensors against the
    test stand-ins of torch_npu / ``_C_ascend`` / ``custom``. Called only by the test fixture."""
    runtime.reset()
    limits.reset_stats()
    for op, fn in implementations().items():
        register_impl(op, "ascend", fn, devices=("cpu",), priority=PRIORITY, auto=False)


def disable_cpu_emulation() -> None:
    """Undo :func:`enable_cpu_emulation`."""
    unregister_backend("ascend", devices=("cpu",))
    runtime.reset()


def fallback_table() -> list[dict[str, str]]:
    """Rows ``{op, chip, condition, runs}``: when the Ascend backend does not call a CANN op."""
    return limits.fallback_table()


def native_table() -> list[dict[str, str]]:
    """Rows ``{op, chip, native}``: the CANN path used inside the limits."""
    return limits.native_table()
