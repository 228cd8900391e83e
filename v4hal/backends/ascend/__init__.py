"""The Ascend backend: DeepSeek-V4 ops on CANN through torch_npu, vllm-ascend's ``_C_ascend`` ops and
the ``custom_ops`` wheel, with layout adapters between our contract and theirs.

Importing this package imports neither torch_npu nor any extension: :func:`probe` does that
lazily (``find_spec`` + guarded import, see :mod:`.runtime`) when ``v4hal info`` or a call on
``npu`` tensors asks. What each op calls per chip, and when it falls back to the reference
backend, is in :func:`fallback_table` / :func:`native_table` and ``docs/ascend.md``.
"""
from __future__ import annotations


def probe() -> str | None:
    """None when torch_npu imports, an NPU is visible and the chip is A2, A3 or 950; else why not."""
    from . import runtime

    return runtime.probe_reason()


def device_reason(device: str) -> str | None:
    """The backend serves ``npu`` tensors (CPU tensors only through the test-only emulation)."""
    if device != "npu":
        return f"the Ascend backend serves npu tensors, not {device}"
    return probe()


def load() -> None:
    """Register the Ascend implementations for ``npu`` tensors."""
    from . import register

    register.load()


def fallback_table() -> list[dict[str, str]]:
    """Per op and chip: the conditions under which the reference backend runs instead of CANN."""
    from . import register

    return register.fallback_table()


def native_table() -> list[dict[str, str]]:
    """Per op and chip: the CANN path used within the limits."""
    from . import register

    return register.native_table()
