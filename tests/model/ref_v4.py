"""An independent float64 re-implementation of the DeepSeek-V4 forward pass (prefill), for tests.

It reads a checkpoint in the public inference naming straight from the safetensors file (not
through `v4hal.model.checkpoint`) and re-derives the computation of the public
``inference/model.py`` with none of v4hal's code: its own FP8/FP4 codecs, YaRN table, rotary,
Hadamard, KV pooling, indexer, sparse attention with sink, MoE, mHC and head.

Math runs in float64. The public code keeps activations in bf16 between steps; the places
where it rounds to bf16 are reproduced with `bf` so that the quantizers (FP8 KV round trips,
FP4 indexer round trips, FP8 activation blocks) see the same inputs as the model under test.
Only prefill (``start_pos == 0``) is implemented: decode is checked against prefill elsewhere.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

F64 = torch.float64
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=F64)


def bf(x: torch.Tensor) -> torch.Tensor:
    """Round to bf16 (nearest even) and back to float64."""
    return x.to(torch.bfloat16).to(F64)


def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.ceil(torch.log2(x)))


def fp8_round(v: torch.Tensor) -> torch.Tensor:
    """Nearest e4m3 value (v already within +-448)."""
    return v.to(torch.float32).to(torch.float8_e4m3fn).to(F64)


def e2m1_round(v: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 value, ties to the even code (v already within +-6)."""
    a = v.abs()
    dist = (a.unsqueeze(-1) - E2M1).abs()
    best = dist.min(dim=-1, keepdim=True).values
    cand = (dist == best)
    # among equally near grid points take the one with an even code index
    even = cand & (torch.arange(8) % 2 == 0)
    idx = torch.where(even.any(-1), even.float().argmax(-1), cand.float().argmax(-1))
    return E2M1[idx] * torch.sign(v)


def fp8_act(x: torch.Tensor, block: int, pow2: bool) -> torch.Tensor:
    """FP8 quantize-dequantize per ``block`` along the last dim (the activation recipe)."""
    xb = x.unflatten(-1, (-1, block))
    s = xb.abs().amax(-1, keepdim=True).clamp_min(1e-4) / 448.0
    if pow2:
        s = pow2_ceil(s)
    return (fp8_round((xb / s).clamp(-448, 448)) * s).flatten(-2)


def fp4_act(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    xb = x.unflatten(-1, (-1, block))
    s = pow2_ceil(xb.abs().amax(-1, keepdim=True).clamp_min(6 * 2.0 ** -126) / 6.0)
    return (e2m1_round((xb / s).clamp(-6, 6)) * s).flatten(-2)


def e8m0(s: torch.Tensor) -> torch.Tensor:
    if s.dtype == torch.float8_e8m0fnu:
        return torch.exp2(s.view(torch.uint8).to(F64) - 127)
    return s.to(F64)


def dequant_fp8_weight(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    n, k = w.shape
    sc = e8m0(s).repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    return w.to(F64) * sc


def dequant_fp4_weight(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    u = w.view(torch.uint8).to(torch.int64)
    codes = torch.stack([u & 15, u >> 4], dim=-1).flatten(-2)
    vals = E2M1[codes & 7] * torch.where(codes >= 8, -1.0, 1.0).to(F64)
    return vals * e8m0(s).repeat_interleave(32, dim=-1)


def yarn_freqs(rd: int, seqlen: int, base: float, factor: float, orig: int, beta_fast: float,
               beta_slow: float) -> torch.Tensor:
    """float64 rotation angles ``[seqlen, rd/2]`` (YaRN-interpolated when ``orig > 0``)."""
    k = torch.arange(rd // 2, dtype=F64)
    inv = base ** (-2.0 * k / rd)
    if orig > 0:
        def dim_for(turns: float) -> float:
            return rd * math.log(orig / (turns * 2 * math.pi)) / (2 * math.log(base))
        lo, hi = max(math.floor(dim_for(beta_fast)), 0), min(math.ceil(dim_for(beta_slow)), rd - 1)
        w = ((k - lo) / ((hi - lo) or 0.001)).clamp(0, 1)          # 0: keep, 1: interpolate
        inv = inv * (1 - w) + inv / factor * w
    return torch.arange(seqlen, dtype=F64)[:, None] * inv[None, :]


def rope(x: torch.Tensor, ang: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim by ``ang [s, rd/2]`` (x ``[b, s, ..., rd]``)."""
    a = ang.to(torch.float32).to(F64)        # the public table is complex64
    c, s = torch.cos(a), torch.sin(a)
    if inverse:
        s = -s
    while c.dim() < x.dim() - 1:
        c, s = c.unsqueeze(-2), s.unsqueeze(-2)
    c, s = c.unsqueeze(0), s.unsqueeze(0)
    xr, xi = x[..., 0::2], x[..., 1::2]
    return torch.stack([xr * c - xi * s, xr * s + xi * c], dim=-1).flatten(-2)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    h = torch.ones(1, 1, dtype=F64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return x @ h * d ** -0.5


class RefV4:
    """Float64 V4 prefill from a checkpoint directory in the public inference layout (one rank file)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.c = json.loads((path / "config.json").read_text())
        self.w: dict[str, torch.Tensor] = {}
        with safe_open(str(path / "model0-mp1.safetensors"), framework="pt") as f:
            for k in f.keys():
                self.w[k] = f.get_tensor(k)
        self.pow2 = self.c.get("scale_fmt") is not None or self.c.get("scale_dtype") == "fp8"

    # ---------------------------------------------------------------- helpers
    def t(self, name: str) -> torch.Tensor:
        return self.w[name].to(F64)

    def weight(self, name: str) -> tuple[torch.Tensor, str]:
        w = self.w[f"{name}.weight"]
        if w.dtype == torch.float8_e4m3fn:
            return dequant_fp8_weight(w, self.w[f"{name}.scale"]), "fp8"
        if w.dtype in (torch.uint8, torch.int8) or str(w.dtype).startswith("torch.float4"):
            return dequant_fp4_weight(w, self.w[f"{name}.scale"]), "fp8"
        return w.to(F64), "float"

    def lin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The public ``linear``: FP8 weights quantize the activation per 128 first; bf16 output."""
        w, kind = self.weight(name)
        if kind == "fp8":
            x = fp8_act(x, 128, self.pow2)
        return bf(x @ w.T)

    def rms(self, x: torch.Tensor, name: str) -> torch.Tensor:
        eps = self.c.get("norm_eps", 1e-6)
        return bf(self.t(name) * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps))

    def angles(self, ratio: int, seqlen: int) -> torch.Tensor:
        c = self.c
        if ratio:
            return yarn_freqs(c["rope_head_dim"], seqlen, c["compress_rope_theta"], c["rope_factor"],
                              c["original_seq_len"], c["beta_fast"], c["beta_slow"])
        return yarn_freqs(c["rope_head_dim"], seqlen, c["rope_theta"], c["rope_factor"], 0, 0, 0)

    def rope_tail(self, x: torch.Tensor, ang: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        rd = self.c["rope_head_dim"]
        return torch.cat([x[..., :-rd], bf(rope(x[..., -rd:], ang, inverse))], dim=-1)

    # ---------------------------------------------------------------- mHC
    def hc_mixes(self, h: torch.Tensor, fn: str) -> torch.Tensor:
        flat = h.flatten(-2)
        r = torch.rsqrt(flat.square().mean(-1, keepdim=True) + self.c.get("norm_eps", 1e-6))
        return (flat @ self.t(fn).T) * r

    def hc_pre(self, h: torch.Tensor, part: str, p: str):
        hc, eps, iters = self.c["hc_mult"], self.c.get("hc_eps", 1e-6), self.c.get("hc_sinkhorn_iters", 20)
        m = self.hc_mixes(h, f"{p}.hc_{part}_fn")
        sc, base = self.t(f"{p}.hc_{part}_scale"), self.t(f"{p}.hc_{part}_base")
        pre = torch.sigmoid(m[..., :hc] * sc[0] + base[:hc]) + eps
        post = 2 * torch.sigmoid(m[..., hc:2 * hc] * sc[1] + base[hc:2 * hc])
        comb = (m[..., 2 * hc:] * sc[2] + base[2 * hc:]).unflatten(-1, (hc, hc)).softmax(-1) + eps
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
        for _ in range(iters - 1):
            comb = comb / (comb.sum(-1, keepdim=True) + eps)
            comb = comb / (comb.sum(-2, keepdim=True) + eps)
        return bf((pre.unsqueeze(-1) * h).sum(-2)), post, comb

    @staticmethod
    def hc_post(x: torch.Tensor, res: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        mixed = torch.einsum("...jk,...jd->...kd", comb, res)
        return bf(post.unsqueeze(-1) * x.unsqueeze(-2) + mixed)

    # ---------------------------------------------------------------- attention
    def compress(self, x: torch.Tensor, p: str, ratio: int, d: int, rotate: bool) -> torch.Tensor:
        """Compressed entries ``[b, s // ratio, d]`` of the prefix ``p`` (a ``Compressor``)."""
        b, s, _ = x.shape
        n = s // ratio
        if n == 0:
            return x.new_zeros(b, 0, d)
        kv = (x @ self.t(f"{p}.wkv.weight").T)[:, :n * ratio].unflatten(1, (n, ratio))
        sc = (x @ self.t(f"{p}.wgate.weight").T)[:, :n * ratio].unflatten(1, (n, ratio)) + self.t(f"{p}.ape")
        if ratio == 4:     # overlapping: first-half channels of the previous block + second half of this one
            prev_kv = torch.cat([torch.zeros_like(kv[:, :1, :, :d]), kv[:, :-1, :, :d]], dim=1)
            prev_sc = torch.cat([torch.full_like(sc[:, :1, :, :d], -math.inf), sc[:, :-1, :, :d]], dim=1)
            kv = torch.cat([prev_kv, kv[..., d:]], dim=2)
            sc = torch.cat([prev_sc, sc[..., d:]], dim=2)
        pooled = bf((kv * sc.softmax(dim=2)).sum(dim=2))
        e = self.rms(pooled, f"{p}.norm.weight")
        e = self.rope_tail(e, self.angles(ratio, s)[0:n * ratio:ratio])
        rd = self.c["rope_head_dim"]
        if rotate:
            return bf(fp4_act(bf(hadamard(e))))
        return torch.cat([bf(fp8_act(e[..., :-rd], 64, self.pow2)), e[..., -rd:]], dim=-1)

    def indexer_scores(self, x: torch.Tensor, qr: torch.Tensor, p: str) -> torch.Tensor:
        """Lightning-indexer logits ``[b, s, s // 4]`` (no mask)."""
        c = self.c
        s = x.shape[1]
        nh, hd = c["index_n_heads"], c["index_head_dim"]
        q = self.lin(qr, f"{p}.wq_b").unflatten(-1, (nh, hd))
        q = self.rope_tail(q, self.angles(4, s))
        q = bf(fp4_act(bf(hadamard(q))))
        k = self.compress(x, f"{p}.compressor", 4, hd, rotate=True)
        w = bf(self.lin(x, f"{p}.weights_proj") * (hd ** -0.5 * nh ** -0.5))
        return torch.einsum("bsh,bsht->bst", w, torch.einsum("bshd,btd->bsht", q, k).relu())

    def valid_picks(self, score: torch.Tensor, picks: list[list[set[int]]], rtol: float = 1e-5) -> list[str]:
        """Problems with ``picks`` as top-k sets of ``score`` (empty when every set is a valid top-k:
        right size, visible entries only, none scoring below the k-th best beyond ``rtol``)."""
        k = self.c["index_topk"]
        bad = []
        for bi, rows in enumerate(picks):
            for i, chosen in enumerate(rows):
                vis = (i + 1) // 4
                sc = score[bi, i, :vis]
                want = min(k, vis)
                if len(chosen) != want or any(j < 0 or j >= vis for j in chosen):
                    bad.append(f"b{bi} q{i}: {sorted(chosen)} is not {want} visible entries of {vis}")
                    continue
                if want == 0:
                    continue
                kth = sc.topk(want).values[-1]
                low = min(float(sc[j]) for j in chosen)
                if low < float(kth) - rtol * float(sc.abs().max()):
                    bad.append(f"b{bi} q{i}: picked entry scores {low:.6g} < k-th best {float(kth):.6g}")
        return bad

    def indexer_pick(self, x: torch.Tensor, qr: torch.Tensor, p: str) -> list[list[set[int]]]:
        """Per (batch, query): the set of compressed entries the lightning indexer selects."""
        c = self.c
        b, s, _ = x.shape
        score = self.indexer_scores(x, qr, p)
        picks = []
        for bi in range(b):
            rows = []
            for i in range(s):
                vis = (i + 1) // 4
                order = score[bi, i, :vis].argsort(descending=True)[:c["index_topk"]]
                rows.append(set(order.tolist()))
            picks.append(rows)
        return picks

    def attention(self, x: torch.Tensor, layer: int, p: str,
                  picks: list[list[set[int]]] | None = None) -> torch.Tensor:
        """One attention layer (prefill). ``picks``: indexer selections to use instead of this
        reference's own (the caller checks them with `valid_picks` first; ties make a top-k
        ambiguous, and FP4-quantized indexer queries/keys tie often)."""
        c = self.c
        b, s, _ = x.shape
        nh, hd, rd, win = c["n_heads"], c["head_dim"], c["rope_head_dim"], c["window_size"]
        ratio = c["compress_ratios"][layer]
        ang = self.angles(ratio, s)
        qr = self.rms(self.lin(x, f"{p}.wq_a"), f"{p}.q_norm.weight")
        q = self.lin(qr, f"{p}.wq_b").unflatten(-1, (nh, hd))
        q = bf(q * torch.rsqrt(q.square().mean(-1, keepdim=True) + c.get("norm_eps", 1e-6)))
        q = self.rope_tail(q, ang)
        kv = self.rope_tail(self.rms(self.lin(x, f"{p}.wkv"), f"{p}.kv_norm.weight"), ang)
        kv = torch.cat([bf(fp8_act(kv[..., :-rd], 64, self.pow2)), kv[..., -rd:]], dim=-1)
        comp = self.compress(x, f"{p}.compressor", ratio, hd, rotate=False) if ratio else kv[:, :0]
        if ratio == 4 and picks is None:
            picks = self.indexer_pick(x, qr, f"{p}.indexer")
        sink = self.t(f"{p}.attn_sink")
        out = torch.zeros(b, s, nh, hd, dtype=F64)
        for bi in range(b):
            for i in range(s):
                keys = [kv[bi, j] for j in range(max(0, i - win + 1), i + 1)]
                if ratio == 128:
                    keys += [comp[bi, j] for j in range((i + 1) // ratio)]
                elif ratio == 4:
                    keys += [comp[bi, j] for j in sorted(picks[bi][i])]
                kmat = torch.stack(keys)                                        # [n, hd]
                sc = q[bi, i] @ kmat.T * hd ** -0.5                             # [h, n]
                top = torch.maximum(sc.max(-1).values, sink)
                e = torch.exp(sc - top[:, None])
                out[bi, i] = (e @ kmat) / (e.sum(-1) + torch.exp(sink - top))[:, None]
        o = self.rope_tail(bf(out), ang, inverse=True)
        g, r = c["o_groups"], c["o_lora_rank"]
        wo_a = self.weight(f"{p}.wo_a")[0].view(g, r, -1)
        o = bf(torch.einsum("bsgd,grd->bsgr", o.view(b, s, g, -1), wo_a))
        return self.lin(o.flatten(2), f"{p}.wo_b")

    # ---------------------------------------------------------------- MoE
    def expert(self, x: torch.Tensor, p: str, w: torch.Tensor | None) -> torch.Tensor:
        lim = self.c.get("swiglu_limit", 0.0)
        gate, up = self.lin(x, f"{p}.w1"), self.lin(x, f"{p}.w3")
        if lim > 0:
            up, gate = up.clamp(-lim, lim), gate.clamp(max=lim)
        h = torch.nn.functional.silu(gate) * up
        if w is not None:
            h = w * h
        return self.lin(bf(h), f"{p}.w2")

    def moe(self, x: torch.Tensor, layer_id: int, p: str, ids: torch.Tensor) -> torch.Tensor:
        c = self.c
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        scores = torch.nn.functional.softplus(x @ self.t(f"{p}.gate.weight").T).sqrt()
        if layer_id < c["n_hash_layers"]:
            idx = self.w[f"{p}.gate.tid2eid"].long()[ids.reshape(-1)]
        else:
            idx = (scores + self.t(f"{p}.gate.bias")).topk(c["n_activated_experts"], dim=-1).indices
        wts = scores.gather(1, idx)
        wts = wts / wts.sum(-1, keepdim=True) * c["route_scale"]
        y = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for j in range(idx.shape[1]):
                y[t] += self.expert(x[t:t + 1], f"{p}.experts.{int(idx[t, j])}", wts[t, j])[0]
        y = y + self.expert(x, f"{p}.shared_experts", None)
        return bf(y).view(shape)

    # ---------------------------------------------------------------- model
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.t("embed.weight")[ids]
        return e.unsqueeze(2).repeat(1, 1, self.c["hc_mult"], 1)

    def attn_input(self, h: torch.Tensor, layer: int, prefix: str | None = None) -> torch.Tensor:
        """The attention input of block ``layer`` (after hc_pre and attn_norm)."""
        p = prefix or f"layers.{layer}"
        return self.rms(self.hc_pre(h, "attn", p)[0], f"{p}.attn_norm.weight")

    def block(self, h: torch.Tensor, layer: int, ids: torch.Tensor, prefix: str | None = None,
              picks: list[list[set[int]]] | None = None) -> torch.Tensor:
        """One block on ``h [b, s, hc, dim]`` (float64 holding bf16 values), positions 0..s-1."""
        p = prefix or f"layers.{layer}"
        x, post, comb = self.hc_pre(h, "attn", p)
        a = self.attention(self.rms(x, f"{p}.attn_norm.weight"), layer, f"{p}.attn", picks)
        h = self.hc_post(a, h, post, comb)
        x, post, comb = self.hc_pre(h, "ffn", p)
        return self.hc_post(self.moe(self.rms(x, f"{p}.ffn_norm.weight"), layer, f"{p}.ffn", ids), h, post, comb)

    def head(self, h: torch.Tensor, prefix: str = "") -> torch.Tensor:
        """Logits of the last position ``[b, vocab]`` from the stream ``h [b, s, hc, dim]``."""
        eps = self.c.get("hc_eps", 1e-6)
        m = self.hc_mixes(h[:, -1], f"{prefix}hc_head_fn")
        pre = torch.sigmoid(m * self.t(f"{prefix}hc_head_scale") + self.t(f"{prefix}hc_head_base")) + eps
        y = bf((pre.unsqueeze(-1) * h[:, -1]).sum(-2))
        y = self.rms(y, f"{prefix}norm.weight")
        return y @ self.t("head.weight").T

    def mtp(self, h: torch.Tensor, next_ids: torch.Tensor, j: int = 0) -> torch.Tensor:
        """MTP block ``j`` on the main final stream ``h`` and the following tokens ``next_ids``."""
        p = f"mtp.{j}"
        e = self.rms(self.t("embed.weight")[next_ids], f"{p}.enorm.weight")
        x = bf(self.lin(e, f"{p}.e_proj").unsqueeze(2) + self.lin(self.rms(h, f"{p}.hnorm.weight"), f"{p}.h_proj"))
        x = self.block(x, self.c["n_layers"] + j, next_ids, prefix=p)
        return self.head(x, prefix=f"{p}.")
