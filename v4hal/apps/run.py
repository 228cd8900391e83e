"""``v4hal run``: prefill a prompt, decode tokens greedily, report tokens/s.

``v4hal run --model v4-mini`` writes a seeded random v4-mini checkpoint into the cache folder
on first use (``$V4HAL_CACHE_DIR`` or ``~/.cache/v4hal``, subfolder named after the preset) and
runs it; ``--checkpoint DIR`` runs a real checkpoint (inference or Hugging Face layout).
``--backend NAME`` forces every op onto one backend (``v4hal.use_backend``), except the ops that backend has no
implementation of (`v4hal.apps.common.backend_gaps`, named in a note), which run on the reference; on the CPU a
kernel backend's private pool then takes quantized pages (`v4hal.apps.common.kernel_private_pages`).

The prompt is ``--batch`` rows of ``--prompt-len`` random token ids (``--seed``). Prefill time
covers the forward pass over the prompt (which yields the first new token); decode time covers
the remaining ``--max-new-tokens - 1`` one-token steps. ``--json PATH`` writes the figures.

``--requests N`` runs N requests through the continuous-batching engine on paged caches instead
(`v4hal.serve.driver.run_requests`: ``--chunk``, ``--arrival``, ``--block-size``, ``--layout``,
``--shared-prefix``, ``--pool-memory``) and prints its throughput, pages and cache bytes next to one
request timed alone; with ``--ep K`` the requests are dealt over K expert-parallel
ranks (request i to rank i % K) that step together (`v4hal.apps.serve.run_requests_ep`).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from v4hal.apps.args import reports_errors, write_json
from v4hal.apps.common import (
    MAX_BATCH,
    MAX_POSITIONS,
    backend_gaps,
    backend_scope,
    experts_fp8,
    kernel_private_pages,
    make_prompt,
    prepare_backend,
    resolve_checkpoint,
    set_threads,
)
from v4hal.bench.decode import timed_decode

__all__ = ["add_arguments", "main", "run", "check_args"]

#: upper bounds of the numeric flags (the model's own limits, such as max_seq_len, are checked in `check_args`)
MAX_PREFILL_TOKENS = 1 << 20     # --batch x --prompt-len: the tokens of the one prefill call
MAX_EP = 64                      # --ep: local processes, each loading the model
MAX_REQUESTS = 1 << 20           # --requests (the workload's tokens are bounded too: driver.MAX_WORKLOAD_TOKENS)
MAX_CHUNK = 1 << 16              # --chunk
MAX_ARRIVAL = 1 << 20            # --arrival
MAX_BLOCK_SIZE = 1024            # --block-size
MAX_POOL_MEMORY = 1 << 50        # --pool-memory (also bounded by the memory available, in `serve_options`)

#: ``--layout`` names (`v4hal.serve.sizing.LAYOUT_PAIRS`), listed here so parsing imports no serving code
LAYOUT_NAMES = ("quantized", "bf16", "bf16_kv")

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``v4hal run``."""
    from v4hal.apps.args import (
        backend_names,
        byte_size,
        choice,
        device,
        int_in,
        model_preset,
        seed,
        threads,
        writable_path,
    )

    parser.add_argument("--model", default="v4-mini", type=model_preset,
                        help="preset whose random checkpoint to run: v4-mini (default) or v41-mini (DeepSeek-V4.1); "
                             "the release-sized presets (v4-flash, v4-pro, v41-flash) need --checkpoint DIR")
    parser.add_argument("--checkpoint", default=None, help="checkpoint directory to run instead of a preset")
    parser.add_argument("--backend", default=None, type=choice(backend_names, "backend"),
                        help="force every op onto this backend (default: automatic); the ops it has no "
                             "implementation of run on the reference, named in a note")
    parser.add_argument("--device", default="cpu", type=device, help="torch device (cpu, cuda, npu ...)")
    parser.add_argument("--prompt-len", type=int_in(1, MAX_POSITIONS), default=64,
                        help="prompt tokens per row (default 64)")
    parser.add_argument("--max-new-tokens", type=int_in(1, MAX_POSITIONS), default=32,
                        help="tokens to generate per row, the first by the prefill (default 32)")
    parser.add_argument("--batch", type=int_in(1, MAX_BATCH), default=1, help="prompt rows (default 1)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the random prompt (0 .. 2**32 - 1)")
    parser.add_argument("--threads", type=threads, default=None,
                        help="torch CPU threads (default: 1 for models with dim <= 1024, whose tiny GEMMs only "
                             "lose to thread synchronization, else torch's choice)")
    parser.add_argument("--experts", choices=("auto", "checkpoint", "fp8"), default="auto",
                        help="routed expert format: as stored, or FP4 re-encoded to FP8 at load when lossless "
                             "(then one moe_experts call covers routed + shared experts); auto = fp8 on cpu")
    parser.add_argument("--mmap", action="store_true",
                        help="CPU only: leave the weights in the checkpoint file's memory map instead of copying "
                             "them into memory (for checkpoints larger than the free RAM). Hazard: the files must "
                             "not change while the run lasts (a truncated file kills it with SIGBUS)")
    parser.add_argument("--json", default=None, type=writable_path, help="write the results to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--ep", type=int_in(1, MAX_EP), default=1,
                        help="expert-parallel ranks: N local gloo processes, each holding E/N routed experts "
                             "(N must divide the model's routed expert count); with --requests, request i is "
                             "served by rank i %% N")
    parser.add_argument("--fp8-payload", action="store_true", help="with --ep: FP8 dispatch payload (act_quant)")
    serve = parser.add_argument_group("continuous batching (--requests N; figures defined in v4hal.serve.driver)")
    serve.add_argument("--requests", type=int_in(1, MAX_REQUESTS), default=None,
                       help="run N requests through the continuous-batching engine on paged caches instead: prompt "
                            "lengths drawn around --prompt-len (uniform in [prompt_len/4, 2*prompt_len]), "
                            "--max-new-tokens each; also times one request alone for comparison")
    serve.add_argument("--chunk", type=int_in(1, MAX_CHUNK), default=None,
                       help="with --requests: tokens per step (decode tokens first, then prefill chunks; default 64)")
    serve.add_argument("--arrival", type=int_in(0, MAX_ARRIVAL), default=None,
                       help="with --requests: one new request every K steps (0: all at once; default: a seeded "
                            "schedule with gaps of 0-3 steps)")
    serve.add_argument("--block-size", type=int_in(1, MAX_BLOCK_SIZE), default=None,
                       help="with --requests: entries per cache page (default 64, or 16 for models whose window "
                            "is under 64 tokens, such as v4-mini)")
    serve.add_argument("--layout", type=choice(LAYOUT_NAMES, "layout"), default=None,
                       help="with --requests: cache layouts, quantized (model1_fp8 + indexer_fp4) or bf16 (bf16 "
                            "attention and indexer caches); default: the device's (quantized on cpu and cuda, bf16 "
                            "on npu)")
    serve.add_argument("--shared-prefix", type=int_in(0, MAX_POSITIONS), default=None,
                       help="with --requests: tokens every prompt starts with (reused from the first request that "
                            "computed them, at page boundaries; default 0)")
    serve.add_argument("--pool-memory", type=byte_size(1 << 20, MAX_POOL_MEMORY), default=None, metavar="SIZE",
                       help="with --requests: bytes of the paged cache pool (e.g. 512M, 2G; with --ep, shared by "
                            "the ranks); requests that do not fit wait for pages. Default: an eighth of the "
                            "available RAM on the CPU, half the free device memory on an accelerator, at most what "
                            "the workload can use"),


def check_args(args: argparse.Namespace) -> None:
    """The checks of ``v4hal run`` that involve several options or the model's config (read from the checkpoint,
    or the preset's), before any work: no checkpoint is written, no rank started. Raises `v4hal.RangeError`."""
    from v4hal.apps.args import backends_on
    from v4hal.hal.errors import RangeError
    from v4hal.model.config import ModelConfig

    if args.checkpoint:
        path = resolve_checkpoint(None, args.checkpoint)
        cfg = ModelConfig.from_json(path if path.is_dir() else path.parent)
        source = str(args.checkpoint)
    else:
        cfg = ModelConfig.preset(args.model)
        source = f"--model {args.model}"
    if args.batch * args.prompt_len > MAX_PREFILL_TOKENS:
        raise RangeError(f"--batch {args.batch} x --prompt-len {args.prompt_len} = {args.batch * args.prompt_len} "
                         f"tokens in one prefill call; at most {MAX_PREFILL_TOKENS}")
    positions = args.prompt_len + args.max_new_tokens - 1
    if positions > cfg.max_seq_len:
        raise RangeError(f"--prompt-len {args.prompt_len} + --max-new-tokens {args.max_new_tokens} - 1 = {positions} "
                         f"positions exceed the max_seq_len {cfg.max_seq_len} of {source}")
    if getattr(args, "mmap", False) and torch.device(args.device).type != "cpu":
        raise RangeError(f"--mmap keeps weights mapped on the CPU only; got --device {args.device}")
    if args.ep > 1:
        if torch.device(args.device).type != "cpu":
            raise RangeError(f"--ep runs local gloo ranks on the CPU; got --device {args.device}")
        n = cfg.n_routed_experts
        if n % args.ep:
            divisors = [d for d in range(1, n + 1) if n % d == 0]
            raise RangeError(f"--ep {args.ep}: the {n} routed experts of {source} do not split evenly over "
                             f"{args.ep} ranks; --ep must divide {n} (one of {divisors})")
    if getattr(args, "requests", None) is None:
        from v4hal.apps.serve import SERVE_DEFAULTS

        given = [f"--{k.replace('_', '-')}" for k in SERVE_DEFAULTS if getattr(args, k, None) is not None]
        if given:
            raise RangeError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} to a "
                             f"continuous-batching run; add --requests N")
    else:
        from v4hal.apps.serve import serve_options

        serve_options(args, cfg)
    if args.backend:
        prepare_backend(args.backend, args.device)
        backends_on([args.backend], args.device, "--backend")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load, prefill, decode; returns the result dict that `main` prints."""
    from tqdm import tqdm

    import v4hal
    from v4hal.model import V4Model

    if args.max_new_tokens < 1:
        raise v4hal.RangeError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    prepare_backend(args.backend, args.device)
    path = resolve_checkpoint(args.model if not args.checkpoint else None, args.checkpoint)
    set_threads(args.threads, path, args.device)
    t0 = time.perf_counter()
    model = V4Model.from_pretrained(path, device=args.device, experts_fp8=experts_fp8(args.experts, args.device),
                                    mmap=getattr(args, "mmap", False))
    load_s = time.perf_counter() - t0
    prompt = make_prompt(args.batch, args.prompt_len, model.config.vocab_size, args.seed, args.device)
    n = args.max_new_tokens
    kernel_private_pages(model, args.backend)
    ctx = backend_scope(args.backend, backend_gaps(args.backend))
    # the bar counts the decode steps, as the summary does: the first of the n new tokens comes from the prefill
    with ctx, tqdm(total=n - 1, desc="decode", unit="tok", disable=args.no_progress or n == 1,
                   file=sys.stderr) as bar:
        out = timed_decode(model, prompt, n, on_step=lambda i: bar.update(1))
    return {
        "model": args.model if not args.checkpoint else None, "checkpoint": str(path),
        "backend": args.backend or "auto", "device": args.device, "batch": args.batch,
        "prompt_len": args.prompt_len, "max_new_tokens": n, "threads": torch.get_num_threads(),
        "experts": model.layers[0].ffn.experts.kind, "load_s": load_s, **out.figures(args.prompt_len),
        "tokens": out.tokens.tolist(), "logits_finite": bool(torch.isfinite(out.logits).all()),
    }


@reports_errors("run")
def main(args: argparse.Namespace) -> int:
    """``v4hal run``: 0 on success, 1 when the logits are not finite, 2 on bad options or a bad checkpoint (one
    line on stderr; `check_args` refuses what it can before anything is loaded)."""
    check_args(args)
    if getattr(args, "requests", None) is not None:
        from v4hal.apps.serve import run_serving
        from v4hal.serve.report import format_report

        res = run_serving(args)
        print(format_report(res))
        print(f"({res['checkpoint']}, backend {res['backend']}, experts {res['experts']})")
        if args.json:
            write_json(args.json, res)
        return 0 if res["all_finished"] and res["logits_finite"] else 1
    if args.ep > 1:
        from v4hal.apps.run_ep import run_ep

        res = run_ep(args, args.ep, fp8_payload=args.fp8_payload)
    else:
        res = run(args)
    for row, toks in enumerate(res["tokens"]):
        print(f"tokens[{row}]: {' '.join(map(str, toks))}")
    dec = f"{res['decode_tok_s']:.2f} tok/s" if res["decode_tok_s"] is not None else "n/a (one token)"
    print(f"prefill: {res['batch']} x {res['prompt_len']} tokens in {res['prefill_s']:.3f} s = "
          f"{res['prefill_tok_s']:.1f} tok/s")
    print(f"decode:  {res['batch']} x {res['max_new_tokens'] - 1} tokens in {res['decode_s']:.3f} s = {dec} "
          f"({res['max_new_tokens']} new tokens per row: the prefill's and {res['max_new_tokens'] - 1} decode steps)")
    print(f"({res['checkpoint']}, backend {res['backend']}, device {res['device']}, {res['threads']} threads, "
          f"experts {res['experts']})")
    if res.get("ep"):
        print(f"expert parallel: {res['ep']} ranks, transport {res['transport']}, attention {res['attention']}, "
              f"prefill bytes sent {res['prefill_bytes_sent']}")
    if args.json:
        write_json(args.json, res)
    return 0 if res["logits_finite"] else 1
