"""``v4hal run --requests N``: the continuous-batching run of `v4hal.serve.driver.run_requests` from the
command line (`run_serving`), and its expert-parallel form on local gloo ranks (`run_requests_ep`)."""
from __future__ import annotations

import argparse
import time
from typing import Any

from v4hal.apps.common import (
    backend_gaps,
    backend_scope,
    experts_fp8,
    kernel_private_pages,
    prepare_backend,
    resolve_checkpoint,
    set_threads,
)
from v4hal.bench.report import format_bytes
from v4hal.hal.errors import RangeError
from v4hal.model import V4Model
from v4hal.model.config import ModelConfig
from v4hal.parallel.launch import spawn
from v4hal.parallel.model import shard_model_experts
from v4hal.serve.driver import merge_ranks, run_requests, serve_rank
from v4hal.serve.sizing import (
    available_memory,
    default_block_size,
    default_layout,
    default_pool_memory,
)
from v4hal.serve.workload import check_workload

__all__ = ["SERVE_DEFAULTS", "serve_options", "run_serving", "run_requests_ep"]

#: the ``--requests`` options and their defaults (None in the parser: given or not)
SERVE_DEFAULTS = {"chunk": 64, "arrival": None, "block_size": None, "layout": None, "shared_prefix": 0,
                  "pool_memory": None}


def serve_options(args: argparse.Namespace, cfg) -> dict[str, Any]:
    """The keyword arguments of `v4hal.serve.driver.run_requests` for ``v4hal run --requests`` (defaults filled
    in), checked against ``cfg``: raises `v4hal.RangeError` for options the engine cannot run."""

    if args.batch != 1:
        raise RangeError(f"--batch {args.batch} sets the rows of a single-sequence run; with --requests the engine "
                         f"forms the batches (leave --batch at 1)")
    opts = {k: (v if (v := getattr(args, k, None)) is not None else d) for k, d in SERVE_DEFAULTS.items()}
    if opts["block_size"] is None:
        opts["block_size"] = default_block_size(cfg)
    if opts["layout"] is None:
        opts["layout"] = default_layout(args.device, cfg)
    opts.update(requests=args.requests, prompt_len=args.prompt_len, max_new_tokens=args.max_new_tokens)
    if opts["pool_memory"] is not None:
        try:
            free = available_memory(args.device)
        except RangeError:
            free = None                             # the device cannot tell: take the size as given
        if free is not None and opts["pool_memory"] > free:
            raise RangeError(f"--pool-memory {format_bytes(opts['pool_memory'])} is more than the "
                             f"{format_bytes(free)} available on {args.device}")
    # the budget each pool gets (one per --ep rank); the default is read again once the model is loaded
    budget = (opts["pool_memory"] or default_pool_memory(args.device)) // args.ep
    check_workload(cfg, **{**opts, "pool_memory": budget})
    return {**opts, "seed": args.seed}


def run_serving(args: argparse.Namespace) -> dict[str, Any]:
    """``v4hal run --requests N``: load the model, run `v4hal.serve.driver.run_requests` (with ``--ep K``:
    `run_requests_ep` on K local gloo ranks, each serving every K-th request); its result
    dict plus the run's setup (model, checkpoint, backend, load time, experts)."""
    prepare_backend(args.backend, args.device)
    path = resolve_checkpoint(args.model if not args.checkpoint else None, args.checkpoint)
    set_threads(args.threads, path, args.device)
    opts = serve_options(args, ModelConfig.from_json(path if path.is_dir() else path.parent))
    setup = {"model": args.model if not args.checkpoint else None, "checkpoint": str(path),
             "backend": args.backend or "auto"}
    gaps = backend_gaps(args.backend)
    if args.ep > 1:
        res = run_requests_ep(str(path), args.ep, experts_fp8=experts_fp8(args.experts, args.device),
                              backend=args.backend, fp8_payload=args.fp8_payload, mmap=getattr(args, "mmap", False),
                              threads=args.threads or 1, progress=not args.no_progress, **opts)
        return {**setup, **res}
    t0 = time.perf_counter()
    model = V4Model.from_pretrained(path, device=args.device, experts_fp8=experts_fp8(args.experts, args.device),
                                    mmap=getattr(args, "mmap", False))
    load_s = time.perf_counter() - t0
    kernel_private_pages(model, args.backend)          # the single-request baseline runs `forward`
    with backend_scope(args.backend, gaps):
        res = run_requests(model, **opts, progress=not args.no_progress)
    return {**setup, "load_s": load_s, "experts": model.layers[0].ffn.experts.kind, **res}


def _rank_requests(rank: int, world: int, path: str, load: dict[str, Any], workload: dict[str, Any]) -> dict:
    """One rank of `run_requests_ep`: load the checkpoint, shard the experts, `serve_rank` in lockstep."""
    t0 = time.perf_counter()
    model = V4Model.from_pretrained(path, device="cpu", experts_fp8=load["experts_fp8"], mmap=load["mmap"])
    shard_model_experts(model, fp8_payload=load["fp8_payload"], timeout=load["timeout"])
    kernel_private_pages(model, load["backend"])
    load_s = time.perf_counter() - t0
    with backend_scope(load["backend"], load["backend_gaps"]):
        rec = serve_rank(model, **workload, expert_parallel=True, timeout=load["timeout"],
                         progress=load["progress"] and rank == 0)
    return {**rec, "load_s": load_s}


def run_requests_ep(path: str, ep: int, *, experts_fp8: bool = True, backend: str | None = None,
                    fp8_payload: bool = False, mmap: bool = False, threads: int = 1, timeout_s: float = 120.0,
                    start_method: str = "spawn", progress: bool = True, **workload: Any) -> dict[str, Any]:
    """`run_requests`'s workload on ``ep`` local gloo ranks (CPU) of the checkpoint at ``path``: each rank
    loads it, keeps ``E / ep`` routed experts (`v4hal.parallel.shard_model_experts`; ``fp8_payload``: FP8
    dispatch), serves the requests ``i % ep == rank`` from its own pool (`serve_rank`), and the ranks step
    together until all are done. ``workload``: `run_requests`'s keywords (requests, prompt_len,
    max_new_tokens, chunk, arrival, block_size, layout, shared_prefix, seed, pool_memory (shared evenly by the
    ranks' pools), reuse_prefixes, baseline).
    ``threads``: torch threads per rank; ``timeout_s``: bound on every exchange (a dead rank ends the run with
    `v4hal.parallel.EPRankError`). The progress bar is rank 0's.

    Returns `merge_ranks` of the ranks' records plus ``load_s`` (the slowest rank's) and ``experts``.
    """
    if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1:
        raise RangeError(f"run_requests_ep: ep must be an int >= 1, got {ep!r}")
    load = {"experts_fp8": experts_fp8, "backend": backend, "backend_gaps": backend_gaps(backend, note=False),
            "fp8_payload": fp8_payload, "mmap": mmap,
            "timeout": timeout_s, "progress": progress}
    recs = spawn(_rank_requests, ep, str(path), load, workload, timeout_s=timeout_s, start_method=start_method,
                 threads=threads)
    res = merge_ranks(recs)
    return {**res, "load_s": max(r["load_s"] for r in recs), "experts": recs[0]["experts"]}
