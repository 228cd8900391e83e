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

Discrete choices are replayed (`Decisions`): the graph's top-k choices (the experts of
``moe_gate``, the indexer's picks and the candidate blocks) turn a rounding difference into a
different set of rows when two candidates score close (and the indexer's FP4 queries move a score
by a whole FP4 step when a value upstream sits at a rounding boundary), after which the streams
differ by whole experts or whole KV entries. Differences of one fp32 ulp in the mHC mixes are
enough (DeepSeek-V4.1-mini: a different expert in the last layer moves the decode logits by
calc_diff ~4e-2, twice the bound). So, as the backend runs take the reference's tokens, they take
the reference's choices where theirs differ (the backend still computes its own, and the expert
weights of the replayed experts come from its own scores); a note counts the rows replayed per
op, and ``--own-choices`` turns the replay off. The choosing ops themselves are compared on their
cases by ``v4hal parity`` (op level).

The caches are paged in the layouts the backends' kernels read on a GPU (`parity_layouts`:
the quantized pair, which stores exactly the values of the ``bf16`` pages), also on the CPU, so
that the interpreted Triton indexer reads the FP4 keys it reads on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from v4hal import compare as numerics
from v4hal.compare import calc_diff

__all__ = ["collect", "format_table", "compare", "calc_diff", "BackendRun", "run_backend", "Decisions",
           "DECISION_OPS", "parity_layouts", "format_replays"]

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
    #: the run's discrete choices in call order (`Decisions.log`): recorded by the reference run
    decisions: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    #: op -> [rows whose choice was replayed from the reference, rows chosen] (empty for the reference)
    replayed: dict[str, list[int]] = field(default_factory=dict)


#: the ops whose outputs are discrete choices (int ids of the chosen experts / KV entries / blocks)
DECISION_OPS = ("moe_gate", "indexer_topk_paged", "indexer_topk_paged_sparse", "indexer_candidate_blocks")


def _rows(ids: torch.Tensor) -> torch.Tensor:
    """Choices ``[..., k]`` as rows of sorted ids ``[R, k]`` (a row's choice is a set: order not compared)."""
    return ids.reshape(-1, ids.shape[-1]).sort(dim=-1).values


class Decisions(TorchFunctionMode):
    """Inside ``with Decisions(recorded):`` the calls of `DECISION_OPS` are recorded (``recorded=None``: the
    reference run; `log` lists ``(op, ids)`` in call order) or replayed: a call whose rows choose a different
    set than the recorded call's returns the recorded choice instead (``moe_gate``: the recorded expert ids
    with weights from this backend's own scores, by the op's table routing). `replayed` counts per op the rows
    replaced and the rows chosen. A replayed run must make the same calls in the same order (same graph, same
    tokens): `RuntimeError` otherwise."""

    def __init__(self, recorded: list[tuple[str, torch.Tensor]] | None = None) -> None:
        super().__init__()
        self.recording = recorded is None
        self.log: list[tuple[str, torch.Tensor]] = [] if recorded is None else recorded
        self.pos = 0
        self.replayed: dict[str, list[int]] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        op = getattr(func, "_qualified_op_name", "").partition("v4hal::")[2]
        out = func(*args, **kwargs)
        if op not in DECISION_OPS:
            return out
        ids = out[1] if op == "moe_gate" else out
        if self.recording:
            self.log.append((op, ids.detach().clone()))
            return out
        if self.pos >= len(self.log) or self.log[self.pos][0] != op or self.log[self.pos][1].shape != ids.shape:
            want = self.log[self.pos][0] if self.pos < len(self.log) else "no further choice"
            raise RuntimeError(f"parity: choice {self.pos} of the replayed run is {op} {tuple(ids.shape)}, the "
                               f"reference made {want} there: the runs did not compute the same graph")
        ref = self.log[self.pos][1].to(ids.device)
        self.pos += 1
        differ = int((_rows(ids) != _rows(ref)).any(dim=-1).sum())
        count = self.replayed.setdefault(op, [0, 0])
        count[0] += differ
        count[1] += ref.reshape(-1, ref.shape[-1]).shape[0]
        if not differ:
            return out
        if op != "moe_gate":
            return ref.clone()
        return self._route_as(func, args, kwargs, ref)

    @staticmethod
    def _route_as(func: Any, args: tuple, kwargs: dict, ids: torch.Tensor) -> Any:
        """``moe_gate`` again with the experts ``ids [T, k]`` as its routing table (one row per token): the
        weights of those experts from this backend's scores."""
        names = [a.name for a in func.default._schema.arguments]
        values = dict(zip(names, args), **kwargs)
        values["tid2eid"] = ids.to(torch.int32).contiguous()
        values["input_ids"] = torch.arange(ids.shape[0], dtype=torch.int32, device=ids.device)
        return func(*(values[n] for n in names if n in values))


def parity_layouts(cfg: Any, device: str | torch.device) -> tuple[str, str]:
    """The (attention, indexer) cache layouts of a parity run: what a pool of ``cfg`` on ``device`` serves with
    (`v4hal.model.caches.private_layouts` with ``serving=True``: the quantized pair where it fits the model, on
    the CPU as on a GPU)."""
    from .caches import private_layouts

    return private_layouts(cfg, torch.device(device), serving=True)


def format_replays(backend: str, replayed: dict[str, list[int]]) -> str | None:
    """One line on the choices a backend run took from the reference, or None when it made none differently."""
    parts = [f"{op} {n} of {total} rows" for op, (n, total) in replayed.items() if n]
    if not parts:
        return None
    return (f"note: {backend}: took the reference's top-k choices where its own differed (--own-choices keeps "
            f"them): " + ", ".join(parts))


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
                forced: torch.Tensor | None, experts_fp8: bool = False, max_retries: int = 32,
                decisions: list[tuple[str, torch.Tensor]] | None = None,
                layouts: tuple[str, str] | None = None) -> BackendRun:
    """Load the checkpoint and run it on ``backend``; ops the backend cannot serve fall back to the reference.
    ``decisions``: the reference run's choices to replay (`Decisions`; None: record this run's own, as
    `BackendRun.decisions`); ``layouts``: the caches' (attention, indexer) layouts (None: `parity_layouts`)."""
    import v4hal
    from v4hal.hal.errors import BackendUnavailableError

    from .model import V4Model

    run = BackendRun(backend)
    for _ in range(max_retries):
        model = V4Model.from_pretrained(path, device=device, experts_fp8=experts_fp8)
        model.private_layouts = layouts or parity_layouts(model.config, device)
        per_op = {op: "reference" for op in run.fallbacks}
        mode = Decisions(decisions)
        try:
            with v4hal.use_backend(backend, **per_op), mode:
                run.stages, run.tokens = collect(model, prompt, decode_steps, forced)
            if decisions is None:
                run.decisions = mode.log
            run.replayed = mode.replayed
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
