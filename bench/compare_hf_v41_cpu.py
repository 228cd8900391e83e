"""DeepSeek-V4.1 logits parity on the CPU: the public Hugging Face modeling code against v4hal's `V4Model`.

The Hugging Face V4.1 files are not part of this repository and not part of a transformers release: fetch
``modeling_deepseek_v41.py`` and ``configuration_deepseek_v41.py`` (transformers ``src/transformers/models/
deepseek_v41/``) into a folder of your own and pass it with ``--hf-dir``; install transformers (>= 5.25, with
``tokenizers`` and ``sympy``) in a private environment. This driver imports the two files as the package
``transformers.models.deepseek_v41`` (an overlay: nothing is copied into transformers) and applies the runtime
patches listed in `PATCHES`.

What it does:

1. builds a checkpoint (or takes one with ``--checkpoint``): a seeded random init of the HF model for a v4hal
   config (``--model``, default ``v41-mini``) with weights scaled so that logits spread over a few units, each
   weight rounded onto the grid its release format stores (FP8 e4m3 in 32x32 ue8m0 tiles, routed experts FP4
   e2m1 with ue8m0 per 16, the Engram tables FP8 with ue8m0 per 32 channels, bf16 elsewhere, fp32 for mHC /
   sinks / biases / Engram q-k weights), written with HF's ``save_pretrained`` (``<out>/hf``, with a small
   tokenizer whose normalised vocabulary has ``engram_compressed_vocab_size`` entries) and, under the release
   tensor names (``layers.{i}.attn.wq_a.weight``, ``embed.weight``, ``head.weight``), for v4hal
   (``<out>/v4hal``: ``save_tensors`` of a v4hal config; bf16 weights, or with ``--v4hal-dtype fp8`` the
   FP8 / FP4 kinds of v4hal's ``checkpoint_spec`` with their scales, holding the same values exactly; the
   Engram tables are FP8 rows in both);
2. runs HF's cache path (what ``generate()`` uses: one ``DynamicCache`` across calls) in fp32 and bf16: a
   one-shot prefill then ``--decode`` one-token steps (fp32 greedy tokens, fed to every other run), and a
   chunked prefill (``--chunks``, odd sizes that cut ratio-2 groups) then the same decode steps; with
   ``--hf-fp8-act`` the same again with v4hal's FP8 activations ahead of every weight the FP8 copy stores FP8 /
   FP4 (`emulate_fp8_activations`: the yardstick of ``--v4hal-dtype fp8``);
3. runs v4hal: ``forward`` (whole prompt, then one token per call), ``forward`` with the same chunks, and
   ``forward_batch`` on a ``CachePool`` with two other requests prefilled and decoded in the same steps;
4. prints a table and writes ``--out`` JSON: per run and phase (prompt / decode positions), max |diff| and
   ``calc_diff`` (``1 - 2<x,y>/(|x|^2+|y|^2)``) of the logits against HF fp32 (and HF fp32 with FP8
   activations), and the share of positions whose argmax agrees. HF's own bf16-vs-fp32 spread is the yardstick
   (`yardsticks`, `comparisons`): a v4hal run passes when its ``calc_diff`` is at most ``--tol-factor`` times
   that spread (floor ``--tol-floor``) and its argmax agrees at every decisive position, one where HF fp32's
   top-2 margin exceeds HF bf16's largest logit error (`compare_rows`; below it HF's own rounding swaps tokens);
5. with ``--bisect``, the teacher-forced per-layer table (`run_bisect`): each layer of HF bf16 and of v4hal
   started from HF fp32's inputs to it, the calc_diff its Engram, attention, MoE and output add.

v4hal returns the logits of each call's last token, so its runs are compared at the positions it returns
(prompt end or chunk ends, and every decode position); HF rows exist for every position. Exact ties among the
indexer's scores are avoided by default (`init_weights`): the public code orders them as ``torch.topk`` happens
to, v4hal by ascending position.

    /tmp/venv/bin/python bench/compare_hf_v41_cpu.py --hf-dir /tmp/hf_v41 --out /tmp/v41_parity.json
"""
from __future__ import annotations

import argparse
import functools
import importlib
import importlib.machinery
import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

#: What this driver changes at run time so that the HF V4.1 files run on transformers 5.25 (the files
#: themselves are imported unchanged).
PATCHES = (
    "transformers.cache_utils.get_layer_types_and_kwargs: layers of type 'shared_compressed_attention' get "
    "config=<the text config> (DeepseekV41CSACache(config) needs it; 5.25 passes it only to its own "
    "compressed layer types)",
    "DeepseekV41ForCausalLM.forward: a 'cache' keyword (what generate() passes on 5.25) is taken as "
    "past_key_values (the files' name); without it generate() runs every step on a fresh cache",
)

HF_PACKAGE = "transformers.models.deepseek_v41"
HF_FILES = ("configuration_deepseek_v41.py", "modeling_deepseek_v41.py")

# weights the release stores FP8 (32x32 ue8m0 tiles); routed experts are FP4; the rest bf16 or fp32
_FP8_SUFFIXES = ("attn.wq_a.weight", "attn.wq_b.weight", "attn.wkv.weight", "attn.wo_a.weight", "attn.wo_b.weight",
                 "indexer.wq_b.weight", "engram.wkv.weight")
_FP32_SUFFIXES = ("hc_attn_fn", "hc_attn_base", "hc_attn_scale", "hc_ffn_fn", "hc_ffn_base", "hc_ffn_scale",
                  "attn_sink", "gate.bias", "gate.bias_vl", "engram.q_weight", "engram.k_weight")


#: std x sqrt(fan_in) of the projections that end a residual branch (attention wo_b, expert w2): small
#: branches keep a random 8-layer model from amplifying rounding (HF's bf16-vs-fp32 spread is the yardstick)
BRANCH_SCALE = 0.25
#: std of the mHC mixing weights and biases (``hc_*_fn``, ``hc_*_base``): biases of std 1 make the pre / post /
#: comb mixes differ from site to site and stream to stream, so the streams part ways and which site's pre mix
#: collapses them matters (with std 0.1 every mix is near uniform, and collapsing attention with its own pre mix
#: instead of the previous site's moved no layer's output beyond HF's bf16 noise)
HC_FN_STD, HC_BASE_STD = 0.02, 1.0


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- comparison math
def compare_rows(ref: dict[int, torch.Tensor], got: dict[int, torch.Tensor],
                 positions: Iterable[int] | None = None,
                 noise: Sequence[dict[int, torch.Tensor]] = ()) -> dict[str, Any]:
    """Logits rows by position (``{pos: [vocab]}``) against reference rows: max |diff|, calc_diff of all
    compared rows together, argmax agreement; over ``positions`` (default: every position ``got`` has).

    ``noise`` (rows of other runs of the reference code at lower precision, HF bf16): a position is a *near
    tie* when the reference's top-2 margin is at most ``max |noise - ref|`` there over those runs (the
    reference's own rounding moves a logit by more than the margin, so either token may come out on top);
    ``decisive`` counts the other positions and ``decisive_disagree`` the argmax disagreements among them."""
    from v4hal.compare import calc_diff

    pos = sorted(got if positions is None else positions)
    missing = [p for p in pos if p not in ref or p not in got or any(p not in n for n in noise)]
    if missing:
        raise KeyError(f"compare_rows: no row at positions {missing[:8]}")
    if not pos:
        return {"positions": 0, "max_abs": None, "calc_diff": None, "argmax_agree": None, "first_disagree": None,
                "decisive": None, "decisive_disagree": None}
    a = torch.stack([ref[p].double() for p in pos])
    b = torch.stack([got[p].double() for p in pos])
    agree = (a.argmax(-1) == b.argmax(-1)).tolist()
    first = next((p for p, ok in zip(pos, agree) if not ok), None)
    out = {"positions": len(pos), "max_abs": float((a - b).abs().max()), "calc_diff": calc_diff(a, b),
           "argmax_agree": sum(agree) / len(agree), "first_disagree": first, "decisive": None,
           "decisive_disagree": None}
    if noise:
        top = a.topk(2, dim=-1).values if a.shape[-1] > 1 else torch.cat([a, a.new_full(a.shape, -math.inf)], -1)
        margin = top[:, 0] - top[:, 1]
        wobble = torch.stack([(torch.stack([n[p].double() for p in pos]) - a).abs().amax(-1) for n in noise]).amax(0)
        decisive = (margin > wobble).tolist()
        out["decisive"] = sum(decisive)
        out["decisive_disagree"] = sum(1 for d, ok in zip(decisive, agree) if d and not ok)
    return out


def verdict(row: dict[str, Any], spread: float | None, factor: float, floor: float) -> str:
    """``pass`` when ``row`` is within ``factor`` x the bf16 spread (at least ``floor``) and every argmax agrees
    (with near ties told apart, see `compare_rows`: every argmax at a decisive position)."""
    if row["positions"] == 0:
        return "-"
    tol = max(factor * (spread or 0.0), floor)
    ok = row["calc_diff"] is not None and math.isfinite(row["calc_diff"]) and row["calc_diff"] <= tol
    if row.get("decisive_disagree") is not None:
        return "pass" if ok and row["decisive_disagree"] == 0 else "FAIL"
    return "pass" if ok and row["argmax_agree"] == 1.0 else "FAIL"


def parse_chunks(text: str) -> list[int]:
    """``"3,5,2"`` -> ``[3, 5, 2]`` (each >= 1)."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--chunks must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--chunks must hold integers >= 1, got {text!r}")
    return sizes


def chunk_plan(length: int, sizes: Sequence[int]) -> list[tuple[int, int]]:
    """``(start, n)`` pieces covering ``length`` tokens, cycling through ``sizes`` (the last one cut short)."""
    out, start, i = [], 0, 0
    while start < length:
        n = min(sizes[i % len(sizes)], length - start)
        out.append((start, n))
        start, i = start + n, i + 1
    return out


def spans(prompt_len: int, total: int) -> dict[str, list[int]]:
    return {"prompt": list(range(prompt_len)), "decode": list(range(prompt_len, total))}


# ---------------------------------------------------------------------------- the HF side
def load_hf(hf_dir: Path):
    """Import the HF V4.1 files of ``hf_dir`` as ``transformers.models.deepseek_v41``; the modeling module."""
    missing = [f for f in HF_FILES if not (hf_dir / f).is_file()]
    if missing:
        raise SystemExit(f"--hf-dir {hf_dir}: missing {', '.join(missing)}")
    if HF_PACKAGE in sys.modules:
        return sys.modules[HF_PACKAGE + ".modeling_deepseek_v41"]
    import transformers.cache_utils as cache_utils
    import transformers.models  # noqa: F401  (the parent package must exist)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    spec = importlib.machinery.ModuleSpec(HF_PACKAGE, None, is_package=True)
    pkg = importlib.util.module_from_spec(spec)
    pkg.__path__ = [str(hf_dir)]
    sys.modules[HF_PACKAGE] = pkg
    modeling = importlib.import_module(HF_PACKAGE + ".modeling_deepseek_v41")

    original = cache_utils.get_layer_types_and_kwargs

    def layer_types_and_kwargs(config):
        types, kwargs = original(config)
        return types, [dict(kw, config=config) if t == "shared_compressed_attention" else kw
                       for t, kw in zip(types, kwargs)]

    cache_utils.get_layer_types_and_kwargs = layer_types_and_kwargs

    causal_lm = modeling.DeepseekV41ForCausalLM
    forward = causal_lm.forward

    @functools.wraps(forward)
    def forward_taking_cache(self, *args, cache=None, **kwargs):
        if cache is not None and kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = cache
        return forward(self, *args, **kwargs)

    causal_lm.forward = forward_taking_cache
    return modeling


def hf_config_kwargs(cfg) -> dict[str, Any]:
    """``DeepseekV41TextConfig`` keyword arguments of a v4hal V4.1 `ModelConfig`."""
    if not cfg.is_v41:
        raise SystemExit(f"--model must be a V4.1 config (arch 'v41'), got arch {cfg.arch!r}")
    if cfg.n_shared_experts != 1:
        raise SystemExit(f"the HF V4.1 code builds exactly one shared expert; the config has {cfg.n_shared_experts}")
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=1, head_dim=cfg.head_dim,
        q_lora_rank=cfg.q_lora_rank, qk_rope_head_dim=cfg.rope_head_dim, rope_theta=cfg.rope_theta,
        compress_rope_theta=cfg.compress_rope_theta,
        rope_scaling={"rope_type": "yarn", "factor": cfg.rope_factor, "beta_fast": cfg.beta_fast,
                      "beta_slow": cfg.beta_slow, "original_max_position_embeddings": cfg.original_seq_len},
        max_position_embeddings=int(cfg.original_seq_len * cfg.rope_factor),
        sliding_window=cfg.window_size, compress_ratios=list(cfg.compress_ratios),
        kv_source_layer_ids=list(cfg.kv_source_layers), index_source_layer_ids=list(cfg.index_source_layers),
        candidate_source_layer_id=cfg.candidate_source_layer, candidate_topk_blocks=cfg.candidate_topk_blocks,
        candidate_block_size=cfg.candidate_block_size, index_n_heads=cfg.index_n_heads,
        index_head_dim=cfg.index_head_dim, index_topk=cfg.index_topk, o_groups=cfg.o_groups,
        o_lora_rank=cfg.o_lora_rank, moe_intermediate_size=cfg.moe_inter_dim,
        n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
        num_experts_per_tok=cfg.n_activated_experts, scoring_func=cfg.score_func, gate_temp=cfg.gate_temp,
        routed_scaling_factor=cfg.route_scale, swiglu_limit=cfg.swiglu_limit, hc_mult=cfg.hc_mult,
        hc_sinkhorn_iters=cfg.hc_sinkhorn_iters, hc_eps=cfg.hc_eps, engram_layer_ids=list(cfg.engram_layers),
        engram_vocab_size=cfg.engram_vocab_size, engram_num_embeddings=list(cfg.engram_num_embeddings),
        engram_max_ngram_size=cfg.engram_max_ngram_size, engram_n_heads=cfg.engram_n_heads,
        engram_head_dim=cfg.engram_head_dim, engram_pad_id=cfg.engram_pad_id,
        engram_compressed_vocab_size=cfg.engram_compressed_vocab_size,
        num_nextn_predict_layers=0, dspark_noise_token_id=cfg.vocab_size - 1, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=False, eos_token_id=None,
    )


def token_strings(vocab_size: int, compressed: int) -> list[str]:
    """``vocab_size`` distinct token strings whose Engram keys take exactly ``compressed`` values: ``compressed``
    base tokens (``<s>``, ``</s>``, ``<pad>``, ``t3`` ...), then variants of them that normalise to a base key
    (upper case, a leading space, an accent on a ``e`` base)."""
    if not 3 < compressed <= vocab_size:
        raise SystemExit(f"need 3 < engram_compressed_vocab_size <= vocab_size, got {compressed}, {vocab_size}")
    base = ["<s>", "</s>", "<pad>"] + [f"{'e' if i % 5 == 0 else 't'}{i}" for i in range(3, compressed)]
    out, i = list(base), 3
    while len(out) < vocab_size:
        b = base[3 + (i - 3) % (compressed - 3)]
        kind = (i - 3) // (compressed - 3)
        variant = {0: b.upper(), 1: " " + b, 2: b.capitalize() + " "}.get(kind, f"{b.upper()}  ")
        if b.startswith("e") and kind == 0:
            variant = "\u00e9" + b[1:]
        out.append(variant)
        i += 1
    return out


def make_tokenizer(cfg):
    """A word-level `PreTrainedTokenizerFast` of ``cfg.vocab_size`` tokens (see `token_strings`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = token_strings(cfg.vocab_size, cfg.engram_compressed_vocab_size)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _grid(name: str, w: torch.Tensor) -> torch.Tensor:
    """``w`` rounded onto the grid its release format stores (see the module doc), as fp32."""
    import v4hal

    if name.endswith(_FP32_SUFFIXES):
        return w.float()
    if ".experts." in name and ".shared_experts." not in name:
        q, s = v4hal.quant_weight_fp4(w.float(), 16)
        return v4hal.dequant_fp4(q, s, 16)
    if name.endswith(_FP8_SUFFIXES) or ".shared_experts." in name:
        q, s = v4hal.quant_weight_fp8(w.float(), 32, "ue8m0")
        return v4hal.dequant_fp8(q, s, 32)
    if name.endswith("engram.embed.weight"):       # FP8 rows, one ue8m0 scale per 32 channels
        rows = w.float().unflatten(-1, (-1, 32))
        amax = rows.abs().amax(-1, keepdim=True).clamp_min(1e-4)
        scale = torch.exp2(torch.ceil(torch.log2(amax / 448.0)))
        return ((rows / scale).to(torch.float8_e4m3fn).float() * scale).flatten(-2)
    return w.to(torch.bfloat16).float()


def init_weights(model: torch.nn.Module, cfg, seed: int, paired_index_heads: bool = True) -> None:
    """Seeded weights with sane scales, each on its release grid (`_grid`).

    ``paired_index_heads``: indexer query head ``2j+1`` is minus head ``2j`` (exactly, through RoPE and the FP4
    rounding), so that an index score ``sum_h w_h relu(q_h.k)`` is 0 only when ``q.k`` is 0 for every pair.
    With independent heads a tiny config (4 heads) scores many keys exactly 0 (every head's ReLU zero), and
    which of those tied keys fill the top-k is up to ``torch.topk``: on the CPU it depends on the row width,
    so HF's own one-shot and chunked runs pick different keys and part ways. Paired heads keep the reference
    well defined."""
    if paired_index_heads and cfg.index_n_heads % 2:
        raise SystemExit(f"paired indexer heads need an even index_n_heads, got {cfg.index_n_heads}")
    g = torch.Generator().manual_seed(seed)

    def randn(shape: Sequence[int]) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = tuple(p.shape)
            if name.endswith("engram.embed.scale"):
                w = torch.ones(shape)
            elif name.endswith(("hc_attn_fn", "hc_ffn_fn")):
                w = randn(shape) * HC_FN_STD
            elif name.endswith(("hc_attn_base", "hc_ffn_base")):
                w = randn(shape) * HC_BASE_STD
            elif name.endswith(("gate.bias", "gate.bias_vl")):
                w = randn(shape) * 0.1
            elif name.endswith(("hc_attn_scale", "hc_ffn_scale", "q_weight", "k_weight")) or "norm" in name:
                w = 1.0 + 0.1 * randn(shape)
            elif name.endswith("attn_sink"):
                w = 0.5 * randn(shape)
            elif name == "model.embed.weight" or name.endswith("engram.embed.weight"):
                w = randn(shape)
            elif name == "lm_head.weight":
                w = randn(shape) * (2.0 / math.sqrt(shape[1]))
            elif name.endswith((".w2.weight", "attn.wo_b.weight")):
                w = randn(shape) * (BRANCH_SCALE / math.sqrt(shape[1]))
            elif p.dim() == 2:
                w = randn(shape) / math.sqrt(shape[1])
            else:
                raise SystemExit(f"init_weights: no rule for HF parameter {name} {shape}")
            if paired_index_heads and name.endswith("indexer.wq_b.weight"):
                heads = w.unflatten(0, (cfg.index_n_heads // 2, 2, -1))
                w = torch.stack((heads[:, 0], -heads[:, 0]), 1).flatten(0, 2)
            p.copy_(_grid(name, w).to(p.dtype))


def release_name(hf_name: str) -> str:
    """The release checkpoint's name of an HF parameter: no ``model.`` prefix, ``lm_head`` is ``head``."""
    if hf_name == "lm_head.weight":
        return "head.weight"
    return hf_name[len("model."):] if hf_name.startswith("model.") else hf_name


def v4hal_tensors(cfg, named: Iterable[tuple[str, torch.Tensor]], kinds: dict[str, str]) -> dict[str, torch.Tensor]:
    """The HF parameters ``named`` under their release names for v4hal. ``kinds`` (release name -> ``"fp8"`` /
    ``"fp4"``, from v4hal's ``checkpoint_spec``) names the weights to store quantized, with their ``.scale``:
    FP8 in ``cfg.weight_block_size`` tiles (an Engram table: per row, one scale per 32 channels), routed
    experts FP4 per ``cfg.expert_block_size``; every other tensor bf16 (fp32 where the release keeps fp32).
    A quantized weight must hold the HF values exactly (the built checkpoint puts them on these grids)."""
    import v4hal

    out: dict[str, torch.Tensor] = {}
    for hf_name, t in named:
        name = release_name(hf_name)
        kind = kinds.get(name)
        if name in out:                # an Engram table's scale, already written with its quantized rows
            continue
        if kind not in ("fp8", "fp4"):
            out[name] = t.float() if hf_name.endswith(_FP32_SUFFIXES) else t.to(torch.bfloat16)
            continue
        w = t.float()
        if kind == "fp8" and name.endswith("engram.embed.weight"):
            q, sc = v4hal.act_quant(w, 32, "ue8m0", torch.float8_e8m0fnu)
            back = v4hal.dequant_fp8(q, sc, 32)
        elif kind == "fp8":
            q, sc = v4hal.quant_weight_fp8(w, cfg.weight_block_size, "ue8m0")
            back = v4hal.dequant_fp8(q, sc, cfg.weight_block_size)
        else:
            q, sc = v4hal.quant_weight_fp4(w, cfg.expert_block_size)
            back = v4hal.dequant_fp4(q, sc, cfg.expert_block_size)
        if not torch.equal(back, w):
            raise SystemExit(f"{name}: its {kind} form does not hold the HF weight exactly "
                             f"(max |diff| {float((back - w).abs().max()):.3g})")
        out[name] = q
        out[name[:-len("weight")] + "scale"] = sc
    return out


def v4hal_kinds(cfg, v4hal_dtype: str) -> tuple[Any, dict[str, str]]:
    """The v4hal config of the written copy and the release names to store quantized (name -> ``"fp8"`` /
    ``"fp4"``, as `v4hal_tensors` takes them): ``"bf16"`` quantizes only the Engram tables (FP8 rows in every
    layout of ``checkpoint_spec``), ``"fp8"`` every FP8 / FP4 kind of ``checkpoint_spec``."""
    from v4hal.model.spec import checkpoint_spec

    if v4hal_dtype == "bf16":
        v4cfg = cfg.replace(dtype="bf16", expert_dtype=None)
    elif v4hal_dtype == "fp8":
        v4cfg = cfg.replace(dtype="fp8", expert_dtype=cfg.expert_dtype or "fp4")
    else:
        raise SystemExit(f"v4hal_dtype must be 'bf16' or 'fp8', got {v4hal_dtype!r}")
    kinds = {name: "fp8" if t.kind == "table" else t.kind for name, t in checkpoint_spec(v4cfg).items()
             if t.kind == "table" or (v4hal_dtype == "fp8" and t.kind in ("fp8", "fp4"))}
    return v4cfg, kinds


def build_checkpoint(modeling, cfg, out: Path, seed: int, paired_index_heads: bool = True,
                     v4hal_dtype: str = "bf16") -> tuple[Path, Path]:
    """Write ``out/hf`` (``save_pretrained`` + tokenizer) and ``out/v4hal`` (release names, ``v4hal_dtype``:
    ``"bf16"`` weights, or ``"fp8"``: the quantized kinds of v4hal's ``checkpoint_spec``); both paths."""
    from v4hal.model.random_checkpoint import save_tensors

    conf = modeling.DeepseekV41TextConfig(**hf_config_kwargs(cfg))
    torch.manual_seed(seed)
    model = modeling.DeepseekV41ForCausalLM(conf).eval()
    init_weights(model, cfg, seed, paired_index_heads)
    hf_path, v4_path = out / "hf", out / "v4hal"
    model.save_pretrained(hf_path)
    tok = make_tokenizer(cfg)
    tok.save_pretrained(hf_path)
    v4cfg, kinds = v4hal_kinds(cfg, v4hal_dtype)
    named = [(name, p.detach()) for name, p in model.named_parameters()]
    save_tensors(v4cfg, v4hal_tensors(v4cfg, named, kinds), v4_path)
    tok.save_pretrained(v4_path)
    return hf_path, v4_path


def load_hf_model(modeling, path: Path, dtype: torch.dtype):
    # the text config, given explicitly: on transformers 5.25 the composite DeepseekV41Config cannot adopt a
    # flat text config.json (its rope standardisation reads max_position_embeddings off the composite)
    conf = modeling.DeepseekV41TextConfig.from_pretrained(path)
    model = modeling.DeepseekV41ForCausalLM.from_pretrained(path, config=conf, dtype=dtype).eval()
    tok = _tokenizer(path)
    model.model.bind_tokenizer(tok)
    return model


def _tokenizer(path: Path):
    from transformers import PreTrainedTokenizerFast

    # not AutoTokenizer: it parses config.json, which 5.25's generic config class cannot (rope standardisation)
    return PreTrainedTokenizerFast.from_pretrained(path)


#: v4hal's activation quantization ahead of an FP8 / FP4 weight (`v4hal.model.layers.Linear`, ``moe_experts``):
#: e4m3 with one power-of-two scale per this many values
ACT_BLOCK = 128


def fp8_activation_round_trip(x: torch.Tensor, block: int = ACT_BLOCK) -> torch.Tensor:
    """``x [..., K]`` through v4hal's activation quantization (``act_quant``: e4m3, ue8m0 scale per ``block``),
    back in x's dtype."""
    import v4hal

    q, sc = v4hal.act_quant(x.float(), block, "ue8m0")
    return (q.float().unflatten(-1, (-1, block)) * sc.float().unsqueeze(-1)).flatten(-2).to(x.dtype)


def emulate_fp8_activations(model, cfg) -> list[str]:
    """Give every linear of the HF ``model`` whose weight the FP8 copy stores FP8 or FP4 (``v4hal_kinds(cfg,
    "fp8")``: attention and indexer projections, Engram ``wkv``, shared and routed experts) v4hal's FP8
    activations (`fp8_activation_round_trip` of its input); the names of those linears. The FP8 copy's
    kernels quantize activations this way; HF's float weights on the CPU do not."""
    _, kinds = v4hal_kinds(cfg, "fp8")
    quantized = {name[:-len(".weight")] for name, kind in kinds.items()
                 if kind in ("fp8", "fp4") and name.endswith(".weight") and ".embed." not in name}
    hooked = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and release_name(name + ".weight")[:-len(".weight")] in quantized:
            mod.register_forward_pre_hook(lambda _m, args: (fp8_activation_round_trip(args[0]), *args[1:]))
            hooked.append(name)
    if len(hooked) != len(quantized):
        missing = sorted(quantized - {release_name(h + ".weight")[:-len(".weight")] for h in hooked})
        raise SystemExit(f"emulate_fp8_activations: no HF linear for {missing[:4]}")
    return hooked


def hf_rows(model, tokens: list[int], pieces: list[tuple[int, int]]) -> dict[int, torch.Tensor]:
    """HF's cache path: ``tokens`` fed in ``pieces`` (``(start, n)``) through one ``DynamicCache``; fp32
    logits rows of every position."""
    from transformers.cache_utils import DynamicCache

    _new_sequence(model)
    cache = DynamicCache(config=model.config)
    rows: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        for start, n in pieces:
            ids = torch.tensor([tokens[start:start + n]])
            pos = torch.arange(start, start + n).unsqueeze(0)
            out = model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            for j in range(n):
                rows[start + j] = out.logits[0, j].float().clone()
    return rows


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``prompt`` on HF's cache path: one-shot prefill, then one token per call."""
    from transformers.cache_utils import DynamicCache

    _new_sequence(model)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True).logits
        out = [int(logits[0, -1].argmax())]
        for k in range(n - 1):
            logits = model(input_ids=torch.tensor([[out[-1]]]), position_ids=torch.tensor([[len(prompt) + k]]),
                           past_key_values=cache, use_cache=True).logits
            out.append(int(logits[0, -1].argmax()))
    return out


def _new_sequence(model) -> None:
    """Forget the Engram n-gram history the HF model keeps across calls (it is per batch row, not per cache)."""
    if model.model.engram_hash_state is not None:
        model.model.engram_hash_state.history = None


def hf_no_cache_rows(model, prompt: list[int]) -> dict[int, torch.Tensor]:
    """The prompt in one call with ``use_cache=False`` (HF's other path, for the record: with two or more KV
    sources its groups concatenate the compressed entries of every source)."""
    _new_sequence(model)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt]), use_cache=False).logits
    return {p: logits[0, p].float().clone() for p in range(len(prompt))}


def hf_generate(model, prompt: list[int], n: int) -> list[int]:
    """``generate()`` greedy tokens (its own cache handling), for the record."""
    _new_sequence(model)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(prompt):].tolist()


# ---------------------------------------------------------------------------- the v4hal side
def v4hal_forward_rows(model, tokens: list[int], pieces: list[tuple[int, int]]) -> dict[int, torch.Tensor]:
    """``V4Model.forward`` on ``pieces`` of ``tokens`` (a new sequence at start 0): the row of each piece's end."""
    rows: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        for start, n in pieces:
            logits = model.forward(torch.tensor([tokens[start:start + n]]), start)
            rows[start + n - 1] = logits[0].float().clone()
    return rows


def v4hal_batched_rows(model, tokens: list[int], prompt_len: int, sizes: Sequence[int],
                       others: list[list[int]], block_size: int) -> dict[int, torch.Tensor]:
    """``forward_batch`` on a `CachePool`: request ``main`` (``tokens``, prompt in chunks of ``sizes`` then one
    token a step) in the same steps as ``others`` (each prefilled in pieces of 5 then decoded, tokens known in
    advance); the rows of ``main``."""
    from v4hal.serve import CachePool

    pool = CachePool(model.config, block_size=block_size)
    plan = {"main": chunk_plan(prompt_len, sizes) + [(p, 1) for p in range(prompt_len, len(tokens))]}
    seqs = {"main": tokens}
    for i, o in enumerate(others):
        rid = f"other{i}"
        seqs[rid] = o
        plan[rid] = chunk_plan(len(o), [5])
    for rid, seq in seqs.items():
        pool.add_request(rid, seq)
    rows: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        step = 0
        while any(step < len(p) for p in plan.values()):
            items = [(rid, p[step][1]) for rid, p in plan.items() if step < len(p)]
            batch = pool.schedule(items)
            out = model.forward_batch(batch, pool)
            pool.advance_batch(batch)
            for i, (rid, _) in enumerate(items):
                if rid == "main":
                    start, n = plan["main"][step]
                    rows[start + n - 1] = out.logits[i].float().clone()
            step += 1
    for rid in seqs:
        pool.release(rid)
    return rows


def load_v4hal(path: Path):
    from v4hal.model import V4Model

    model = V4Model.from_pretrained(path)
    if not getattr(model.config, "is_v41", False):
        raise SystemExit(f"{path}: v4hal read it as arch {model.config.arch!r}, not 'v41'")
    return model


# ---------------------------------------------------------------------------- per-layer bisection
#: sub-modules whose outputs `bisect_layers` compares, in the order a layer runs them (then the layer's output)
BISECT_PARTS = ("engram", "attn", "ffn", "layer")


def _record(cap: dict, key: tuple, out: Any) -> None:
    t = out[0] if isinstance(out, tuple) else out
    cap[key] = t.float().reshape(-1, t.shape[-1]).clone()


def hf_forced_rows(model, tokens: list[int], pieces: list[tuple[int, int]],
                   forced: dict | None = None) -> dict[tuple, Any]:
    """HF's cache path over ``pieces`` recording, per call ``c`` and layer ``i``, the layer's inputs
    ``(c, "in", i)`` (streams fp32, pre mix) and the outputs of `BISECT_PARTS` ``(c, part, i)``; with ``forced``
    (such a record) every layer starts from the forced inputs instead of the previous layer's outputs."""
    from transformers.cache_utils import DynamicCache

    cap: dict[tuple, Any] = {}
    call = [0]
    handles = []
    for i, layer in enumerate(model.model.layers):
        def pre(_m, args, kwargs, i=i):
            cap[(call[0], "in", i)] = (args[0].float().clone(), args[1].clone())
            if forced is not None:
                h, mix = forced[(call[0], "in", i)]
                return (h.to(args[0].dtype), mix.clone(), *args[2:]), kwargs
            return None
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        parts = {"layer": layer, "attn": layer.attn, "ffn": layer.ffn, "engram": layer.engram}
        for part, mod in parts.items():
            if mod is not None:
                handles.append(mod.register_forward_hook(
                    lambda _m, _a, out, i=i, part=part: _record(cap, (call[0], part, i), out)))
    _new_sequence(model)
    cache = DynamicCache(config=model.config)
    try:
        with torch.inference_mode():
            for c, (start, n) in enumerate(pieces):
                call[0] = c
                model(input_ids=torch.tensor([tokens[start:start + n]]),
                      position_ids=torch.arange(start, start + n).unsqueeze(0), past_key_values=cache, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    return cap


def v4hal_forced_rows(model, tokens: list[int], pieces: list[tuple[int, int]], forced: dict) -> dict[tuple, Any]:
    """`V4Model.forward` over ``pieces`` with every layer started from HF's recorded inputs ``forced``
    (`hf_forced_rows`), rounded to the model's stream dtype; the outputs of `BISECT_PARTS` per call and layer."""
    cap: dict[tuple, Any] = {}
    call = [0]
    handles = []
    for i, block in enumerate(model.layers):
        def lagged(h, mix, *args, _orig=block.forward_lagged, i=i, **kw):
            fh, fmix = forced[(call[0], "in", i)]
            out = _orig(fh.to(h.dtype).view(h.shape), fmix.float().view(mix.shape), *args, **kw)
            _record(cap, (call[0], "layer", i), out[0])
            return out
        block.forward_lagged = lagged
        for part, mod in {"attn": block.attn, "ffn": block.ffn, "engram": block.engram}.items():
            if mod is not None:
                handles.append(mod.register_forward_hook(
                    lambda _m, _a, out, i=i, part=part: _record(cap, (call[0], part, i), out)))
    try:
        with torch.inference_mode():
            for c, (start, n) in enumerate(pieces):
                call[0] = c
                model.forward(torch.tensor([tokens[start:start + n]]), start)
    finally:
        for h in handles:
            h.remove()
        for block in model.layers:
            vars(block).pop("forward_lagged", None)          # back to the class's method
    return cap


def _row_diffs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """calc_diff of each row of ``a [R, D]`` against ``b`` (float64; 0 for two zero rows)."""
    den = (a * a + b * b).sum(-1)
    return torch.where(den > 0, 1 - 2 * (a * b).sum(-1) / den.clamp_min(1e-300), torch.zeros_like(den))


def bisect_layers(ref: dict, others: dict[str, dict], n_calls: int, n_layers: int) -> list[dict[str, Any]]:
    """Per layer and part, calc_diff of each run in ``others`` against ``ref`` (all calls' rows together) and the
    median of the per-row calc_diffs (``<name>_median``: one token routed to another expert or attending
    another top-k pick moves the first a lot, the median hardly)."""
    from v4hal.compare import calc_diff

    out = []
    for i in range(n_layers):
        for part in BISECT_PARTS:
            keys = [(c, part, i) for c in range(n_calls) if (c, part, i) in ref]
            if not keys:
                continue
            r = torch.cat([ref[k] for k in keys]).double()
            row: dict[str, Any] = {"layer": i, "part": part}
            for name, cap in others.items():
                x = torch.cat([cap[k] for k in keys]).double()
                row[name] = calc_diff(r, x)
                row[name + "_median"] = float(_row_diffs(r, x).median())
            out.append(row)
    return out


def run_bisect(modeling, cfg, hf_path: Path, v4_path: Path, tokens: list[int], pieces: list[tuple[int, int]],
               fp8_act: bool) -> list[dict[str, Any]]:
    """Teacher-forced bisection: every layer of HF bf16 and of v4hal starts from HF fp32's inputs to that layer
    (streams and pre mix, each call of ``pieces``), so each row shows the error a layer's own parts add, with no
    error carried in from the layers before. ``fp8_act``: the reference and the HF bf16 run both get v4hal's FP8
    activations (`emulate_fp8_activations`), the yardstick of an FP8 copy."""
    from v4hal.model import V4Model

    hf32 = load_hf_model(modeling, hf_path, torch.float32)
    forced = {k: v for k, v in hf_forced_rows(hf32, tokens, pieces).items() if k[1] == "in"}
    if fp8_act:
        emulate_fp8_activations(hf32, cfg)
    ref = hf_forced_rows(hf32, tokens, pieces, forced)
    del hf32
    hf16 = load_hf_model(modeling, hf_path, torch.bfloat16)
    if fp8_act:
        emulate_fp8_activations(hf16, cfg)
    b16 = hf_forced_rows(hf16, tokens, pieces, forced)
    del hf16
    v4 = v4hal_forced_rows(V4Model.from_pretrained(v4_path), tokens, pieces, forced)
    return bisect_layers(ref, {"hf_bf16": b16, "v4hal": v4}, len(pieces), cfg.n_layers)


def bisect_verdict(rows: list[dict[str, Any]], factor: float) -> dict[str, Any]:
    """``pass`` when every part's per-row median calc_diff (v4hal) is at most ``factor`` x HF bf16's; the worst
    part. Medians, not the pooled figures: one rerouted token moves those (see `bisect_layers`)."""
    def ratio(r: dict[str, Any]) -> float:
        b = r["hf_bf16_median"]
        return r["v4hal_median"] / b if b > 0 else (0.0 if r["v4hal_median"] == 0 else math.inf)

    worst = max(rows, key=ratio)
    return {"verdict": "pass" if ratio(worst) <= factor else "FAIL", "worst_layer": worst["layer"],
            "worst_part": worst["part"], "worst_median_ratio": ratio(worst)}


def format_bisect(rows: list[dict[str, Any]], factor: float) -> str:
    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else (0.0 if a == 0 else math.inf)

    lines = [f"{'layer':>5} {'part':<7} {'hf_bf16':>9} {'v4hal':>9} {'ratio':>6}  {'median':>9} {'median':>9} "
             f"{'ratio':>6}", f"{'':>14}{'(all rows together)':^27}  {'hf_bf16 / v4hal, per row':^26}", "-" * 72]
    for r in rows:
        whole, med = ratio(r["v4hal"], r["hf_bf16"]), ratio(r["v4hal_median"], r["hf_bf16_median"])
        flag = "  <<" if med > factor else ""
        lines.append(f"{r['layer']:>5} {r['part']:<7} {r['hf_bf16']:9.2e} {r['v4hal']:9.2e} {whole:6.2f}  "
                     f"{r['hf_bf16_median']:9.2e} {r['v4hal_median']:9.2e} {med:6.2f}{flag}")
    lines.append(f"teacher-forced calc_diff against HF fp32 of each layer's parts (<< : v4hal's median above "
                 f"{factor:g}x HF bf16's)")
    v = bisect_verdict(rows, factor)
    lines.append(f"bisection: {v['verdict']} (worst: layer {v['worst_layer']} {v['worst_part']}, median "
                 f"{v['worst_median_ratio']:.2f}x HF bf16's)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- driver
def model_config(preset: str, replace: str | None):
    """The v4hal preset ``preset`` with the fields of the JSON object ``replace`` replaced (validated), e.g.
    ``{"n_layers": 10, "kv_source_layers": [2, 4, 6]}`` for a topology closer to the release's."""
    from v4hal.hal.errors import V4HalError
    from v4hal.model.config import ModelConfig

    cfg = ModelConfig.preset(preset)
    if not replace:
        return cfg
    try:
        fields = json.loads(replace)
        if not isinstance(fields, dict):
            raise ValueError("not a JSON object")
        cfg = cfg.replace(**fields)
        cfg.validate()
    except (ValueError, TypeError, V4HalError) as e:
        raise SystemExit(f"--replace {replace!r}: {e}") from None
    return cfg


def run(a: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(a.threads)
    cfg = model_config(a.model, a.replace)
    modeling = load_hf(a.hf_dir)
    if a.checkpoint is None:
        progress(f"building the {a.model} checkpoint (seed {a.seed}) in {a.workdir}")
        hf_path, v4_path = build_checkpoint(modeling, cfg, a.workdir, a.seed, not a.independent_index_heads,
                                            a.v4hal_dtype)
    else:
        hf_path, v4_path = a.checkpoint / "hf", a.checkpoint / "v4hal"
    g = torch.Generator().manual_seed(a.seed + 1)
    prompt = torch.randint(3, cfg.vocab_size, (a.prompt_len,), generator=g).tolist()
    others = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (a.prompt_len // 2 + 3, 11)]

    progress("HF fp32: greedy decode")
    hf32 = load_hf_model(modeling, hf_path, torch.float32)
    forced = hf_greedy(hf32, prompt, a.decode)
    tokens = prompt + forced[:-1]           # the last greedy token is never fed
    total = len(tokens)
    one_shot = [(0, a.prompt_len)] + [(p, 1) for p in range(a.prompt_len, total)]
    chunked = chunk_plan(a.prompt_len, a.chunks) + [(p, 1) for p in range(a.prompt_len, total)]
    runs: dict[str, dict[int, torch.Tensor]] = {}
    progress("HF fp32: one-shot prefill + decode, chunked prefill + decode")
    runs["hf_fp32"] = hf_rows(hf32, tokens, one_shot)
    runs["hf_fp32_chunked"] = hf_rows(hf32, tokens, chunked)
    runs["hf_fp32_no_cache"] = hf_no_cache_rows(hf32, prompt)
    gen = hf_generate(hf32, prompt, a.decode) if a.generate else None
    del hf32
    progress("HF bf16: one-shot prefill + decode, chunked")
    hf16 = load_hf_model(modeling, hf_path, torch.bfloat16)
    runs["hf_bf16"] = hf_rows(hf16, tokens, one_shot)
    runs["hf_bf16_chunked"] = hf_rows(hf16, tokens, chunked)
    del hf16
    if a.hf_fp8_act:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            progress(f"HF {name} with v4hal's FP8 activations: one-shot, chunked")
            hf = load_hf_model(modeling, hf_path, dtype)
            emulate_fp8_activations(hf, cfg)
            runs[f"hf_{name}_fp8act"] = hf_rows(hf, tokens, one_shot)
            runs[f"hf_{name}_fp8act_chunked"] = hf_rows(hf, tokens, chunked)
            del hf

    v4hal_error = None
    if not a.skip_v4hal:
        try:
            progress("v4hal: loading")
            model = load_v4hal(v4_path)
        except Exception as e:  # a checkpoint v4hal refuses: say why, keep HF's results
            v4hal_error = f"{type(e).__name__}: {e}"
            progress(f"v4hal: not run ({v4hal_error})")
        else:
            progress("v4hal: forward one-shot, forward chunked, forward_batch")
            runs["v4hal_forward"] = v4hal_forward_rows(model, tokens, one_shot)
            runs["v4hal_chunked"] = v4hal_forward_rows(model, tokens, chunked)
            runs["v4hal_batched"] = v4hal_batched_rows(model, tokens, a.prompt_len, a.chunks, others, a.block_size)

    bisect = None
    if a.bisect and v4hal_error is None and not a.skip_v4hal:
        progress("bisection: teacher-forced layers, HF bf16 and v4hal against HF fp32 (one-shot prefill + decode)")
        bisect = run_bisect(modeling, cfg, hf_path, v4_path, tokens, one_shot,
                            a.hf_fp8_act and a.v4hal_dtype == "fp8")

    phases = spans(a.prompt_len, total)
    table = comparisons(runs, phases, a.tol_factor, a.tol_floor)
    return {
        "model": a.model, "replace": a.replace, "seed": a.seed, "prompt_len": a.prompt_len, "decode": a.decode,
        "chunks": a.chunks,
        "threads": a.threads, "v4hal_dtype": a.v4hal_dtype, "hf_checkpoint": str(hf_path),
        "v4hal_checkpoint": str(v4_path), "patches": list(PATCHES), "prompt": prompt,
        "greedy_tokens_hf_fp32": forced, "generate_tokens_hf_fp32": gen,
        "generate_matches": None if gen is None else gen == forced,
        "bf16_spread": {ph: compare_rows(runs["hf_fp32"], runs["hf_bf16"], pos) for ph, pos in phases.items()},
        "tol_factor": a.tol_factor, "tol_floor": a.tol_floor, "v4hal_error": v4hal_error, "rows": table,
        "bisect": bisect, "bisect_verdict": bisect_verdict(bisect, a.tol_factor) if bisect else None,
    }


def yardsticks(run: str, runs: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """``(reference, spread runs)`` a run is compared with: every run against HF fp32 (no spread); a v4hal run
    also against HF fp32 with FP8 activations when that ran. The spread runs are the HF bf16 runs of the same
    reference, one-shot and chunked: each is one sample of HF's own rounding noise at the positions compared,
    and a v4hal run gives the same rows whichever way its prompt is cut."""
    if not run.startswith("v4hal"):
        return [("hf_fp32", [])]
    out = [("hf_fp32", ["hf_bf16", "hf_bf16_chunked"])]
    if "hf_fp32_fp8act" in runs:
        out.append(("hf_fp32_fp8act", ["hf_bf16_fp8act", "hf_bf16_fp8act_chunked"]))
    return out


def comparisons(runs: dict[str, dict[int, torch.Tensor]], phases: dict[str, list[int]], factor: float,
                floor: float) -> list[dict[str, Any]]:
    """The table: each run (but HF fp32) per phase against each of its `yardsticks`; a v4hal row carries the
    spread (the largest calc_diff of its HF bf16 runs against the same reference, at the same positions or over
    the whole phase), the near ties those runs show (`compare_rows`) and its verdict."""
    table = []
    for name, rows in runs.items():
        if name == "hf_fp32":
            continue
        for ref, spread_runs in yardsticks(name, runs):
            for ph, pos in phases.items():
                at = [p for p in pos if p in rows]
                noise = [runs[n] for n in spread_runs]
                r = compare_rows(runs[ref], rows, at, noise)
                # HF's noise at these positions and over the whole phase (one row alone is a poor estimate)
                spreads = [compare_rows(runs[ref], n, span)["calc_diff"] for n in noise for span in (at, pos)]
                spread = max(spreads) if spreads and at else None
                r.update(run=name, ref=ref, phase=ph, spread=spread,
                         verdict=verdict(r, spread, factor, floor) if spread_runs else "-")
                table.append(r)
    return table


def format_table(result: dict[str, Any]) -> str:
    def f(x: Any, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    lines = [f"{'run':<24} {'reference':<15} {'phase':<7} {'rows':>4} {'max_abs':>9} {'calc_diff':>9} "
             f"{'spread':>9} {'argmax':>6} {'decisive':>9} verdict", "-" * 110]
    for r in result["rows"]:
        dec = "-" if r["decisive"] is None else f"{r['decisive'] - r['decisive_disagree']}/{r['decisive']}"
        lines.append(f"{r['run']:<24} {r['ref']:<15} {r['phase']:<7} {r['positions']:>4} {f(r['max_abs'], '9.2e')} "
                     f"{f(r['calc_diff'], '9.2e')} {f(r['spread'], '9.2e')} {f(r['argmax_agree'], '6.3f')} "
                     f"{dec:>9} {r['verdict']}")
    lines.append("spread: the largest calc_diff of HF bf16 one-shot / chunked against the same reference, at the "
                 "same positions or over the phase;\ndecisive: argmax agreements at positions whose reference top-2 "
                 "margin exceeds HF bf16's max |diff| there")
    if result["generate_matches"] is not None:
        lines.append(f"HF generate() greedy tokens == the cache-path loop's: {result['generate_matches']}")
    if result["v4hal_error"]:
        lines.append(f"v4hal not run: {result['v4hal_error']}")
    if result.get("bisect"):
        lines += ["", format_bisect(result["bisect"], result["tol_factor"])]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf-dir", required=True, type=Path,
                    help="folder holding the HF modeling_deepseek_v41.py and configuration_deepseek_v41.py")
    ap.add_argument("--out", required=True, type=Path, help="JSON file to write the results to")
    ap.add_argument("--model", default="v41-mini", help="v4hal preset of the config (a V4.1 one)")
    ap.add_argument("--replace", default=None,
                    help="JSON object of config fields to replace in the preset (e.g. more layers and KV sources)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/v41_parity_ckpt"),
                    help="where the built checkpoint goes (hf/ and v4hal/)")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="take a checkpoint this driver built before (its hf/ and v4hal/) instead of building one")
    ap.add_argument("--v4hal-dtype", choices=("bf16", "fp8"), default="bf16",
                    help="the v4hal copy's weights: bf16, or fp8 (FP8 tiles and FP4 experts where v4hal's "
                         "checkpoint_spec says so; the same values either way)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--decode", type=int, default=8, help="greedy decode steps after the prompt")
    ap.add_argument("--chunks", type=parse_chunks, default=[3, 5, 1, 7],
                    help="prefill chunk sizes, cycled (odd sizes cut ratio-2 groups)")
    ap.add_argument("--block-size", type=int, default=16, help="page size of the CachePool")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tol-factor", type=float, default=4.0, help="pass: calc_diff <= this x HF's bf16 spread")
    ap.add_argument("--tol-floor", type=float, default=1e-6, help="pass: calc_diff <= this in any case")
    ap.add_argument("--independent-index-heads", action="store_true",
                    help="draw the indexer query heads independently (exact-zero score ties: see init_weights)")
    ap.add_argument("--hf-fp8-act", action="store_true",
                    help="also run HF (fp32 and bf16) with v4hal's FP8 activations ahead of every FP8 / FP4 weight "
                         "(the yardstick of --v4hal-dtype fp8) and compare the v4hal runs with it too")
    ap.add_argument("--bisect", action="store_true",
                    help="also print the teacher-forced per-layer table (see run_bisect; for an fp8 copy with "
                         "--hf-fp8-act: against HF with FP8 activations)")
    ap.add_argument("--generate", action="store_true", help="also record HF generate()'s greedy tokens")
    ap.add_argument("--skip-v4hal", action="store_true", help="run the HF side only")
    return ap


def check_args(a: argparse.Namespace, error: Callable[[str], Any]) -> None:
    if a.prompt_len < 2:
        error(f"--prompt-len must be >= 2, got {a.prompt_len}")
    if a.decode < 1:
        error(f"--decode must be >= 1, got {a.decode}")
    if a.threads < 1 or a.block_size < 1:
        error(f"--threads and --block-size must be >= 1, got {a.threads}, {a.block_size}")
    if a.tol_factor <= 0 or a.tol_floor < 0:
        error(f"--tol-factor must be > 0 and --tol-floor >= 0, got {a.tol_factor}, {a.tol_floor}")
    if a.out.exists() and a.out.is_dir():
        error(f"--out must be a file path, got the folder {a.out}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    check_args(a, ap.error)
    result = run(a)
    print(format_table(result))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    progress(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
