"""A continuous-batching driver: requests of mixed prompt lengths arrive over time and run through the
`Engine` on a `CachePool`; the figures of the run (throughput, pages, cache bytes, prefix reuse).

`run_requests` is the Python side of ``v4hal run --requests N``; `memory_rows` / `format_memory_table` are
the cache-bytes comparison that ``v4hal cost --pool`` prints.

Definitions of the figures:

- A step's wall time is split between its prefill and decode tokens in proportion to their counts;
  ``prefill_tok_s`` / ``decode_tok_s`` are each kind's tokens over its share of the time of all steps.
  ``decode_only_tok_s`` counts only the steps that hold decode tokens alone (None when there are none;
  ``decode_only_mean_batch``: their mean number of requests).
  A request's first new token comes from its last prefill chunk, so it decodes ``max_new_tokens - 1``
  tokens, as the single-request path does.
- ``single``: the contiguous path (``V4Model.forward``, batch 1, a prompt of the requests' mean length,
  shared prefix included, and the same ``max_new_tokens``), timed like ``v4hal run`` (the median of 3
  runs): ``decode_tok_s`` = ``max_new_tokens - 1`` one-token steps over their time.
  ``speedup`` = batched ``decode_tok_s`` / single ``decode_tok_s`` (``speedup_decode_only`` likewise).
- ``requests_s``: requests over the wall time from the first step to the last.
- Pool: ``pool_memory`` the byte budget it was sized from, ``pool_bytes`` the bytes of its pages,
  ``waited`` the requests that arrived while the pool could not take them and joined later.
- Pages: ``peak_pages`` per kind (each kind's own maximum over the steps) and ``final_pages`` after the
  last request left (what registered prefixes still hold); ``pages_after_evict`` once those are evicted
  too (all zero unless pages leaked).
- Bytes: ``kv_bytes_per_token_peak`` = bytes of the pages the live requests reference (shared pages once)
  / the positions they have computed, at the step where those bytes peak; ``pool_bytes_peak`` counts every
  page in use (registered prefixes too); ``kv_bytes_per_token_request`` = ``pool.kv_bytes_per_token`` of
  one request of the mean final length.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import torch

from v4hal.bench.report import text_table
from v4hal.bench.timing import synchronize
from v4hal.hal.errors import RangeError
from v4hal.model.config import ModelConfig
from v4hal.ops.paged import PAGED_LAYOUTS

from .batch import STATE_BLOCK_SIZE, block_sizes_of, kinds_of, pages_needed
from .engine import Engine
from .pool import CachePool, cache_layouts

__all__ = ["LAYOUT_PAIRS", "FLASHMLA_ENTRY_BYTES", "MAX_WORKLOAD_TOKENS", "POOL_MEMORY_SHARE", "default_block_size",
           "default_layout", "request_lengths", "iter_prompts", "make_prompts", "arrival_steps", "available_memory",
           "default_pool_memory", "page_bytes_of", "request_pages", "check_workload", "pool_blocks",
           "single_request_decode", "run_requests", "serve_rank", "merge_ranks", "run_requests_ep", "format_report",
           "contiguous_bytes", "memory_rows", "format_memory_table"]

#: cache layout pairs (attention caches, indexer key caches) by the name ``--layout`` takes. ``bf16`` stores
#: the indexer keys as bf16 too: they are FP4-rounded values, which bf16 holds exactly (``indexer_fp8`` would
#: round them again with one scale per token), so both pairs give the same logits.
LAYOUT_PAIRS: dict[str, tuple[str, str]] = {"quantized": ("model1_fp8", "indexer_fp4"), "bf16": ("bf16", "bf16")}

#: bytes of one FlashMLA sparse-decode cache entry at V4's width (448 e4m3 + 64 bf16 + 7 ue8m0 + 1 pad)
FLASHMLA_ENTRY_BYTES = 584


def default_block_size(cfg: ModelConfig) -> int:
    """Entries per page: 64 (FlashMLA's page size) when the window spans at least that many tokens, else 16
    (v4-mini's 16-token window fits one page, and prefixes are reused at 16-token steps)."""
    return 64 if cfg.window_size >= 64 else 16


def default_layout(device: str | torch.device | None) -> str:
    """The `LAYOUT_PAIRS` name of the pair a pool on ``device`` uses by default (`cache_layouts`)."""
    pair = cache_layouts(device)
    return next(name for name, p in LAYOUT_PAIRS.items() if p == pair)


def request_lengths(n: int, prompt_len: int, seed: int) -> list[int]:
    """``n`` prompt lengths drawn uniformly from ``[max(1, prompt_len // 4), 2 * prompt_len]`` (seeded)."""
    g = torch.Generator().manual_seed(seed)
    lo = max(1, prompt_len // 4)
    return torch.randint(lo, 2 * prompt_len + 1, (n,), generator=g).tolist()


def iter_prompts(lengths: Sequence[int], vocab: int, seed: int, shared_prefix: int = 0) -> Iterator[list[int]]:
    """One prompt per length, made when asked for (request by request, as they arrive): ``shared_prefix``
    tokens common to all, then that many random token ids (one seeded stream, in request order)."""
    g = torch.Generator().manual_seed(seed + 1)
    prefix = torch.randint(0, vocab, (shared_prefix,), generator=g).tolist()
    for n in lengths:
        yield prefix + torch.randint(0, vocab, (n,), generator=g).tolist()


def make_prompts(lengths: Sequence[int], vocab: int, seed: int, shared_prefix: int = 0) -> list[list[int]]:
    """Every prompt of `iter_prompts` at once."""
    return list(iter_prompts(lengths, vocab, seed, shared_prefix))


def arrival_steps(n: int, arrival: int | None, seed: int) -> list[int]:
    """The step at which each request joins: ``arrival = k`` one request every ``k`` steps (0: all at once);
    None: a seeded schedule, request 0 at step 0 and gaps drawn uniformly from ``{0, 1, 2, 3}`` steps."""
    if arrival is not None:
        return [i * arrival for i in range(n)]
    g = torch.Generator().manual_seed(seed + 2)
    gaps = torch.randint(0, 4, (n,), generator=g).tolist()
    steps, at = [], 0
    for i, gap in enumerate(gaps):
        at += gap if i else 0
        steps.append(at)
    return steps


#: the most tokens (every prompt plus every output, summed over the requests) a run synthesises and records:
#: prompts are made as requests arrive, but their tokens and outputs stay in the results (about 36 bytes each)
MAX_WORKLOAD_TOKENS = 1 << 23
#: the share of the available memory a pool takes by default: on the CPU (RAM, which the model and the
#: run's records share) and on an accelerator (its free memory once the model is loaded)
POOL_MEMORY_SHARE = {"cpu": 0.125, "accelerator": 0.5}


def _int_at_least(name: str, value: object, least: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise RangeError(f"{name} must be an int >= {least}, got {value!r}")
    return value


def _cpu_available() -> int:
    """Bytes of RAM this process could still take: MemAvailable of /proc/meminfo (else the physical RAM),
    bounded by a cgroup v2 memory limit when one is set."""
    avail = None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    if avail is None:
        try:
            avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            avail = 8 << 30
    with contextlib.suppress(OSError, ValueError):
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
                avail = min(avail, max(0, int(limit) - int(f.read().strip())))
    return avail


def available_memory(device: str | torch.device | None) -> int:
    """Bytes free for a cache pool on ``device``: RAM this process could still take on the CPU (`_cpu_available`),
    the free memory of the device on an accelerator (``torch.<type>.mem_get_info``)."""
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cpu":
        return _cpu_available()
    mod = getattr(torch, dev.type, None)
    info = getattr(mod, "mem_get_info", None)
    if info is None:
        raise RangeError(f"cannot tell how much memory {dev} has free (torch.{dev.type}.mem_get_info is missing); "
                         f"give the pool's size (pool_memory, --pool-memory)")
    return int(info(dev)[0])


def default_pool_memory(device: str | torch.device | None) -> int:
    """The pool's memory budget by default: `POOL_MEMORY_SHARE` of `available_memory` on ``device``."""
    dev = torch.device("cpu" if device is None else device)
    share = POOL_MEMORY_SHARE["cpu" if dev.type == "cpu" else "accelerator"]
    return int(share * available_memory(dev))


def page_bytes_of(cfg: ModelConfig, block_size: int, layout: str) -> dict[str, int]:
    """Bytes of one page of each kind of a pool of ``cfg`` (pages of ``block_size`` entries, `LAYOUT_PAIRS`
    ``layout``), from the pool's accounting (no tensors)."""
    attn, idx = LAYOUT_PAIRS[layout]
    return CachePool(cfg, blocks=dict.fromkeys(kinds_of(cfg), 1), block_size=block_size, attn_layout=attn,
                     indexer_layout=idx, allocate=False).page_bytes()


def request_pages(cfg: ModelConfig, positions: int, block_size: int,
                  state_block_size: int = STATE_BLOCK_SIZE) -> dict[str, int]:
    """Pages per kind one request of ``positions`` positions holds at most (none released)."""
    sizes = block_sizes_of(kinds_of(cfg), block_size, state_block_size)
    return {k: pages_needed(k, positions, bs) for k, bs in sizes.items()}


def check_workload(cfg: ModelConfig, *, requests: int, prompt_len: int, max_new_tokens: int, chunk: int,
                   arrival: int | None, block_size: int, layout: str, shared_prefix: int = 0,
                   pool_memory: int | None = None, flag: str = "--") -> None:
    """Refuse a workload `run_requests` cannot run on ``cfg`` (`RangeError` / `ShapeError` naming the option,
    ``flag`` its prefix: ``"--"`` for the command line), before anything is allocated or loaded: bad values,
    prompts past ``max_seq_len``, more than `MAX_WORKLOAD_TOKENS` tokens in all, layouts that do not hold the
    config's widths, and (``pool_memory`` bytes given) a longest request whose pages alone exceed it."""
    def name(opt: str) -> str:
        return f"{flag}{opt.replace('_', '-')}" if flag == "--" else opt

    for opt, v, least in (("requests", requests, 1), ("prompt_len", prompt_len, 1),
                          ("max_new_tokens", max_new_tokens, 1), ("chunk", chunk, 1), ("block_size", block_size, 1),
                          ("shared_prefix", shared_prefix, 0)):
        _int_at_least(name(opt), v, least)
    if arrival is not None:
        _int_at_least(name("arrival"), arrival, 0)
    if pool_memory is not None:
        _int_at_least(name("pool_memory"), pool_memory, 1)
    if layout not in LAYOUT_PAIRS:
        raise RangeError(f"{name('layout')} must be one of {list(LAYOUT_PAIRS)}, got {layout!r}")
    longest = shared_prefix + 2 * prompt_len
    if longest + max_new_tokens - 1 > cfg.max_seq_len:
        raise RangeError(f"the longest prompt ({name('shared_prefix')} {shared_prefix} + 2 x {name('prompt_len')} "
                         f"{prompt_len} = {longest}) + {name('max_new_tokens')} {max_new_tokens} - 1 exceeds the "
                         f"max_seq_len {cfg.max_seq_len} of the model")
    per_request = shared_prefix + 2 * prompt_len + max_new_tokens
    if requests * per_request > MAX_WORKLOAD_TOKENS:
        raise RangeError(f"{name('requests')} {requests} x up to {per_request} tokens each (prompt and output) = "
                         f"{requests * per_request} tokens: a run makes and records at most {MAX_WORKLOAD_TOKENS}; "
                         f"give at most {name('requests')} {max(1, MAX_WORKLOAD_TOKENS // per_request)}")
    attn, idx = LAYOUT_PAIRS[layout]
    for lay, dim, what in ((attn, cfg.head_dim, "attention caches (head_dim)"),
                           (idx, cfg.index_head_dim, "indexer caches (index_head_dim)")):
        why = PAGED_LAYOUTS[lay].dim_problem(dim)
        if why is not None:
            raise RangeError(f"{name('layout')} {layout}: {what}: {why}")
    if pool_memory is not None:
        pb = page_bytes_of(cfg, block_size, layout)
        one = request_pages(cfg, longest + max_new_tokens - 1, block_size)
        need = sum(pb[k] * n for k, n in one.items())
        if need > pool_memory:
            raise RangeError(f"the longest request ({longest + max_new_tokens - 1} positions) needs "
                             f"{_size(need)} of cache pages, more than the pool's {name('pool_memory')} "
                             f"{_size(pool_memory)}; give a larger {name('pool_memory')} or shorter requests")


def _size(n: float) -> str:
    from v4hal.cliargs import format_bytes

    return format_bytes(n)


def pool_blocks(cfg: ModelConfig, lengths: Sequence[int], max_new_tokens: int, block_size: int,
                state_block_size: int = STATE_BLOCK_SIZE, *, budget: int | None = None,
                page_bytes: dict[str, int] | None = None) -> dict[str, int]:
    """Pages per kind (of ``block_size`` entries, ``state_block_size`` for the state kinds) that hold every
    request at once at its full length (no page released): enough for any schedule of these requests,
    prefix reuse included (a reused page is one fewer to allocate).

    ``budget`` (bytes, with ``page_bytes`` per kind): at most as many pages as fit in it, in whole sets of the
    pages the longest request needs, so that pages of every kind run out together (`RangeError` when not
    even one set fits); requests then wait for pages (`serve_rank` admits one only when its pages are sure)."""
    sizes = block_sizes_of(kinds_of(cfg), block_size, state_block_size)
    full = {k: max(1, sum(pages_needed(k, n + max_new_tokens - 1, bs) for n in lengths)) for k, bs in sizes.items()}
    if budget is None:
        return full
    if page_bytes is None:
        raise RangeError("pool_blocks: a budget needs page_bytes (bytes of one page per kind)")
    one = request_pages(cfg, max(lengths) + max_new_tokens - 1, block_size, state_block_size)
    one_bytes = sum(page_bytes[k] * n for k, n in one.items())
    sets = budget // one_bytes if one_bytes else 0
    if sets < 1:
        raise RangeError(f"pool_blocks: the longest request ({max(lengths) + max_new_tokens - 1} positions) needs "
                         f"{_size(one_bytes)} of cache pages, more than the budget of {_size(budget)}")
    return {k: max(1, min(full[k], sets * one[k])) for k in sizes}


@torch.inference_mode()
def single_request_decode(model: torch.nn.Module, prompt_len: int, max_new_tokens: int, seed: int = 0,
                          repeats: int = 3) -> dict:
    """One request through the contiguous path (``model(prompt, 0)`` then one-token steps, greedy), timed as
    ``v4hal run`` times it, ``repeats`` times. Returns the run with the median decode time: ``prefill_s``,
    ``prefill_tok_s``, ``decode_s``, ``decode_tokens``, ``decode_tok_s`` (None with a single new token), and
    ``decode_tok_s_runs`` (every run's)."""
    g = torch.Generator().manual_seed(seed)
    dev = model.device
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g).to(dev)
    steps = max_new_tokens - 1
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tok = model(prompt, 0).argmax(dim=-1, keepdim=True)
        synchronize(dev.type)
        prefill_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        for i in range(1, max_new_tokens):
            tok = model(tok, prompt_len + i - 1).argmax(dim=-1, keepdim=True)
        synchronize(dev.type)
        decode_s = time.perf_counter() - t1
        runs.append({"prompt_len": prompt_len, "max_new_tokens": max_new_tokens, "prefill_s": prefill_s,
                     "prefill_tok_s": prompt_len / prefill_s, "decode_s": decode_s, "decode_tokens": steps,
                     "decode_tok_s": steps / decode_s if steps and decode_s > 0 else None})
    best = sorted(runs, key=lambda r: r["decode_s"])[len(runs) // 2]
    return {**best, "decode_tok_s_runs": [r["decode_tok_s"] for r in runs]}


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
    expert parallelism each rank takes its ``1 / world`` share), in whole sets of the pages the longest
    request needs (`pool_blocks`). A request joins the engine when it has arrived and the pages it can hold
    at its full length fit next to those of the requests in flight (in arrival order; it waits otherwise), so
    no step can run out of pages whatever ``requests`` is. ``baseline`` (collective with expert parallelism):
    time one request on the contiguous path (`single_request_decode`) with the workload's mean prompt length.

    Returns a JSON-ready dict: ``rank``, ``world``, ``mine`` (request indices), ``outputs`` (index -> tokens),
    ``trace`` (per step: ``seconds``, ``prefill``, ``decode``, ``requests``, ``pages`` per kind, live page
    ``live_bytes`` / ``live_tokens`` as in `run_requests`), ``setup`` (the workload), the pool's figures
    (``pool_pages``, ``page_bytes``, ``pool_memory`` (the budget), ``pool_bytes`` (its pages), ``final_pages``,
    ``pages_after_evict``, ``prefix``), ``waited`` (requests that waited for pages after they arrived),
    ``wall_s``, ``tokens_computed``, ``finite``, ``experts``, ``transport`` and ``single``.
    """
    cfg = model.config
    block_size = default_block_size(cfg) if block_size is None else block_size
    layout = default_layout(model.device) if layout is None else layout
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
    attn, idx = LAYOUT_PAIRS[layout]
    page_bytes = page_bytes_of(cfg, block_size, layout)
    blocks = pool_blocks(cfg, [lengths[i] for i in mine] or [1], max_new_tokens, block_size, budget=budget,
                         page_bytes=page_bytes)
    pool = CachePool(cfg, blocks=blocks, block_size=block_size, device=model.device, attn_layout=attn,
                     indexer_layout=idx)
    capacity = {k: a.capacity for k, a in pool.allocators.items()}
    pool_bytes = sum(page_bytes[k] * n for k, n in capacity.items())
    if progress and rank == 0:
        print(f"cache pool: {_size(pool_bytes)} of pages on {model.device} (budget {_size(budget)}"
              f"{' per rank' if world > 1 else ''}); requests wait for pages beyond that", file=sys.stderr)
    finite = [True]

    def choose(_rid: Hashable, logits: torch.Tensor) -> int:
        if not bool(torch.isfinite(logits).all()):
            finite[0] = False
        return int(logits.argmax())

    def pages_of(i: int) -> dict[str, int]:
        return request_pages(cfg, lengths[i] + max_new_tokens - 1, block_size)

    engine = Engine(model, pool, chunk=chunk, choose=choose, reuse_prefixes=reuse_prefixes,
                    isolate_failures=not expert_parallel)      # EP forwards are collective: one per step
    trace: list[dict[str, Any]] = []
    held = dict.fromkeys(capacity, 0)           # pages the requests in flight may hold at their full length
    flight: dict[int, dict[str, int]] = {}
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
            if not flight and nxt < len(mine) and arrive[mine[nxt]] <= step_no:    # pool_blocks rules this out
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
            for i in [i for i in flight if i in engine.finished]:
                for k, n in flight.pop(i).items():
                    held[k] -= n
            if stats is None and not expert_parallel:
                continue
            live = _live_pages(pool)
            trace.append({"seconds": seconds, "prefill": stats.prefill_tokens if stats else 0,
                          "decode": stats.decode_tokens if stats else 0, "requests": stats.requests if stats else 0,
                          "pages": stats.pages_in_use if stats else pool.pages_in_use(),
                          "live_bytes": live[0], "live_tokens": live[1]})
            bar.update(len(engine.finished) - bar.n)
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
        "outputs": {i: list(r.output) for i, r in engine.finished.items()},
        "trace": trace, "wall_s": wall_s, "tokens_computed": engine.tokens_computed, "finite": finite[0],
        "setup": {"requests": requests, "prompt_len": prompt_len, "prompt_lengths": lengths,
                  "shared_prefix": shared_prefix, "max_new_tokens": max_new_tokens, "chunk": chunk,
                  "arrival": arrival, "arrival_steps": arrive, "block_size": block_size, "layout": layout,
                  "attn_layout": attn, "indexer_layout": idx, "device": str(model.device),
                  "threads": torch.get_num_threads()},
        "pool_pages": capacity, "page_bytes": page_bytes, "pool_memory": budget,
        "pool_bytes": pool_bytes, "waited": waited,
        "final_pages": final_pages, "pages_after_evict": pool.pages_in_use(), "prefix": prefix,
        "request_tokens": final_len, "kv_bytes_per_token_request": pool.kv_bytes_per_token(final_len),
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
        "peak_pages": peak_pages, "final_pages": total("final_pages"), "pages_after_evict": total("pages_after_evict"),
        "pool_bytes_peak": pool_bytes_peak, "live_bytes_peak": live["live_bytes"],
        "live_tokens_at_peak": live["live_tokens"],
        "kv_bytes_per_token_peak": live["live_bytes"] / live["live_tokens"] if live["live_tokens"] else None,
        "request_tokens": recs[0]["request_tokens"],
        "kv_bytes_per_token_request": recs[0]["kv_bytes_per_token_request"],
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
    `LAYOUT_PAIRS` name (None: `default_layout` of the model's device). The pool takes at most
    ``pool_memory`` bytes on the model's device (None: `default_pool_memory`), and requests wait for pages
    when it cannot hold them all (`serve_rank`). ``baseline``: also time one request on the contiguous path
    (`single_request_decode`, the workload's mean prompt length). ``progress``: a tqdm bar of finished
    requests on stderr. Returns the figures defined in the module docstring (a JSON-ready dict; ``tokens``:
    each request's generated tokens, in request order). `run_requests_ep` runs the same workload on
    expert-parallel ranks.
    """
    return merge_ranks([serve_rank(model, requests=requests, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                                   chunk=chunk, arrival=arrival, block_size=block_size, layout=layout,
                                   shared_prefix=shared_prefix, seed=seed, pool_memory=pool_memory,
                                   reuse_prefixes=reuse_prefixes, baseline=baseline, progress=progress)])


def _rank_requests(rank: int, world: int, path: str, load: dict[str, Any], workload: dict[str, Any]) -> dict:
    """One rank of `run_requests_ep`: load the checkpoint, shard the experts, `serve_rank` in lockstep."""
    import v4hal
    from v4hal.model import V4Model
    from v4hal.parallel.model import shard_model_experts

    t0 = time.perf_counter()
    model = V4Model.from_pretrained(path, device="cpu", experts_fp8=load["experts_fp8"], mmap=load["mmap"])
    shard_model_experts(model, fp8_payload=load["fp8_payload"], timeout=load["timeout"])
    load_s = time.perf_counter() - t0
    backend = load["backend"]
    with v4hal.use_backend(backend) if backend else contextlib.nullcontext():
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
    from v4hal.parallel.launch import spawn

    if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1:
        raise RangeError(f"run_requests_ep: ep must be an int >= 1, got {ep!r}")
    load = {"experts_fp8": experts_fp8, "backend": backend, "fp8_payload": fp8_payload, "mmap": mmap,
            "timeout": timeout_s, "progress": progress}
    recs = spawn(_rank_requests, ep, str(path), load, workload, timeout_s=timeout_s, start_method=start_method,
                 threads=threads)
    res = merge_ranks(recs)
    return {**res, "load_s": max(r["load_s"] for r in recs), "experts": recs[0]["experts"]}


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def format_report(res: dict[str, Any]) -> str:
    """The screen table of a `run_requests` result."""
    single = res.get("single") or {}
    kinds = list(res["peak_pages"])
    arrival = "seeded gaps of 0-3 steps" if res["arrival"] is None else f"one every {res['arrival']} steps"
    rows = [
        ["requests", f"{res['finished']} / {res['requests']} finished in {res['steps']} steps "
                     f"({res['decode_only_steps']} decode-only), arrivals: {arrival}"],
        ["prompts", f"{min(res['prompt_lengths'])} .. {max(res['prompt_lengths'])} tokens "
                    f"(shared prefix {res['shared_prefix']}), {res['max_new_tokens']} new tokens each"],
        ["prefill", f"{res['prefill_tokens']} tokens, {_fmt(res['prefill_tok_s'])} tok/s"],
        ["decode", f"{res['decode_tokens']} tokens, {_fmt(res['decode_tok_s'])} tok/s "
                   f"(decode-only steps: {_fmt(res['decode_only_tok_s'])} tok/s, "
                   f"{_fmt(res['decode_only_mean_batch'])} requests per step on average)"],
        ["single request", f"decode {_fmt(single.get('decode_tok_s'))} tok/s (contiguous path, batch 1, prompt "
                           f"{single.get('prompt_len')} = the requests' mean, median of "
                           f"{len(single.get('decode_tok_s_runs', []))} runs)"
         if single else "not measured"],
        ["batched / single", f"{_fmt(res['speedup'], '.2f')}x (decode-only steps: "
                             f"{_fmt(res['speedup_decode_only'], '.2f')}x)"],
        ["requests/s", f"{res['requests_s']:.2f} ({res['wall_s']:.2f} s)"],
        ["pages (" + "/".join(kinds) + ")", "peak " + "/".join(str(res["peak_pages"][k]) for k in kinds)
         + ", final " + "/".join(str(res["final_pages"][k]) for k in kinds)
         + f" ({res['prefixes_registered_at_end']} prefixes registered), after evicting them "
         + "/".join(str(res["pages_after_evict"][k]) for k in kinds)
         + ", of " + "/".join(str(res["pool_pages"][k]) for k in kinds)],
        ["pool", f"{_size(res['pool_bytes'])} of pages (budget {_size(res['pool_memory'])}); {res['waited']} "
                 f"requests waited for pages after they arrived"],
        ["KV bytes/token", f"{_fmt(res['kv_bytes_per_token_peak'])} at peak ({res['live_bytes_peak']} B for "
                           f"{res['live_tokens_at_peak']} positions); one {res['request_tokens']}-token request: "
                           f"{res['kv_bytes_per_token_request']:.1f}; pool peak {res['pool_bytes_peak']} B"],
        ["prefix reuse", f"{res['prefix_hits']} hits of {res['prefix_lookups']} lookups, "
                         f"{res['prefix_tokens_saved']} tokens saved"],
        ["setup", f"chunk {res['chunk']}, block size {res['block_size']}, layout {res['layout']} "
                  f"({res['attn_layout']} + {res['indexer_layout']}), {res['device']}, {res['threads']} threads"],
    ]
    if res.get("ep"):
        rows.append(["expert parallel", f"{res['ep']} ranks ({res['transport']}), requests per rank "
                     + "/".join(map(str, res["rank_requests"])) + ", steps joined without a token of their own "
                     + "/".join(map(str, res["rank_idle_steps"])) + "; step times are the slowest rank's, the "
                     "single request runs on every rank"])
    return text_table(["", "value"], rows, left=2)


# ---------------------------------------------------------------------- memory
def contiguous_bytes(cfg: ModelConfig, tokens: int) -> int:
    """Cache bytes of one sequence of ``tokens`` on the contiguous path (`V4Model.forward`, caches sized for
    ``max_seq_len = tokens``), every layer (main and MTP): a bf16 ``head_dim`` row per window slot and per
    compressed entry, a bf16 ``index_head_dim`` row per indexer key (ratio 4), and the compressors' fp32
    state of the unfinished block (``kv`` and ``score``, and the previous block's for ratio 4)."""
    total = 0
    for r in cfg.compress_ratios:
        total += 2 * cfg.head_dim * (cfg.window_size + (tokens // r if r else 0))
        if r:
            coff = 2 if r == 4 else 1
            parts = 4 if r == 4 else 2                      # cur kv, score (+ prev kv, score), fp32
            total += parts * 4 * r * coff * cfg.head_dim
        if r == 4:                                          # the indexer's keys and its compressor's state
            total += 2 * cfg.index_head_dim * (tokens // 4)
            total += 4 * 4 * 4 * 2 * cfg.index_head_dim
    return total


def _measured_pool_bytes(cfg: ModelConfig, tokens: int, attn: str, idx: str, block_size: int) -> int:
    """Bytes one ``tokens``-long request holds in an allocated pool, counted from the tensors: each cache's
    ``nbytes`` per page times the pages the request's tables hold once its positions are computed."""
    pool = CachePool(cfg.replace(max_batch_size=1), block_size=block_size, attn_layout=attn, indexer_layout=idx)
    pool.add_request("m", [0] * tokens)
    pool.plan("m", tokens)
    pool.advance("m", tokens)
    held = {k: sum(b >= 0 for b in pool.requests["m"].tables[k]) for k in pool.kinds}
    total = 0
    for s in pool.specs:
        t = getattr(pool.layers[s.layer], s.name)
        total += t.untyped_storage().nbytes() // t.shape[0] * held[s.kind]
    return total


def memory_rows(tokens: int = 1 << 20, presets: Sequence[str] = ("v4-flash", "v4-pro"), *,
                mini: bool = True, block_size: int | None = None) -> list[dict[str, Any]]:
    """Cache bytes per token of one request, per preset and `LAYOUT_PAIRS` entry: ``pool`` from a `CachePool`
    built without tensors (page-granular: window pages, compressor state per token, compressed and indexer
    entries), ``cost`` from `v4hal.bench.cost` (main layers, what the caches store), ``flashmla`` every
    attention entry at FlashMLA's 584 B (window and compressed, indexer keys at the layout's bytes), and
    ``contiguous`` from `contiguous_bytes`. ``mini``: add v4-mini rows at ``min(tokens, max_seq_len)``
    whose ``measured`` figure comes from an allocated pool's tensors. Block size: `default_block_size`."""
    from v4hal.bench.cost import v4_cost

    rows = []
    names = list(presets) + (["v4-mini"] if mini else [])
    for name in names:
        cfg = ModelConfig.preset(name)
        n = min(tokens, cfg.max_seq_len) if name == "v4-mini" else tokens
        cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, n), max_batch_size=1)
        bs = default_block_size(cfg) if block_size is None else block_size
        cost = v4_cost(cfg, n, name)
        for layout, (attn, idx) in LAYOUT_PAIRS.items():
            pool = CachePool(cfg, block_size=bs, attn_layout=attn, indexer_layout=idx, allocate=False)
            by_kind = pool.request_bytes(n)
            flashmla = None
            if PAGED_LAYOUTS["model1_fp8"].token_bytes(cfg.head_dim) == FLASHMLA_ENTRY_BYTES:
                entries = sum(min(cfg.window_size, n) + (n // r if r else 0) for r in cfg.compress_ratios)
                keys = sum(n // 4 for r in cfg.compress_ratios if r == 4)
                flashmla = (FLASHMLA_ENTRY_BYTES * entries
                            + PAGED_LAYOUTS["indexer_fp4"].token_bytes(cfg.index_head_dim) * keys) / n
            row = {"config": name, "layout": layout, "attn_layout": attn, "indexer_layout": idx, "tokens": n,
                   "block_size": bs, "attn_entry_bytes": PAGED_LAYOUTS[attn].token_bytes(cfg.head_dim),
                   "indexer_entry_bytes": PAGED_LAYOUTS[idx].token_bytes(cfg.index_head_dim),
                   "pool": sum(by_kind.values()) / n, "pool_by_kind": by_kind,
                   "cost": cost.kv_bytes_per_token, "flashmla": flashmla,
                   "contiguous": contiguous_bytes(cfg, n) / n, "measured": None}
            if name == "v4-mini":
                row["measured"] = _measured_pool_bytes(cfg, n, attn, idx, bs) / n
            rows.append(row)
    return rows


def format_memory_table(rows: Sequence[dict[str, Any]]) -> str:
    """The screen table of `memory_rows` (bytes per token of one request)."""
    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    body = [[r["config"], r["layout"], f"{r['attn_layout']}+{r['indexer_layout']}", str(r["tokens"]),
             f"{r['attn_entry_bytes']}/{r['indexer_entry_bytes']}", f(r["pool"]), f(r["measured"]), f(r["cost"]),
             f(r["flashmla"]), f(r["contiguous"])] for r in rows]
    return text_table(["config", "layout", "caches", "tokens", "entry B (attn/idx)", "pool B/tok", "measured",
                   "v4hal cost", "FlashMLA 584", "contiguous bf16"], body, left=3)

