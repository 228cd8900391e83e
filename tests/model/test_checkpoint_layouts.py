"""The DeepSeek-V4.1 hub layout and the layouts transformers' save_pretrained writes (V4.1 and V4 5.23)."""
from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from v4hal.hal.errors import RangeError
from v4hal.model.checkpoint import (
    CheckpointError,
    read_checkpoint,
    read_for_device,
    to_transformers_name,
    transformers_rename,
)
from v4hal.model.config import ModelConfig
from v4hal.model.random_checkpoint import write_random_checkpoint
from v4hal.model.spec import checkpoint_spec

FIXTURES = Path(__file__).parent / "fixtures"


def _headers(path: Path) -> dict[str, list]:
    out = {}
    for p in glob.glob(str(path / "*.safetensors")):
        f = safe_open(p, "pt")
        for k in f.keys():
            out[k] = [f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()]
    return out


def _read(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    cfg, it = read_checkpoint(path)
    return cfg, dict(it)


def _same(a: torch.Tensor, b: torch.Tensor, bf16: bool) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point() and a.element_size() >= 2:
        if bf16:
            a, b = a.to(torch.bfloat16), b.to(torch.bfloat16)
        return torch.equal(a.float(), b.float())
    return torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a, b.view(torch.uint8)
                       if b.element_size() == 1 else b)


def test_v4_transformers_layout_is_what_transformers_5_23_writes(tmp_path) -> None:
    """The tensor names / dtypes / shapes and config.json of transformers 5.23's save_pretrained of a bf16
    DeepseekV4ForCausalLM shaped like v4-mini (recorded from transformers itself in tests/model/fixtures)."""
    d = write_random_checkpoint(ModelConfig.preset("v4-mini"), tmp_path / "t", dtype="bf16", layout="transformers")
    assert _headers(d) == json.loads((FIXTURES / "v4_transformers_tensors.json").read_text())
    assert json.loads((d / "config.json").read_text()) == json.loads(
        (FIXTURES / "v4_transformers_config.json").read_text())


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_v4_transformers_layout_reads_back(tmp_path, dtype: str) -> None:
    cfg = ModelConfig.preset("v4-mini")
    ref_cfg, ref = _read(write_random_checkpoint(cfg, tmp_path / "inf", seed=3, dtype=dtype))
    got_cfg, got = _read(write_random_checkpoint(cfg, tmp_path / "tr", seed=3, dtype=dtype, layout="transformers",
                                                 shards=3))
    # transformers builds no MTP layers: the checkpoint is read as the main model
    want = ref_cfg.replace(n_mtp_layers=0, compress_ratios=ref_cfg.compress_ratios[:cfg.n_layers])
    if dtype == "bf16":        # a config without quantization_config says nothing of activation scales
        want = want.replace(scale_fmt=None, scale_dtype="fp32")
    assert got_cfg == want
    assert set(got) == {n for n in ref if not n.startswith("mtp.")}
    bad = [n for n in got if not _same(got[n], ref[n], bf16=True)]
    assert bad == []


@pytest.mark.parametrize("layout", ["hub", "transformers"])
def test_v41_layouts_read_back(tmp_path, layout: str) -> None:
    cfg = ModelConfig.preset("v41-mini")
    ref_cfg, ref = _read(write_random_checkpoint(cfg, tmp_path / "inf", seed=5))
    d = write_random_checkpoint(cfg, tmp_path / layout, seed=5, layout=layout, shards=2)
    names = set(_headers(d))
    if layout == "transformers":
        assert "lm_head.weight" in names and all(n == "lm_head.weight" or n.startswith("model.") for n in names)
        assert not any(n.endswith(".scale") and "engram.embed" not in n for n in names)
    else:   # the inference names, plus the scales of wo_a, which the hub stores FP8 (dequantized at load)
        assert names == set(_headers(tmp_path / "inf")) | {f"layers.{i}.attn.wo_a.scale" for i in range(8)}
        assert _headers(d)["layers.0.attn.wo_a.weight"][0] == "F8_E4M3"
    got_cfg, got = _read(d)
    assert got_cfg == ref_cfg and set(got) == set(ref)
    assert [n for n in got if not _same(got[n], ref[n], bf16=layout == "transformers")] == []


def test_v41_hub_skips_dspark_and_vision_refuses_the_rest(tmp_path) -> None:
    cfg = ModelConfig.preset("v41-mini").replace(dspark_layers=3)
    d = write_random_checkpoint(cfg, tmp_path / "hub", seed=1, layout="hub")
    extra = {"mtp.0.attn.wq_a.weight": torch.zeros(4, 4), "mtp.2.markov_head.head.weight": torch.zeros(2, 2),
             "vision.blocks.0.attn.wqkv.weight": torch.zeros(2, 2), "aligner.w1.weight": torch.zeros(2, 2),
             "image_newline": torch.zeros(4)}
    save_file(extra, str(d / "extra.safetensors"))
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: "extra.safetensors" for k in extra})
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    got_cfg, got = _read(d)
    assert got_cfg == cfg and not any(n.startswith(("mtp.", "vision.", "aligner.", "image_")) for n in got)
    save_file({"layers.0.attn.bogus.weight": torch.zeros(2)}, str(d / "extra2.safetensors"))
    index["weight_map"]["layers.0.attn.bogus.weight"] = "extra2.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="unexpected tensor layers.0.attn.bogus.weight"):
        read_checkpoint(d)


def _v41_hub_names(n_layers: int = 3) -> list[str]:
    """Hub names of every kind of V4.1 tensor (module paths of the public HF DeepseekV41 model, whose modules
    carry the release names): a window layer with Engram, a KV + index source, a consumer."""
    names = ["embed.weight", "norm.weight", "head.weight"]
    for i in range(n_layers):
        p = f"layers.{i}"
        names += [f"{p}.attn_norm.weight", f"{p}.ffn_norm.weight"]
        names += [f"{p}.hc_{s}_{k}" for s in ("attn", "ffn") for k in ("fn", "base", "scale")]
        for w in ("wq_a", "wq_b", "wkv", "wo_a", "wo_b"):
            names += [f"{p}.attn.{w}.weight", f"{p}.attn.{w}.scale"]
        names += [f"{p}.attn.attn_sink", f"{p}.attn.q_norm.weight", f"{p}.attn.kv_norm.weight"]
        names += [f"{p}.ffn.gate.weight", f"{p}.ffn.gate.bias", f"{p}.ffn.gate.bias_vl"]
        for e in ("experts.0", "experts.1", "shared_experts"):
            for w in ("w1", "w2", "w3"):
                names += [f"{p}.ffn.{e}.{w}.weight", f"{p}.ffn.{e}.{w}.scale"]
    names += ["layers.0.engram.embed.weight", "layers.0.engram.embed.scale", "layers.0.engram.wkv.weight",
              "layers.0.engram.wkv.scale", "layers.0.engram.q_weight", "layers.0.engram.k_weight"]
    names += [f"layers.1.attn.compressor.{w}" for w in ("wkv.weight", "wgate.weight", "norm.weight")]
    names += [f"layers.1.attn.indexer.{w}" for w in ("wq_b.weight", "wq_b.scale", "weights_proj.weight",
                                                    "wk.weight", "k_norm.weight")]
    return names


def test_v41_transformers_names() -> None:
    hf = {n: to_transformers_name(n, True) for n in _v41_hub_names()}
    assert hf["head.weight"] == "lm_head.weight" and hf["embed.weight"] == "model.embed.weight"
    assert hf["layers.0.attn.wq_a.scale"] == "model.layers.0.attn.wq_a.weight_scale_inv"
    assert hf["layers.0.engram.embed.scale"] == "model.layers.0.engram.embed.scale"
    assert hf["layers.1.attn.indexer.k_norm.weight"] == "model.layers.1.attn.indexer.k_norm.weight"
    assert hf["layers.2.ffn.gate.bias_vl"] == "model.layers.2.ffn.gate.bias_vl"
    assert len(set(hf.values())) == len(hf)
    assert {n: transformers_rename(t, True) for n, t in hf.items()} == {n: n for n in hf}
    for skipped in ("mtp.0.attn.wq_a.weight", "model.vision.blocks.0.attn.wo.weight", "aligner.w1.weight",
                    "model.image_newline"):
        assert transformers_rename(skipped, True, dspark_layers=3) is None
    assert transformers_rename("mtp.3.attn.wq_a.weight", True, dspark_layers=3) == "mtp.3.attn.wq_a.weight"


def test_v4_transformers_names() -> None:
    names = [n for n in checkpoint_spec(ModelConfig.preset("v4-mini")) if not n.startswith("mtp.")]
    hf = {n: to_transformers_name(n, False) for n in names}
    assert hf["layers.0.attn.kv_norm.weight"] == "model.layers.0.attn.norm.weight"
    assert hf["layers.1.attn.compressor.norm.weight"] == "model.layers.1.attn.compressor.norm.weight"
    assert hf["hc_head_fn"] == "model.hc_head.hc_fn" and hf["embed.weight"] == "model.embed_tokens.weight"
    assert len(set(hf.values())) == len(hf) and all(transformers_rename(t, False) == n for n, t in hf.items())


def test_read_for_device_engram_device_is_checked(tmp_path) -> None:
    d = write_random_checkpoint(ModelConfig.preset("v41-mini"), tmp_path / "c", seed=0)
    with pytest.raises(RangeError, match="engram_device"):
        read_for_device(d, engram_device="not-a-device")
    cfg, it = read_for_device(d, engram_device="cpu")
    assert cfg.engram_layers == [1, 4] and all(t.device.type == "cpu" for _, t in it)


def test_hub_layout_is_v41_only(tmp_path) -> None:
    with pytest.raises(RangeError, match="layout"):
        write_random_checkpoint(ModelConfig.preset("v4-mini"), tmp_path / "x", layout="hub")




def test_matches_transformers_itself(tmp_path) -> None:
    """Only where transformers (5.23, with DeepseekV4) is installed: its save_pretrained of a bf16 model shaped like
    v4-mini gives the same names, dtypes, shapes and config.json as layout="transformers", and reads back exactly."""
    tr = pytest.importorskip("transformers")
    if not hasattr(tr, "DeepseekV4ForCausalLM"):
        pytest.skip("this transformers has no DeepseekV4ForCausalLM")
    hf_cfg = tr.DeepseekV4Config(
        vocab_size=512, hidden_size=256, moe_intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        head_dim=128, q_lora_rank=128, n_routed_experts=8, num_experts_per_tok=2, o_groups=2, o_lora_rank=64,
        index_n_heads=4, index_head_dim=64, index_topk=8, sliding_window=16, compress_ratios=[0, 4, 128, 4],
        num_hash_layers=1, qk_rope_head_dim=64,
        rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                      "beta_slow": 1})
    model = tr.DeepseekV4ForCausalLM._from_config(hf_cfg, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    ours = write_random_checkpoint(ModelConfig.preset("v4-mini"), tmp_path / "ours", dtype="bf16",
                                   layout="transformers")
    assert _headers(tmp_path / "hf") == _headers(ours)
    theirs = json.loads((tmp_path / "hf" / "config.json").read_text())
    mine = json.loads((ours / "config.json").read_text())
    theirs.pop("transformers_version")
    mine.pop("transformers_version")
    assert theirs == mine
    cfg, got = _read(tmp_path / "hf")
    assert cfg.n_mtp_layers == 0 and cfg.compress_ratios == [0, 4, 128, 4]
    state = {k: v for k, v in load_file(str(tmp_path / "hf" / "model.safetensors")).items()}
    for key, t in state.items():
        name = transformers_rename(key, False)
        want = t.float() if checkpoint_spec(cfg)[name].kind == "f32" else t
        assert torch.equal(got[name].to(want.dtype), want), name


def test_from_pretrained_takes_a_transformers_v4_directory(tmp_path) -> None:
    """V4Model.from_pretrained on what transformers writes gives the model of the same weights in the inference
    layout (bit for bit)."""
    from v4hal.model.model import V4Model
    from v4hal.model.random_checkpoint import save_tensors

    cfg = ModelConfig.preset("v4-mini").replace(dtype="bf16", expert_dtype=None)
    d = write_random_checkpoint(cfg, tmp_path / "tr", seed=2, layout="transformers")
    got_cfg, tensors = _read(d)
    inf = save_tensors(got_cfg, tensors, tmp_path / "inf")
    tokens = torch.tensor([[3, 17, 250, 9, 4, 100]])
    a = V4Model.from_pretrained(d)
    b = V4Model.from_pretrained(inf)
    assert a.config == b.config and a.config.n_mtp_layers == 0
    with torch.no_grad():
        assert torch.equal(a.forward(tokens), b.forward(tokens))


@pytest.mark.parametrize("name", ["v41-mini", "v41-flash"])
def test_v41_spec_names_map_both_ways(name: str) -> None:
    spec = checkpoint_spec(ModelConfig.preset(name))
    hf = [to_transformers_name(n, True) for n in spec]
    assert len(set(hf)) == len(hf) and all(h.startswith("model.") or h == "lm_head.weight" for h in hf)
    assert [transformers_rename(h, True) for h in hf] == list(spec)


def test_v41_float_engram_tables_as_transformers_saves_them(tmp_path) -> None:
    """transformers keeps an Engram table in float (its ``scale`` then unused, saved as ones): read as the same FP8
    table (e4m3, a power-of-two scale per 32) when every value is on that grid, refused naming the row if not."""
    from v4hal.model.checkpoint import CheckpointDTypeError
    from v4hal.model.model import V4Model

    cfg = ModelConfig.preset("v41-mini")
    d = write_random_checkpoint(cfg, tmp_path / "fp8", seed=3, layout="transformers")
    (shard,) = glob.glob(str(d / "*.safetensors"))
    tensors = load_file(shard)
    tables = [k for k in tensors if k.endswith("engram.embed.weight")]
    assert len(tables) == len(cfg.engram_layers)
    for k in tables:
        scale = tensors[k[:-len("weight")] + "scale"].float()
        w = tensors[k].float().unflatten(-1, (scale.shape[-1], -1)) * scale.unsqueeze(-1)
        tensors[k] = w.flatten(-2)
        tensors[k[:-len("weight")] + "scale"] = torch.ones_like(scale)
    floats = tmp_path / "float"
    floats.mkdir()
    for f in glob.glob(str(d / "*.json")):
        (floats / Path(f).name).write_text(Path(f).read_text())
    save_file(tensors, str(floats / Path(shard).name))
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])
    want = V4Model.from_pretrained(d).forward(ids, 0)
    assert torch.equal(V4Model.from_pretrained(floats).forward(ids, 0), want)
    tensors[tables[0]][7, 5] += 1e-3                  # off the grid: loading would change it
    save_file(tensors, str(floats / Path(shard).name))
    with pytest.raises(CheckpointDTypeError, match=r"engram\.embed\.weight is a float32 Engram table whose row 7"):
        V4Model.from_pretrained(floats)
