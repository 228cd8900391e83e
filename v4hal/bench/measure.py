"""``v4hal cost --measure``: time one ``v4-mini`` decode step at growing context lengths.

Two models built from the same ops (``V4Model`` on v4hal ops, random seeded weights, the
backend in force):
- **hybrid**: ``v4-mini`` as it is (window 16; ratio 0 / 4 / 128 layers);
- **dense**: the same config with every layer window-only and the window as long as the
  context, so each layer's ``sparse_attn`` attends to every previous token (a dense-attention
  control).

For each context length L both models are built with ``max_seq_len = L``, a one-token prefill
allocates their caches, then the running position is moved to ``L - 1`` and one decode step
is timed (median of ``repeats``). The arithmetic of a step does not depend on the cached
values, so the caches are not filled token by token (that would take L steps per point);
the step reads and scores exactly as many entries as it would after a real prefill of L
tokens. Next to the times, the analytic FLOPs of `v4hal.bench.cost` for both configs.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from v4hal.hal.errors import RangeError
from v4hal.model import V4Model, read_checkpoint, write_random_checkpoint
from v4hal.model.config import ModelConfig

from . import cost as costmod
from .timing import Timing, time_fn, value_checks_off

__all__ = ["measure", "render_measure", "DEFAULT_CONTEXTS", "dense_control"]

DEFAULT_CONTEXTS = (256, 2048, 16384, 131072)


def dense_control(cfg: ModelConfig, context: int) -> ModelConfig:
    """``cfg`` with every layer window-only and a window of ``context`` tokens (dense attention)."""
    return cfg.replace(window_size=context, compress_ratios=[0] * cfg.n_total_layers, max_seq_len=context)


def _seek(model: V4Model, pos: int) -> None:
    """Make ``pos`` the model's next decode position (its caches stay as they are)."""
    if not hasattr(model, "_next_pos"):
        raise RuntimeError("V4Model no longer tracks its running position in `_next_pos`; update "
                           "v4hal.bench.measure._seek")
    model._next_pos = pos


def _build(path: Path, cfg: ModelConfig, device: str) -> V4Model:
    _, tensors = read_checkpoint(path)
    return V4Model.from_tensors(cfg, tensors, device=device).eval()


def _time_step(model: V4Model, context: int, repeats: int, device: str, seed: int) -> Timing:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    model(torch.randint(0, vocab, (1, 1), generator=g).to(device), 0)
    tok = torch.randint(0, vocab, (1, 1), generator=g).to(device)

    def step(i: int) -> None:
        _seek(model, context - 1)
        model(tok, context - 1)

    with value_checks_off():
        return time_fn(step, device, warmup=1, repeats=repeats)


def measure(contexts: Sequence[int] | None = None, repeats: int = 3, seed: int = 0, device: str = "cpu",
            weights: str = "bf16", progress: bool = True) -> dict[str, Any]:
    """Decode-step times (ms) of the hybrid v4-mini and of its dense-attention control at each context.

    ``weights``: "bf16" (default: keeps the context-independent part of a step small on a CPU, where
    the reference backend dequantizes FP8/FP4 weights on every call) or "fp8" (the preset's FP8 +
    FP4-expert checkpoint).
    """
    contexts = sorted(set(int(c) for c in (contexts or DEFAULT_CONTEXTS)))
    if not contexts or contexts[0] < 2:
        raise RangeError(f"cost --measure: contexts must be integers >= 2, got {contexts}")
    if repeats < 1:
        raise RangeError(f"cost --measure: repeats must be >= 1, got {repeats}")
    if weights not in ("bf16", "fp8"):
        raise RangeError(f"cost --measure: weights must be 'bf16' or 'fp8', got {weights!r}")
    base = ModelConfig.preset("v4-mini")
    if weights == "bf16":
        base = base.replace(dtype="bf16", expert_dtype=None)
    rows: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=2 * len(contexts), desc="v4hal cost --measure", unit="model", leave=False)
    with tempfile.TemporaryDirectory(prefix="v4hal-measure-") as tmp:
        hybrid_dir = write_random_checkpoint(base, Path(tmp) / "hybrid", seed=seed)
        dense_dir = write_random_checkpoint(dense_control(base, base.max_seq_len), Path(tmp) / "dense", seed=seed)
        try:
            for L in contexts:
                hyb_cfg = base.replace(max_seq_len=max(L, base.window_size))
                den_cfg = dense_control(base, L)
                row: dict[str, Any] = {"context": L}
                for name, path, cfg in (("hybrid", hybrid_dir, hyb_cfg), ("dense", dense_dir, den_cfg)):
                    model = _build(path, cfg, device)
                    t = _time_step(model, L, repeats, device, seed)
                    row[f"{name}_ms"] = 1e3 * t.median
                    row[f"{name}_p10_ms"], row[f"{name}_p90_ms"] = 1e3 * t.p10, 1e3 * t.p90
                    row[f"{name}_model_gflop"] = costmod.v4_cost(cfg, L).total_flops / 1e9
                    del model
                    if bar is not None:
                        bar.update(1)
                row["dense_over_hybrid"] = row["dense_ms"] / row["hybrid_ms"]
                rows.append(row)
        finally:
            if bar is not None:
                bar.close()
    return {"model": "v4-mini", "weights": weights, "device": device, "repeats": repeats, "seed": seed,
            "backend_note": "the backend in force (v4hal.use_backend / V4HAL_BACKEND) runs both models",
            "rows": rows}


def render_measure(result: dict[str, Any]) -> str:
    """The table of `measure`'s result."""
    headers = ["context", "hybrid ms", "dense ms", "dense/hybrid", "hybrid GFLOP", "dense GFLOP"]
    body = [[str(r["context"]), f"{r['hybrid_ms']:.2f}", f"{r['dense_ms']:.2f}", f"{r['dense_over_hybrid']:.2f}x",
             f"{r['hybrid_model_gflop']:.4f}", f"{r['dense_model_gflop']:.4f}"] for r in result["rows"]]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
    lines = [f"measured: one {result['model']} ({result['weights']} weights) decode step on {result['device']} "
             f"(median of {result['repeats']}), hybrid V4 attention vs a dense-attention control",
             "  ".join(h.rjust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)
