"""Finding the CANN ops at run time, tier by tier, and caching what was found.

Three packaging tiers ship the DeepSeek-V4 ops, with different schemas:

1. ``torch_npu``: ``torch_npu.<name>`` (same op as ``torch.ops.npu.<name>``);
2. ``_C_ascend``: vllm-ascend's compiled ops, ``torch.ops._C_ascend.<name>``, registered by
   ``import vllm_ascend.vllm_ascend_C``;
3. ``custom``: the cann-recipes-infer / sgl-kernel-npu ``custom_ops`` wheel, ``torch.ops.custom.<name>``.

Each adapter names its candidates as ``(tier, op name)`` pairs in preference order; :func:`lookup`
returns the first one present (probing with ``hasattr``), once per process until :func:`reset`.
The extension modules of tiers 2 and 3 are imported lazily and only if installed
(``find_spec``), with every failure kept as a reason for ``bound_ops()`` / ``v4hal info``.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from v4hal.hal.devices import torch_npu_module

TIERS: tuple[str, ...] = ("torch_npu", "_C_ascend", "custom")

#: Python modules whose import registers a tier's ``torch.ops`` namespace.
TIER_MODULES: dict[str, tuple[str, ...]] = {
    "_C_ascend": ("vllm_ascend.vllm_ascend_C",),
    "custom": ("custom_ops", "sgl_kernel_npu"),
}

_LOCK = threading.Lock()
_FOUND: dict[tuple[tuple[str, str], ...], "Bound | None"] = {}
_MODULE_REASONS: dict[str, str | None] = {}


@dataclass(frozen=True)
class Bound:
    """One resolved op: which tier, which name, and the callable."""

    tier: str
    name: str
    fn: Callable[..., Any]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def reset() -> None:
    """Forget resolved ops and extension-module probes."""
    with _LOCK:
        _FOUND.clear()
        _MODULE_REASONS.clear()


def _load_tier_modules(tier: str) -> None:
    """Import the extension module(s) of ``tier`` once, if installed; failures are recorded."""
    for mod in TIER_MODULES.get(tier, ()):
        if mod in _MODULE_REASONS:
            continue
        if mod in sys.modules:
            _MODULE_REASONS[mod] = None
            continue
        try:
            top = mod.split(".")[0]
            if top not in sys.modules and importlib.util.find_spec(top) is None:
                _MODULE_REASONS[mod] = f"{top} not installed"
                continue
            importlib.import_module(mod)
            _MODULE_REASONS[mod] = None
        except Exception as exc:
            _MODULE_REASONS[mod] = f"{mod} failed to import: {type(exc).__name__}: {exc}"


def _namespace(tier: str) -> Any | None:
    """The object holding the tier's ops (torch_npu module or a ``torch.ops`` namespace)."""
    if tier == "torch_npu":
        return torch_npu_module()
    import torch

    _load_tier_modules(tier)
    try:
        return getattr(torch.ops, tier)
    except Exception:
        return None


def _find(tier: str, name: str) -> Callable[..., Any] | None:
    ns = _namespace(tier)
    if ns is None:
        return None
    try:
        fn = getattr(ns, name)
    except Exception:  # torch.ops namespaces raise AttributeError/RuntimeError for unknown ops
        return None
    return fn if callable(fn) else None


def lookup(candidates: Sequence[tuple[str, str]]) -> Bound | None:
    """The first present op among ``(tier, name)`` candidates, or None. Cached."""
    key = tuple(candidates)
    with _LOCK:
        if key in _FOUND:
            return _FOUND[key]
    found: Bound | None = None
    for tier, name in key:
        fn = _find(tier, name)
        if fn is not None:
            found = Bound(tier, name, fn)
            break
    with _LOCK:
        _FOUND[key] = found
    return found


def describe(candidates: Sequence[tuple[str, str]]) -> str:
    """'torch_npu.npu_x / _C_ascend.npu_x' for messages."""
    return " / ".join(f"{t}.{n}" for t, n in candidates)


def module_reasons() -> dict[str, str | None]:
    """Extension modules probed so far and why each is unavailable (None = imported)."""
    with _LOCK:
        return dict(_MODULE_REASONS)
