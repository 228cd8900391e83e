"""What can run here: the op x backend x device matrix, each unavailable cell with its reason.

A backend may add notes of its own (per-op facts the matrix cannot show, such as the calls the
Ascend backend serves by running the reference): its module (``registry.BACKENDS[name].module``)
defines ``info_notes() -> list[dict[str, str]]``, rows with an ``"op"`` (may be empty) and a
``"note"``. :func:`info` collects them for every backend that defines the hook, without loading
the backend (the hook must not import device runtimes), and :func:`format_info` prints them.
"""
from __future__ import annotations

import importlib
from typing import Any

import torch

from . import dispatch, registry
from .devices import devices_here
from .optable import OPS, public_ops


def _devices_here() -> list[str]:
    """The registered device types present on this machine (``v4hal.hal.devices``)."""
    return devices_here()


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends that can serve at least one op on ``device`` (default: the CPU) on this machine."""
    dev = torch.device(device).type if device is not None else "cpu"
    registry.ensure_device_backends(dev)
    names = {impl.backend for op in OPS for impl in registry.implementations(op, dev)}
    return [name for name in registry.BACKENDS if name in names]


def info(devices: list[str] | None = None) -> dict[str, Any]:
    """The matrix as data: ``{"devices", "backends": {name: reason|None}, "ops": {op: {device: [rows]}}}``."""
    devices = devices or _devices_here()
    backends = {name: registry.backend_reason(name) for name in registry.BACKENDS}
    ops = {op: {dev: dispatch.explain(op, dev) for dev in devices} for op in public_ops()}
    return {"torch": torch.__version__, "devices": devices, "backends": backends, "ops": ops,
            "descriptions": {n: s.description for n, s in registry.BACKENDS.items()},
            "notes": backend_notes()}


def backend_notes() -> dict[str, list[dict[str, str]]]:
    """backend -> the rows its module's ``info_notes()`` returns (backends without the hook, or
    whose module does not import, are left out: their reason is in ``info()["backends"]``)."""
    notes: dict[str, list[dict[str, str]]] = {}
    for name, spec in registry.BACKENDS.items():
        try:
            module = importlib.import_module(spec.module)
        except Exception:  # the import failure is the backend's reason, shown with the backends
            continue
        hook = getattr(module, "info_notes", None)
        if hook is not None:
            notes[name] = [{"op": str(row.get("op", "")), "note": str(row["note"])} for row in hook()]
    return notes


def _backend_state(data: dict[str, Any], name: str, reason: str | None) -> str:
    """``available`` when backend ``name`` serves some op on a listed device; ``importable, but serves no op
    on <devices> here: <why>`` when it loads yet every cell of its column is unavailable (e.g. Triton on a CPU
    without ``TRITON_INTERPRET=1``); else ``unavailable: <reason>``."""
    if reason is not None:
        return f"unavailable: {reason}"
    rows = [row for per_dev in data["ops"].values() for dev in data["devices"] for row in per_dev.get(dev, [])
            if row["backend"] == name]
    if not rows or any(row["status"] != "unavailable" for row in rows):
        return "available"
    why = next((row["reason"] for row in rows if row.get("reason")), "no op has an implementation for them")
    return f"importable, but serves no op on {', '.join(data['devices'])} here: {why}"


def format_info(data: dict[str, Any]) -> str:
    """``v4hal info`` as text: backends with their reasons, then one table per device."""
    lines = [f"v4hal on torch {data['torch']}; devices here: {', '.join(data['devices'])}", "", "backends:"]
    for name, reason in data["backends"].items():
        lines.append(f"  {name:<10} {_backend_state(data, name, reason)}")
        lines.append(f"  {'':<10} ({data['descriptions'][name]})")
    names = list(data["backends"])
    for dev in data["devices"]:
        lines += ["", f"ops on {dev} (yes = chosen automatically by priority; explicit only = use_backend)"]
        notes: dict[str, int] = {}  # one footnote per distinct reason
        table: list[tuple[str, list[str]]] = []
        for op, per_dev in data["ops"].items():
            cells = []
            for row in per_dev[dev]:
                mark = row["status"]
                if row.get("reason"):
                    key = f"{row['backend']}: {row['reason']}"
                    mark += f" [{notes.setdefault(key, len(notes) + 1)}]"
                cells.append(mark)
            table.append((op, cells))
        width = max([len(n) for n in names] + [len(c) for _, cells in table for c in cells]) + 2
        op_width = max([len("op")] + [len(op) for op, _ in table]) + 2
        lines.append(f"  {'op':<{op_width}}" + "".join(f"{n:<{width}}" for n in names).rstrip())
        lines += [f"  {op:<{op_width}}" + "".join(f"{c:<{width}}" for c in cells).rstrip() for op, cells in table]
        if notes:
            lines += ["", "  notes:"] + [f"  [{i}] {text}" for text, i in notes.items()]
    for name, rows in data.get("notes", {}).items():
        if rows:
            lines += ["", f"notes from the {name} backend:"]
            lines += [f"  {row['op']:<22} {row['note']}" for row in rows]
    return "\n".join(lines)
