"""DeepSeek-V4.1's Engram memory on v4hal ops: n-gram hashing of the step's tokens, the FP8 table lookup and the
gated update of every mHC stream, before the layers of ``cfg.engram_layers``.

Per token and Engram layer: the compressed ids (the tokenizer's vocabulary map, `v4hal.model.tokenizer`) of
the token and the ``N - 1`` before it (``N = engram_max_ngram_size``; looking back stops at the sequence
start, where the hash takes the compressed pad id) are hashed into ``(N - 1) * engram_n_heads`` table rows
(``engram_hash``; `EngramHash` does it once per step for every Engram layer); `Engram` gathers and
dequantizes the rows (``engram_lookup``), projects them with ``wkv`` into one key per stream and one shared
value, and adds ``gate * value`` to each stream (``engram_gate``).

What a request has seen before the step comes with the batch (``ForwardBatch.history_ids``: its token ids
before its first new position, from the pool that keeps its tokens), so a request cut into chunks, resumed
at any position or started from a reused prefix hashes exactly as in one call.

The tables are large (about 98 GB each in the release): by default the model keeps them in host memory even
on an accelerator, pageable (a memory-mapped checkpoint's table stays in the file's map): ``engram_lookup``
gathers the rows on the host and moves only those. Pinning a table (``v4hal.backends.triton.engram.
map_host_table``) lets the Triton kernel read it from the GPU directly, at the cost of page-locking all of
it; ``V4Model(..., engram_on_device=True)`` places the tables on the model's device.
"""
from __future__ import annotations

import torch
from torch import nn

import v4hal
from v4hal.hal.errors import RangeError, ShapeError
from v4hal.ops.engram import DEAD, engram_multipliers, engram_primes

from .batch import ForwardBatch, history_width
from .config import ModelConfig
from .layers import Linear
from .spec import linear_kind

__all__ = ["Engram", "EngramHash", "EngramTable"]

META = torch.device("meta")


class EngramTable(nn.Module):
    """One layer's table: ``weight [rows, head_dim]`` float8_e4m3fn and ``scale [rows, head_dim / 32]`` (e8m0 or
    fp32, one per 32 channels of a row)."""

    def __init__(self, rows: int, width: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.empty(rows, width, dtype=torch.float8_e4m3fn, device=META))
        self.register_buffer("scale", torch.empty(rows, width // 32, dtype=torch.float8_e8m0fnu, device=META))


class Engram(nn.Module):
    """The Engram memory before layer ``layer_id``: streams ``[1, T, hc, dim]`` and the step's rows of this layer
    ``[T, (N - 1) * heads]`` -> the updated streams (same shape and dtype)."""

    def __init__(self, layer_id: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.index = cfg.engram_layers.index(layer_id)        # this layer's row of the hash constants
        self.eps = cfg.norm_eps
        cols = (cfg.engram_max_ngram_size - 1) * cfg.engram_n_heads
        self.embed = EngramTable(cfg.engram_num_embeddings[self.index], cfg.engram_head_dim)
        self.wkv = Linear(cols * cfg.engram_head_dim, (cfg.hc_mult + 1) * cfg.dim, linear_kind(cfg), cfg)
        self.register_buffer("q_weight", torch.empty(cfg.hc_mult, cfg.dim, device=META))
        self.register_buffer("k_weight", torch.empty(cfg.hc_mult, cfg.dim, device=META))

    def forward(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        emb = v4hal.engram_lookup(rows, self.embed.weight, self.embed.scale, torch.bfloat16)   # [T, cols, W]
        kv = self.wkv(emb.flatten(1))                                                          # [T, (hc+1)*dim]
        out = v4hal.engram_gate(h[0], kv.to(h.dtype), self.q_weight, self.k_weight, None, self.eps)
        return out.unsqueeze(0)


class EngramHash:
    """The hash constants of every Engram layer and the tokenizer's vocabulary map (``vocab_map [vocab_size]``
    int64 -> compressed ids in ``[0, engram_compressed_vocab_size)``, `v4hal.model.tokenizer.load_vocab_map`);
    `rows` hashes one step for all Engram layers."""

    def __init__(self, cfg: ModelConfig, vocab_map: torch.Tensor) -> None:
        if not isinstance(vocab_map, torch.Tensor) or vocab_map.dtype != torch.int64 \
                or tuple(vocab_map.shape) != (cfg.vocab_size,):
            raise ShapeError(f"EngramHash: vocab_map must be int64 [vocab_size = {cfg.vocab_size}], got "
                             f"{getattr(vocab_map, 'dtype', type(vocab_map).__name__)} "
                             f"{list(getattr(vocab_map, 'shape', []))}")
        size = cfg.engram_compressed_vocab_size
        if vocab_map.numel() and (int(vocab_map.min()) < 0 or int(vocab_map.max()) >= size):
            raise RangeError(f"EngramHash: vocab_map values must lie in [0, engram_compressed_vocab_size = {size}), "
                             f"got [{int(vocab_map.min())}, {int(vocab_map.max())}]")
        n = cfg.engram_max_ngram_size
        self.width = history_width(cfg)
        self.map = vocab_map.cpu()
        self.pad_id = int(self.map[cfg.engram_pad_id])          # the pad token's compressed id
        self.multipliers = engram_multipliers(cfg.engram_layers, n, size)                        # [L, N]
        self.primes = engram_primes(cfg.engram_layers, n, cfg.engram_n_heads, cfg.engram_vocab_size)  # [L, N-1, H]
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        got = self._on.get(device)
        if got is None:
            got = self._on[device] = (self.map.to(device), self.multipliers.to(device), self.primes.to(device))
        return got

    def rows(self, batch: ForwardBatch) -> list[torch.Tensor]:
        """int64 ``[T, (N - 1) * heads]`` table rows of every Engram layer for the tokens of ``batch``."""
        dev = batch.input_ids.device
        vmap, mult, primes = self._constants(dev)
        hist = batch.history_ids
        if hist is None:
            if any(batch.start_positions):
                raise RangeError("V4Model: Engram layers need the batch's history_ids (the token ids before each "
                                 "request's start) when a request starts after position 0; build the batch with "
                                 "CachePool.build_batch or pass history_ids to ForwardBatch.from_block_tables")
            hist = torch.full((batch.num_requests, self.width), DEAD, dtype=torch.int64, device=dev)
        hist = torch.where(hist >= 0, vmap[hist.clamp_min(0)], DEAD)
        ids = vmap[batch.input_ids]
        return [v4hal.engram_hash(ids, batch.cu_seqlens, hist, mult[i], primes[i], self.pad_id)[0]
                for i in range(mult.shape[0])]
