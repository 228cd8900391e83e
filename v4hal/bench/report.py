"""Presenting benchmark rows: the screen table, the JSON document, the PNG chart."""
from __future__ import annotations

import json
import platform
from typing import Any, Sequence

import torch

from v4hal.extras import require

from .ceilings import Ceilings
from .peers import installed_libraries
from .runner import Row

__all__ = ["format_bytes", "fmt_time", "text_table",
           "render_table", "render_ceilings", "build_document", "write_json", "plot_rows"]


def format_bytes(n: float) -> str:
    """``n`` bytes as a short binary size: ``"512 MiB"``, ``"1.5 GiB"``."""
    for unit, scale in (("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Columns padded to their widest cell; the first ``left`` left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) if j >= left else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]
    return "\n".join(out)


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def render_ceilings(c: Ceilings) -> str:
    mm = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in c.matmul_flops_per_s.items())
    lines = [f"ceilings on {c.device} ({c.device_name}): copy {c.copy_bytes_per_s / 1e9:.1f} GB/s (read+write); "
             f"matmul {mm}"]
    lines += [f"  note: {k}: {v}" for k, v in c.notes.items()]
    return "\n".join(lines)


def render_table(rows: Sequence[Row]) -> str:
    """One line per row: op, case, backend, dtype, time, TFLOP/s, GB/s, bound, % of ceiling, vs best peer, check."""
    headers = ["op", "case", "backend", "dtype", "time", "TFLOP/s", "GB/s", "bound", "% ceil", "vs peer", "check"]
    body = []
    for r in rows:
        peer = r.best_peer
        check = {"ok": "pass", "check-failed": "FAIL"}.get(r.status, r.status)
        if r.status == "ok" and r.verified == "oracle":
            check = "oracle"
        backend = r.backend + (" (interp)" if r.interpreter else "")
        body.append([r.op, r.case, backend, r.dtype, fmt_time(r.time_s), _num(r.tflops), _num(r.gbps, 4),
                     r.bound or "-", "-" if r.pct_of_ceiling is None else f"{r.pct_of_ceiling:.1f}",
                     f"{peer[1]:.3g}x {peer[0]}" if peer else "-", check])
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
    notes = sorted({r.note for r in rows if r.note and r.status != "ok"})
    if notes:
        lines += ["", "notes:"] + [f"  {n}" for n in notes]
    if any(r.interpreter for r in rows):
        lines += ["", "(interp) rows ran under the Triton interpreter: their times say nothing about GPU speed."]
    lines += ["", "vs peer: the peer's time / ours (above 1: v4hal is faster); % ceil: of the ceiling that binds "
                  "(copy bandwidth when memory-bound, the matmul rate of the dtype when compute-bound)."]
    return "\n".join(lines)


def build_document(rows: Sequence[Row], ceilings: Ceilings | None, meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON document: environment, ceilings, rows (and anything in ``meta``)."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "schema": "v4hal.bench/1",
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
                        "cuda": torch.version.cuda, "platform": platform.platform(),
                        "peer_libraries_installed": installed_libraries()},
        "ceilings": ceilings.to_dict() if ceilings is not None else None,
        **meta,
        "rows": [r.to_dict() for r in rows],
    }


def write_json(path: str, doc: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, default=str)


def plot_rows(path: str, rows: Sequence[Row], title: str = "v4hal bench") -> None:
    """PNG: per timed row, % of the binding ceiling (left) and speedup over the best peer (right)."""
    require("matplotlib", "plot_rows").use("Agg")
    plt = require("matplotlib.pyplot", "plot_rows")
    timed = [r for r in rows if r.time_s is not None]
    backends = sorted({r.backend for r in timed})
    colors = {b: f"C{i}" for i, b in enumerate(backends)}
    labels = [f"{r.op} {r.case.split('/')[-1]} [{r.backend}{' interp' if r.interpreter else ''}]" for r in timed]
    height = max(3.0, 0.22 * len(timed) + 1.5)
    fig, axes = plt.subplots(1, 2, figsize=(15, height), sharey=True,
                             gridspec_kw={"width_ratios": [2, 1]})
    ys = list(range(len(timed)))
    pct = [r.pct_of_ceiling or 0.0 for r in timed]
    axes[0].barh(ys, pct, color=[colors[r.backend] for r in timed])
    axes[0].set_yticks(ys, labels, fontsize=7)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("% of the binding ceiling")
    axes[0].set_title(title)
    Patch = require("matplotlib.patches", "plot_rows").Patch
    axes[0].legend(handles=[Patch(color=colors[b], label=b) for b in backends], loc="lower right", fontsize=8)
    sp = [(r.best_peer[1] if r.best_peer else 0.0) for r in timed]
    axes[1].barh(ys, sp, color=["C2" if s >= 1 else "C3" for s in sp])
    axes[1].axvline(1.0, color="k", lw=0.8)
    axes[1].set_xlabel("speedup over the best peer (peer time / ours)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
