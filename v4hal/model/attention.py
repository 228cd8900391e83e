"""V4 attention: sliding window + compressed KV (CSA ratio 4 with the lightning indexer, HCA ratio 128),
over paged caches, one `Step` at a time.

Computation of the public ``inference/model.py`` (``Compressor``, ``Indexer``, ``Attention``), written on
v4hal ops for the ``T`` tokens of a step (requests at their own positions, see `v4hal.model.step`):

1. projections: `Linear` (``act_quant`` + ``fp8_gemm`` or ``grouped_gemm``); norms ``rms_norm``; rotary
   ``rotary_emb`` on the last ``rope_head_dim`` dims at each token's own position; the KV gets V4's FP8
   round trip (``act_quant(..., 64, inplace=True)`` on the no-rope dims) and is written to the window cache
   at the token's slot (``paged_cache_write``);
2. the compressor (``compressor_ragged``: projections, state kept per token position in the pool's
   ``"state4"`` / ``"state128"`` pages, pooling, norm, rope) emits the entries this step completes; they get
   V4's round trip (FP8, or ``hadamard_transform`` + ``fp4_act_quant`` for indexer keys) and are written to
   the compressed / indexer caches;
3. picks per token: for ratio 4 the indexer's top-k (``indexer_topk_paged`` over the FP4 keys of the
   entries visible at that position, bf16 head weights as V4 computes them), for ratio 128 every visible
   entry, as entry indices;
4. ``sparse_attn_paged`` over the window cache plus the compressed cache (one softmax with the sink), in the
   op's position form: the window as a band (each token's position, its request's pages, ``window``) and
   the compressed picks as entry indices into the request's pages; then the inverse rope on the output, the
   grouped low-rank output projection (``grouped_gemm``, one group per ``o_groups``) and ``wo_b``.

Writes happen before reads within a layer, so a token sees the window rows and entries that earlier tokens
of its own chunk produced, and never a later one (visibility is by position). Because V4 rounds the KV to
FP8 (64-blocks) and the indexer keys to FP4 before storing them, a ``model1_fp8`` (ue8m0 models) /
``indexer_fp4`` cache stores exactly the values a ``bf16`` cache would.

Projections that read the same input run as one GEMM (`FusedLinear`, built by `Attention.prepare` after
loading): ``wq_a | wkv`` on x, ``wq_b | indexer.wq_b`` on the q latent. Rope of q and kv is one
``rotary_emb`` call (kv rides along as one more head).

Plain torch is glue only: slicing, ``cat``/``split``, gathering each token's rope row, ``x.float()`` before
the fp32 indexer head-weight GEMM, and the scalar ``* index_head_dim**-0.5 * index_n_heads**-0.5`` of the
indexer head weights.
"""
from __future__ import annotations

import torch
from torch import nn

import v4hal

from .caches import LayerCaches
from .config import ModelConfig
from .layers import FusedLinear, Linear, RMSNorm, act_scale_format, float_gemm
from .spec import linear_kind
from .step import Step

__all__ = ["Compressor", "Indexer", "SharedKVAttention", "Attention", "rope_tail", "adjacent_pair", "bf16_if_exact",
           "write_entries"]


def rope_tail(x: torch.Tensor, freqs: torch.Tensor, rd: int, inverse: bool = False) -> torch.Tensor:
    """Rotary embedding on the last ``rd`` dims of ``x`` ``[b, s, (h,) d]``; the other dims unchanged."""
    tail = v4hal.rotary_emb(x[..., -rd:], freqs, inverse)
    return torch.cat([x[..., :-rd], tail], dim=-1)


def _fp8_kv_roundtrip(x: torch.Tensor, rd: int, scale_fmt: str | None) -> torch.Tensor:
    """FP8 round trip (blocks of 64) of the no-rope dims of ``x [..., d]``; the rope dims stay as they are."""
    nope = x[..., :-rd].contiguous()
    v4hal.act_quant(nope, 64, scale_fmt, inplace=True)
    return torch.cat([nope, x[..., -rd:]], dim=-1)


class Compressor(nn.Module):
    """Gated pooling of ``ratio`` tokens into one KV entry (``compressor_ragged``).

    ``ratio == 4`` pools overlapping windows (``coff = 2``: each token projects ``2*head_dim``
    channels, the first half feeding the next entry). After pooling: RMSNorm, rope on the last
    ``rope_head_dim`` dims at the block's first position (inside the op), then an FP8 round trip of the
    no-rope dims (attention KV) or a Hadamard rotation + FP4 round trip (``rotate``, indexer keys).
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
        #: (wkv, wgate, norm weight) in bf16 when all three hold bf16 values, set by `prepare`
        self.ragged_weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def prepare(self) -> None:
        """After loading: bf16 copies of ``wkv``, ``wgate`` and the norm weight when every value of the three is
        a bf16 value (V4's checkpoints store them so). ``compressor_ragged`` computes in fp32 from either, so
        the results are the same bits; the CANN compressor multiplies in x's dtype and takes only these."""
        wkv, wgate = adjacent_pair(self.wkv.weight, self.wgate.weight)
        self.wkv._buffers["weight"], self.wgate._buffers["weight"] = wkv, wgate
        low = [bf16_if_exact(w) for w in (torch.cat([wkv, wgate]), self.norm.weight)]
        self.ragged_weights = (*low[0].split(wkv.shape[0]), low[1]) if all(w is not None for w in low) else None

    def forward(self, x: torch.Tensor, step: Step, state: torch.Tensor, eps: float, freqs_cis: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The entries the step's tokens ``x [T, dim]`` (bf16) complete: ``[N, head_dim]`` bf16 (normed, roped,
        V4's round trip applied), with their request rows and entry indices int32 ``[N]`` (-1 for unused
        rows), or None when the step completes none (the state is updated either way). ``state``: this
        compressor's fp32 state cache; ``freqs_cis`` the layer's full rope table."""
        b = step.batch
        wkv, wgate, norm = self.ragged_weights or (self.wkv.weight, self.wgate.weight, self.norm.weight)
        entries, req, epos = v4hal.compressor_ragged(
            x, wkv, wgate, self.ape, norm, freqs_cis, state,
            step.state_tables[self.ratio], b.cu_seqlens, b.start_pos, self.ratio, eps)
        if not step.completed[self.ratio]:
            return None
        if self.rotate:
            entries = v4hal.hadamard_transform(entries)
            v4hal.fp4_act_quant(entries, 32, inplace=True)
        else:
            entries = _fp8_kv_roundtrip(entries, self.rd, self.scale_fmt)
        return entries, req, epos


def adjacent_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a [n, K]`` and ``b [m, K]`` (same values) as the two row ranges of one contiguous ``[n + m, K]`` tensor,
    so that an op that stacks them (``compressor_ragged`` projects x on ``wkv | wgate`` in one GEMM) takes the
    stack without copying it."""
    both = torch.cat([a, b])
    return both[:a.shape[0]], both[a.shape[0]:]


def bf16_if_exact(w: torch.Tensor) -> torch.Tensor | None:
    """``w`` in bf16 when every value is a bf16 value (the conversion is then exact), else None."""
    low = w.to(torch.bfloat16)
    return low if torch.equal(low.float(), w.float()) else None


def write_entries(cache: torch.Tensor, layout: str, done: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                   table: torch.Tensor, block_size: int) -> None:
    """Write what a `Compressor` returned (``done``: compressed ``entries [N, D]`` of batch rows ``req`` at entry
    indices ``epos``, -1 for unused rows; None: nothing)."""
    if done is None:
        return
    entries, req, epos = done
    slots = v4hal.paged_slots(epos.unsqueeze(1), table, block_size, req_index=req.clamp_min(0)).squeeze(1)
    v4hal.paged_cache_write(cache, entries.contiguous(), slots, layout)


class Indexer(nn.Module):
    """Lightning indexer of ratio-4 layers: picks ``index_topk`` compressed entries per query."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.rd, self.topk, self.ratio = cfg.rope_head_dim, cfg.index_topk, 4
        self.weight_scale = self.head_dim ** -0.5 * self.n_heads ** -0.5
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, linear_kind(cfg), cfg)
        self.weights_proj = Linear(cfg.dim, self.n_heads, "bf16", cfg)
        self.compressor = Compressor(cfg, self.ratio, self.head_dim, rotate=True)
        self.weights_f32: torch.Tensor | None = None      # weights_proj widened to fp32, by prepare()

    def prepare(self) -> None:
        """After loading: the fp32 copy of ``weights_proj`` the head weights are computed with, and the
        compressor's bf16 weights."""
        self.weights_f32 = self.weights_proj.weight.float()
        self.compressor.prepare()

    def queries(self, qr: torch.Tensor, freqs: torch.Tensor, q_proj: torch.Tensor | None = None) -> torch.Tensor:
        """Indexer queries ``[b, s, H, D]`` bf16 of the q latent ``qr [b, s, q_lora_rank]`` with rope rows
        ``freqs [s, rd/2]``: projection (``q_proj`` when the caller fused it), rope, Hadamard, FP4 round trip."""
        q = (self.wq_b(qr) if q_proj is None else q_proj).unflatten(-1, (self.n_heads, self.head_dim))
        q = v4hal.hadamard_transform(rope_tail(q, freqs, self.rd))
        v4hal.fp4_act_quant(q, 32, inplace=True)
        return q

    def forward(self, x: torch.Tensor, qr: torch.Tensor, q_proj: torch.Tensor | None, freqs: torch.Tensor, step: Step,
                caches: LayerCaches, eps: float, freqs_cis: torch.Tensor) -> torch.Tensor:
        """The compressed entries each of the step's tokens attends to: x ``[1, T, dim]`` (bf16, normed), the q
        latent ``qr [1, T, q_lora_rank]`` (``q_proj``: its fused ``wq_b`` projection, or None), each token's
        rope rows ``freqs [T, rd/2]`` -> int32 ``[T, 1, topk]`` entry indices (-1 padded). Writes the indexer
        keys the step completes into ``caches.indexer`` first."""
        t = x.shape[1]
        done = self.compressor(x[0], step, caches.index_state, eps, freqs_cis)
        write_entries(caches.indexer, step.indexer_layout, done, step.batch.block_tables["c4"], step.batch.block_size)
        q = self.queries(qr, freqs, q_proj)
        weights = self.head_weights(x)
        return v4hal.indexer_topk_paged(q.view(t, 1, self.n_heads, self.head_dim), caches.indexer,
                                        weights.view(t, self.n_heads), step.c4_context, step.request_rows("c4"),
                                        self.topk, layout=step.indexer_layout)

    def head_weights(self, x: torch.Tensor) -> torch.Tensor:
        """bf16 ``[..., H]`` head weights of ``x [..., dim]`` (bf16): the fp32 GEMM of the widened bf16
        ``weights_proj`` rounded to bf16 (a bf16 GEMM with fp32 accumulation), times the scale (in bf16, as V4
        computes them; the dtype the CANN indexers take)."""
        w = self.weights_f32 if self.weights_f32 is not None else self.weights_proj.weight.float()
        return float_gemm(x.float(), w).to(torch.bfloat16) * self.weight_scale


class SharedKVAttention(nn.Module):
    """What V4's and V4.1's attention layers share on the paged path: the picks of ``sparse_attn_paged`` and the
    grouped low-rank output projection, and the shapes and the sink of layer ``layer_id``. Subclasses add
    the projections (``wo_a`` among them)."""

    def __init__(self, layer_id: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.head_dim, self.rd = cfg.n_heads, cfg.head_dim, cfg.rope_head_dim
        self.groups, self.o_rank = cfg.o_groups, cfg.o_lora_rank
        self.window, self.eps = cfg.window_size, cfg.norm_eps
        self.ratio = cfg.compress_ratios[layer_id]
        self.softmax_scale = cfg.head_dim ** -0.5
        self.register_buffer("attn_sink", torch.empty(cfg.n_heads, device=torch.device("meta")))

    def _grouped_out(self, o: torch.Tensor) -> torch.Tensor:
        """``o [b, s, h, d]`` -> per-group low-rank ``[b, s, groups * o_rank]`` through ``grouped_gemm``."""
        bsz, seqlen = o.shape[:2]
        t = bsz * seqlen
        x = o.reshape(t, self.groups, -1).transpose(0, 1).reshape(self.groups * t, -1)
        offsets = torch.arange(0, (self.groups + 1) * t, t, dtype=torch.int64, device=o.device)
        w = self.wo_a.weight.view(self.groups, self.o_rank, -1)
        y = v4hal.grouped_gemm(x, w, offsets, out_dtype=o.dtype)          # [g*t, r]
        return y.view(self.groups, t, self.o_rank).transpose(0, 1).reshape(bsz, seqlen, -1)

    def _picks(self, step: Step, kind: str, extra: torch.Tensor | None, extra_idx: torch.Tensor | None
               ) -> tuple[torch.Tensor | None, dict]:
        """The picks of ``sparse_attn_paged`` for this layer: the window ``indices`` (None for a band) and the
        other keyword arguments. ``extra``: the compressed cache (of ``kind`` pages) or None; ``extra_idx`` its
        entry indices ``[T, 1, k]``.

        The position form: the window as a band over each token's request pages, the compressed picks as entry
        indices into them (what the CANN shared-KV attention takes). Backends that read slots convert it in
        every call; where the reference serves the op (`Step.slot_form`) the step converts what every layer
        shares once instead (`Step.window_slots`, and the ratio-128 picks, which are the step's,
        `Step.c128_slots`) and passes slots: the same slots, so the same bits. The ratio-4 picks (the layer's
        own indexer's) stay entry indices."""
        t = step.positions.shape[0]
        positions = step.positions.view(t, 1)
        if not step.slot_form:
            return None, dict(extra_kv_cache=extra, extra_indices=extra_idx, positions=positions,
                              block_table=step.request_rows("token"), window_size=self.window,
                              extra_block_table=step.request_rows(kind) if extra is not None else None,
                              extra_ratio=self.ratio if extra is not None else 0)
        window = step.window_slots(self.window)
        if extra is None:
            return window, {}
        if self.ratio == 128:
            return window, dict(extra_kv_cache=extra, extra_indices=step.c128_slots())
        return window, dict(extra_kv_cache=extra, extra_indices=extra_idx, positions=positions,
                            extra_block_table=step.request_rows(kind), extra_ratio=self.ratio)


class Attention(SharedKVAttention):
    """Shared-KV multi-head attention over the sliding window plus compressed entries."""

    def __init__(self, layer_id: int, cfg: ModelConfig) -> None:
        super().__init__(layer_id, cfg)
        lin = linear_kind(cfg)
        self.scale_fmt = act_scale_format(cfg)[0]
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
        self.qkv_a: FusedLinear | None = None         # wq_a | wkv, built by prepare()
        self.q_b: FusedLinear | None = None           # wq_b | indexer.wq_b (both read qr)

    def prepare(self) -> None:
        """After loading: fuse the projections that share an input into single GEMMs (exact)."""
        parts = [self.wq_a, self.wkv]
        self.qkv_a = FusedLinear(parts) if FusedLinear.can_fuse(parts) else None
        if self.qkv_a is not None:
            self.qkv_a.fuse()
        if self.compressor is not None:
            self.compressor.prepare()
        if self.indexer is not None:
            self.indexer.prepare()
            parts = [self.wq_b, self.indexer.wq_b]
            self.q_b = FusedLinear(parts) if FusedLinear.can_fuse(parts) else None
            if self.q_b is not None:
                self.q_b.fuse()

    def _head_norm(self, q: torch.Tensor) -> torch.Tensor:
        if self._ones is None or self._ones.device != q.device:
            self._ones = torch.ones(self.head_dim, dtype=torch.float32, device=q.device)
        return v4hal.rms_norm(q, self._ones, self.eps)

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

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """This layer over the step's tokens: x ``[1, T, dim]`` bf16 (normed) -> ``[1, T, dim]`` bf16."""
        caches = step.caches[self.layer_id]
        bs = step.batch.block_size
        t = x.shape[1]
        rd, ratio = self.rd, self.ratio
        freqs = self.freqs_cis[step.positions]                                 # [T, rd/2]: each token's position
        qr, iq, q, kv = self.project(x, freqs)
        v4hal.paged_cache_write(caches.window, kv[0].contiguous(), step.token_slots, step.attn_layout)

        extra = extra_idx = None
        kind = "c4" if ratio == 4 else "c128"
        if ratio:
            x2 = x[0]
            done = self.compressor(x2, step, caches.state, self.eps, self.freqs_cis)
            write_entries(caches.compressed, step.attn_layout, done, step.batch.block_tables[kind], bs)
            extra = caches.compressed
            if ratio == 4:
                extra_idx = self.indexer(x, qr, iq, freqs, step, caches, self.eps, self.freqs_cis)
            elif step.c128_picks is not None:
                extra_idx = step.c128_picks
            else:
                extra = None
        indices, picks = self._picks(step, kind, extra, extra_idx)
        o = v4hal.sparse_attn_paged(q.view(t, 1, self.n_heads, self.head_dim), caches.window, indices, self.attn_sink,
                                    self.softmax_scale, layout=step.attn_layout, **picks)
        o = rope_tail(o.view(1, t, self.n_heads, self.head_dim), freqs, rd, inverse=True)
        return self.wo_b(self._grouped_out(o))
