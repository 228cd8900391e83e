"""``v4hal parity --model v4-mini --backends reference,triton``: the whole V4 graph on each backend.

Every backend runs the same checkpoint and the same prompt: a prefill, then ``--decode-steps``
one-token steps fed with the reference run's greedy tokens (so every backend sees the same
inputs), then the MTP block on the prefill. After every layer the residual stream is compared
with the reference run's, and so are the logits of every step, by the cosine-style distance
``calc_diff = 1 - 2<x,y>/(|x|^2+|y|^2)`` (DeepGEMM's metric) and the largest absolute error.
A row fails when ``calc_diff`` exceeds its bound: the numerics table's rules for the graph's
hidden states and logits (`v4hal.compare`, ``MODEL_HIDDEN`` / ``MODEL_LOGITS``), unless
``--tol-hidden`` / ``--tol-logits`` set another.

A backend runs the graph with ``v4hal.use_backend(name)``. When it cannot serve some op (no
implementation on this device, or a requirement unmet), that op falls back to the reference
backend for the whole run; the fallbacks are listed with their reasons, so the table always
says which ops the comparison covered.

The bounds are loose on purpose: FP8/FP4 activation quantization turns a one-ulp bf16
difference upstream into a full quantization step downstream, so two correct backends drift
apart by ~1e-3 (calc_diff) over a few quantized layers; a wrong kernel shows up as 1e-1..1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from v4hal import compare as numerics
from v4hal.compare import calc_diff

__all__ = ["collect", "format_table", "compare", "calc_diff", "BackendRun", "run_backend"]

HIDDEN_RULE = numerics.rule_for(numerics.MODEL_HIDDEN, torch.float32)
LOGITS_RULE = numerics.rule_for(numerics.MODEL_LOGITS, torch.float32)
DEFAULT_TOL_HIDDEN = HIDDEN_RULE.max_diff
DEFAULT_TOL_LOGITS = LOGITS_RULE.max_diff
#: calc_diff lies in [0, 2]: a tolerance of 2 passes everything
MAX_TOL = 2.0


@dataclass
class BackendRun:
    """What one backend produced: per stage, the per-layer streams and the logits."""

    backend: str
    stages: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    tokens: torch.Tensor | None = None
    fallbacks: dict[str, str] = field(default_factory=dict)   # op -> why it ran on the reference


def collect(model: Any, prompt: torch.Tensor, decode_steps: int, forced: torch.Tensor | None = None,
            mtp: bool = True) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor]:
    """Run prefill + ``decode_steps`` steps (+ MTP). ``forced [b, decode_steps + 1]`` are the tokens fed
    to the decode steps and MTP (default: this run's own greedy tokens). Returns (stages, tokens)."""
    stages: dict[str, dict[str, torch.Tensor]] = {}
    plen = prompt.shape[1]
    res = model.forward_full(prompt, 0, keep_hidden=True)
    own = [res.logits.argmax(-1)]
    stages["prefill"] = {f"layer {i}": h.float().cpu() for i, h in enumerate(res.hidden)}
    stages["prefill"]["logits"] = res.logits.float().cpu()
    final = res.final
    first = forced[:, 0] if forced is not None else own[0]
    for step in range(decode_steps):
        tok = forced[:, step] if forced is not None else own[-1]
        r = model.forward_full(tok.unsqueeze(1), plen + step, keep_hidden=True)
        own.append(r.logits.argmax(-1))
        stages[f"decode {step}"] = {f"layer {i}": h.float().cpu() for i, h in enumerate(r.hidden)}
        stages[f"decode {step}"]["logits"] = r.logits.float().cpu()
    if mtp and len(model.mtp):
        next_ids = torch.cat([prompt[:, 1:], first.unsqueeze(1)], dim=1)
        stages["mtp prefill"] = {"logits": model.mtp_forward(final, next_ids, 0).float().cpu()}
    return stages, torch.stack(own, dim=1)


def run_backend(path: str, backend: str, device: str, prompt: torch.Tensor, decode_steps: int,
                forced: torch.Tensor | None, experts_fp8: bool = False, max_retries: int = 32) -> BackendRun:
    """Load the checkpoint and run it on ``backend``; ops the backend cannot serve fall back to the reference."""
    import v4hal
    from v4hal.hal.errors import BackendUnavailableError

    from .model import V4Model

    run = BackendRun(backend)
    for _ in range(max_retries):
        model = V4Model.from_pretrained(path, device=device, experts_fp8=experts_fp8)
        per_op = {op: "reference" for op in run.fallbacks}
        try:
            with v4hal.use_backend(backend, **per_op):
                run.stages, run.tokens = collect(model, prompt, decode_steps, forced)
            return run
        except BackendUnavailableError as e:
            op = str(e).split(":", 1)[0].strip()
            if backend == "reference" or op not in v4hal.PUBLIC_OPS or op in run.fallbacks:
                raise
            run.fallbacks[op] = str(e)
    raise RuntimeError(f"parity: backend {backend} kept failing after {max_retries} fallbacks")


def compare(ref: BackendRun, other: BackendRun, tol_hidden: float, tol_logits: float) -> list[dict[str, Any]]:
    """Rows of (stage, tensor, backend, max_abs, calc_diff, status) for ``other`` against ``ref``."""
    rows = []
    hidden, logits = numerics.with_bound(HIDDEN_RULE, tol_hidden), numerics.with_bound(LOGITS_RULE, tol_logits)
    for stage, tensors in ref.stages.items():
        got = other.stages.get(stage, {})
        for name, want in tensors.items():
            rule = logits if name == "logits" else hidden
            tol = rule.max_diff
            have = got.get(name)
            if have is None or have.shape != want.shape:
                rows.append(dict(stage=stage, tensor=name, backend=other.backend, max_abs=float("inf"),
                                 calc_diff=float("inf"), tol=tol, status="FAIL"))
                continue
            res = numerics.compare_tensor(have, want, rule)
            row = dict(stage=stage, tensor=name, backend=other.backend, max_abs=res.max_abs, calc_diff=res.diff,
                       tol=tol, status="pass" if res.passed else "FAIL")
            if name == "logits":
                row["argmax_agree"] = float((have.argmax(-1) == want.argmax(-1)).float().mean())
            rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'stage':<14}{'tensor':<10}{'backend':<11}{'max abs err':>12}{'calc_diff':>11}{'tol':>9}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        extra = f"  argmax agree {r['argmax_agree']:.2f}" if "argmax_agree" in r else ""
        lines.append(f"{r['stage']:<14}{r['tensor']:<10}{r['backend']:<11}{r['max_abs']:>12.3g}"
                     f"{r['calc_diff']:>11.2g}{r['tol']:>9.1g}  {r['status']}{extra}")
    return "\n".join(lines)
