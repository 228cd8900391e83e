"""DeepSeek-V4.1 attention over paged caches, one `Step` at a time: sliding window + CSA2 shared compressed KV,
the indexer with shared keys, and the candidate (two-level) top-k.

Per layer ``i`` of compress ratio ``r`` (the cache path of V4.1's public code, written on v4hal ops):

1. ``qr = q_norm(wq_a(x))``, ``q = wq_b(qr)`` (no per-head norm of q, unlike V4); ``kv = kv_norm(wkv(x))``
   (V4.1's norms, `V41RMSNorm`, round to bf16 before and after the weight);
   rope on the last ``rope_head_dim`` dims of q and kv at each token's position (the compress rope, theta
   and YaRN, when ``r > 0``, else the main rope); kv gets the window cache's FP8 round trip (e4m3 with one
   ue8m0 scale per 32 values, every dim) and is written at the token's ``"token"`` slot.
2. KV source (``i in cfg.kv_source_layers``): its `CSA2Compressor` (``csa2_compressor_ragged``: ratio 2
   gated pooling or ratio 1, unfinished groups kept in the ``"state2"`` pages across calls) emits the
   entries the step completes; they get the FP4 round trip of the compressed cache (e2m1, e4m3 scale per
   16) and are written to the layer's compressed cache (``"c{r}"`` pages). An index source that is a KV
   source also derives the indexer keys from the compressor's pre-rope latent:
   ``FP4(rope(k_norm(wk(latent))))`` (e2m1, ue8m0 scale per 32) at the group's position ``g * r``.
3. Index source (``i in cfg.index_source_layers``): queries ``FP4(rope(indexer.wq_b(qr)))``, head weights
   ``bf16(weights_proj(x)) * D**-0.5 * H**-0.5`` (fp32), scored against the keys of its KV source
   (``cfg.kv_source_of(i)``); the candidate source (``cfg.candidate_source_layer``) scores every visible
   entry, keeps its top ``index_topk`` and publishes its best ``candidate_topk_blocks`` blocks of
   ``candidate_block_size`` entries (``indexer_candidate_blocks``); later index sources score only inside
   those blocks (``indexer_topk_paged_sparse``). The picks (entry indices ``[T, 1, index_topk]``, -1 padded,
   equal scores by ascending entry) live in the step (`Step.plans`), never in the module.
4. ``sparse_attn_paged`` over the window band plus the source's compressed cache at the picks of
   ``cfg.index_source_of(i)`` (one softmax with the sink; entry ``g`` visible at ``p`` iff
   ``g < (p + 1) // r``); inverse rope of the output, grouped ``wo_a`` (``grouped_gemm``), ``wo_b``.

Consumer layers (ratio > 0, not a source) own no compressor and no compressed cache: they read their
source's, written earlier in the same step (layers run in order). The FP8 / FP4 round trips are the cache
formats' own (`v4hal.hal.formats`), so ``v41_window_fp8`` / ``v41_compressed_fp4`` / ``indexer_fp4`` pages
store exactly what ``bf16`` pages do.
"""
from __future__ import annotations

import torch
from torch import nn

import v4hal
from v4hal.hal import formats
from v4hal.hal.errors import RangeError

from .attention import SharedKVAttention, adjacent_pair, bf16_if_exact, rope_tail, write_entries
from .caches import LayerCaches, compressed_layout
from .config import ModelConfig
from .layers import FusedLinear, Linear, RMSNorm
from .spec import linear_kind
from .step import Step

__all__ = ["V41RMSNorm", "CSA2Compressor", "V41Indexer", "V41Attention", "window_round_trip", "compressed_round_trip",
           "topk_plan_key", "CANDIDATES_PLAN"]

#: `Step.plans` key of the candidate blocks the candidate source publishes (int32 ``[T, 1, n_blocks]``)
CANDIDATES_PLAN = "v41:candidates"


def topk_plan_key(layer_id: int) -> str:
    """`Step.plans` key of index source ``layer_id``'s picks (int32 ``[T, 1, index_topk]`` entry indices)."""
    return f"v41:topk:{layer_id}"


def window_round_trip(x: torch.Tensor) -> torch.Tensor:
    """bf16 ``[..., D]`` -> bf16: the ``v41_window_fp8`` cache's FP8 round trip (e4m3, one ue8m0 scale per 32
    values, the scale floored at 1e-4 after the division by 448, as FlashMLA's format stores it; the public
    PyTorch model floors the block amax at 1e-4 instead, which differs only for blocks whose amax is below
    448e-4)."""
    y, s = formats.fp8_cache_block_quant(x)
    return formats.fp8_block_dequant(y, s).to(x.dtype)


def compressed_round_trip(x: torch.Tensor) -> torch.Tensor:
    """bf16 ``[..., D]`` -> bf16: the ``v41_compressed_fp4`` cache's FP4 round trip (e2m1, one e4m3 scale per
    16 values)."""
    return formats.fp4_e4m3_round_trip(x).to(x.dtype)


def _fused(parts: list[Linear]) -> FusedLinear | None:
    """``parts`` (reading one input) as one fused GEMM, or None where they cannot be fused."""
    if not FusedLinear.can_fuse(parts):
        return None
    fused = FusedLinear(parts)
    fused.fuse()
    return fused


class V41RMSNorm(RMSNorm):
    """V4.1's RMSNorm: ``x * rsqrt(mean(x**2) + eps)`` rounded to x's dtype (``rms_norm`` with a unit weight), then
    times the weight, rounded again (V4's `RMSNorm` rounds once)."""

    _ones: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._ones is None or self._ones.device != x.device:
            self._ones = torch.ones(self.weight.shape[0], dtype=torch.float32, device=x.device)
        return (v4hal.rms_norm(x, self._ones, self.eps).float() * self.weight).to(x.dtype)


class CSA2Compressor(nn.Module):
    """A KV source's compressor (``csa2_compressor_ragged``): ratio 2 pools pairs with a per-channel softmax
    gate, ratio 1 projects each token; RMSNorm, then rope at the group's position inside the op."""

    def __init__(self, cfg: ModelConfig, ratio: int) -> None:
        super().__init__()
        self.ratio = ratio
        self.wkv = Linear(cfg.dim, cfg.head_dim, "f32", cfg)
        self.wgate = Linear(cfg.dim, cfg.head_dim, "f32", cfg) if ratio == 2 else None
        self.norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.eps = cfg.norm_eps
        #: (wkv, wgate or None, norm weight) in bf16 when every value is a bf16 value, set by `prepare`
        self.low: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None

    def prepare(self) -> None:
        """After loading: bf16 copies of the weights when exact (the op computes in fp32 from either)."""
        if self.wgate is not None:
            wkv, wgate = adjacent_pair(self.wkv.weight, self.wgate.weight)
            self.wkv._buffers["weight"], self.wgate._buffers["weight"] = wkv, wgate
            w = bf16_if_exact(torch.cat([wkv, wgate]))
            parts = (None, None) if w is None else tuple(w.split(wkv.shape[0]))
        else:
            parts = (bf16_if_exact(self.wkv.weight), None)
        norm = bf16_if_exact(self.norm.weight)
        ok = parts[0] is not None and norm is not None
        self.low = (parts[0], parts[1], norm) if ok else None

    def forward(self, x: torch.Tensor, step: Step, state: torch.Tensor | None, freqs_cis: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The entries the step's tokens ``x [T, dim]`` (bf16) complete: ``(entries, latent)`` ``[N, head_dim]``
        bf16 (roped / pre-rope) with request rows and entry indices int32 ``[N]`` (-1 unused), or None when the
        step completes none (the state is updated either way). ``state``: the fp32 ``"state2"`` cache (ratio
        2; None at ratio 1); ``freqs_cis``: the layer's compress rope table."""
        b = step.batch
        wkv, wgate, norm = self.low or (self.wkv.weight, None if self.wgate is None else self.wgate.weight,
                                        self.norm.weight)
        if self.ratio == 2:
            table = step.state_tables[2]
        else:   # ratio 1 keeps no state: a one-row cache and an empty table, never read
            state = step.plan("v41:no_state", lambda: x.new_zeros(1, 1, 2 * norm.shape[0], dtype=torch.float32))
            table = step.plan("v41:no_table", lambda: b.start_pos.new_zeros(b.num_requests, 0))
        entries, latent, req, epos = v4hal.csa2_compressor_ragged(
            x, wkv, wgate, norm, freqs_cis, state, table, b.cu_seqlens, b.start_pos, self.ratio, self.eps)
        if not step.completed[self.ratio]:
            return None
        return entries, latent, req, epos


class V41Indexer(nn.Module):
    """The indexer of a V4.1 index-source layer; at a KV source it also owns the key projection."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.head_dim, self.rd = cfg.index_n_heads, cfg.index_head_dim, cfg.rope_head_dim
        self.topk = cfg.index_topk
        self.weight_scale = self.head_dim ** -0.5 * self.n_heads ** -0.5
        self.source = cfg.kv_source_of(layer_id)
        self.ratio = cfg.compress_ratios[self.source]
        cand = cfg.candidate_source_layer
        self.publishes = layer_id == cand
        self.restricted = 0 <= cand < layer_id
        if self.restricted and cfg.kv_source_of(cand) != self.source:
            raise RangeError(f"V41Indexer: layer {layer_id} selects inside the candidate blocks of layer {cand}, "
                             f"which index the entries of KV source {cfg.kv_source_of(cand)}; its own keys are KV "
                             f"source {self.source}'s: a candidate source must share the KV source of every later "
                             f"index source")
        self.n_blocks, self.block = cfg.candidate_topk_blocks, cfg.candidate_block_size
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, linear_kind(cfg), cfg)
        self.weights_proj = Linear(cfg.dim, self.n_heads, "bf16", cfg)
        self.owns_keys = layer_id in cfg.kv_source_layers
        if self.owns_keys:
            self.wk = Linear(cfg.head_dim, self.head_dim, "bf16", cfg)
            self.k_norm = V41RMSNorm(self.head_dim, cfg.norm_eps)

    def keys(self, latent: torch.Tensor, epos: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        """Indexer keys ``[N, index_head_dim]`` bf16 of the compressor's pre-rope ``latent [N, head_dim]`` at
        entry indices ``epos [N]`` (-1 unused): ``k_norm(wk(latent))``, rope at ``g * ratio``, FP4 round trip."""
        k = self.k_norm(self.wk(latent))
        f = freqs_cis[(epos.long().clamp_min(0) * self.ratio)]
        k = rope_tail(k.unsqueeze(0), f, self.rd)[0].contiguous()
        v4hal.fp4_act_quant(k, 32, inplace=True)
        return k

    def forward(self, x: torch.Tensor, qr: torch.Tensor, freqs: torch.Tensor, step: Step,
                cache: torch.Tensor, q_proj: torch.Tensor | None = None) -> torch.Tensor:
        """Entry indices int32 ``[T, 1, index_topk]`` (-1 padded) each token attends to: x ``[1, T, dim]`` bf16
        (normed), the q latent ``qr [1, T, q_lora_rank]`` (``q_proj``: its ``wq_b`` projection when the caller
        fused it), each token's rope rows ``freqs [T, rd/2]``, ``cache`` the KV source's indexer keys. Publishes
        the candidate blocks at the candidate source."""
        t = x.shape[1]
        proj = self.wq_b(qr) if q_proj is None else q_proj
        q = rope_tail(proj.unflatten(-1, (self.n_heads, self.head_dim)), freqs, self.rd).contiguous()
        v4hal.fp4_act_quant(q, 32, inplace=True)
        q = q.view(t, 1, self.n_heads, self.head_dim)
        w = self.weights_proj(x[0]).float() * self.weight_scale                            # [T, H] fp32
        kind = f"c{self.ratio}"
        ctx = step.plan(f"v41:context:{self.ratio}",
                        lambda: ((step.positions + 1) // self.ratio).to(torch.int32))
        rows = step.request_rows(kind)
        layout = step.indexer_layout
        cands = step.plans.get(CANDIDATES_PLAN) if self.restricted else None
        if cands is not None:
            return v4hal.indexer_topk_paged_sparse(q, cache, w, ctx, rows, cands, self.topk,
                                                   candidate_block=self.block, layout=layout)
        if self.publishes:
            width = max(1, step.batch.max_context_len // self.ratio)
            logits = v4hal.indexer_logits_paged(q, cache, w, ctx, rows, width, layout=layout)
            step.plans[CANDIDATES_PLAN] = v4hal.indexer_candidate_blocks(logits, ctx, self.n_blocks,
                                                                         candidate_block=self.block)
        return v4hal.indexer_topk_paged(q, cache, w, ctx, rows, self.topk, layout=layout)


class V41Attention(SharedKVAttention):
    """One V4.1 attention layer (see the module docstring); checkpoint names as V4's plus ``compressor``
    (KV sources) and ``indexer`` (index sources)."""

    def __init__(self, layer_id: int, cfg: ModelConfig) -> None:
        super().__init__(layer_id, cfg)
        lin = linear_kind(cfg)
        self.source = cfg.kv_source_of(layer_id)
        self.index_source = cfg.index_source_of(layer_id)
        self.wq_a = Linear(cfg.dim, cfg.q_lora_rank, lin, cfg)
        self.q_norm = V41RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
        self.wq_b = Linear(cfg.q_lora_rank, cfg.n_heads * cfg.head_dim, lin, cfg)
        self.wkv = Linear(cfg.dim, cfg.head_dim, lin, cfg)
        self.kv_norm = V41RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.wo_a = Linear(cfg.n_heads * cfg.head_dim // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, "bf16", cfg)
        self.wo_b = Linear(cfg.o_groups * cfg.o_lora_rank, cfg.dim, lin, cfg)
        self.compressor = CSA2Compressor(cfg, self.ratio) if layer_id in cfg.kv_source_layers else None
        self.indexer = V41Indexer(cfg, layer_id) if layer_id in cfg.index_source_layers else None
        self.register_buffer("freqs_cis", torch.empty(cfg.max_seq_len, cfg.rope_head_dim // 2,
                                                      dtype=torch.complex64, device=torch.device("meta")),
                             persistent=False)
        self.qkv_a: FusedLinear | None = None         # wq_a | wkv, built by prepare()
        self.q_b: FusedLinear | None = None           # wq_b | indexer.wq_b (both read qr)

    def prepare(self) -> None:
        """After loading: fuse the projections that share an input (``wq_a | wkv`` on x, ``wq_b | indexer.wq_b``
        on the q latent) into single GEMMs, and the compressor's bf16 weight copies."""
        self.qkv_a = _fused([self.wq_a, self.wkv])
        self.q_b = _fused([self.wq_b, self.indexer.wq_b]) if self.indexer is not None else None
        if self.compressor is not None:
            self.compressor.prepare()

    def project(self, x: torch.Tensor, freqs: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """x ``[1, T, dim]`` (normed) with rope rows ``freqs [T, rd/2]`` -> the q latent ``qr``, the indexer's
        projection of it when fused (else None), ``q [1, T, h, d]`` (roped) and ``kv [1, T, d]`` (normed,
        roped; `forward` gives it the window cache's FP8 rounding)."""
        rd = self.rd
        qa, kva = self.qkv_a(x) if self.qkv_a is not None else (self.wq_a(x), self.wkv(x))
        qr = self.q_norm(qa)
        qb, iq = self.q_b(qr) if self.q_b is not None else (self.wq_b(qr), None)
        q = qb.unflatten(-1, (self.n_heads, self.head_dim))
        kv = self.kv_norm(kva)
        tails = v4hal.rotary_emb(torch.cat([q[..., -rd:], kv[..., -rd:].unsqueeze(2)], dim=2), freqs)
        q = torch.cat([q[..., :-rd], tails[:, :, :-1]], dim=-1)
        kv = torch.cat([kv[..., :-rd], tails[:, :, -1]], dim=-1)
        return qr, iq, q, kv

    def _compress(self, x: torch.Tensor, step: Step, caches: LayerCaches) -> None:
        """KV source: run the compressor; write the compressed KV (and, at an index source, the keys)."""
        done = self.compressor(x[0], step, caches.state, self.freqs_cis)
        if done is None:
            return
        entries, latent, req, epos = done
        kind, bs = f"c{self.ratio}", step.batch.block_size
        table = step.batch.block_tables[kind]
        write_entries(caches.compressed, compressed_layout(True, step.attn_layout),
                       (compressed_round_trip(entries), req, epos), table, bs)
        if self.indexer is not None:
            write_entries(caches.indexer, step.indexer_layout,
                           (self.indexer.keys(latent, epos, self.freqs_cis), req, epos), table, bs)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """This layer over the step's tokens: x ``[1, T, dim]`` bf16 (normed) -> ``[1, T, dim]`` bf16."""
        caches = step.caches[self.layer_id]
        t = x.shape[1]
        freqs = self.freqs_cis[step.positions]                                 # [T, rd/2]
        qr, iq, q, kv = self.project(x, freqs)
        if step.attn_layout != "v41_window_fp8":     # those pages round it themselves, to the same values
            kv = window_round_trip(kv)
        v4hal.paged_cache_write(caches.window, kv[0].contiguous(), step.token_slots, step.attn_layout)
        extra = picks = None
        kind = f"c{self.ratio}"
        if self.ratio:
            if self.compressor is not None:
                self._compress(x, step, caches)
            src = step.caches[self.source]
            if self.indexer is not None:
                step.plans[topk_plan_key(self.layer_id)] = self.indexer(x, qr, freqs, step, src.indexer, iq)
            picks = step.plans.get(topk_plan_key(self.index_source))
            extra = src.compressed if picks is not None else None
        indices, kw = self._picks(step, kind, extra, picks)
        if extra is not None:
            kw["extra_layout"] = compressed_layout(True, step.attn_layout)
        o = v4hal.sparse_attn_paged(q.view(t, 1, self.n_heads, self.head_dim), caches.window, indices, self.attn_sink,
                                    self.softmax_scale, layout=step.attn_layout, **kw)
        o = rope_tail(o.view(1, t, self.n_heads, self.head_dim), freqs, self.rd, inverse=True)
        return self.wo_b(self._grouped_out(o))
