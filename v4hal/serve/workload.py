"""The workload of a serving run: prompt lengths, prompts and arrival steps drawn from seeds, and the checks
that refuse a workload before anything is allocated (`check_workload`)."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from v4hal.bench.report import format_bytes
from v4hal.hal.errors import RangeError
from v4hal.model.config import ModelConfig
from v4hal.ops.paged import PAGED_LAYOUTS

from .sizing import LAYOUT_PAIRS, layout_pair, request_budget_bytes

__all__ = ["MAX_WORKLOAD_TOKENS", "request_lengths", "iter_prompts", "make_prompts", "arrival_steps",
           "check_workload"]

#: the most tokens (every prompt plus every output, summed over the requests) a run synthesises and records:
#: prompts are made as requests arrive, but their tokens and outputs stay in the results (about 36 bytes each)
MAX_WORKLOAD_TOKENS = 1 << 23


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


def _int_at_least(name: str, value: object, least: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise RangeError(f"{name} must be an int >= {least}, got {value!r}")
    return value


def check_workload(cfg: ModelConfig, *, requests: int, prompt_len: int, max_new_tokens: int, chunk: int,
                   arrival: int | None, block_size: int, layout: str, shared_prefix: int = 0,
                   pool_memory: int | None = None, flag: str = "--") -> None:
    """Refuse a workload `v4hal.serve.driver.run_requests` cannot run on ``cfg`` (`RangeError` / `ShapeError`
    naming the option, ``flag`` its prefix: ``"--"`` for the command line), before anything is allocated or
    loaded: bad values, prompts past ``max_seq_len``, more than `MAX_WORKLOAD_TOKENS` tokens in all, layouts
    that do not hold the config's widths, and (``pool_memory`` bytes given) a budget that does not hold the
    longest request (`v4hal.serve.sizing.request_budget_bytes`)."""
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
    attn, idx = layout_pair(layout, cfg)
    for lay, dim, what in ((attn, cfg.head_dim, "attention caches (head_dim)"),
                           (idx, cfg.index_head_dim, "indexer caches (index_head_dim)")):
        why = PAGED_LAYOUTS[lay].dim_problem(dim)
        if why is not None:
            raise RangeError(f"{name('layout')} {layout}: {what}: {why}")
    if pool_memory is not None:
        need = request_budget_bytes(cfg, longest + max_new_tokens - 1, chunk=chunk, block_size=block_size,
                                    attn_layout=attn, indexer_layout=idx)
        if need > pool_memory:
            raise RangeError(f"the longest request ({longest + max_new_tokens - 1} positions) needs "
                             f"{format_bytes(need)} of cache pages, more than the pool's {name('pool_memory')} "
                             f"{format_bytes(pool_memory)}; give a larger {name('pool_memory')} or shorter requests")
