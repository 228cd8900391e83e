"""An independent float64 re-derivation of DeepSeek-V4.1's attention layers (prefill of one sequence), for tests.

Written from the semantics of V4.1's public cache path (not from v4hal's code): per layer the low-rank query
without a per-head norm, the window KV with its FP8 round trip (e4m3, ue8m0 scale per 32 of every dim), the
CSA2 compressor of the KV sources (ratio 2: per-channel softmax over the pair; ratio 1: one entry per token),
the compressed KV's FP4 round trip (e2m1, e4m3 scale per 16), indexer keys from the pre-rope latent
(``k_norm(wk(latent))``, rope at ``g * ratio``, FP4 per 32 with ue8m0 scales), indexer queries
``FP4(rope(wq_b(qr)))``, the score ``sum_h relu(q.k) * D**-0.5 * w_h * H**-0.5``, the candidate blocks of the
candidate source (block max, the newest block pinned) restricting later index sources, the top-k reused by
the layers up to the next index source, attention over [window ; picked entries] with the sink, the inverse
rope and the grouped output projection.

Every layer reads the same input ``x`` (layers interact only through the shared caches, top-k and
candidates). Math in float64; the places where a bf16 model rounds to bf16 are reproduced with `bf`. The
helpers (bf16 / e2m1 / FP4 rounding, YaRN angles, rotary) come from `ref_v4`, the V4 re-derivation. Equal
scores go to the lower entry (block) index, as v4hal's indexer ops rank them.
"""
from __future__ import annotations

import torch
from ref_v4 import F64, bf, e2m1_round, fp4_act, fp8_round, pow2_ceil, rope, yarn_freqs

from v4hal.model.config import ModelConfig


def window_fp8(x: torch.Tensor) -> torch.Tensor:
    """The window cache's FP8 round trip: blocks of 32, scale ``2**ceil(log2(max(amax / 448, 1e-4)))``."""
    xb = x.unflatten(-1, (-1, 32))
    s = pow2_ceil((xb.abs().amax(-1, keepdim=True) / 448.0).clamp_min(1e-4))
    return (fp8_round((xb / s).clamp(-448, 448)) * s).flatten(-2)


def fp4_e4m3(x: torch.Tensor) -> torch.Tensor:
    """The compressed cache's FP4 round trip: blocks of 16, scale ``e4m3(clamp(amax / 6, 2**-9, 448))``."""
    xb = x.unflatten(-1, (-1, 16))
    s = fp8_round((xb.abs().amax(-1, keepdim=True).to(torch.float32) / 6.0).clamp(2.0 ** -9, 448).to(F64))
    return (e2m1_round((xb.to(torch.float32) / s.to(torch.float32)).to(F64).clamp(-6, 6)) * s).flatten(-2)


def stable_top(scores: torch.Tensor, k: int) -> list[int]:
    """The indices of the ``k`` best finite-or-inf scores (not ``-inf``), equal scores by lower index."""
    order = sorted(range(scores.shape[0]), key=lambda j: (-float(scores[j]), j))
    return [j for j in order[:k] if scores[j] > float("-inf")]


class RefV41Attention:
    """The attention layers of ``cfg`` (a V4.1 config) from checkpoint ``tensors`` (name -> tensor, bf16 Linear
    weights); `run` gives each layer's output for one sequence at positions ``0 .. T-1``."""

    def __init__(self, cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
        self.cfg, self.t = cfg, tensors
        rd, s = cfg.rope_head_dim, cfg.max_seq_len
        self.main = yarn_freqs(rd, s, cfg.rope_theta, cfg.rope_factor, 0, cfg.beta_fast, cfg.beta_slow)
        self.comp = yarn_freqs(rd, s, cfg.compress_rope_theta, cfg.rope_factor, cfg.original_seq_len,
                               cfg.beta_fast, cfg.beta_slow)
        #: what `run` saw: candidate block ids per token, each index source's picks per token
        self.candidates: list[list[int]] | None = None
        self.picks: dict[int, list[list[int]]] = {}

    def w(self, name: str) -> torch.Tensor:
        return self.t[name].to(F64)

    def lin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return bf(x @ self.w(name).T)

    def rms(self, x: torch.Tensor, name: str) -> torch.Tensor:
        y = bf(x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.cfg.norm_eps))
        return bf(y * self.w(name))

    def rope_tail(self, x: torch.Tensor, ang: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        rd = self.cfg.rope_head_dim
        tail = rope(x[..., -rd:].unsqueeze(0), ang, inverse)[0]
        return bf(torch.cat([x[..., :-rd], tail], dim=-1))

    def compress(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """KV source ``i``: (compressed KV after its FP4 round trip ``[G, D]``, pre-rope latent ``[G, D]``)."""
        r, p = self.cfg.compress_ratios[i], f"layers.{i}.attn.compressor"
        if r == 2:
            kv, gate = x @ self.w(f"{p}.wkv.weight").T, x @ self.w(f"{p}.wgate.weight").T
            g = x.shape[0] // 2
            kv, gate = kv[:2 * g].view(g, 2, -1), gate[:2 * g].view(g, 2, -1)
            pooled = (kv * torch.softmax(gate, dim=1)).sum(1)
            latent = self.rms(bf(pooled), f"{p}.norm.weight")
        else:
            latent = self.rms(self.lin(x, f"{p}.wkv.weight"), f"{p}.norm.weight")
        ang = self.comp[torch.arange(latent.shape[0]) * r]
        return fp4_e4m3(self.rope_tail(latent, ang)), latent

    def keys(self, i: int, latent: torch.Tensor) -> torch.Tensor:
        p, r = f"layers.{i}.attn.indexer", self.cfg.compress_ratios[i]
        k = self.rms(self.lin(latent, f"{p}.wk.weight"), f"{p}.k_norm.weight")
        return fp4_act(self.rope_tail(k, self.comp[torch.arange(latent.shape[0]) * r]))

    def index(self, i: int, x: torch.Tensor, qr: torch.Tensor, keys: torch.Tensor, use_candidates: bool
              ) -> list[list[int]]:
        cfg, p = self.cfg, f"layers.{i}.attn.indexer"
        t, h, d = x.shape[0], cfg.index_n_heads, cfg.index_head_dim
        r = cfg.compress_ratios[i]
        q = fp4_act(self.rope_tail(self.lin(qr, f"{p}.wq_b.weight").view(t, h, d), self.comp[:t]))
        w = bf(x @ self.w(f"{p}.weights_proj.weight").T) * h ** -0.5
        score = (torch.relu(torch.einsum("thd,gd->thg", q, keys)) * d ** -0.5 * w.unsqueeze(-1)).sum(1)
        ctx = [(pos + 1) // r for pos in range(t)]
        score = torch.where(torch.arange(keys.shape[0])[None] < torch.tensor(ctx)[:, None], score, float("-inf"))
        if i == cfg.candidate_source_layer:
            cb = cfg.candidate_block_size
            nb = -(-keys.shape[0] // cb)
            pad = torch.full((t, nb * cb), float("-inf"), dtype=F64)
            pad[:, :keys.shape[0]] = score
            blocks = pad.view(t, nb, cb).amax(-1)
            self.candidates = []
            for row in range(t):
                b = blocks[row].clone()
                if ctx[row]:
                    b[(ctx[row] - 1) // cb] = float("inf")
                self.candidates.append(sorted(stable_top(b, cfg.candidate_topk_blocks)))
        elif use_candidates and 0 <= cfg.candidate_source_layer < i:
            cb = cfg.candidate_block_size
            for row in range(t):
                keep = torch.zeros(keys.shape[0], dtype=torch.bool)
                for c in self.candidates[row]:
                    keep[c * cb:(c + 1) * cb] = True
                score[row] = torch.where(keep, score[row], float("-inf"))
        return [stable_top(score[row], cfg.index_topk) for row in range(t)]

    def run(self, x: torch.Tensor, use_candidates: bool = True) -> list[torch.Tensor]:
        """Each layer's output ``[T, dim]`` (float64 holding bf16 values) for the input ``x [T, dim]`` (bf16 values)
        at positions ``0 .. T-1``; ``use_candidates=False`` ignores the candidate restriction."""
        cfg = self.cfg
        t, h, d = x.shape[0], cfg.n_heads, cfg.head_dim
        comp: dict[int, torch.Tensor] = {}
        keys: dict[int, torch.Tensor] = {}
        outs = []
        for i, r in enumerate(cfg.compress_ratios):
            a = f"layers.{i}.attn"
            ang = (self.comp if r else self.main)[:t]
            qr = self.rms(self.lin(x, f"{a}.wq_a.weight"), f"{a}.q_norm.weight")
            q = self.rope_tail(self.lin(qr, f"{a}.wq_b.weight").view(t, h, d), ang)
            kv = window_fp8(self.rope_tail(self.rms(self.lin(x, f"{a}.wkv.weight"), f"{a}.kv_norm.weight"), ang))
            if i in cfg.kv_source_layers:
                comp[i], latent = self.compress(i, x)
                if i in cfg.index_source_layers:
                    keys[i] = self.keys(i, latent)
            if i in cfg.index_source_layers:
                self.picks[i] = self.index(i, x, qr, keys[cfg.kv_source_of(i)], use_candidates)
            sink = self.w(f"{a}.attn_sink")
            o = torch.zeros(t, h, d, dtype=F64)
            for p in range(t):
                kvs = [kv[max(0, p - cfg.window_size + 1):p + 1]]
                if r:
                    picked = self.picks[cfg.index_source_of(i)][p]
                    kvs.append(comp[cfg.kv_source_of(i)][picked])
                k = torch.cat(kvs)
                logits = q[p] @ k.T * d ** -0.5                                   # [h, n]
                m = torch.maximum(logits.amax(-1), sink)
                e = torch.exp(logits - m[:, None])
                o[p] = (e / (e.sum(-1) + torch.exp(sink - m))[:, None]) @ k
            o = self.rope_tail(bf(o), ang, inverse=True)
            g, rank = cfg.o_groups, cfg.o_lora_rank
            wo_a = self.w(f"{a}.wo_a.weight").view(g, rank, -1)
            low = bf(torch.einsum("tgk,grk->tgr", o.reshape(t, g, -1), wo_a)).reshape(t, g * rank)
            outs.append(self.lin(low, f"{a}.wo_b.weight"))
        return outs
