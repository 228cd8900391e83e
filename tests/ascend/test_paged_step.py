"""The paged serving step of a V4-shaped layer under ``use_backend("ascend")`` through the stand-ins.

One layer shaped like V4 (dim 4096, 64 heads of 512, indexer 64 x 128 with top-512, window 128, ratio 4,
bf16 weights) served by the `Engine` over a `CachePool` of bf16 pages: two requests prefilled in one step,
then decode steps. On A3 and 950 the three attention ops of the step reach CANN (``sparse_attn_paged`` ->
the shared-KV sparse attention, ``indexer_topk_paged`` -> the lightning indexer, ``compressor_ragged`` ->
the compressor); A2 has no CANN compressor. Every logits row matches the reference backend's within the
model-parity tolerance of ``test_model_graph``.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import v4hal
from tests.numerics import calc_diff
from v4hal.backends.ascend import limits, register
from v4hal.hal import registry
from v4hal.model import ModelConfig, V4Model, write_random_checkpoint
from v4hal.serve import CachePool
from v4hal.serve.engine import Engine

from .fake_npu import install, uninstall

TOL_LOGITS = 2e-2
OPS = ("sparse_attn_paged", "indexer_topk_paged", "compressor_ragged")
PROMPTS = [[3, 17, 5, 9, 101, 44, 7, 12, 250], [8, 1, 66, 13, 200, 31]]
NEW = 3


def v4_shaped_config() -> ModelConfig:
    return ModelConfig.preset("v4-mini").replace(
        dim=4096, n_heads=64, head_dim=512, index_n_heads=64, index_head_dim=128, index_topk=512, q_lora_rank=128,
        o_groups=8, o_lora_rank=128, n_layers=1, compress_ratios=[4], n_mtp_layers=0, window_size=128,
        n_routed_experts=4, moe_inter_dim=128, vocab_size=256)


def serve(model: V4Model, backend: str, forced: list[list[int]] | None = None) -> dict:
    """Both prompts through the engine (bf16 pages of 16 tokens, one prefill step, then decode);
    ``forced``: the tokens to choose (default greedy). The finished requests by id."""
    pool = CachePool(model.config, block_size=16, attn_layout="bf16", indexer_layout="bf16")
    choose = None if forced is None else (lambda rid, _l: forced[rid][len(engine.running[rid].output)])
    engine = Engine(model, pool, chunk=64, keep_logits=True, choose=choose)
    with v4hal.use_backend(backend):
        for i, p in enumerate(PROMPTS):
            engine.add(i, p, NEW)
        while not engine.idle:
            engine.step()
    return engine.finished


def served_paths(stats: dict) -> dict[str, set[str]]:
    """op -> the paths that served it (``native:<tier>.<op>`` or ``reference: <reason>``)."""
    out: dict[str, set[str]] = {}
    for (op, _chip, path), _n in stats.items():
        if op in OPS:
            out.setdefault(op, set()).add(path)
    return out


def compressors(model: V4Model) -> list:
    attn = model.layers[0].attn
    return [attn.compressor, attn.indexer.compressor]


def round_compressors_to_bf16(model: V4Model) -> None:
    """Make the compressors' weights bf16 values held in fp32, as V4's checkpoints give them (the random
    checkpoint draws fp32 values), and run the load-time hook again."""
    for comp in compressors(model):
        for w in (comp.wkv.weight, comp.wgate.weight, comp.norm.weight):
            w.copy_(w.to(torch.bfloat16).float())
    for comp in compressors(model):
        comp.prepare()


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path: Path = write_random_checkpoint(v4_shaped_config(), tmp_path_factory.mktemp("v4paged"), seed=3, dtype="bf16")
    model = V4Model.from_pretrained(path)
    assert all(c.ragged_weights is None for c in compressors(model))     # fp32 values: nothing converted
    round_compressors_to_bf16(model)
    assert all(c.ragged_weights is not None and all(w.dtype == torch.bfloat16 for w in c.ragged_weights)
               for c in compressors(model))
    want = serve(model, "reference")
    return {"model": model, "want": want, "forced": [want[i].output for i in range(len(PROMPTS))]}


def run_on(chip: str, layer: dict) -> tuple[dict, dict[str, set[str]]]:
    registry.ensure_device_backends("cpu")
    handle = install(chip)
    register.enable_cpu_emulation()
    limits.reset_stats()
    try:
        got = serve(layer["model"], "ascend", layer["forced"])
        return got, served_paths(limits.stats())
    finally:
        register.disable_cpu_emulation()
        uninstall(handle)
        limits.reset_stats()


@pytest.mark.parametrize("chip", ["950", "A3", "A2"])
def test_v4_shaped_paged_step_reaches_cann(layer, chip, monkeypatch):
    monkeypatch.delenv("V4HAL_BACKEND", raising=False)
    monkeypatch.delenv("V4HAL_OP_BACKENDS", raising=False)
    v4hal.hal.dispatch.refresh()
    got, served = run_on(chip, layer)
    native = {"950": {"sparse_attn_paged": "native:_C_ascend.npu_kv_quant_sparse_attn_sharedkv",
                      "indexer_topk_paged": "native:torch_npu.npu_lightning_indexer",
                      "compressor_ragged": "native:_C_ascend.compressor"},
              "A3": {"sparse_attn_paged": "native:_C_ascend.npu_sparse_attn_sharedkv",
                     "indexer_topk_paged": "native:torch_npu.npu_lightning_indexer",
                     "compressor_ragged": "native:_C_ascend.compressor"},
              "A2": {"sparse_attn_paged": "native:_C_ascend.npu_sparse_attn_sharedkv",
                     "indexer_topk_paged": "native:torch_npu.npu_lightning_indexer"}}[chip]
    for op, path in native.items():
        assert served.get(op) == {path}, (op, served.get(op))
    if chip == "A2":
        assert served["compressor_ragged"] == {"reference: the CANN compressor does not support A2"}
    for i in range(len(PROMPTS)):
        assert got[i].output == layer["forced"][i]
        assert len(got[i].logits) == NEW
        for a, b in zip(got[i].logits, layer["want"][i].logits):
            assert calc_diff(a, b) <= TOL_LOGITS, (chip, i)


def test_bf16_compressor_weights_change_no_bit_on_the_reference(layer):
    """The load-time bf16 copies feed compressor_ragged the same values: the reference logits are the same
    bits with and without them."""
    model = layer["model"]
    kept = [c.ragged_weights for c in compressors(model)]
    try:
        for c in compressors(model):
            c.ragged_weights = None
        plain = serve(model, "reference", layer["forced"])
    finally:
        for c, w in zip(compressors(model), kept):
            c.ragged_weights = w
    for i in range(len(PROMPTS)):
        for a, b in zip(plain[i].logits, layer["want"][i].logits):
            assert torch.equal(a, b)
