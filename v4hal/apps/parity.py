"""``v4hal parity``: every op on every available backend against the reference (`v4hal.parity`), or with
``--model`` the model's hidden states and logits per backend (`v4hal.model.parity`)."""
from __future__ import annotations

import argparse
import time
from typing import Any

from v4hal.apps.args import reports_errors, write_json
from v4hal.model.parity import (
    DEFAULT_TOL_HIDDEN,
    DEFAULT_TOL_LOGITS,
    MAX_TOL,
    compare,
    format_replays,
    parity_layouts,
    run_backend,
)
from v4hal.model.parity import format_table as format_model_table
from v4hal.parity import format_table, run_parity


def summary(rows: list[dict[str, Any]], device: str = "cpu", seconds: float | None = None) -> str:
    """What a parity run compared, in words: ``compared N backend(s) against the reference (names): P passed,
    F failed, S skipped``, then each other backend that was not compared and why (its first reason on
    ``device``). With nothing compared it says so instead of a pass count."""
    from v4hal.apps.args import unavailable_reason
    from v4hal.hal import registry

    ran = [r for r in rows if r["status"] in ("pass", "FAIL")]
    failed = sum(r["status"] == "FAIL" for r in ran)
    skipped = sum(r["status"] == "skipped" for r in rows)
    compared = sorted({r["backend"] for r in ran})
    absent = [n for n in registry.BACKENDS if n != "reference" and n not in compared]
    why = "; ".join(f"{n} not compared: {unavailable_reason(n, device) or 'no case ran on it'}" for n in absent)
    oracle = sum(r["status"] == "oracle" for r in rows)
    took = f"; {len(rows)} rows in {seconds:.1f} s" if seconds is not None else ""
    if not ran:
        return (f"compared 0 backend(s) against the reference: nothing was checked (the reference ran {oracle} "
                f"case(s) alone, {skipped} skipped{took})" + (f"\n{why}" if why else ""))
    return (f"compared {len(compared)} backend(s) against the reference ({', '.join(compared)}): "
            f"{len(ran) - failed} passed, {failed} failed, {skipped} skipped{took}" + (f"\n{why}" if why else ""))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``v4hal parity`` (op level; with ``--model``, also `v4hal.model.parity`'s)."""
    from v4hal.apps.args import backend_names, choice_list, device, model_preset, seed, writable_path
    from v4hal.ops import public_ops

    parser.add_argument("--device", default="cpu", type=device,
                        help="device whose tensors the ops run on (cpu, cuda, npu)")
    parser.add_argument("--backends", default=None, type=choice_list(backend_names, "backend"),
                        help="comma-separated backends to compare with the reference (default: all available)")
    parser.add_argument("--ops", default=None, type=choice_list(public_ops, "op"),
                        help="comma-separated ops (default: all)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the case inputs (0 .. 2**32 - 1)")
    parser.add_argument("--json", default=None, type=writable_path, help="write the rows to this JSON file")
    parser.add_argument("--model", default=None, type=model_preset,
                        help="model-level parity instead (e.g. v4-mini): compare hidden states and logits per backend")
    group = parser.add_argument_group("with --model")
    add_model_arguments(group)


@reports_errors("parity")
def main(args: argparse.Namespace) -> int:
    """``v4hal parity``: 0 when every compared row passes, 1 otherwise, 2 on bad options (one line on stderr)."""
    from v4hal.apps.args import backends_on, split_list

    if args.model:
        return model_main(args)
    backends = split_list(args.backends) if args.backends else None
    ops = split_list(args.ops) if args.ops else None
    if backends:
        backends_on(backends, args.device)
    t0 = time.perf_counter()
    rows = run_parity(args.device, backends, ops, args.seed)
    print(format_table(rows))
    print()
    print(summary(rows, args.device, time.perf_counter() - t0))
    failed = [r for r in rows if r["status"] == "FAIL"]
    if args.json:
        write_json(args.json, {"device": args.device, "seed": args.seed, "rows": rows})
        print(f"wrote {args.json}")
    return 1 if failed else 0


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options only model-level parity has (for ``v4hal parity`` to add to its parser)."""
    from v4hal.apps.args import float_in, int_in
    from v4hal.apps.run import MAX_BATCH, MAX_POSITIONS

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
    parser.add_argument("--own-choices", action="store_true",
                        help="let each backend keep its own top-k choices (experts, indexer picks) where they differ "
                             "from the reference's (default: replay the reference's, see v4hal.model.parity)")


def _opt(args: argparse.Namespace, name: str, default: Any) -> Any:
    v = getattr(args, name, None)
    return default if v is None else v


def model_main(args: argparse.Namespace) -> int:
    """``v4hal parity --model``: returns 0 when every row passes, 1 otherwise, 2 on bad options or a bad
    checkpoint (one line on stderr, before any backend runs)."""
    import v4hal
    from v4hal.apps.args import backends_on, split_list
    from v4hal.apps.run import make_prompt, prepare_backend, resolve_checkpoint, set_threads
    from v4hal.model.config import ModelConfig

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

    layouts = parity_layouts(cfg, device)
    own = bool(getattr(args, "own_choices", False))
    ref = run_backend(str(path), "reference", device, prompt, steps, None, experts_fp8, layouts=layouts)
    forced = ref.tokens
    rows: list[dict[str, Any]] = []
    runs = {"reference": ref}
    for b in others:
        runs[b] = run_backend(str(path), b, device, prompt, steps, forced, experts_fp8,
                              decisions=None if own else ref.decisions, layouts=layouts)
        rows += compare(ref, runs[b], tol_h, tol_l)
    if rows:
        print(format_model_table(rows))
    print(f"caches: {layouts[0]} attention, {layouts[1]} indexer pages")
    for b, r in runs.items():
        for op, why in r.fallbacks.items():
            print(f"note: {b}: {op} ran on the reference backend ({why})")
        line = format_replays(b, r.replayed)
        if line:
            print(line)
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
                               "layouts": list(layouts), "own_choices": own,
                               "replayed": {b: r.replayed for b, r in runs.items() if b != "reference"},
                               "reference_tokens": forced.tolist()})
    return 1 if failed else 0
