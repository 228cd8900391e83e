"""Checkpoints: the random writer, every layout loading to the same logits, and loading errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from v4hal.model import (
    CheckpointDTypeError,
    CheckpointError,
    CheckpointShapeError,
    ModelConfig,
    V4Model,
    checkpoint_spec,
    read_checkpoint,
    write_random_checkpoint,
)
from v4hal.model.checkpoint import hf_rename, shard_dim

PROMPT = torch.randint(0, 512, (2, 21), generator=torch.Generator().manual_seed(0))


NEXT = torch.tensor([[5], [77]])


def _logits(path: Path, **kw) -> torch.Tensor:
    """Prefill logits and the logits of one decode step (fixed next tokens)."""
    model = V4Model.from_pretrained(path, **kw)
    out = model(PROMPT, 0)
    return torch.stack([out, model(NEXT, PROMPT.shape[1])])


@pytest.fixture(scope="module")
def base_logits(mini_fp8) -> torch.Tensor:
    return _logits(mini_fp8)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model0-mp1.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _variant(src: Path, dst: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text()) if config is None else config
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(dst / "model0-mp1.safetensors"))
    return dst


# ------------------------------------------------------------------------------ the writer
def test_random_checkpoint_is_sane_and_seeded(mini_fp8, base_logits, tmp_path) -> None:
    assert torch.isfinite(base_logits).all()
    assert base_logits.std() > 0.3, "degenerate logits"
    assert len(set(base_logits[0].argmax(-1).tolist())) == 2, "both rows predict the same token"
    spec = checkpoint_spec(ModelConfig.preset("v4-mini"))
    names = set(_tensors(mini_fp8))
    assert names == set(spec), (sorted(names ^ set(spec)))[:5]
    t = _tensors(mini_fp8)
    assert t["layers.0.attn.wq_a.weight"].dtype == torch.float8_e4m3fn
    assert t["layers.0.attn.wq_a.scale"].dtype == torch.float8_e8m0fnu
    assert t["layers.0.attn.wo_a.weight"].dtype == torch.bfloat16
    assert t["layers.1.ffn.experts.0.w1.weight"].dtype == torch.float4_e2m1fn_x2
    assert t["layers.0.ffn.gate.tid2eid"].dtype == torch.int32 and "layers.0.ffn.gate.bias" not in t
    same = write_random_checkpoint(ModelConfig.preset("v4-mini"), tmp_path / "again", seed=0)
    torch.testing.assert_close(_logits(same), base_logits, rtol=0, atol=0)
    other = write_random_checkpoint(ModelConfig.preset("v4-mini"), tmp_path / "other", seed=5)
    assert not torch.equal(_logits(other), base_logits)


def test_bf16_and_fp8_expert_checkpoints(tmp_path) -> None:
    cfg = ModelConfig.preset("v4-mini")
    p = write_random_checkpoint(cfg, tmp_path / "fp8e", seed=0, expert_dtype="fp8")
    t = _tensors(p)
    assert t["layers.1.ffn.experts.0.w1.weight"].dtype == torch.float8_e4m3fn
    assert t["layers.1.ffn.experts.0.w1.scale"].shape == (1, 2)
    assert json.loads((p / "config.json").read_text())["expert_dtype"] == "fp8"
    lg = _logits(p)
    assert torch.isfinite(lg).all() and lg.std() > 0.3
    # the FP8 experts and the FP8 shared expert are fused into one moe_experts call
    assert V4Model.from_pretrained(p).layers[1].ffn.fused


# ------------------------------------------------------------------------------ layouts
def test_model_parallel_rank_files(tmp_path) -> None:
    """model0-mp2 + model1-mp2, split like the public converter, load to the single-file logits.
    (v4-mini's wo_b has K = 128, which two ranks cannot split into FP8 blocks: widen o_lora_rank.)"""
    cfg = ModelConfig.preset("v4-mini").replace(o_lora_rank=128)
    one = write_random_checkpoint(cfg, tmp_path / "mp1", seed=2)
    two = write_random_checkpoint(cfg, tmp_path / "mp2", seed=2, world=2)
    assert sorted(x.name for x in two.glob("*.safetensors")) == ["model0-mp2.safetensors", "model1-mp2.safetensors"]
    with safe_open(str(two / "model1-mp2.safetensors"), framework="pt") as f:
        assert f.get_slice("embed.weight").get_shape() == [256, 256]            # vocab split in halves
        assert f.get_slice("layers.0.attn.wo_b.weight").get_shape() == [256, 128]
        assert "layers.1.ffn.experts.7.w1.weight" in f.keys()
        assert "layers.1.ffn.experts.0.w1.weight" not in f.keys()
    torch.testing.assert_close(_logits(two), _logits(one), rtol=0, atol=0)
    import v4hal
    with pytest.raises(v4hal.RangeError, match="breaks its 128x128 FP8 scale blocks"):
        write_random_checkpoint(ModelConfig.preset("v4-mini"), tmp_path / "bad", seed=2, world=2)


@pytest.mark.parametrize("layout,kw", [
    ("inference", dict(fp4_storage="I8")),
    ("hf", dict(shards=3)),
    ("hf", dict(shards=1)),
])
def test_layouts_give_the_same_logits(tmp_path, base_logits, layout, kw) -> None:
    p = write_random_checkpoint(ModelConfig.preset("v4-mini"), tmp_path / "ckpt", seed=0, layout=layout, **kw)
    files = sorted(x.name for x in p.glob("*.safetensors"))
    if layout == "hf":
        cfg = json.loads((p / "config.json").read_text())
        assert "hidden_size" in cfg and "dim" not in cfg
        assert (p / "model.safetensors.index.json").exists() and len(files) == kw["shards"]
    torch.testing.assert_close(_logits(p), base_logits, rtol=0, atol=0)


def test_hf_names_and_fp8_wo_a(tmp_path, mini_fp8, base_logits) -> None:
    """A Hugging Face file with ``model.`` prefixes, ``self_attn``/``mlp`` and ``weight_scale_inv`` names,
    ``e_score_correction_bias``, an FP8 ``wo_a`` and MTP copies of embed/head."""
    t = _tensors(mini_fp8)
    hf = {}
    for k, v in t.items():
        name = "model." + k.replace(".attn.", ".self_attn.").replace(".ffn.", ".mlp.")
        name = name.replace(".scale", ".weight_scale_inv") if k.endswith(".scale") else name
        name = name.replace("gate.bias", "gate.e_score_correction_bias")
        hf[name] = v.view(torch.int8) if v.dtype == torch.float4_e2m1fn_x2 else v
    assert hf_rename("model.layers.0.self_attn.wq_a.weight_scale_inv") == "layers.0.attn.wq_a.scale"
    assert hf_rename("mtp.0.embed.weight") is None and hf_rename("mtp.0.head.weight") is None
    import v4hal
    for k in [k for k in hf if k.endswith("self_attn.wo_a.weight")]:
        q, s = v4hal.quant_weight_fp8(hf[k].float(), 128, "ue8m0")
        hf[k], hf[k[:-len("weight")] + "weight_scale_inv"] = q, s
    hf["model.mtp.0.embed.weight"] = t["embed.weight"].clone()
    hf["model.mtp.0.head.weight"] = t["head.weight"].clone()
    cfg = json.loads((mini_fp8 / "config.json").read_text())
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(hf, str(d / "model.safetensors"))
    # the writer draws wo_a on the FP8 grid, so its FP8 encoding here is lossless
    torch.testing.assert_close(_logits(d), base_logits, rtol=0, atol=0)


def test_fp32_scales_load(tmp_path, mini_fp8, base_logits) -> None:
    t = _tensors(mini_fp8)
    t = {k: (v.float() if v.dtype == torch.float8_e8m0fnu and "experts." not in k else v) for k, v in t.items()}
    lg = _logits(_variant(mini_fp8, tmp_path / "f32s", t))
    torch.testing.assert_close(lg, base_logits, rtol=0, atol=0)


def test_experts_fp8_reencoding_matches_fp4(mini_fp8, base_logits) -> None:
    """Lossless FP4 -> FP8 re-encoding: the experts compute bit for bit the same; fusing the shared expert
    into the same call moves the rounding of the routed sum (bf16 noise, amplified by FP8 layers)."""
    model = V4Model.from_pretrained(mini_fp8, experts_fp8=True)
    plain = V4Model.from_pretrained(mini_fp8)
    assert model.layers[1].ffn.experts.kind == "fp8" and model.layers[1].ffn.fused
    assert plain.layers[1].ffn.experts.kind == "fp4" and not plain.layers[1].ffn.fused
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(0)).bfloat16()
    w = torch.rand(5, 2, generator=torch.Generator().manual_seed(1))
    idx = torch.randint(0, 8, (5, 2), generator=torch.Generator().manual_seed(2)).int()
    e8, e4 = model.layers[1].ffn.experts, plain.layers[1].ffn.experts
    assert torch.equal(e8(x, w, idx), e4(x, w, idx))
    out = model(PROMPT, 0)
    lg = torch.stack([out, model(NEXT, PROMPT.shape[1])])
    from tests.numerics import calc_diff
    assert calc_diff(lg, base_logits) < 1e-2


def test_shard_dims_follow_the_public_converter() -> None:
    assert shard_dim("layers.3.attn.wq_b.weight") == 0 and shard_dim("layers.3.attn.wq_b.scale") == 0
    assert shard_dim("layers.3.attn.wo_b.weight") == 1 and shard_dim("layers.3.attn.wo_b.scale") == 1
    assert shard_dim("layers.3.attn.attn_sink") == 0 and shard_dim("layers.3.attn.indexer.weights_proj.weight") == 0
    assert shard_dim("layers.3.hc_attn_fn") is None and shard_dim("layers.3.attn.wq_a.weight") is None
    assert shard_dim("head.weight") == 0 and shard_dim("embed.weight") == 0


# ------------------------------------------------------------------------------ errors
def test_missing_tensor(tmp_path, mini_fp8) -> None:
    t = _tensors(mini_fp8)
    del t["layers.2.attn.compressor.ape"]
    with pytest.raises(CheckpointError, match=r"missing tensor layers\.2\.attn\.compressor\.ape \(expected f32 "
                                              r"\[128, 128\]\)"):
        V4Model.from_pretrained(_variant(mini_fp8, tmp_path / "c", t))


def test_extra_tensor(tmp_path, mini_fp8) -> None:
    t = _tensors(mini_fp8)
    t["layers.0.attn.indexer.wq_b.weight"] = torch.zeros(4, 4)      # layer 0 is window-only: no indexer
    with pytest.raises(CheckpointError, match=r"unexpected tensor layers\.0\.attn\.indexer\.wq_b\.weight"):
        V4Model.from_pretrained(_variant(mini_fp8, tmp_path / "c", t))


def test_wrong_shape(tmp_path, mini_fp8) -> None:
    t = _tensors(mini_fp8)
    t["layers.1.attn.wkv.weight"] = t["layers.1.attn.wkv.weight"][:64].contiguous()
    with pytest.raises(CheckpointShapeError, match=r"layers\.1\.attn\.wkv\.weight must be \[128, 256\], "
                                                   r"found \[64, 256\]"):
        V4Model.from_pretrained(_variant(mini_fp8, tmp_path / "c", t))


def test_wrong_dtype(tmp_path, mini_fp8) -> None:
    t = _tensors(mini_fp8)
    t["layers.3.attn.wq_b.weight"] = t["layers.3.attn.wq_b.weight"].to(torch.bfloat16)   # fp8 expected
    t["layers.0.ffn.gate.tid2eid"] = t["layers.0.ffn.gate.tid2eid"].float()              # int expected
    with pytest.raises(CheckpointDTypeError) as info:
        V4Model.from_pretrained(_variant(mini_fp8, tmp_path / "c", t))
    msg = str(info.value)
    assert "layers.3.attn.wq_b.weight must be float8_e4m3fn (fp8), found bfloat16 [512, 128]" in msg
    assert "layers.0.ffn.gate.tid2eid must be int32 or int64 (i32), found float32 [512, 2]" in msg


def test_config_disagrees_with_weights(tmp_path, mini_fp8) -> None:
    cfg = json.loads((mini_fp8 / "config.json").read_text())
    cfg["dtype"] = "bf16"
    cfg["expert_dtype"] = None
    with pytest.raises(CheckpointError, match=r"layers\.0\.attn\.wq_a\.weight must be bfloat16 or float16 or "
                                              r"float32 \(bf16\), found float8_e4m3fn \[128, 256\].*and \d+ more"):
        V4Model.from_pretrained(_variant(mini_fp8, tmp_path / "c", _tensors(mini_fp8), cfg))


def test_truncated_file(tmp_path, mini_fp8) -> None:
    d = tmp_path / "trunc"
    shutil.copytree(mini_fp8, d)
    f = d / "model0-mp1.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model0-mp1\.safetensors.*truncated"):
        V4Model.from_pretrained(d)
    f.write_bytes(data[:5])                                           # not even a header
    with pytest.raises(CheckpointError, match="cannot read"):
        V4Model.from_pretrained(d)


def test_missing_files(tmp_path, mini_fp8) -> None:
    p = write_random_checkpoint(ModelConfig.preset("v4-mini").replace(o_lora_rank=128), tmp_path / "mp", seed=0,
                                world=2)
    (p / "model1-mp2.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing \['model1-mp2\.safetensors'\]"):
        V4Model.from_pretrained(p)
    h = write_random_checkpoint(ModelConfig.preset("v4-mini"), tmp_path / "hf", seed=0, layout="hf", shards=2)
    (h / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard files that are missing"):
        V4Model.from_pretrained(h)
    e = tmp_path / "empty"
    e.mkdir()
    with pytest.raises(CheckpointError, match="no .safetensors"):
        V4Model.from_pretrained(e)
    (tmp_path / "nocfg").mkdir()
    shutil.copy(mini_fp8 / "model0-mp1.safetensors", tmp_path / "nocfg")
    with pytest.raises(CheckpointError, match="config.json is missing"):
        V4Model.from_pretrained(tmp_path / "nocfg")


def test_errors_come_before_any_tensor_is_read(tmp_path, mini_fp8) -> None:
    t = _tensors(mini_fp8)
    t["norm.weight"] = torch.ones(3)
    with pytest.raises(CheckpointShapeError):
        read_checkpoint(_variant(mini_fp8, tmp_path / "c", t))          # raises at once, not while iterating
    cfg, it = read_checkpoint(mini_fp8)
    first = next(it)
    assert first[0] == "embed.weight" and first[1].dtype == torch.bfloat16
    assert cfg.dim == 256


def test_published_shapes_in_the_spec() -> None:
    """The V4-Flash tensor list: counts and the shapes CHECKPOINT.md gives; the graph builds on it (meta)."""
    cfg = ModelConfig.preset("v4-flash")
    spec = checkpoint_spec(cfg)
    assert spec["layers.2.attn.wo_a.weight"].shape == (8 * 1024, 64 * 512 // 8)
    assert spec["layers.2.attn.wq_b.scale"].shape == (64 * 512 // 128, 1024 // 128)
    assert spec["layers.2.ffn.experts.255.w2.weight"].shape == (4096, 2048 // 2)
    assert spec["layers.2.ffn.experts.255.w2.scale"].shape == (4096, 2048 // 32)
    assert spec["layers.2.attn.indexer.compressor.ape"].shape == (4, 2 * 128)
    assert spec["layers.3.attn.compressor.ape"].shape == (128, 512)
    assert "layers.3.attn.indexer.wq_b.weight" not in spec and "layers.0.attn.compressor.ape" not in spec
    assert spec["layers.2.ffn.gate.tid2eid"].shape == (129280, 6) and "layers.3.ffn.gate.bias" in spec
    assert spec["mtp.0.hc_head_fn"].shape == (4, 4 * 4096) and "mtp.0.ffn.gate.bias" in spec
    experts = sum(1 for n in spec if ".experts." in n and "shared" not in n)
    assert experts == 44 * 256 * 3 * 2
    model = V4Model(cfg)                                    # every buffer on the meta device: no memory
    assert model.layers[2].ffn.experts.w1.shape == (256, 2048, 2048)
    assert model.layers[2].attn.indexer is not None and model.layers[3].attn.indexer is None
