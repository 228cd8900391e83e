"""The Ascend backend: DeepSeek-V4 ops on CANN through torch_npu, vllm-ascend's ``_C_ascend`` ops and
the ``custom_ops`` wheel, with layout adapters between our contract and theirs.

Importing this package imports neither torch_npu nor any extension: :func:`probe` does that
lazily (the NPU probes of :mod:`v4hal.hal.devices`) when ``v4hal info`` or a call on ``npu``
tensors asks. What each op calls per chip, and when it falls back to the reference backend, is in
:func:`fallback_table` / :func:`native_table`, :func:`info_notes` (what ``v4hal info`` prints) and
``docs/ascend.md``.
"""
from __future__ import annotations

from v4hal.hal.requirements import Requirement


def probe() -> str | None:
    """None when torch_npu imports, an NPU is visible and the chip is A2, A3 or 950; else why not."""
    from v4hal.hal.devices import npu_reason

    return npu_reason()


def device_reason(device: str) -> str | None:
    """The backend serves ``npu`` tensors (CPU tensors only through the test-only emulation)."""
    if device != "npu":
        return f"the Ascend backend serves npu tensors, not {device}"
    return probe()


def load() -> None:
    """Register the Ascend implementations for ``npu`` tensors."""
    from . import register

    register.load()


_ON_NPU = "reference backend on the NPU tensors"


def _runs(req: Requirement) -> str:
    """What serves a call that breaks ``req`` (a fallback requirement)."""
    from .limits import REFERENCE

    return _ON_NPU if req.fallback == REFERENCE else str(req.fallback)


def fallback_table() -> list[dict[str, str]]:
    """Rows ``{op, chip, condition, runs}``: when the Ascend backend does not call its CANN op."""
    from . import limits, register

    register.import_op_modules()
    rows: list[dict[str, str]] = []
    for op in sorted(limits.PLANS):
        native = limits.PLANS[op].native
        for chip in limits.CHIPS:
            reqs = [r for r in limits.requirements(op) if limits.applies(r, chip)]
            if chip not in native:
                first = reqs[0] if reqs else None
                cond = first.description if first else f"no CANN op for {op} on {chip}"
                rows.append({"op": op, "chip": chip, "condition": "always: " + cond,
                             "runs": _runs(first) if first else _ON_NPU})
                continue
            rows += [{"op": op, "chip": chip, "condition": r.description, "runs": _runs(r)} for r in reqs]
    return rows


def native_table() -> list[dict[str, str]]:
    """Rows ``{op, chip, native}``: the CANN path used inside the limits."""
    from . import limits, register

    register.import_op_modules()
    return [{"op": op, "chip": chip, "native": limits.PLANS[op].native[chip]}
            for op in sorted(limits.PLANS) for chip in limits.CHIPS if chip in limits.PLANS[op].native]


def info_notes() -> list[dict[str, str]]:
    """``v4hal info``'s notes: one row ``{op, note}`` per fallback requirement of each Ascend
    implementation (read from the declarations the registry registers), e.g.
    ``falls back to reference: head dim d != 512 (...) (A2/A3/950)``, after one ``native: <CANN path>
    (<chips>)`` row per native path, plus one row per chip that has no CANN path for an op and no
    requirement saying why."""
    from v4hal.hal.registry import declarations

    from . import limits, register

    register.import_op_modules()
    rows: list[dict[str, str]] = []
    for op, decl in sorted(declarations("ascend").items()):
        native = limits.PLANS[op].native
        by_path: dict[str, list[str]] = {}
        for chip in limits.CHIPS:
            if chip in native:
                by_path.setdefault(native[chip], []).append(chip)
        rows += [{"op": op, "note": f"native: {path} ({'/'.join(chips)})"} for path, chips in by_path.items()]
        rows += [{"op": op, "note": req.summary()} for req in decl.requires if req.fallback is not None]
        bare = [chip for chip in limits.CHIPS if chip not in native
                and not any(limits.applies(req, chip) for req in decl.requires)]
        if bare:
            rows.append({"op": op, "note": f"falls back to reference: no CANN op ({'/'.join(bare)})"})
    return rows
