"""Sizing a `CachePool`: the pages one request holds at its peak, and the pool a memory budget buys.

A request of at most ``max_len`` positions, computed in steps of at most ``chunk`` new tokens (one for a
decode step), holds at most, per page kind (``bs``: the kind's page size, ``block_size`` or
``state_block_size``; ``ceil`` rounds up):

- ``"c4"`` / ``"c128"``: ``ceil((max_len // r) / bs)`` (compressed entries stay until the request is released);
- ``"c2"`` / ``"c1"`` (V4.1): likewise with ``r`` = 2 / 1;
- ``"token"``, ``"state4"``, ``"state128"``, ``"state2"``: ``min(ceil(max_len / bs), ceil((chunk + back - 1) /
  bs) + 1)`` with ``back = window_size - 1``, ``7``, ``127`` and ``1``: a step reads ``back`` positions behind its
  first new one (`v4hal.serve.first_needed_position`) and writes ``chunk``; a span of ``m`` positions touches at most
  ``ceil((m - 1) / bs) + 1`` pages.

A pool holding ``R`` such requests at once needs ``R`` times that of each kind (`request_pages`); its bytes are
``sum over kinds of (blocks + 1 for a state kind) * page_bytes`` (block 0 of a state kind is reserved), with
``CachePool.page_bytes()`` the bytes of one page of each kind over every layer (`pool_bytes`).
`blocks_for_budget` inverts that: the most requests a byte budget holds, and the ``blocks`` for `CachePool`
(`request_budget_bytes`: the bytes a pool needs for one request). Registered prefixes hold pages too, but the
pool evicts them when a step needs the room.

Also the serving defaults that size a pool: the named cache layout pairs (`LAYOUT_PAIRS`, `default_layout`),
the page size (`default_block_size`), and the memory a pool takes on a device (`available_memory`,
`default_pool_memory`, from the device's `v4hal.hal.platform.Platform`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from v4hal.hal.errors import RangeError
from v4hal.hal.platform import platform_of
from v4hal.model.config import ModelConfig

from .batch import POSITION_KINDS, STATE_BLOCK_SIZE, STATE_KINDS, block_sizes_of, kinds_of, pages_needed
from .pool import CachePool, cache_layouts

__all__ = ["PoolSize", "request_pages", "page_bytes", "pool_bytes", "request_budget_bytes", "blocks_for_budget",
           "LAYOUT_PAIRS", "layout_pair", "default_layout", "default_block_size", "available_memory",
           "default_pool_memory"]

#: cache layout pairs (attention caches, indexer key caches) by the name ``--layout`` takes. ``bf16`` stores
#: the indexer keys as bf16 too: they are FP4-rounded values, which bf16 holds exactly (``indexer_fp8`` would
#: round them again with one scale per token), so both pairs give the same logits. ``bf16_kv``: bf16 attention
#: caches beside FP4 indexer keys, the default of a model whose KV scales are not powers of two (its FP8 KV
#: would round again in ``model1_fp8`` pages). A DeepSeek-V4.1 model takes each pair with its own window format
#: in place of ``model1_fp8`` (`layout_pair`).
LAYOUT_PAIRS: dict[str, tuple[str, str]] = {"quantized": ("model1_fp8", "indexer_fp4"), "bf16": ("bf16", "bf16"),
                                            "bf16_kv": ("bf16", "indexer_fp4")}


def layout_pair(name: str, cfg: ModelConfig | None = None) -> tuple[str, str]:
    """The (attention, indexer) layouts of `LAYOUT_PAIRS` entry ``name`` for ``cfg``: as listed, except that a
    DeepSeek-V4.1 model's quantized window caches are ``v41_window_fp8`` (FlashMLA's V4.1 format; its
    compressed caches then take ``v41_compressed_fp4``) where V4's are ``model1_fp8``."""
    if name not in LAYOUT_PAIRS:
        raise RangeError(f"layout must be one of {list(LAYOUT_PAIRS)}, got {name!r}")
    attn, idx = LAYOUT_PAIRS[name]
    if cfg is not None and cfg.is_v41 and attn == "model1_fp8":
        attn = "v41_window_fp8"
    return attn, idx


def default_layout(device: str | torch.device | None, cfg: ModelConfig | None = None) -> str:
    """The `LAYOUT_PAIRS` name of the pair a pool of ``cfg`` on ``device`` uses by default (`cache_layouts`:
    the device's preferred layouts, restricted to what stores exactly what the model computed)."""
    pair = cache_layouts(device, cfg)
    name = next((n for n in LAYOUT_PAIRS if layout_pair(n, cfg) == pair), None)
    if name is None:
        raise RangeError(f"default_layout: the default cache layouts {pair} on {device} have no --layout name; "
                         f"named pairs: {LAYOUT_PAIRS}")
    return name


def default_block_size(cfg: ModelConfig) -> int:
    """Entries per page: 64 (FlashMLA's page size) when the window spans at least that many tokens, else 16
    (v4-mini's 16-token window fits one page, and prefixes are reused at 16-token steps)."""
    return 64 if cfg.window_size >= 64 else 16


def available_memory(device: str | torch.device | None) -> int:
    """Bytes free for a cache pool on ``device`` (`v4hal.hal.platform.Platform.free_memory`): RAM this process
    could still take on the CPU, the device's free memory on an accelerator; `RangeError` when the device
    cannot tell."""
    free = platform_of(device).free_memory(device)
    if free is None:
        kind = platform_of(device).name
        raise RangeError(f"cannot tell how much memory {device} has free (torch.{kind}.mem_get_info is missing); "
                         f"give the pool's size (pool_memory, --pool-memory)")
    return free


def default_pool_memory(device: str | torch.device | None) -> int:
    """The pool's memory budget by default: the device's ``pool_memory_share`` (`v4hal.hal.platform.Platform`:
    1/8 of the RAM on the CPU, which the model and the run's records share; 1/2 of an accelerator's free
    memory once the model is loaded) of `available_memory`."""
    return int(platform_of(device).pool_memory_share * available_memory(device))

#: positions a step reads behind its first new one, per state kind (the window's is ``window_size - 1``)
STATE_BACK = {"state4": 7, "state128": 127, "state2": 1}


def _positive(op: str, name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RangeError(f"{op}: {name} must be an int >= 1, got {value!r}")
    return value


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def request_pages(cfg: ModelConfig, max_len: int, *, chunk: int = 64, block_size: int = 64,
                  state_block_size: int = STATE_BLOCK_SIZE) -> dict[str, int]:
    """Pages per kind one request of at most ``max_len`` positions holds at its peak when each step computes at
    most ``chunk`` of its tokens (prefill chunks; decode steps compute 1): the formula of the module docstring,
    an upper bound that a step at the worst page alignment reaches."""
    op = "request_pages"
    if not isinstance(cfg, ModelConfig):
        raise RangeError(f"{op}: cfg must be a ModelConfig, got {type(cfg).__name__}")
    for name, v in (("max_len", max_len), ("chunk", chunk), ("block_size", block_size),
                    ("state_block_size", state_block_size)):
        _positive(op, name, v)
    if max_len > cfg.max_seq_len:
        raise RangeError(f"{op}: max_len must be at most the config's max_seq_len = {cfg.max_seq_len}, got {max_len}")
    out = {}
    for k, bs in block_sizes_of(kinds_of(cfg), block_size, state_block_size).items():
        if k not in POSITION_KINDS:
            out[k] = pages_needed(k, max_len, bs)
            continue
        back = cfg.window_size - 1 if k == "token" else STATE_BACK[k]
        span = min(chunk, max_len) + back
        out[k] = min(_ceil(max_len, bs), _ceil(span - 1, bs) + 1)
    return out


def _pool(cfg: ModelConfig, block_size: int, state_block_size: int, attn_layout: str | None,
          indexer_layout: str | None, device: str | torch.device | None) -> CachePool:
    return CachePool(cfg, blocks={k: 1 for k in kinds_of(cfg)}, block_size=block_size,
                     state_block_size=state_block_size, device=device, attn_layout=attn_layout,
                     indexer_layout=indexer_layout, allocate=False)


def page_bytes(cfg: ModelConfig, *, block_size: int = 64, state_block_size: int = STATE_BLOCK_SIZE,
               attn_layout: str | None = None, indexer_layout: str | None = None,
               device: str | torch.device | None = None) -> dict[str, int]:
    """Bytes of one page of each kind, over every layer, of a pool with these arguments; nothing is allocated."""
    return _pool(cfg, block_size, state_block_size, attn_layout, indexer_layout, device).page_bytes()


def pool_bytes(cfg: ModelConfig, blocks: dict[str, int], *, block_size: int = 64,
               state_block_size: int = STATE_BLOCK_SIZE, attn_layout: str | None = None,
               indexer_layout: str | None = None, device: str | torch.device | None = None) -> int:
    """Bytes of the cache tensors of ``CachePool(cfg, blocks=blocks, ...)`` with the same arguments (the
    reserved block 0 of each state kind included); nothing is allocated."""
    page = page_bytes(cfg, block_size=block_size, state_block_size=state_block_size, attn_layout=attn_layout,
                      indexer_layout=indexer_layout, device=device)
    unknown = sorted(set(blocks) - set(page))
    if unknown:
        raise RangeError(f"pool_bytes: blocks has kinds {unknown} this config does not use; kinds: {list(page)}")
    return sum((_positive("pool_bytes", f"blocks[{k!r}]", blocks.get(k, 1)) + (k in STATE_KINDS)) * page[k]
               for k in page)


@dataclass(frozen=True)
class PoolSize:
    """What `blocks_for_budget` found: ``requests`` held at once at ``max_len`` positions each, ``blocks`` per
    kind for `CachePool` (at least 1 of each), and the pool's ``bytes`` (`pool_bytes`)."""

    requests: int
    blocks: dict[str, int]
    bytes: int


def blocks_for_budget(cfg: ModelConfig, budget_bytes: int, max_len: int, *, chunk: int = 64, block_size: int = 64,
                      state_block_size: int = STATE_BLOCK_SIZE, attn_layout: str | None = None,
                      indexer_layout: str | None = None, device: str | torch.device | None = None) -> PoolSize:
    """The pool that ``budget_bytes`` of cache memory buys: the most requests of at most ``max_len`` positions
    (steps of at most ``chunk`` tokens each) it holds at once, ``blocks = requests * request_pages(...)``.
    Layouts default to those of ``device`` (`v4hal.serve.cache_layouts`). `RangeError` when the budget does not
    hold one request (the message gives the bytes one needs)."""
    op = "blocks_for_budget"
    _positive(op, "budget_bytes", budget_bytes)
    per, page, one, fixed = _request_cost(cfg, max_len, chunk, block_size, state_block_size, attn_layout,
                                          indexer_layout, device)
    requests = (budget_bytes - fixed) // one
    if requests < 1:
        raise RangeError(f"{op}: budget_bytes = {budget_bytes} does not hold one request of {max_len} positions: "
                         f"it needs {one + fixed} bytes (pages per kind {per}, bytes per page {page})")
    blocks = {k: max(1, requests * n) for k, n in per.items()}
    return PoolSize(requests, blocks, requests * one + fixed)


def _request_cost(cfg: ModelConfig, max_len: int, chunk: int, block_size: int, state_block_size: int,
                  attn_layout: str | None, indexer_layout: str | None,
                  device: str | torch.device | None) -> tuple[dict[str, int], dict[str, int], int, int]:
    """(pages per kind of one request, bytes per page, that request's page bytes, the pool's fixed bytes:
    block 0 of each state kind and the one page CachePool keeps of a kind no request uses)."""
    per = request_pages(cfg, max_len, chunk=chunk, block_size=block_size, state_block_size=state_block_size)
    page = page_bytes(cfg, block_size=block_size, state_block_size=state_block_size, attn_layout=attn_layout,
                      indexer_layout=indexer_layout, device=device)
    fixed = sum(page[k] for k in page if k in STATE_KINDS) + sum(page[k] for k, n in per.items() if n == 0)
    return per, page, sum(per[k] * page[k] for k in per), fixed


def request_budget_bytes(cfg: ModelConfig, max_len: int, *, chunk: int = 64, block_size: int = 64,
                         state_block_size: int = STATE_BLOCK_SIZE, attn_layout: str | None = None,
                         indexer_layout: str | None = None, device: str | torch.device | None = None) -> int:
    """The smallest ``budget_bytes`` for which `blocks_for_budget` holds one request of ``max_len`` positions."""
    _, _, one, fixed = _request_cost(cfg, max_len, chunk, block_size, state_block_size, attn_layout,
                                     indexer_layout, device)
    return one + fixed
