"""``v4hal run --ep N``: ``v4hal run``'s job on ``N`` local gloo ranks (`v4hal.parallel.launch.spawn`).

Each rank loads the checkpoint, shards the routed experts (`v4hal.parallel.model.shard_model_experts`) and
runs prefill + greedy decode (`v4hal.bench.decode.timed_decode`) on its rows of the prompt (rows split in
contiguous chunks when ``batch >= N``, data-parallel attention; otherwise every rank runs every row,
replicated attention), the MoE layers exchanging tokens every step.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.distributed as dist

from v4hal.apps.common import (
    backend_gaps,
    backend_scope,
    experts_fp8,
    kernel_private_pages,
    make_prompt,
    prepare_backend,
    resolve_checkpoint,
)
from v4hal.bench.decode import timed_decode
from v4hal.hal.errors import RangeError
from v4hal.model import V4Model
from v4hal.parallel.launch import spawn
from v4hal.parallel.model import moe_layers, shard_model_experts

__all__ = ["run_ep"]


def _rank_run(rank: int, world: int, opts: dict[str, Any], path: str) -> dict[str, Any]:
    """One rank of `run_ep`: load, shard, prefill + decode its rows; tokens, timings, EP byte counts."""
    t0 = time.perf_counter()
    model = V4Model.from_pretrained(path, device="cpu", experts_fp8=opts["experts_fp8"], mmap=opts["mmap"])
    shard_model_experts(model, fp8_payload=opts["fp8_payload"], timeout=opts["timeout"])
    kernel_private_pages(model, opts["backend"])
    load_s = time.perf_counter() - t0
    cfg = model.config
    prompt = make_prompt(opts["batch"], opts["prompt_len"], cfg.vocab_size, opts["seed"], "cpu")
    rows = (torch.tensor_split(torch.arange(opts["batch"]), world)[rank] if opts["batch"] >= world
            else torch.arange(opts["batch"]))
    prompt = prompt[rows]
    ctx = backend_scope(opts["backend"], opts["backend_gaps"])
    sent = {"dispatch_bytes_remote": 0.0, "combine_bytes_remote": 0.0}
    layers = [f.experts for f in moe_layers(model)]

    def count_prefill_bytes() -> None:
        for ex in layers:
            for key in sent:
                sent[key] += ex.ep.last_handle.stats.get(key, 0.0) if ex.ep.last_handle else 0.0

    with ctx:
        out = timed_decode(model, prompt, opts["max_new_tokens"], start=dist.barrier,
                           after_prefill=count_prefill_bytes)
    return {"rows": rows.tolist(), "tokens": out.tokens, "load_s": load_s, "prefill_s": out.prefill_s,
            "decode_s": out.decode_s, "logits_finite": bool(torch.isfinite(out.logits).all()),
            "experts": layers[0].kind if layers else None,
            "transport": layers[0].transport if layers else None, "prefill_bytes_sent": sent,
            "threads": torch.get_num_threads()}


def run_ep(args: argparse.Namespace, ep: int, *, timeout_s: float = 120.0, start_method: str = "spawn",
           fp8_payload: bool = False) -> dict[str, Any]:
    """``v4hal run`` on ``ep`` local gloo ranks; the same result keys as `v4hal.apps.run.run` plus
    ``ep``, ``attention`` ("data-parallel" or "replicated"), ``transport`` and ``prefill_bytes_sent``.

    ``args``: the ``v4hal run`` namespace (model, checkpoint, backend, device, prompt_len, max_new_tokens,
    batch, seed, threads, experts). Only ``device="cpu"`` (gloo) is served.
    """
    if ep < 1:
        raise RangeError(f"--ep must be >= 1, got {ep}")
    if str(args.device) != "cpu":
        raise RangeError(f"--ep runs local gloo ranks on the CPU; got --device {args.device}")
    if args.max_new_tokens < 1:
        raise RangeError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    prepare_backend(args.backend, "cpu")
    path = resolve_checkpoint(args.model if not args.checkpoint else None, args.checkpoint)
    opts = {"batch": args.batch, "prompt_len": args.prompt_len, "max_new_tokens": args.max_new_tokens,
            "seed": args.seed, "backend": args.backend, "backend_gaps": backend_gaps(args.backend),
            "fp8_payload": fp8_payload, "timeout": timeout_s,
            "experts_fp8": experts_fp8(getattr(args, "experts", "auto"), "cpu"), "mmap": getattr(args, "mmap", False)}
    threads = getattr(args, "threads", None) or 1
    res = spawn(_rank_run, ep, opts, str(path), timeout_s=timeout_s, start_method=start_method, threads=threads)
    tokens = torch.empty(args.batch, args.max_new_tokens, dtype=torch.long)
    for r in res:
        tokens[r["rows"]] = r["tokens"]
    prefill_s = max(r["prefill_s"] for r in res)
    decode_s = max(r["decode_s"] for r in res)
    steps = args.max_new_tokens - 1
    return {
        "model": args.model if not args.checkpoint else None, "checkpoint": str(path),
        "backend": args.backend or "auto", "device": "cpu", "batch": args.batch, "prompt_len": args.prompt_len,
        "max_new_tokens": args.max_new_tokens, "threads": res[0]["threads"], "experts": res[0]["experts"],
        "load_s": max(r["load_s"] for r in res), "prefill_s": prefill_s,
        "prefill_tok_s": args.batch * args.prompt_len / prefill_s,
        "decode_s": decode_s, "decode_tok_s": (args.batch * steps / decode_s) if steps and decode_s > 0 else None,
        "tokens": tokens.tolist(), "logits_finite": all(r["logits_finite"] for r in res),
        "ep": ep, "attention": "data-parallel" if args.batch >= ep else "replicated",
        "transport": res[0]["transport"],
        "prefill_bytes_sent": {k: sum(r["prefill_bytes_sent"][k] for r in res) for k in res[0]["prefill_bytes_sent"]},
    }
