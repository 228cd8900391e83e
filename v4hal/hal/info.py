"""What can run here: the op x backend x device matrix, each unavailable cell with its reason."""
from __future__ import annotations

from typing import Any

import torch

from . import dispatch, registry


def _devices_here() -> list[str]:
    devices = ["cpu"]
    if torch.version.cuda is not None and torch.cuda.is_available():
        devices.append("cuda")
    npu = getattr(torch, "npu", None)
    if npu is not None and getattr(npu, "is_available", lambda: False)():
        devices.append("npu")
    return devices


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends that can serve at least one op on ``device`` (default: the CPU) on this machine."""
    dev = torch.device(device).type if device is not None else "cpu"
    registry.ensure_device_backends(dev)
    from v4hal.ops import OPS

    names = {impl.backend for op in OPS for impl in registry.implementations(op, dev)}
    return [name for name in registry.BACKENDS if name in names]


def info(devices: list[str] | None = None) -> dict[str, Any]:
    """The matrix as data: ``{"devices", "backends": {name: reason|None}, "ops": {op: {device: [rows]}}}``."""
    from v4hal.ops import PUBLIC_OPS

    devices = devices or _devices_here()
    backends = {name: registry.backend_reason(name) for name in registry.BACKENDS}
    ops = {op: {dev: dispatch.explain(op, dev) for dev in devices} for op in PUBLIC_OPS}
    from v4hal.backends.ascend import fallback_table  # data only: imports no torch_npu

    return {"torch": torch.__version__, "devices": devices, "backends": backends, "ops": ops,
            "descriptions": {n: s.description for n, s in registry.BACKENDS.items()},
            "ascend_fallbacks": fallback_table()}


def format_info(data: dict[str, Any]) -> str:
    """``v4hal info`` as text: backends with their reasons, then one table per device."""
    lines = [f"v4hal on torch {data['torch']}; devices here: {', '.join(data['devices'])}", "", "backends:"]
    for name, reason in data["backends"].items():
        lines.append(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
        lines.append(f"  {'':<10} ({data['descriptions'][name]})")
    names = list(data["backends"])
    for dev in data["devices"]:
        lines += ["", f"ops on {dev} (yes = chosen automatically by priority; explicit only = use_backend)"]
        header = f"  {'op':<20}" + "".join(f"{n:<16}" for n in names)
        lines.append(header)
        notes: dict[str, int] = {}  # one footnote per distinct reason
        for op, per_dev in data["ops"].items():
            cells = []
            for row in per_dev[dev]:
                mark = row["status"]
                if row.get("reason"):
                    key = f"{row['backend']}: {row['reason']}"
                    mark += f" [{notes.setdefault(key, len(notes) + 1)}]"
                cells.append(f"{mark:<16}")
            lines.append(f"  {op:<20}" + "".join(cells))
        if notes:
            lines += ["", "  notes:"] + [f"  [{i}] {text}" for text, i in notes.items()]
    lines += ["", "ascend: calls that run the reference on the NPU tensors instead of a CANN op (per chip)"]
    grouped: dict[tuple[str, str], list[str]] = {}
    for row in data.get("ascend_fallbacks", []):
        grouped.setdefault((row["op"], row["condition"]), []).append(row["chip"])
    for (op, condition), chips in grouped.items():
        lines.append(f"  {op:<22} {'/'.join(chips):<10} {condition}")
    return "\n".join(lines)
