"""V4 attention: sliding window + compressed KV (CSA ratio 4 with the lightning indexer, HCA ratio 128).

Computation of the public ``inference/model.py`` (``Compressor``, ``Indexer``, ``Attention``),
written on v4hal ops:

* projections: `Linear` (``act_quant`` + ``fp8_gemm`` or ``grouped_gemm``); norms ``rms_norm``;
  rotary ``rotary_emb`` on the last ``rope_head_dim`` dims (and its inverse on the output);
* the KV round trips of the quantization-aware training: ``act_quant(..., 64, inplace=True)``
  on the no-rope dims of every KV row, ``hadamard_transform`` + ``fp4_act_quant(inplace=True)``
  on indexer queries and keys;
* pooling of ``ratio`` tokens into one entry: ``compress_kv``; indexer: ``indexer_topk``;
  attention: ``sparse_attn`` over the window rows plus the compressed rows;
* grouped low-rank output projection: ``grouped_gemm`` (one group per ``o_groups``), then ``wo_b``.

Projections that read the same input run as one GEMM (`FusedLinear`, built by `Attention.prepare`
after loading): ``wq_a | wkv`` on x, ``wq_b | indexer.wq_b`` on the q latent, and every
compressor projection of x with the indexer's ``weights_proj`` (fp32). Rope of q and kv is one
``rotary_emb`` call (kv rides along as one more head).

Plain torch is glue only: slicing, ``cat``/``split``, the int32 index tables of the window and
of the compressed entries, writing cache rows, ``x.float()`` before the fp32 compressor GEMM,
and the scalar ``* index_head_dim**-0.5 * index_n_heads**-0.5`` of the indexer head weights.

Caches (allocated by ``reset(batch)`` at every prefill, ``start_pos == 0``):

* ``kv_cache [b, window + max_seq_len // ratio, head_dim]``: a ring of the last ``window``
  KV rows (row ``pos % window``) followed by the compressed entries;
* each `Compressor` keeps the raw projections of the unfinished block (``cur``) and, for the
  overlapping ratio-4 pooling, of the previous block (``prev``), and emits one entry every
  ``ratio`` tokens in decode;
* the `Indexer` has its own compressed cache of indexer keys.

Prefill (``start_pos == 0``) takes any number of tokens; decode takes one token per call.
"""
from __future__ import annotations

import torch
from torch import nn

import v4hal
from v4hal.hal.errors import RangeError

from .config import ModelConfig
from .layers import FusedLinear, Linear, RMSNorm, act_scale_format
from .spec import linear_kind

__all__ = ["Compressor", "Indexer", "Attention", "window_topk_idxs", "compressed_topk_idxs", "check_positions"]


def _rope_tail(x: torch.Tensor, freqs: torch.Tensor, rd: int, inverse: bool = False) -> torch.Tensor:
    """Rotary embedding on the last ``rd`` dims of ``x`` ``[b, s, (h,) d]``; the other dims unchanged."""
    tail = v4hal.rotary_emb(x[..., -rd:], freqs, inverse)
    return torch.cat([x[..., :-rd], tail], dim=-1)


def _fp8_kv_roundtrip(x: torch.Tensor, rd: int, scale_fmt: str | None) -> torch.Tensor:
    """FP8 round trip (blocks of 64) of the no-rope dims of ``x [..., d]``; the rope dims stay as they are."""
    nope = x[..., :-rd].contiguous()
    v4hal.act_quant(nope, 64, scale_fmt, inplace=True)
    return torch.cat([nope, x[..., -rd:]], dim=-1)


def window_topk_idxs(window: int, bsz: int, seqlen: int, start_pos: int, device: torch.device) -> torch.Tensor:
    """int32 KV rows of the sliding window per query, -1 where empty.

    Prefill: rows index the full prompt (query i sees ``max(0, i-window+1) .. i``),
    ``[b, s, min(s, window)]``. Decode: rows index the ring buffer, ``[b, 1, window]``.
    """
    if start_pos == 0:
        width = min(seqlen, window)
        q = torch.arange(seqlen, device=device).unsqueeze(1)
        rows = (q - window + 1).clamp_min(0) + torch.arange(width, device=device)
        rows = torch.where(rows > q, torch.full_like(rows, -1), rows)
    else:
        filled = min(start_pos + 1, window)      # ring rows written so far
        rows = torch.arange(window, device=device)
        rows = torch.where(rows < filled, rows, torch.full_like(rows, -1)).unsqueeze(0)
    return rows.to(torch.int32).unsqueeze(0).expand(bsz, -1, -1)


def compressed_topk_idxs(ratio: int, bsz: int, seqlen: int, start_pos: int, offset: int,
                         device: torch.device) -> torch.Tensor:
    """int32 rows of every compressed entry a query may see (ratio-128 layers), -1 when its block is unfinished.

    Prefill: ``[b, s, s // ratio]``, entry j visible to query i when ``j < (i + 1) // ratio``.
    Decode: ``[b, 1, (start_pos + 1) // ratio]``, all visible. Visible rows are ``j + offset``.
    """
    if start_pos == 0:
        j = torch.arange(seqlen // ratio, device=device).unsqueeze(0)
        limit = (torch.arange(seqlen, device=device) + 1).unsqueeze(1) // ratio
        rows = torch.where(j < limit, j + offset, torch.full_like(j, -1))
    else:
        rows = (torch.arange((start_pos + 1) // ratio, device=device) + offset).unsqueeze(0)
    return rows.to(torch.int32).unsqueeze(0).expand(bsz, -1, -1)


class Compressor(nn.Module):
    """Gated pooling of ``ratio`` tokens into one KV entry, written into a cache.

    ``ratio == 4`` pools overlapping windows (``coff = 2``: each token projects ``2*head_dim``
    channels, the first half feeding the next entry). After pooling: RMSNorm, rope on the last
    ``rope_head_dim`` dims at the block's first position, then an FP8 round trip of the no-rope
    dims (attention KV) or a Hadamard rotation + FP4 round trip (``rotate``, indexer keys).
    """

    def __init__(self, cfg: ModelConfig, ratio: int, head_dim: int, rotate: bool) -> None:
        super().__init__()
        self.ratio, self.head_dim, self.rotate = ratio, head_dim, rotate
        self.overlap = ratio == 4
        self.coff = 2 if self.overlap else 1
        self.rd = cfg.rope_head_dim
        self.scale_fmt = act_scale_format(cfg)[0]
        self.wkv = Linear(cfg.dim, self.coff * head_dim, "f32", cfg)
        self.wgate = Linear(cfg.dim, self.coff * head_dim, "f32", cfg)
        self.register_buffer("ape", torch.empty(ratio, self.coff * head_dim, device=torch.device("meta")))
        self.norm = RMSNorm(head_dim, cfg.norm_eps)
        self.cache: torch.Tensor | None = None       # a view into the owner's cache, set by the owner
        self.cur_kv = self.cur_score = self.prev_kv = self.prev_score = None
        self.has_prev = False

    def reset(self, bsz: int, cache: torch.Tensor) -> None:
        """Start a new sequence batch: ``cache [b, n_entries, head_dim]`` receives the entries."""
        shape = (bsz, self.ratio, self.coff * self.head_dim)
        dev = cache.device
        self.cache = cache
        self.cur_kv = torch.zeros(shape, device=dev)
        self.cur_score = torch.zeros(shape, device=dev)
        self.prev_kv = torch.zeros(shape, device=dev) if self.overlap else None
        self.prev_score = torch.zeros(shape, device=dev) if self.overlap else None
        self.has_prev = False

    def _finish(self, pooled: torch.Tensor, freqs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        kv = self.norm(pooled.to(dtype))
        kv = _rope_tail(kv, freqs, self.rd)
        if self.rotate:
            kv = v4hal.hadamard_transform(kv)
            v4hal.fp4_act_quant(kv, 32, inplace=True)
        else:
            kv = _fp8_kv_roundtrip(kv, self.rd, self.scale_fmt)
        return kv

    def forward(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor,
                proj: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
        """x ``[b, s, dim]`` (bf16) at positions ``start_pos ..``; ``freqs_cis`` the layer's full table;
        ``proj``: the fp32 projections ``(x @ wkv^T, x @ wgate^T)`` when the caller computed them
        (fused with other projections of x), else computed here.

        Returns the new entries ``[b, n, head_dim]`` (x's dtype; also written to the cache at
        rows ``start_pos // ratio ..``), or None when no block completed.
        """
        bsz, seqlen, _ = x.shape
        ratio, dtype = self.ratio, x.dtype
        if proj is None:
            xf = x.float()
            proj = (self.wkv(xf), self.wgate(xf))            # fp32 [b, s, coff*d] each
        kv, score = proj
        if start_pos == 0:
            cutoff = seqlen - seqlen % ratio
            rem = seqlen - cutoff
            if rem:
                self.cur_kv[:bsz, :rem] = kv[:, cutoff:]
                self.cur_score[:bsz, :rem] = score[:, cutoff:]
            if self.overlap and cutoff >= ratio:
                self.prev_kv[:bsz] = kv[:, cutoff - ratio:cutoff]
                self.prev_score[:bsz] = score[:, cutoff - ratio:cutoff]
                self.has_prev = True
            if cutoff == 0:
                return None
            pooled = v4hal.compress_kv(kv[:, :cutoff].contiguous(), score[:, :cutoff].contiguous(),
                                       self.ape, ratio, self.overlap)          # fp32 [b, n, d]
            out = self._finish(pooled, freqs_cis[0:cutoff:ratio], dtype)
            self.cache[:bsz, :cutoff // ratio] = out
            return out
        j = start_pos % ratio
        self.cur_kv[:bsz, j] = kv[:, 0]
        self.cur_score[:bsz, j] = score[:, 0]
        if (start_pos + 1) % ratio:
            return None
        if self.overlap and self.has_prev:
            both_kv = torch.cat([self.prev_kv[:bsz], self.cur_kv[:bsz]], dim=1)
            both_score = torch.cat([self.prev_score[:bsz], self.cur_score[:bsz]], dim=1)
            pooled = v4hal.compress_kv(both_kv, both_score, self.ape, ratio, True)[:, 1:]
        else:
            pooled = v4hal.compress_kv(self.cur_kv[:bsz], self.cur_score[:bsz], self.ape, ratio, self.overlap)
        if self.overlap:
            self.prev_kv[:bsz] = self.cur_kv[:bsz]
            self.prev_score[:bsz] = self.cur_score[:bsz]
            self.has_prev = True
        first = start_pos + 1 - ratio
        out = self._finish(pooled, freqs_cis[first:first + 1], dtype)
        self.cache[:bsz, start_pos // ratio] = out[:, 0]
        return out


class Indexer(nn.Module):
    """Lightning indexer of ratio-4 layers: picks ``index_topk`` compressed entries per query."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.rd, self.topk, self.ratio = cfg.rope_head_dim, cfg.index_topk, 4
        self.max_entries = cfg.max_seq_len // self.ratio
        self.weight_scale = self.head_dim ** -0.5 * self.n_heads ** -0.5
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, linear_kind(cfg), cfg)
        self.weights_proj = Linear(cfg.dim, self.n_heads, "bf16", cfg)
        self.compressor = Compressor(cfg, self.ratio, self.head_dim, rotate=True)
        self.kv_cache: torch.Tensor | None = None

    def reset(self, bsz: int, device: torch.device) -> None:
        self.kv_cache = torch.zeros(bsz, self.max_entries, self.head_dim, dtype=torch.bfloat16, device=device)
        self.compressor.reset(bsz, self.kv_cache)

    def queries(self, qr: torch.Tensor, freqs: torch.Tensor, q_proj: torch.Tensor | None = None) -> torch.Tensor:
        """Indexer queries ``[b, s, H, D]`` bf16 of the q latent ``qr [b, s, q_lora_rank]`` with rope rows
        ``freqs [s, rd/2]``: projection (``q_proj`` when the caller fused it), rope, Hadamard, FP4 round trip."""
        q = (self.wq_b(qr) if q_proj is None else q_proj).unflatten(-1, (self.n_heads, self.head_dim))
        q = v4hal.hadamard_transform(_rope_tail(q, freqs, self.rd))
        v4hal.fp4_act_quant(q, 32, inplace=True)
        return q

    def forward(self, x: torch.Tensor, qr: torch.Tensor, start_pos: int, offset: int,
                freqs_cis: torch.Tensor, proj: tuple[torch.Tensor, torch.Tensor] | None = None,
                q_proj: torch.Tensor | None = None, w_proj: torch.Tensor | None = None) -> torch.Tensor:
        """x ``[b, s, dim]``, qr ``[b, s, q_lora_rank]`` -> int32 ``[b, s, min(topk, entries)]`` KV rows (+offset).

        Precomputed projections (when the caller fused them with others of the same input):
        ``proj`` of the indexer's compressor (see `Compressor.forward`), ``q_proj = wq_b(qr)``,
        ``w_proj = weights_proj(x)``."""
        bsz, seqlen, _ = x.shape
        end_pos = start_pos + seqlen
        q = self.queries(qr, freqs_cis[start_pos:end_pos], q_proj)
        self.compressor(x, start_pos, freqs_cis, proj)
        weights = (self.weights_proj(x) if w_proj is None else w_proj) * self.weight_scale
        n = end_pos // self.ratio
        if n == 0:
            return torch.empty(bsz, seqlen, 0, dtype=torch.int32, device=x.device)
        return v4hal.indexer_topk(q, self.kv_cache[:bsz, :n], weights, self.topk, start_pos=start_pos,
                                  ratio=self.ratio, offset=offset)


class Attention(nn.Module):
    """Shared-KV multi-head attention over the sliding window plus compressed entries."""

    def __init__(self, layer_id: int, cfg: ModelConfig) -> None:
        super().__init__()
        lin = linear_kind(cfg)
        self.layer_id = layer_id
        self.n_heads, self.head_dim, self.rd = cfg.n_heads, cfg.head_dim, cfg.rope_head_dim
        self.groups, self.o_rank = cfg.o_groups, cfg.o_lora_rank
        self.window, self.eps = cfg.window_size, cfg.norm_eps
        self.ratio = cfg.compress_ratios[layer_id]
        self.max_seq_len = cfg.max_seq_len
        self.softmax_scale = cfg.head_dim ** -0.5
        self.scale_fmt = act_scale_format(cfg)[0]
        self.register_buffer("attn_sink", torch.empty(cfg.n_heads, device=torch.device("meta")))
        self.wq_a = Linear(cfg.dim, cfg.q_lora_rank, lin, cfg)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
        self.wq_b = Linear(cfg.q_lora_rank, cfg.n_heads * cfg.head_dim, lin, cfg)
        self.wkv = Linear(cfg.dim, cfg.head_dim, lin, cfg)
        self.kv_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.wo_a = Linear(cfg.n_heads * cfg.head_dim // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, "bf16", cfg)
        self.wo_b = Linear(cfg.o_groups * cfg.o_lora_rank, cfg.dim, lin, cfg)
        self.compressor = Compressor(cfg, self.ratio, cfg.head_dim, rotate=False) if self.ratio else None
        self.indexer = Indexer(cfg) if self.ratio == 4 else None
        self.register_buffer("freqs_cis", torch.empty(cfg.max_seq_len, cfg.rope_head_dim // 2,
                                                      dtype=torch.complex64, device=torch.device("meta")),
                             persistent=False)
        self._ones: torch.Tensor | None = None
        self.kv_cache: torch.Tensor | None = None
        self.qkv_a: FusedLinear | None = None         # wq_a | wkv, built by prepare()
        self.comp_proj: FusedLinear | None = None     # compressor projections (+ indexer weights_proj) of x
        self.q_b: FusedLinear | None = None           # wq_b | indexer.wq_b (both read qr)

    def prepare(self) -> None:
        """After loading: fuse the projections that share an input into single GEMMs (exact)."""
        parts = [self.wq_a, self.wkv]
        self.qkv_a = FusedLinear(parts) if FusedLinear.can_fuse(parts) else None
        if self.qkv_a is not None:
            self.qkv_a.fuse()
        comp = []
        if self.compressor is not None:
            comp += [self.compressor.wkv, self.compressor.wgate]
        if self.indexer is not None:
            comp += [self.indexer.compressor.wkv, self.indexer.compressor.wgate, self.indexer.weights_proj]
        self.comp_proj = FusedLinear(comp) if comp and FusedLinear.can_fuse(comp) else None
        if self.comp_proj is not None:
            self.comp_proj.fuse()
        if self.indexer is not None:
            parts = [self.wq_b, self.indexer.wq_b]
            self.q_b = FusedLinear(parts) if FusedLinear.can_fuse(parts) else None
            if self.q_b is not None:
                self.q_b.fuse()

    def reset(self, bsz: int) -> None:
        """Fresh caches for a batch of ``bsz`` sequences (called at every prefill)."""
        dev = self.attn_sink.device
        size = self.window + (self.max_seq_len // self.ratio if self.ratio else 0)
        self.kv_cache = torch.zeros(bsz, size, self.head_dim, dtype=torch.bfloat16, device=dev)
        if self.compressor is not None:
            self.compressor.reset(bsz, self.kv_cache[:, self.window:])
        if self.indexer is not None:
            self.indexer.reset(bsz, dev)

    def _head_norm(self, q: torch.Tensor) -> torch.Tensor:
        if self._ones is None or self._ones.device != q.device:
            self._ones = torch.ones(self.head_dim, dtype=torch.float32, device=q.device)
        return v4hal.rms_norm(q, self._ones, self.eps)

    def _grouped_out(self, o: torch.Tensor) -> torch.Tensor:
        """``o [b, s, h, d]`` -> per-group low-rank ``[b, s, groups * o_rank]`` through ``grouped_gemm``."""
        bsz, seqlen = o.shape[:2]
        t = bsz * seqlen
        x = o.reshape(t, self.groups, -1).transpose(0, 1).reshape(self.groups * t, -1)
        offsets = torch.arange(0, (self.groups + 1) * t, t, dtype=torch.int64, device=o.device)
        w = self.wo_a.weight.view(self.groups, self.o_rank, -1)
        y = v4hal.grouped_gemm(x, w, offsets, out_dtype=o.dtype)          # [g*t, r]
        return y.view(self.groups, t, self.o_rank).transpose(0, 1).reshape(bsz, seqlen, -1)

    def project(self, x: torch.Tensor, freqs: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """x ``[b, s, dim]`` (normed) with rope rows ``freqs [s, rd/2]`` (each position's) -> the q latent
        ``qr`` (normed), the indexer's q projection when fused (else None), ``q [b, s, h, d]`` (head-normed,
        roped) and ``kv [b, s, d]`` (normed, roped, V4's FP8 round trip on the no-rope dims)."""
        rd = self.rd
        if self.qkv_a is not None:
            qa, kva = self.qkv_a(x)
        else:
            qa, kva = self.wq_a(x), self.wkv(x)
        qr = self.q_norm(qa)
        iq = None
        if self.q_b is not None:
            qb, iq = self.q_b(qr)
        else:
            qb = self.wq_b(qr)
        q = self._head_norm(qb.unflatten(-1, (self.n_heads, self.head_dim)))
        kv = self.kv_norm(kva)
        # rope on q's heads and on kv in one call (kv rides along as one more head)
        tails = v4hal.rotary_emb(torch.cat([q[..., -rd:], kv[..., -rd:].unsqueeze(2)], dim=2), freqs)
        q = torch.cat([q[..., :-rd], tails[:, :, :-1]], dim=-1)
        kv = _fp8_kv_roundtrip(torch.cat([kv[..., :-rd], tails[:, :, -1]], dim=-1), rd, self.scale_fmt)
        return qr, iq, q, kv

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        """x ``[b, s, dim]`` bf16 (already normed) -> ``[b, s, dim]`` bf16."""
        bsz, seqlen, _ = x.shape
        win, rd, ratio = self.window, self.rd, self.ratio
        freqs = self.freqs_cis[start_pos:start_pos + seqlen]
        qr, iq, q, kv = self.project(x, freqs)

        comp = main_proj = idx_proj = iw = None
        if self.comp_proj is not None:
            comp = self.comp_proj(x.float())
            main_proj = comp[:2] if self.compressor is not None else None
            if self.indexer is not None:
                idx_proj, iw = comp[2:4], comp[4]
        idxs = window_topk_idxs(win, bsz, seqlen, start_pos, x.device)
        if ratio:
            offset = seqlen if start_pos == 0 else win
            if self.indexer is not None:
                cidx = self.indexer(x, qr, start_pos, offset, self.freqs_cis, idx_proj, iq, iw)
            else:
                cidx = compressed_topk_idxs(ratio, bsz, seqlen, start_pos, offset, x.device)
            idxs = torch.cat([idxs, cidx], dim=-1)

        if start_pos == 0:
            keep = min(seqlen, win)
            ring = torch.arange(seqlen - keep, seqlen, device=x.device) % win
            self.kv_cache[:bsz, ring] = kv[:, seqlen - keep:]
            rows = kv
            if self.compressor is not None:
                new = self.compressor(x, 0, self.freqs_cis, main_proj)
                if new is not None:
                    rows = torch.cat([kv, new], dim=1)
            o = v4hal.sparse_attn(q, rows, self.attn_sink, idxs.contiguous(), self.softmax_scale)
        else:
            self.kv_cache[:bsz, start_pos % win] = kv[:, 0]
            if self.compressor is not None:
                self.compressor(x, start_pos, self.freqs_cis, main_proj)
            o = v4hal.sparse_attn(q, self.kv_cache[:bsz], self.attn_sink, idxs.contiguous(), self.softmax_scale)
        o = _rope_tail(o, freqs, rd, inverse=True)
        return self.wo_b(self._grouped_out(o))


def check_positions(start_pos: int, seqlen: int, max_seq_len: int) -> None:
    """Raise `RangeError` unless (start_pos, seqlen) is a prefill from 0 or a one-token decode step in range."""
    if start_pos < 0:
        raise RangeError(f"V4Model: start_pos must be >= 0, got {start_pos}")
    if seqlen < 1:
        raise RangeError(f"V4Model: input_ids must hold at least one position, got {seqlen}")
    if start_pos > 0 and seqlen != 1:
        raise RangeError(f"V4Model: decode (start_pos > 0) takes one token per call, got {seqlen} tokens "
                         f"at start_pos={start_pos}; prefill from start_pos=0 instead")
    if start_pos + seqlen > max_seq_len:
        raise RangeError(f"V4Model: positions up to {start_pos + seqlen} exceed max_seq_len={max_seq_len}")

