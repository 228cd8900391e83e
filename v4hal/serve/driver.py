"""A continuous-batching driver: requests of mixed prompt lengths arrive over time and run through the
`Engine` on a `CachePool`; the figures of the run (throughput, pages, cache bytes, prefix reuse).

`run_requests` is the Python side of ``v4hal run --requests N`` (`serve_rank` the loop of one process,
`merge_ranks` the figures of a run over its ranks). The workload comes from `v4hal.serve.workload`, the pool's
size from `v4hal.serve.sizing`, the screen table from `v4hal.serve.report`.

Definitions of the figures:

- A step's wall time is split between its prefill and decode tokens in proportion to their counts;
  ``prefill_tok_s`` / ``decode_tok_s`` are each kind's tokens over its share of the time of all steps.
  ``decode_only_tok_s`` counts only the steps that hold decode tokens alone (None when there are none;
  ``decode_only_mean_batch``: their mean number of requests).
  A request's first new token comes from its last prefill chunk, so it decodes ``max_new_tokens - 1``
  tokens, as the single-request path does.
- ``single``: one request alone (``V4Model.forward`` on its private pool, batch 1, a prompt of the requests'
  mean length, shared prefix included, and the same ``max_new_tokens``), timed like ``v4hal run``
  (`v4hal.bench.decode.timed_decode`, the median of 3 runs): ``decode_tok_s`` = ``max_new_tokens - 1``
  one-token steps over their time.
  ``speedup`` = batched ``decode_tok_s`` / single ``decode_tok_s`` (``speedup_decode_only`` likewise).
- ``requests_s``: requests over the wall time from the first step to the last.
- Pool: ``pool_memory`` the byte budget it was sized from, ``pool_bytes`` the bytes of its pages,
  ``waited`` the requests that arrived while the pool could not take them and joined later.
- Engine: ``preemptions`` (requests the engine preempted to free pages), ``failed`` (request index -> why,
  for requests the engine failed, e.g. non-finite logits; they count in ``finished`` with their tokens so far).
- Pages: ``peak_pages`` per kind (each kind's own maximum over the steps) and ``final_pages`` after the
  last request left (what registered prefixes still hold); ``pages_after_evict`` once those are evicted
  too (all zero unless pages leaked).
- Bytes: ``kv_bytes_per_token_peak`` = bytes of the pages the live requests reference (shared pages once)
  / the positions they have computed, at the step where those bytes peak; ``pool_bytes_peak`` counts every
  page in use (registered prefixes too); ``kv_bytes_per_token_request`` = ``pool.kv_bytes_per_token`` of
  one request of the mean final length; ``cache_layers``: the layers whose caches the pool holds (each has a
  window cache; an MTP layer counts).
- ``v4_counterpart`` (a DeepSeek-V4.1 model only, else None): the same one-request figure for the V4 preset
  whose caches have the model's widths (`v4_counterpart`: v4-mini beside v41-mini, v4-flash beside v41-flash),
  in a pool of the same ``layout`` name and page size, computed from that pool's page sizes
  (``CachePool.kv_bytes_per_token``, nothing allocated or run): ``model``, ``attn_layout``, ``indexer_layout``,
  ``block_size``, ``request_tokens`` (the run's), ``cache_layers`` (the V4 preset's, its MTP layer included)
  and ``kv_bytes_per_token_request``.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from v4hal.bench.decode import timed_decode
from v4hal.bench.report import format_bytes
from v4hal.hal.errors import RangeError
from v4hal.model.caches import compressed_layout
from v4hal.model.config import ModelConfig

from .batch import kinds_of
from .engine import Engine
from .pool import CachePool
from .sizing import (
    blocks_for_budget,
    default_block_size,
    default_layout,
    default_pool_memory,
    layout_pair,
    request_pages,
)
from .workload import arrival_steps, check_workload, iter_prompts, request_lengths

__all__ = ["single_request_decode", "serve_rank", "merge_ranks", "run_requests", "v4_counterpart",
           "v4_kv_bytes"]


@torch.inference_mode()
def single_request_decode(model: torch.nn.Module, prompt_len: int, max_new_tokens: int, seed: int = 0,
                          repeats: int = 3) -> dict:
    """One request alone through ``V4Model.forward`` (``model(prompt, 0)`` then one-token steps, greedy), timed by
    `v4hal.bench.decode.timed_decode` as ``v4hal run`` times it, ``repeats`` times. Returns the run with the
    median decode time: ``prefill_s``, ``prefill_tok_s``, ``decode_s``, ``decode_tokens``, ``decode_tok_s``
    (None with a single new token), and ``decode_tok_s_runs`` (every run's)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g).to(model.device)
    runs = []
    for _ in range(repeats):
        out = timed_decode(model, prompt, max_new_tokens)
        runs.append({"prompt_len": prompt_len, "max_new_tokens": max_new_tokens, "decode_tokens": out.decode_steps,
                     **out.figures(prompt_len)})
    best = sorted(runs, key=lambda r: r["decode_s"])[len(runs) // 2]
    return {**best, "decode_tok_s_runs": [r["decode_tok_s"] for r in runs]}


#: the widths a V4 preset must share with a V4.1 config to stand beside it in the cache figures
_CACHE_WIDTHS = ("head_dim", "rope_head_dim", "window_size", "index_head_dim")


def v4_counterpart(cfg: ModelConfig) -> str | None:
    """The V4 preset whose cache bytes a DeepSeek-V4.1 config's are set beside: one with the same cache widths
    (``head_dim``, ``rope_head_dim``, ``window_size``, ``index_head_dim``), the nearest in layer count
    (``v41-mini`` -> ``v4-mini``, ``v41-flash`` -> ``v4-flash``). None for a V4 config, or when no V4 preset
    has those widths."""
    if not cfg.is_v41:
        return None
    presets = ((n, ModelConfig.preset(n)) for n in ModelConfig.PRESET_NAMES)
    same = [(abs(c.n_layers - cfg.n_layers), n) for n, c in presets
            if not c.is_v41 and all(getattr(c, w) == getattr(cfg, w) for w in _CACHE_WIDTHS)]
    return min(same, key=lambda t: t[0])[1] if same else None


def v4_kv_bytes(cfg: ModelConfig, layout: str, block_size: int, tokens: int) -> dict[str, Any] | None:
    """The cache bytes per token one request of ``tokens`` positions holds in a pool of ``cfg``'s
    `v4_counterpart` with the same `LAYOUT_PAIRS` name and page size, from that pool's page sizes (nothing is
    allocated or run); None when ``cfg`` has no counterpart. The keys are the module docstring's
    ``v4_counterpart``."""
    name = v4_counterpart(cfg)
    if name is None:
        return None
    v4 = ModelConfig.preset(name)
    attn, idx = layout_pair(layout, v4)
    pool = CachePool(v4, blocks={k: 1 for k in kinds_of(v4)}, block_size=block_size, attn_layout=attn,
                     indexer_layout=idx, allocate=False)
    return {"model": name, "attn_layout": attn, "indexer_layout": idx, "block_size": block_size,
            "request_tokens": tokens, "cache_layers": len(v4.compress_ratios),
            "kv_bytes_per_token_request": pool.kv_bytes_per_token(tokens)}


def _live_pages(pool: CachePool) -> tuple[int, int]:
    """Bytes of the distinct pages the active requests reference, and the positions they have computed."""
    pb = pool.page_bytes()
    total = 0
    for k in pool.kinds:
        ids = {b for st in pool.requests.values() for b in st.tables[k] if b >= 0}
        total += len(ids) * pb[k]
    return total, sum(st.computed for st in pool.requests.values())


def _experts_of(model: torch.nn.Module) -> Any:
    """The first MoE layer's experts module (None for a model without one)."""
    blocks = [*getattr(model, "layers", []), *getattr(model, "mtp", [])]
    return next((b.ffn.experts for b in blocks if hasattr(getattr(b, "ffn", None), "experts")), None)


def serve_rank(model: torch.nn.Module, *, requests: int = 16, prompt_len: int = 64, max_new_tokens: int = 32,
               chunk: int = 64, arrival: int | None = None, block_size: int | None = None, layout: str | None = None,
               shared_prefix: int = 0, seed: int = 0, pool_memory: int | None = None, reuse_prefixes: bool = True,
               baseline: bool = True, progress: bool = True, expert_parallel: bool = False, group: Any = None,
               timeout: float | None = None) -> dict[str, Any]:
    """Serve one process's share of the `run_requests` workload and record the run; `merge_ranks` turns the
    records of every rank into the figures.

    One process (``expert_parallel=False``): every request, steps of `Engine.step`; when nothing runs until the
    next arrival, the step counter skips ahead. Expert parallel (a model sharded by
    `v4hal.parallel.shard_model_experts` over ``group``, None: the default group): this rank serves the
    requests ``i % world == rank`` on its own pool and steps with `v4hal.parallel.step_engine_ep` (collective,
    ``timeout`` seconds per exchange) until every rank is done; a step where no rank runs a token stands for
    the one-process skip. Prompts and arrival steps are those of the whole workload, so each request gets the
    tokens it gets in one process (greedy); prompts are made as their requests arrive.

    The pool takes at most ``pool_memory`` bytes (None: `default_pool_memory` of the model's device; with
    expert parallelism each rank takes its ``1 / world`` share): as many of the longest request's peak page
    sets as the budget buys (`v4hal.serve.sizing.blocks_for_budget`), never more pages than all of this
    rank's requests at once. A request joins the engine when it has arrived and the pages it holds at its
    peak (`v4hal.serve.sizing.request_pages`) fit next to those of the requests in flight (in arrival order;
    it waits otherwise), so no step can run out of pages whatever ``requests`` is. Requests that leave are
    taken from the engine as they go (`Engine.pop_finished`). ``baseline`` (collective with expert parallelism):
    time one request alone (`single_request_decode`) with the workload's mean prompt length.

    Returns a JSON-ready dict: ``rank``, ``world``, ``mine`` (request indices), ``outputs`` (index -> tokens),
    ``failed`` (index -> why, requests the engine failed), ``preemptions`` (the engine's),
    ``trace`` (per step: ``seconds``, ``prefill``, ``decode``, ``requests``, ``pages`` per kind, live page
    ``live_bytes`` / ``live_tokens`` as in `run_requests`), ``setup`` (the workload), the pool's figures
    (``pool_pages``, ``page_bytes``, ``pool_memory`` (the budget), ``pool_bytes`` (its pages), ``final_pages``,
    ``pages_after_evict``, ``prefix``), ``waited`` (requests that waited for pages after they arrived),
    ``wall_s``, ``tokens_computed``, ``finite``, ``experts``, ``transport`` and ``single``.
    """
    cfg = model.config
    block_size = default_block_size(cfg) if block_size is None else block_size
    layout = default_layout(model.device, cfg) if layout is None else layout
    rank, world = 0, 1
    if expert_parallel:
        import torch.distributed as dist

        from v4hal.parallel.model import step_engine_ep

        rank, world = dist.get_rank(group), dist.get_world_size(group)
    budget = (default_pool_memory(model.device) if pool_memory is None else pool_memory) // world
    check_workload(cfg, requests=requests, prompt_len=prompt_len, max_new_tokens=max_new_tokens, chunk=chunk,
                   arrival=arrival, block_size=block_size, layout=layout, shared_prefix=shared_prefix,
                   pool_memory=budget, flag="")
    from tqdm import tqdm

    lengths = [shared_prefix + n for n in request_lengths(requests, prompt_len, seed)]
    prompts = iter_prompts([n - shared_prefix for n in lengths], cfg.vocab_size, seed, shared_prefix)
    arrive = arrival_steps(requests, arrival, seed)            # non-decreasing: requests arrive in index order
    mine = [i for i in range(requests) if i % world == rank]
    attn, idx = layout_pair(layout, cfg)

    def pages_of(i: int) -> dict[str, int]:
        """The most pages request ``i`` holds at once (`v4hal.serve.sizing.request_pages`)."""
        return request_pages(cfg, lengths[i] + max_new_tokens - 1, chunk=chunk, block_size=block_size)

    longest = max((lengths[i] for i in mine), default=1) + max_new_tokens - 1
    size = blocks_for_budget(cfg, budget, longest, chunk=chunk, block_size=block_size, attn_layout=attn,
                             indexer_layout=idx)
    every = {k: sum(pages_of(i)[k] for i in mine) for k in size.blocks}     # every request of mine at once
    blocks = {k: max(1, min(n, every[k])) for k, n in size.blocks.items()}
    pool = CachePool(cfg, blocks=blocks, block_size=block_size, device=model.device, attn_layout=attn,
                     indexer_layout=idx)
    capacity = {k: a.capacity for k, a in pool.allocators.items()}
    page_bytes = pool.page_bytes()
    pool_bytes = sum(page_bytes[k] * n for k, n in capacity.items())
    if progress and rank == 0:
        print(f"cache pool: {format_bytes(pool_bytes)} of pages on {model.device} (budget {format_bytes(budget)}"
              f"{' per rank' if world > 1 else ''}); requests wait for pages beyond that", file=sys.stderr)
    finite = [True]

    def choose(_rid: Hashable, logits: torch.Tensor) -> int:
        if not bool(torch.isfinite(logits).all()):
            finite[0] = False
        return int(logits.argmax())

    engine = Engine(model, pool, chunk=chunk, choose=choose, reuse_prefixes=reuse_prefixes,
                    isolate_failures=not expert_parallel)      # EP forwards are collective: one per step
    trace: list[dict[str, Any]] = []
    held = dict.fromkeys(capacity, 0)           # pages the requests in flight may hold at their full length
    flight: dict[int, dict[str, int]] = {}
    outputs: dict[int, list[int]] = {}          # tokens of the requests that left, by request index
    failed: dict[int, str] = {}                 # why, for the requests the engine failed
    nxt, made, step_no, waited = 0, 0, 0, 0     # next of mine to add; prompts made (every rank's, in order)
    blocked = -1                                # the request last found waiting for pages
    desc = "requests" if world == 1 else f"rank 0 requests (of {requests})"
    with tqdm(total=len(mine), desc=desc, unit="req", disable=not progress or rank != 0, file=sys.stderr) as bar:
        if expert_parallel:
            dist.barrier(group=group)
        t0 = time.perf_counter()
        while True:
            if not expert_parallel:
                if nxt >= len(mine) and engine.idle:
                    break
                if engine.idle and arrive[mine[nxt]] > step_no:
                    step_no = arrive[mine[nxt]]           # nothing runs until the next arrival: skip ahead
            while nxt < len(mine) and arrive[mine[nxt]] <= step_no:
                i = mine[nxt]
                need = pages_of(i)
                if any(held[k] + n > capacity[k] for k, n in need.items()):
                    if blocked != i:
                        blocked, waited = i, waited + 1
                    break                                 # waits until requests in flight leave
                while made <= i:
                    prompt = next(prompts)
                    made += 1
                engine.add(i, prompt, max_new_tokens)
                flight[i] = need
                for k, n in need.items():
                    held[k] += n
                nxt += 1
            if not flight and nxt < len(mine) and arrive[mine[nxt]] <= step_no:    # blocks_for_budget rules this out
                raise RangeError(f"serve_rank: request {mine[nxt]} does not fit an empty pool of {capacity} pages")
            if expert_parallel:
                ts = time.perf_counter()
                ran, stats = step_engine_ep(engine, pending=nxt < len(mine), group=group, timeout=timeout)
                if not ran:
                    break
                seconds = time.perf_counter() - ts                  # the exchanges of an idle step too
            else:
                stats = engine.step()
                seconds = stats.seconds if stats is not None else 0.0
            step_no += 1
            for i, r in engine.pop_finished().items():       # the engine forgets them: a long run keeps no prompt
                outputs[i] = list(r.output)
                if r.status == "failed":
                    failed[i] = r.error or "failed"
                for k, n in flight.pop(i).items():
                    held[k] -= n
            if stats is None and not expert_parallel:
                continue
            live = _live_pages(pool)
            trace.append({"seconds": seconds, "prefill": stats.prefill_tokens if stats else 0,
                          "decode": stats.decode_tokens if stats else 0, "requests": stats.requests if stats else 0,
                          "pages": stats.pages_in_use if stats else pool.pages_in_use(),
                          "live_bytes": live[0], "live_tokens": live[1]})
            bar.update(len(outputs) - bar.n)
        wall_s = time.perf_counter() - t0
    final_pages = pool.pages_in_use()
    prefix = pool.stats()
    for entry in list(pool.prefix.lru_order()):
        pool.evict_prefix(entry)
    final_len = round(sum(lengths) / requests) + max_new_tokens - 1
    experts = _experts_of(model)
    single_len = round(sum(lengths) / requests)       # like for like: the workload's mean prompt, shared prefix in
    single = single_request_decode(model, single_len, max_new_tokens, seed) if baseline else None
    return {
        "rank": rank, "world": world, "mine": mine,
        "outputs": outputs, "failed": failed, "preemptions": engine.preemptions,
        "trace": trace, "wall_s": wall_s, "tokens_computed": engine.tokens_computed, "finite": finite[0],
        "setup": {"requests": requests, "prompt_len": prompt_len, "prompt_lengths": lengths,
                  "shared_prefix": shared_prefix, "max_new_tokens": max_new_tokens, "chunk": chunk,
                  "arrival": arrival, "arrival_steps": arrive, "block_size": block_size, "layout": layout,
                  "attn_layout": attn, "indexer_layout": idx, "compressed_layout": compressed_layout(cfg, attn),
                  "device": str(model.device),
                  "threads": torch.get_num_threads()},
        "pool_pages": capacity, "page_bytes": page_bytes, "pool_memory": budget,
        "pool_bytes": pool_bytes, "waited": waited,
        "final_pages": final_pages, "pages_after_evict": pool.pages_in_use(), "prefix": prefix,
        "request_tokens": final_len, "kv_bytes_per_token_request": pool.kv_bytes_per_token(final_len),
        "cache_layers": len(cfg.compress_ratios), "v4_counterpart": v4_kv_bytes(cfg, layout, block_size, final_len),
        "experts": getattr(experts, "kind", None), "transport": getattr(experts, "transport", None),
        "single": single,
    }


def merge_ranks(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The figures of a run (the module docstring defines them) from the `serve_rank` records of its ranks
    (one record: the one-process run).

    Ranks step together, so their traces align step by step: a step's tokens, requests and pages are the sums
    over the ranks, its time the slowest rank's; steps in which no rank ran a token are left out (the
    one-process run skips them). Pool figures (capacity, final pages, prefix reuse) are summed over the
    ranks' pools; ``wall_s`` and ``single`` are the slowest rank's. With several ranks also: ``ep`` (ranks),
    ``rank_requests`` (requests per rank), ``rank_idle_steps`` (steps each rank joined without a token of its
    own), ``transport``.
    """
    recs = sorted(records, key=lambda r: r["rank"])
    if [r["rank"] for r in recs] != list(range(len(recs))) or any(r["world"] != len(recs) for r in recs):
        raise RangeError(f"merge_ranks: expected the records of ranks 0..{len(recs) - 1}, got ranks "
                         f"{[r['rank'] for r in recs]} of worlds {sorted({r['world'] for r in recs})}")
    if len({len(r["trace"]) for r in recs}) > 1:
        raise RangeError(f"merge_ranks: the ranks took different numbers of steps {[len(r['trace']) for r in recs]}")
    setup = recs[0]["setup"]
    requests, max_new_tokens = setup["requests"], setup["max_new_tokens"]
    kinds = list(recs[0]["page_bytes"])
    page_bytes = recs[0]["page_bytes"]
    steps = []
    for rows in zip(*(r["trace"] for r in recs)):
        steps.append({"seconds": max(s["seconds"] for s in rows), "prefill": sum(s["prefill"] for s in rows),
                      "decode": sum(s["decode"] for s in rows), "requests": sum(s["requests"] for s in rows),
                      "pages": {k: sum(s["pages"][k] for s in rows) for k in kinds},
                      "live_bytes": sum(s["live_bytes"] for s in rows),
                      "live_tokens": sum(s["live_tokens"] for s in rows)})
    idle = [sum(1 for s, all_ in zip(r["trace"], steps) if s["prefill"] + s["decode"] == 0
                and all_["prefill"] + all_["decode"] > 0) for r in recs]
    steps = [s for s in steps if s["prefill"] + s["decode"] > 0]
    peak_pages = {k: max((s["pages"][k] for s in steps), default=0) for k in kinds}
    pool_bytes_peak = max((sum(page_bytes[k] * n for k, n in s["pages"].items()) for s in steps), default=0)
    live = max(steps, key=lambda s: s["live_bytes"], default={"live_bytes": 0, "live_tokens": 0})
    prefill_tokens = sum(s["prefill"] for s in steps)
    decode_tokens = sum(s["decode"] for s in steps)
    prefill_s = sum(s["seconds"] * s["prefill"] / (s["prefill"] + s["decode"]) for s in steps)
    decode_s = sum(s["seconds"] * s["decode"] / (s["prefill"] + s["decode"]) for s in steps)
    only = [s for s in steps if s["prefill"] == 0]
    only_s, only_tokens = sum(s["seconds"] for s in only), sum(s["decode"] for s in only)
    outputs = {i: out for r in recs for i, out in r["outputs"].items()}
    wall_s = max(r["wall_s"] for r in recs)

    def rate(n: int, s: float) -> float | None:
        return n / s if n and s > 0 else None

    def total(key: str) -> dict[str, int]:
        return {k: sum(r[key][k] for r in recs) for k in kinds}

    res: dict[str, Any] = {
        "requests": requests, "finished": len(outputs),
        "all_finished": len(outputs) == requests and all(len(o) == max_new_tokens for o in outputs.values()),
        "logits_finite": all(r["finite"] for r in recs), **{k: v for k, v in setup.items() if k != "requests"},
        "steps": len(steps), "decode_only_steps": len(only),
        "max_requests_in_step": max((s["requests"] for s in steps), default=0),
        "wall_s": wall_s, "step_s": prefill_s + decode_s,
        "prefill_tokens": prefill_tokens, "decode_tokens": decode_tokens,
        "tokens_computed": sum(r["tokens_computed"] for r in recs),
        "prefill_s": prefill_s, "decode_s": decode_s,
        "prefill_tok_s": rate(prefill_tokens, prefill_s), "decode_tok_s": rate(decode_tokens, decode_s),
        "decode_only_tok_s": rate(only_tokens, only_s), "decode_only_mean_batch": only_tokens / len(only) if only
        else None, "requests_s": requests / wall_s if wall_s > 0 else None,
        "pool_pages": total("pool_pages"), "page_bytes": page_bytes,
        "pool_memory": sum(r["pool_memory"] for r in recs), "pool_bytes": sum(r["pool_bytes"] for r in recs),
        "waited": sum(r["waited"] for r in recs),
        "preemptions": sum(r["preemptions"] for r in recs),
        "failed": dict(sorted((i, why) for r in recs for i, why in r["failed"].items())),
        "peak_pages": peak_pages, "final_pages": total("final_pages"), "pages_after_evict": total("pages_after_evict"),
        "pool_bytes_peak": pool_bytes_peak, "live_bytes_peak": live["live_bytes"],
        "live_tokens_at_peak": live["live_tokens"],
        "kv_bytes_per_token_peak": live["live_bytes"] / live["live_tokens"] if live["live_tokens"] else None,
        "request_tokens": recs[0]["request_tokens"],
        "kv_bytes_per_token_request": recs[0]["kv_bytes_per_token_request"],
        "cache_layers": recs[0]["cache_layers"], "v4_counterpart": recs[0]["v4_counterpart"],
        "prefix_lookups": sum(r["prefix"]["prefix_lookups"] for r in recs),
        "prefix_hits": sum(r["prefix"]["prefix_hits"] for r in recs),
        "prefix_tokens_saved": sum(r["prefix"]["prefix_tokens_saved"] for r in recs),
        "prefixes_registered_at_end": sum(r["prefix"]["prefixes"] for r in recs),
        "tokens": [outputs.get(i) for i in range(requests)],
    }
    if len(recs) > 1:
        res.update(ep=len(recs), rank_requests=[len(r["mine"]) for r in recs], rank_idle_steps=idle,
                   transport=recs[0]["transport"])
    singles = [r["single"] for r in recs if r["single"] is not None]
    res["single"] = single = max(singles, key=lambda s: s["decode_s"]) if singles else None
    for key, src in (("speedup", "decode_tok_s"), ("speedup_decode_only", "decode_only_tok_s")):
        ok = single is not None and single["decode_tok_s"] and res[src]
        res[key] = res[src] / single["decode_tok_s"] if ok else None
    return res


def run_requests(model: torch.nn.Module, *, requests: int = 16, prompt_len: int = 64, max_new_tokens: int = 32,
                 chunk: int = 64, arrival: int | None = None, block_size: int | None = None,
                 layout: str | None = None, shared_prefix: int = 0, seed: int = 0, pool_memory: int | None = None,
                 reuse_prefixes: bool = True, baseline: bool = True, progress: bool = True) -> dict[str, Any]:
    """Run ``requests`` greedy requests through an `Engine` on ``model`` (a `V4Model`) and measure the run.

    Prompts: `request_lengths` around ``prompt_len`` (after ``shared_prefix`` common tokens), random ids from
    ``seed``; each generates ``max_new_tokens``. Arrivals: `arrival_steps`. ``chunk``: the engine's token
    budget per step; ``block_size``: pool page size (None: `default_block_size`); ``layout``: a
    `LAYOUT_PAIRS` name (None: `default_layout` of the model's device and config). The pool takes at most
    ``pool_memory`` bytes on the model's device (None: `default_pool_memory`), and requests wait for pages
    when it cannot hold them all (`serve_rank`). ``baseline``: also time one request alone
    (`single_request_decode`, the workload's mean prompt length). ``progress``: a tqdm bar of finished
    requests on stderr. Returns the figures defined in the module docstring (a JSON-ready dict; ``tokens``:
    each request's generated tokens, in request order). `run_requests_ep` runs the same workload on
    expert-parallel ranks.
    """
    return merge_ranks([serve_rank(model, requests=requests, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                                   chunk=chunk, arrival=arrival, block_size=block_size, layout=layout,
                                   shared_prefix=shared_prefix, seed=seed, pool_memory=pool_memory,
                                   reuse_prefixes=reuse_prefixes, baseline=baseline, progress=progress)])
