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

import argparse
from dataclasses import dataclass, field
from typing import Any

import torch

from v4hal import compare as numerics
from v4hal.cliargs import reports_errors, write_json
from v4hal.compare import calc_diff

__all__ = ["add_arguments", "main", "collect", "compare", "calc_diff", "BackendRun", "run_backend"]

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``v4hal parity --model`` (``v4hal parity`` defines --device/--backends/--seed/--json/--model)."""
    from v4hal.cliargs import backend_names, choice_list, device, model_preset, seed, writable_path

    parser.add_argument("--model", default="v4-mini", type=model_preset,
                        help="preset whose random checkpoint to compare")
    parser.add_argument("--backends", default=None, type=choice_list(backend_names, "backend"),
                        help="comma-separated backends (default: all available)")
    parser.add_argument("--device", default="cpu", type=device)
    parser.add_argument("--seed", type=seed, default=0, help="seed of the prompt (0 .. 2**32 - 1)")
    parser.add_argument("--json", default=None, type=writable_path, help="write the rows to this JSON file")
    add_model_arguments(parser)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options only model-level parity has (for ``v4hal parity`` to add to its parser)."""
    from v4hal.cliargs import float_in, int_in

    from .cli import MAX_BATCH, MAX_POSITIONS

    parser.add_argument("--checkpoint", default=None, help="checkpoint directory instead of the preset's")
    parser.add_argument("--prompt-len", type=int_in(1, MAX_POSITIONS), default=24, help="prompt tokens (default 24)")
    parser.add_argument("--decode-steps", type=int_in(0, MAX_POSITIONS), default=3,
                        help="decode steps compared (default 3)")
    parser.add_argument("--batch", type=int_in(1, MAX_BATCH), default=1)
    parser.add_argument("--experts", choices=("checkpoint", "fp8"), default="checkpoint",
                        help="routed expert format (see v4hal run --experts)")
    parser.add_argument("--tol-hidden", type=float_in(0, MAX_TOL), default=DEFAULT_TOL_HIDDEN,
                        help=f"max calc_diff of a layer's output stream (default {DEFAULT_TOL_HIDDEN:g})")
    parser.add_argument("--tol-logits", type=float_in(0, MAX_TOL), default=DEFAULT_TOL_LOGITS,
                        help=f"max calc_diff of the logits (default {DEFAULT_TOL_LOGITS:g})")


def _opt(args: argparse.Namespace, name: str, default: Any) -> Any:
    v = getattr(args, name, None)
    return default if v is None else v


@reports_errors("parity")
def main(args: argparse.Namespace) -> int:
    """``v4hal parity --model``: returns 0 when every row passes, 1 otherwise, 2 on bad options or a bad
    checkpoint (one line on stderr, before any backend runs)."""
    import v4hal
    from v4hal.cliargs import backends_on, split_list

    from .cli import make_prompt, prepare_backend, resolve_checkpoint, set_threads
    from .config import ModelConfig

    device = _opt(args, "device", "cpu")
    backends = split_list(args.backends) if getattr(args, "backends", None) else None
    for b in backends or []:
        prepare_backend(b, device)
    if backends is None:
        backends = v4hal.available_backends(device)
    backends_on(backends, device)
    others = [b for b in backends if b != "reference"]
    checkpoint = getattr(args, "checkpoint", None)
    path = resolve_checkpoint(_opt(args, "model", "v4-mini") if not checkpoint else None, checkpoint)
    set_threads(None, path, device)
    cfg = ModelConfig.from_json(path)
    prompt_len, steps = _opt(args, "prompt_len", 24), _opt(args, "decode_steps", 3)
    if prompt_len + steps > cfg.max_seq_len:
        raise v4hal.RangeError(f"--prompt-len {prompt_len} + --decode-steps {steps} = {prompt_len + steps} positions "
                               f"exceed the max_seq_len {cfg.max_seq_len} of {path}")
    prompt = make_prompt(_opt(args, "batch", 1), prompt_len, cfg.vocab_size, _opt(args, "seed", 0), device)
    experts_fp8 = _opt(args, "experts", "checkpoint") == "fp8"
    tol_h, tol_l = _opt(args, "tol_hidden", DEFAULT_TOL_HIDDEN), _opt(args, "tol_logits", DEFAULT_TOL_LOGITS)

    ref = run_backend(str(path), "reference", device, prompt, steps, None, experts_fp8)
    forced = ref.tokens
    rows: list[dict[str, Any]] = []
    runs = {"reference": ref}
    for b in others:
        runs[b] = run_backend(str(path), b, device, prompt, steps, forced, experts_fp8)
        rows += compare(ref, runs[b], tol_h, tol_l)
    if rows:
        print(format_table(rows))
    for b, r in runs.items():
        for op, why in r.fallbacks.items():
            print(f"note: {b}: {op} ran on the reference backend ({why})")
    failed = [r for r in rows if r["status"] == "FAIL"]
    if not others:
        print("only the reference backend was run (nothing to compare); set TRITON_INTERPRET=1 or use a GPU "
              "to compare the Triton kernels")
    counts = (f"compared {len(others)} backend(s) against the reference: {len(rows) - len(failed)} passed, "
              f"{len(failed)} failed" if others else "compared 0 backend(s) against the reference: nothing was checked")
    print(f"\n{counts} ({path}, prompt {prompt_len}, {steps} decode steps, backends {', '.join(backends)})")
    if getattr(args, "json", None):
        write_json(args.json, {"model": _opt(args, "model", None), "checkpoint": str(path), "device": device,
                               "backends": backends, "prompt_len": prompt_len, "decode_steps": steps,
                               "tol_hidden": tol_h, "tol_logits": tol_l, "rows": rows,
                               "fallbacks": {b: r.fallbacks for b, r in runs.items()},
                               "reference_tokens": forced.tolist()})
    return 1 if failed else 0
