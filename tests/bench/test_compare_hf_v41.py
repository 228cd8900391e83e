"""bench/compare_hf_v41_cpu.py without transformers: arguments, chunk plans, the comparison math, the
tokenizer's Engram vocabulary, weight grids and the HF config of v41-mini."""
from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path

import pytest
import torch

import v4hal
from v4hal.model.config import ModelConfig
from v4hal.ops.engram import engram_vocab_map

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "compare_hf_v41_cpu.py"


@pytest.fixture(scope="module")
def cmp():
    spec = importlib.util.spec_from_file_location("compare_hf_v41_cpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_arguments_are_checked(cmp, tmp_path: Path, capsys) -> None:
    base = ["--hf-dir", str(tmp_path), "--out", str(tmp_path / "r.json")]
    for extra, msg in ((["--chunks", "3,0"], "integers >= 1"), (["--chunks", "a"], "comma-separated"),
                       (["--decode", "0"], "--decode must be >= 1"), (["--prompt-len", "1"], "--prompt-len"),
                       (["--tol-factor", "0"], "--tol-factor")):
        with pytest.raises(SystemExit):
            cmp.main(base + extra)
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cmp.main(["--out", "x.json"])                            # --hf-dir is required
    with pytest.raises(SystemExit, match="missing configuration_deepseek_v41.py, modeling_deepseek_v41.py"):
        cmp.load_hf(tmp_path)
    a = cmp.build_parser().parse_args(base + ["--chunks", "3, 5,1"])
    assert a.chunks == [3, 5, 1] and a.decode == 8 and a.model == "v41-mini"


def test_chunk_plan_cycles_and_covers(cmp) -> None:
    assert cmp.chunk_plan(10, [3, 5]) == [(0, 3), (3, 5), (8, 2)]
    assert cmp.chunk_plan(3, [7]) == [(0, 3)]
    plan = cmp.chunk_plan(40, [3, 5, 1, 7])
    assert sum(n for _, n in plan) == 40 and all(s == sum(n for _, n in plan[:i]) for i, (s, _) in enumerate(plan))
    assert any(s % 2 for s, _ in plan[1:])                  # odd starts: ratio-2 groups cut across calls
    assert cmp.spans(3, 5) == {"prompt": [0, 1, 2], "decode": [3, 4]}


def test_compare_rows_math(cmp) -> None:
    ref = {0: torch.tensor([1.0, 2.0, 3.0]), 1: torch.tensor([3.0, 0.0, 1.0]), 2: torch.tensor([0.0, 1.0, 0.0])}
    same = cmp.compare_rows(ref, dict(ref))
    assert same == {"positions": 3, "max_abs": 0.0, "calc_diff": 0.0, "argmax_agree": 1.0, "first_disagree": None,
                    "decisive": None, "decisive_disagree": None}
    got = {0: torch.tensor([1.0, 2.0, 3.5]), 1: torch.tensor([3.0, 4.0, 1.0])}   # row 1's argmax moves
    r = cmp.compare_rows(ref, got)
    a, b = torch.tensor([[1, 2, 3], [3, 0, 1.0]]).double(), torch.tensor([[1, 2, 3.5], [3, 4, 1.0]]).double()
    want = 1 - 2 * float((a * b).sum()) / float((a * a).sum() + (b * b).sum())
    assert r["positions"] == 2 and r["max_abs"] == 4.0 and math.isclose(r["calc_diff"], want, rel_tol=1e-12)
    assert r["argmax_agree"] == 0.5 and r["first_disagree"] == 1
    assert cmp.compare_rows(ref, got, [0])["argmax_agree"] == 1.0
    with pytest.raises(KeyError, match=r"\[2\]"):
        cmp.compare_rows(ref, got, [0, 2])
    assert cmp.compare_rows(ref, got, [])["positions"] == 0


def test_verdict_uses_the_bf16_spread(cmp) -> None:
    row = {"positions": 4, "calc_diff": 3e-4, "argmax_agree": 1.0}
    assert cmp.verdict(row, 1e-4, 4.0, 1e-6) == "pass"
    assert cmp.verdict(row, 5e-5, 4.0, 1e-6) == "FAIL"
    assert cmp.verdict(row, None, 4.0, 1e-3) == "pass"              # the floor alone
    assert cmp.verdict(dict(row, argmax_agree=0.75), 1.0, 4.0, 1e-6) == "FAIL"
    assert cmp.verdict(dict(row, calc_diff=float("inf")), 1.0, 4.0, 1e-6) == "FAIL"
    assert cmp.verdict({"positions": 0}, 1.0, 4.0, 1e-6) == "-"


def test_token_strings_compress_to_the_engram_vocabulary(cmp) -> None:
    """v4hal's own Engram normaliser gives the tokenizer exactly engram_compressed_vocab_size keys."""
    cfg = ModelConfig.preset("v41-mini")
    words = cmp.token_strings(cfg.vocab_size, cfg.engram_compressed_vocab_size)
    assert len(words) == cfg.vocab_size == len(set(words))
    mapping, size = engram_vocab_map(words)
    assert size == cfg.engram_compressed_vocab_size
    assert int(mapping[words.index("T4")]) == int(mapping[words.index("t4")])
    assert int(mapping[words.index("\u00e95")]) == int(mapping[words.index("e5")])
    with pytest.raises(SystemExit):
        cmp.token_strings(10, 11)


def test_weight_grids_are_exact_in_their_release_formats(cmp) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g)
    fp8 = cmp._grid("model.layers.2.attn.wq_b.weight", w)
    q, s = v4hal.quant_weight_fp8(fp8, 32, "ue8m0")
    assert torch.equal(v4hal.dequant_fp8(q, s, 32), fp8) and not torch.equal(fp8, w)
    fp4 = cmp._grid("model.layers.0.ffn.experts.3.w1.weight", w)
    q, s = v4hal.quant_weight_fp4(fp4, 16)
    assert torch.equal(v4hal.dequant_fp4(q, s, 16), fp4)
    assert len(fp4.unique()) < len(fp8.unique())
    shared = cmp._grid("model.layers.0.ffn.shared_experts.w2.weight", w)
    assert torch.equal(shared, fp8)
    assert torch.equal(cmp._grid("model.layers.0.hc_attn_fn", w), w)
    assert torch.equal(cmp._grid("model.embed.weight", w), w.bfloat16().float())
    rows = cmp._grid("model.layers.1.engram.embed.weight", w)
    assert torch.equal(rows.to(torch.bfloat16).float(), rows) and (rows - w).abs().max() < 0.1 * w.abs().max()


def test_release_names(cmp) -> None:
    assert cmp.release_name("lm_head.weight") == "head.weight"
    assert cmp.release_name("model.embed.weight") == "embed.weight"
    assert cmp.release_name("model.layers.4.attn.compressor.wkv.weight") == "layers.4.attn.compressor.wkv.weight"


def test_hf_config_of_v41_mini(cmp) -> None:
    cfg = ModelConfig.preset("v41-mini")
    kw = cmp.hf_config_kwargs(cfg)
    assert kw["compress_ratios"] == [0, 0, 2, 2, 1, 1, 1, 1] and kw["kv_source_layer_ids"] == [2, 4]
    assert kw["index_source_layer_ids"] == [2, 4, 6] and kw["candidate_source_layer_id"] == 4
    assert (kw["candidate_topk_blocks"], kw["candidate_block_size"]) == (4, 4)
    assert kw["engram_layer_ids"] == [1, 4] and kw["engram_num_embeddings"] == cfg.engram_num_embeddings
    assert kw["rms_norm_eps"] == 1e-20 and kw["sliding_window"] == cfg.window_size
    assert kw["rope_scaling"]["original_max_position_embeddings"] == cfg.original_seq_len
    assert kw["num_nextn_predict_layers"] == 0
    with pytest.raises(SystemExit, match="V4.1"):
        cmp.hf_config_kwargs(ModelConfig.preset("v4-mini"))


def test_parse_chunks_type(cmp) -> None:
    assert cmp.parse_chunks("7") == [7]
    with pytest.raises(argparse.ArgumentTypeError):
        cmp.parse_chunks("")


@pytest.fixture(scope="module")
def v41_model(tmp_path_factory):
    from v4hal.model import V4Model, write_random_checkpoint

    cfg = ModelConfig.preset("v41-mini").replace(max_seq_len=256)
    return V4Model.from_pretrained(write_random_checkpoint(cfg, tmp_path_factory.mktemp("v41"), seed=0))


def test_v4hal_side_runs_the_documented_api(cmp, v41_model) -> None:
    """The driver's v4hal runs on a random DeepSeek-V4.1 model (v41-mini): ``forward`` in chunks that cut ratio-2
    groups and ``forward_batch`` beside two other requests give, bit for bit, the rows of the one-shot
    ``forward``."""
    model, cfg = v41_model, v41_model.config
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (30,), generator=g).tolist()
    others = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (15, 11)]
    prompt, sizes = 24, [3, 5, 1, 7]
    decode = [(p, 1) for p in range(prompt, len(tokens))]
    one = cmp.v4hal_forward_rows(model, tokens, [(0, prompt)] + decode)
    chunked = cmp.v4hal_forward_rows(model, tokens, cmp.chunk_plan(prompt, sizes) + decode)
    batched = cmp.v4hal_batched_rows(model, tokens, prompt, sizes, others, 16)
    assert sorted(one) == list(range(prompt - 1, len(tokens)))
    assert sorted(chunked) == sorted(batched) == [2, 7, 8, 15, 18] + sorted(one)
    assert all(torch.equal(one[p], chunked[p]) for p in one)
    assert cmp.compare_rows(chunked, batched) == {"positions": 12, "max_abs": 0.0, "calc_diff": 0.0,
                                                  "argmax_agree": 1.0, "first_disagree": None, "decisive": None,
                                                  "decisive_disagree": None}


def test_v4hal_tensors_quantize_losslessly_or_refuse(cmp) -> None:
    """Weights on their release grids go into FP8 tiles / FP4 blocks / FP8 Engram rows exactly, with scales;
    a weight off its grid is refused; the rest is bf16 (fp32 where the release keeps fp32)."""
    cfg = ModelConfig.preset("v41-mini")
    g = torch.Generator().manual_seed(1)

    def on_grid(name: str, *shape: int) -> tuple[str, torch.Tensor]:
        return name, cmp._grid(name, torch.randn(*shape, generator=g))

    named = [on_grid("model.layers.2.attn.wq_a.weight", 128, 256),
             on_grid("model.layers.0.ffn.experts.1.w2.weight", 256, 128),
             on_grid("model.layers.1.engram.embed.weight", 96, 64),
             ("model.layers.1.engram.embed.scale", torch.ones(96, 2)),
             on_grid("model.layers.0.hc_attn_fn", 24, 1024), on_grid("lm_head.weight", 512, 256)]
    kinds = {"layers.2.attn.wq_a.weight": "fp8", "layers.0.ffn.experts.1.w2.weight": "fp4",
             "layers.1.engram.embed.weight": "fp8"}
    out = cmp.v4hal_tensors(cfg, named, kinds)
    assert sorted(out) == sorted(["layers.2.attn.wq_a.weight", "layers.2.attn.wq_a.scale",
                                  "layers.0.ffn.experts.1.w2.weight", "layers.0.ffn.experts.1.w2.scale",
                                  "layers.1.engram.embed.weight", "layers.1.engram.embed.scale",
                                  "layers.0.hc_attn_fn", "head.weight"])
    assert out["layers.2.attn.wq_a.scale"].shape == (4, 8)
    assert out["layers.2.attn.wq_a.weight"].dtype == torch.float8_e4m3fn
    assert torch.equal(v4hal.dequant_fp8(out["layers.2.attn.wq_a.weight"], out["layers.2.attn.wq_a.scale"], 32),
                       named[0][1])
    assert out["layers.0.ffn.experts.1.w2.scale"].shape == (256, 8)
    assert torch.equal(v4hal.dequant_fp4(out["layers.0.ffn.experts.1.w2.weight"],
                                         out["layers.0.ffn.experts.1.w2.scale"], 16), named[1][1])
    assert out["layers.1.engram.embed.scale"].shape == (96, 2)            # the computed scales, not HF's ones
    assert torch.equal(v4hal.dequant_fp8(out["layers.1.engram.embed.weight"], out["layers.1.engram.embed.scale"], 32),
                       named[2][1])
    assert out["layers.0.hc_attn_fn"].dtype == torch.float32 and out["head.weight"].dtype == torch.bfloat16
    plain = cmp.v4hal_tensors(cfg, named, {})
    assert plain["layers.1.engram.embed.scale"].dtype == torch.bfloat16 and len(plain) == len(named)
    with pytest.raises(SystemExit, match="layers.2.attn.wq_a.weight: its fp8 form"):
        cmp.v4hal_tensors(cfg, [("model.layers.2.attn.wq_a.weight", torch.randn(128, 256, generator=g))], kinds)


def test_near_ties_are_told_apart(cmp) -> None:
    """A disagreement where the reference's top-2 margin is within HF bf16's own wobble is a near tie: it does not
    fail the verdict; one at a decisive position does."""
    ref = {0: torch.tensor([1.0, 1.05, 0.0]), 1: torch.tensor([3.0, 0.0, 1.0]), 2: torch.tensor([0.0, 2.0, 0.0])}
    bf16 = {0: torch.tensor([1.0, 1.0, 0.1]), 1: torch.tensor([3.0, 0.1, 1.0]), 2: torch.tensor([0.0, 2.0, 0.2])}
    other = {0: ref[0], 1: ref[1], 2: torch.tensor([2.5, 2.0, 0.0])}      # a second bf16 sample: wobble 2.5 at 2
    got = {0: torch.tensor([1.1, 1.0, 0.0]), 1: torch.tensor([3.0, 0.0, 1.0]), 2: torch.tensor([0.0, 2.0, 0.0])}
    r = cmp.compare_rows(ref, got, None, [bf16])
    assert r["argmax_agree"] == 2 / 3 and (r["decisive"], r["decisive_disagree"]) == (2, 0)
    assert cmp.verdict(r, 1.0, 4.0, 1e-6) == "pass"
    assert cmp.compare_rows(ref, got, None, [bf16, other])["decisive"] == 1        # the larger wobble counts
    moved = {**got, 1: torch.tensor([0.0, 0.0, 1.0])}                       # a decisive position's argmax moves
    r = cmp.compare_rows(ref, moved, None, [bf16])
    assert (r["decisive"], r["decisive_disagree"]) == (2, 1) and cmp.verdict(r, 1.0, 4.0, 1e-6) == "FAIL"
    with pytest.raises(KeyError):
        cmp.compare_rows(ref, got, None, [{0: bf16[0]}])


def test_yardsticks_and_table(cmp) -> None:
    """v4hal runs are judged against HF fp32 with both HF bf16 cuts as the spread (and the FP8-activation
    reference when it ran); HF runs are listed against HF fp32 without a verdict."""
    assert cmp.yardsticks("hf_bf16", {}) == [("hf_fp32", [])]
    assert cmp.yardsticks("v4hal_chunked", {}) == [("hf_fp32", ["hf_bf16", "hf_bf16_chunked"])]
    assert cmp.yardsticks("v4hal_forward", {"hf_fp32_fp8act": {}})[1] == \
        ("hf_fp32_fp8act", ["hf_bf16_fp8act", "hf_bf16_fp8act_chunked"])
    g = torch.Generator().manual_seed(3)
    ref = {p: torch.randn(16, generator=g) for p in range(4)}
    runs = {"hf_fp32": ref, "hf_bf16": {p: v + 0.01 for p, v in ref.items()},
            "hf_bf16_chunked": {p: v - 0.02 for p, v in ref.items()}, "v4hal_forward": {1: ref[1] + 0.015, 3: ref[3]}}
    table = cmp.comparisons(runs, cmp.spans(2, 4), 4.0, 1e-9)
    v4 = [r for r in table if r["run"] == "v4hal_forward"]
    assert [(r["phase"], r["positions"], r["verdict"]) for r in v4] == [("prompt", 1, "pass"), ("decode", 1, "pass")]
    spread = max(cmp.compare_rows(ref, runs["hf_bf16_chunked"], pos)["calc_diff"] for pos in ([1], [0, 1]))
    assert math.isclose(v4[0]["spread"], spread, rel_tol=1e-12)
    assert all(r["verdict"] == "-" for r in table if r["run"].startswith("hf_"))


def test_v4hal_kinds_keep_the_engram_tables_fp8(cmp) -> None:
    """Both copies store the Engram tables FP8 (the only layout v4hal reads); the bf16 copy nothing else."""
    from v4hal.model.spec import checkpoint_spec

    cfg = ModelConfig.preset("v41-mini")
    tables = {n for n, t in checkpoint_spec(cfg).items() if t.kind == "table"}
    assert tables == {"layers.1.engram.embed.weight", "layers.4.engram.embed.weight"}
    v4cfg, kinds = cmp.v4hal_kinds(cfg, "bf16")
    assert v4cfg.dtype == "bf16" and v4cfg.expert_dtype is None and kinds == {n: "fp8" for n in tables}
    v4cfg, kinds = cmp.v4hal_kinds(cfg, "fp8")
    spec = checkpoint_spec(v4cfg)
    assert v4cfg.dtype == "fp8" and v4cfg.expert_dtype == "fp4" and set(kinds.values()) == {"fp8", "fp4"}
    assert {n for n, t in spec.items() if t.kind in ("fp8", "fp4", "table")} == set(kinds)
    with pytest.raises(SystemExit):
        cmp.v4hal_kinds(cfg, "fp16")


def test_fp8_activation_emulation(cmp) -> None:
    """The round trip is v4hal's act_quant (e4m3, power-of-two scale per 128); it is hooked onto exactly the
    linears the FP8 copy stores FP8 / FP4, found by their HF names."""
    from torch import nn

    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 256, generator=g) * torch.logspace(-2, 1, 256)
    y = cmp.fp8_activation_round_trip(x)
    q, sc = v4hal.act_quant(x, 128, "ue8m0")
    assert torch.equal(y, (q.float().view(3, 2, 128) * sc.float().unsqueeze(-1)).view(3, 256)) and not torch.equal(x, y)
    assert torch.equal(cmp.fp8_activation_round_trip(y), y)

    cfg = ModelConfig.preset("v41-mini")
    _, kinds = cmp.v4hal_kinds(cfg, "fp8")
    names = sorted(n[:-len(".weight")] for n, k in kinds.items() if k in ("fp8", "fp4") and ".embed." not in n)
    root = nn.Module()
    for name in names + ["layers.2.attn.compressor.wkv", "layers.2.attn.wo_a"]:      # two that stay unquantized
        parent = root
        for part in ("model." + name).split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(name.split(".")[-1], nn.Linear(256, 256, bias=False))
    hooked = cmp.emulate_fp8_activations(root, cfg)
    assert sorted(h[len("model."):] for h in hooked) == names
    assert "layers.0.ffn.experts.3.w2" in names and "layers.1.engram.wkv" in names
    lin = root.model.layers[0].attn.wq_a if isinstance(root.model.layers, nn.ModuleList) else \
        root.model.layers.get_submodule("0.attn.wq_a")
    assert torch.equal(lin(x), nn.functional.linear(y, lin.weight))
    wo_a = root.get_submodule("model.layers.2.attn.wo_a")
    assert torch.equal(wo_a(x), nn.functional.linear(x, wo_a.weight))
    with pytest.raises(SystemExit, match="no HF linear"):
        cmp.emulate_fp8_activations(nn.Module(), cfg)


def test_forced_layers_replay_their_own_inputs(cmp, v41_model) -> None:
    """`v4hal_forced_rows` starts every layer from the given inputs: forced with the inputs a plain run gave each
    layer (prefill in odd chunks, then decode), it reproduces that run's layer outputs bit for bit, and leaves the
    blocks as they were."""
    model = v41_model
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(3, model.config.vocab_size, (14,), generator=g).tolist()
    pieces = cmp.chunk_plan(11, [3, 5]) + [(11, 1), (12, 1), (13, 1)]
    seen, outs, call = {}, {}, [0]
    for i, block in enumerate(model.layers):
        def lagged(h, mix, *args, _orig=block.forward_lagged, i=i, **kw):
            seen[(call[0], "in", i)] = (h.float().clone(), mix.clone())
            out = _orig(h, mix, *args, **kw)
            outs[(call[0], "layer", i)] = out[0].float().reshape(-1, out[0].shape[-1]).clone()
            return out
        block.forward_lagged = lagged
    try:
        with torch.inference_mode():
            for c, (start, n) in enumerate(pieces):
                call[0] = c
                model.forward(torch.tensor([tokens[start:start + n]]), start)
    finally:
        for block in model.layers:
            del block.forward_lagged
    forced = cmp.v4hal_forced_rows(model, tokens, pieces, seen)
    layer_keys = [k for k in forced if k[1] == "layer"]
    assert sorted(layer_keys) == sorted(outs) and len(outs) == len(pieces) * model.config.n_layers
    assert all(torch.equal(forced[k], outs[k]) for k in outs)
    assert {k[1] for k in forced} == {"layer", "attn", "ffn", "engram"}
    assert all("forward_lagged" not in vars(b) for b in model.layers)
    rows = cmp.bisect_layers(forced, {"same": forced}, len(pieces), model.config.n_layers)
    assert [(r["layer"], r["part"]) for r in rows[:5]] == [(0, "attn"), (0, "ffn"), (0, "layer"), (1, "engram"),
                                                           (1, "attn")]
    assert all(r["same"] == 0.0 and r["same_median"] == 0.0 for r in rows)
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]).double()
    b = torch.tensor([[1.0, 0.0], [0.0, -2.0], [1.0, 0.0]]).double()
    assert cmp._row_diffs(a, b).tolist() == [0.0, 2.0, 1 - 2 / 3]
    two = [{"layer": 0, "part": "attn", "hf_bf16_median": 1e-4, "v4hal_median": 2e-4},
           {"layer": 1, "part": "ffn", "hf_bf16_median": 1e-5, "v4hal_median": 5e-5}]
    assert cmp.bisect_verdict(two, 4.0) == {"verdict": "FAIL", "worst_layer": 1, "worst_part": "ffn",
                                            "worst_median_ratio": 5.0}
    assert cmp.bisect_verdict(two, 5.0)["verdict"] == "pass"


def test_model_config_replaces_fields(cmp) -> None:
    cfg = cmp.model_config("v41-mini", '{"n_layers": 10, "compress_ratios": [0, 0, 2, 2, 2, 2, 1, 1, 1, 1], '
                                       '"kv_source_layers": [2, 4, 6], "index_source_layers": [2, 4, 6, 8], '
                                       '"candidate_source_layer": 6}')
    assert cfg.n_layers == 10 and cfg.kv_source_of(5) == 4 and cfg.index_source_of(9) == 8
    assert cmp.model_config("v41-mini", None) == ModelConfig.preset("v41-mini")
    for bad in ("[1]", "{", '{"no_such_field": 1}', '{"n_layers": 10}'):      # the last: ratios of 8 layers
        with pytest.raises(SystemExit, match="--replace"):
            cmp.model_config("v41-mini", bad)
