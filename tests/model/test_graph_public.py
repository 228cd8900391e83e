"""The v4hal V4 graph equals the public DeepSeek-V4 computation.

The oracle is ``ref_v4.RefV4``: a float64 re-derivation of the public ``inference/model.py``
that reads the checkpoint (public inference naming, written by `write_random_checkpoint`)
directly with safetensors and shares no code with v4hal. Every sub-layer is compared on the
same input (captured from the model with forward hooks), so a difference upstream cannot hide
or excuse one downstream: mHC pre/post mixing, the attention sub-layer (window, CSA with the
indexer, HCA), the MoE sub-layer (hash and score routing, shared expert), the head and MTP.

FP8/FP4 activation quantization turns bf16-level differences into quantization steps, so
tokens are compared one by one with a bound on the worst token as well as on the whole layer.
The lightning indexer's top-k is ambiguous under ties (its FP4-quantized inputs tie often):
the model's picks are first checked to be a valid top-k of the reference's own scores, then
the reference attends over them.
"""
from __future__ import annotations

import pytest
import torch
from ref_v4 import F64, RefV4

from tests.numerics import calc_diff
from v4hal.model import V4Model

# (whole-tensor calc_diff bound, worst-token relative squared error bound)
TOL = {"bf16": (2e-5, 2e-3), "fp8": (1e-4, 1e-2)}


def _token_err(have: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    have, want = have.double(), want.double()
    dims = tuple(range(2, want.dim()))
    return ((have - want) ** 2).sum(dims) / (want ** 2).sum(dims).clamp_min(1e-30)


def _check(name: str, have: torch.Tensor, want: torch.Tensor, tol: tuple[float, float]) -> None:
    d = calc_diff(have, want)
    worst = float(_token_err(have, want).max())
    assert d < tol[0] and worst < tol[1], f"{name}: calc_diff {d:.3g} (bound {tol[0]:g}), worst token {worst:.3g}"


def _capture(model: V4Model) -> dict:
    cap: dict = {}

    def keep(key):
        def hook(mod, args, out):
            cap[key] = ([a.clone() if isinstance(a, torch.Tensor) else a for a in args],
                        out.clone() if isinstance(out, torch.Tensor) else out)
        return hook

    for i, blk in enumerate([*model.layers, *model.mtp]):
        blk.register_forward_hook(keep(("block", i)))
        blk.attn.register_forward_hook(keep(("attn", i)))
        blk.ffn.register_forward_hook(keep(("ffn", i)))
        if blk.attn.indexer is not None:
            blk.attn.indexer.register_forward_hook(keep(("indexer", i)))
    return cap


def _picks(cap: dict, i: int, bsz: int) -> list[list[set[int]]]:
    """The indexer's picks ``[T, 1, topk]`` (entry indices of the step's ``T = bsz * s`` tokens) per row and token."""
    out = cap[("indexer", i)][1].view(bsz, -1, cap[("indexer", i)][1].shape[-1])
    return [[set(row[row >= 0].tolist()) for row in out[b]] for b in range(bsz)]


def _seq(t: torch.Tensor, bsz: int) -> torch.Tensor:
    """A step's ``[1, T, ...]`` tensor as ``bsz`` sequences ``[bsz, T / bsz, ...]``."""
    return t.reshape(bsz, -1, *t.shape[2:])


def _check_model(path, kind: str, bsz: int, seqlen: int, seed: int) -> None:
    tol = TOL[kind]
    ref = RefV4(path)
    model = V4Model.from_pretrained(path)
    cap = _capture(model)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (bsz, seqlen), generator=torch.Generator().manual_seed(seed))
    res = model.forward_full(ids, 0, keep_hidden=True)
    nxt = torch.cat([ids[:, 1:], res.logits.argmax(-1, keepdim=True)], dim=1)
    mtp_logits = model.mtp_forward(res.final, nxt, 0)

    emb = ref.embed(ids)
    for key, (args, out) in list(cap.items()):        # the step's tokens [1, T, ...] as [bsz, seqlen, ...]
        cap[key] = ([_seq(a, bsz) if isinstance(a, torch.Tensor) and a.dim() > 2 else a for a in args],
                    _seq(out, bsz) if key[0] != "indexer" else out)
    torch.testing.assert_close(cap[("block", 0)][0][0].to(F64), emb, rtol=0, atol=0)
    for i in range(cfg.n_layers + cfg.n_mtp_layers):
        prefix = f"layers.{i}" if i < cfg.n_layers else f"mtp.{i - cfg.n_layers}"
        ids_i = ids if i < cfg.n_layers else nxt
        h_in = cap[("block", i)][0][0].to(F64)
        (attn_in,), attn_out = cap[("attn", i)][0][:1], cap[("attn", i)][1]
        (ffn_in, _), ffn_out = cap[("ffn", i)][0][:2], cap[("ffn", i)][1]
        where = f"{prefix} (ratio {cfg.compress_ratios[i]})"
        # mHC pre-mixing + attn_norm
        _check(f"{where} attention input", attn_in, ref.attn_input(h_in, i, prefix), (1e-6, 1e-5))
        # attention sub-layer on the model's own input
        picks = None
        if cfg.compress_ratios[i] == 4:
            x = attn_in.to(F64)
            qr = ref.rms(ref.lin(x, f"{prefix}.attn.wq_a"), f"{prefix}.attn.q_norm.weight")
            picks = _picks(cap, i, bsz)
            problems = ref.valid_picks(ref.indexer_scores(x, qr, f"{prefix}.attn.indexer"), picks)
            assert not problems, f"{where} indexer: {problems[:3]}"
        want_attn = ref.attention(attn_in.to(F64), i, f"{prefix}.attn", picks)
        _check(f"{where} attention", attn_out, want_attn, tol)
        # post-mixing, pre-mixing of the FFN
        _, post, comb = ref.hc_pre(h_in, "attn", prefix)
        h_mid = ref.hc_post(attn_out.to(F64), h_in, post, comb)
        x_mid, post2, comb2 = ref.hc_pre(h_mid, "ffn", prefix)
        _check(f"{where} ffn input", ffn_in, ref.rms(x_mid, f"{prefix}.ffn_norm.weight"), (1e-6, 1e-5))
        # MoE sub-layer
        _check(f"{where} moe", ffn_out, ref.moe(ffn_in.to(F64), i, f"{prefix}.ffn", ids_i), tol)
        # block output
        _check(f"{where} block output", cap[("block", i)][1], ref.hc_post(ffn_out.to(F64), h_mid, post2, comb2),
               (1e-6, 1e-5))
    # heads: the main head on the final stream, the MTP head on the MTP block's output
    torch.testing.assert_close(res.logits.double(), ref.head(res.final.to(F64)), rtol=1e-4, atol=1e-4)
    j = cfg.n_layers
    torch.testing.assert_close(mtp_logits.double(), ref.head(cap[("block", j)][1].to(F64), prefix="mtp.0."),
                               rtol=1e-4, atol=1e-4)
    # the MTP input mixing (embedding of the next tokens + projected main stream)
    e = ref.rms(ref.t("embed.weight")[nxt], "mtp.0.enorm.weight")
    mixed = ref.lin(e, "mtp.0.e_proj").unsqueeze(2) + ref.lin(ref.rms(res.final.to(F64), "mtp.0.hnorm.weight"),
                                                               "mtp.0.h_proj")
    _check("mtp input", cap[("block", j)][0][0], mixed, TOL[kind])


def test_fp8_fp4_checkpoint_long_prompt(mini_fp8) -> None:
    """FP8 weights + FP4 experts; 136 tokens: window wrap, ratio-4 picks among > index_topk entries,
    a ratio-128 entry."""
    _check_model(mini_fp8, "fp8", bsz=1, seqlen=136, seed=3)


def test_bf16_checkpoint_batch(mini_bf16) -> None:
    """bf16 weights everywhere, batch of 2 rows."""
    _check_model(mini_bf16, "bf16", bsz=2, seqlen=40, seed=4)


def test_reference_is_sensitive(mini_bf16) -> None:
    """The oracle sees an off-by-one window (a plausible bug) as a failure."""
    ref = RefV4(mini_bf16)
    model = V4Model.from_pretrained(mini_bf16)
    cap = _capture(model)
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(5))
    model.forward_full(ids, 0)
    (x,), out = cap[("attn", 0)][0][:1], cap[("attn", 0)][1]        # one sequence: [1, T, ...] is [b, s, ...]
    ref.c = dict(ref.c, window_size=ref.c["window_size"] - 1)
    with pytest.raises(AssertionError):
        _check("attention with a shorter window", out, ref.attention(x.to(F64), 0, "layers.0.attn"), TOL["bf16"])
