"""The whole DeepSeek-V4 graph under ``use_backend("ascend")`` through the stand-ins, against the reference.

- ``v4-mini`` (FP8 weights, MXFP4 experts): most attention/mHC calls are outside the CANN limits
  (head dim 128, dim 256) and fall back; MoE, norms, rope, GEMMs go through the stand-ins.
- a one-layer V4-shaped model (dim 4096, 64 heads of 512, indexer 64 x 128, bf16 weights):
  ``npu_hc_pre_v2`` and the lightning indexer run in the graph too.

``V4Model.forward`` is the paged step over the model's private pool, so the graph's attention ops are the
paged ones (``sparse_attn_paged``, ``indexer_topk_paged``, ``compressor_ragged``).
Logits after a prefill and one decode step must match within the model-parity tolerance of
``v4hal parity --model`` (calc_diff <= 2e-2; the FP8/FP4 activation round trips turn one-ulp bf16
differences of a different summation order into ~1e-3).
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

from .fake_npu import install, uninstall

TOL_LOGITS = 2e-2


def _logits(path: Path, ids: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    model = V4Model.from_pretrained(path)
    with v4hal.use_backend(backend):
        prefill = model(ids[:, :-1], 0)
        decode = model(ids[:, -1:], ids.shape[1] - 1)
    return prefill, decode


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> dict:
    cfg = ModelConfig.preset("v4-mini")
    path = write_random_checkpoint(cfg, tmp_path_factory.mktemp("v4mini"), seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    return {"path": path, "ids": ids, "want": _logits(path, ids, "reference")}


@pytest.fixture(scope="module")
def v4_shaped(tmp_path_factory: pytest.TempPathFactory) -> dict:
    cfg = ModelConfig.preset("v4-mini").replace(
        dim=4096, n_heads=64, head_dim=512, index_n_heads=64, index_head_dim=128, index_topk=512, q_lora_rank=128,
        o_groups=8, o_lora_rank=128, n_layers=1, compress_ratios=[4], n_mtp_layers=0, window_size=128,
        n_routed_experts=4, moe_inter_dim=128, vocab_size=256)
    path = write_random_checkpoint(cfg, tmp_path_factory.mktemp("v4shaped"), seed=1, dtype="bf16")
    ids = torch.randint(0, cfg.vocab_size, (1, 13), generator=torch.Generator().manual_seed(1))
    return {"path": path, "ids": ids, "want": _logits(path, ids, "reference")}


def _run_ascend(chip: str, case: dict) -> tuple[tuple[torch.Tensor, torch.Tensor], dict[str, set[str]]]:
    registry.ensure_device_backends("cpu")
    handle = install(chip)
    register.enable_cpu_emulation()
    try:
        got = _logits(case["path"], case["ids"], "ascend")
        served: dict[str, set[str]] = {}
        for (op, _chip, path), _n in limits.stats().items():
            served.setdefault(op, set()).add(path.split(" ")[0].split(":")[0])
        return got, served
    finally:
        register.disable_cpu_emulation()
        uninstall(handle)
        limits.reset_stats()


@pytest.mark.parametrize("chip", ["A2", "950"])
def test_v4_mini_graph(mini, chip, monkeypatch):
    monkeypatch.delenv("V4HAL_BACKEND", raising=False)
    v4hal.hal.dispatch.refresh()
    (prefill, decode), served = _run_ascend(chip, mini)
    want_prefill, want_decode = mini["want"]
    assert calc_diff(prefill, want_prefill) <= TOL_LOGITS
    assert calc_diff(decode, want_decode) <= TOL_LOGITS
    for op in ("rms_norm", "rotary_emb", "moe_gate", "moe_experts", "hc_post", "grouped_gemm"):
        assert "native" in served[op], (op, served[op])
    assert served["fp8_gemm"] == ({"native"} if chip == "950" else {"dequant"})
    assert served["sparse_attn_paged"] == {"reference"}                 # head dim 128: outside CANN's attention


def test_v4_shaped_graph_runs_the_fused_ops(v4_shaped, monkeypatch):
    monkeypatch.delenv("V4HAL_BACKEND", raising=False)
    v4hal.hal.dispatch.refresh()
    (prefill, decode), served = _run_ascend("A3", v4_shaped)
    want_prefill, want_decode = v4_shaped["want"]
    assert calc_diff(prefill, want_prefill) <= 1e-3
    assert calc_diff(decode, want_decode) <= 1e-3
    for op in ("hc_pre", "hc_post", "rms_norm", "moe_experts"):
        assert served[op] == {"native"}, (op, served[op])
    # the one path's attention ops: the shared-KV attention (band window) and the lightning indexer run on
    # CANN for prefill and decode; the compressor stays on the reference here because this random
    # checkpoint's compressor weights are fp32 values (tests/ascend/test_paged_step.py: bf16 values -> CANN)
    assert served["sparse_attn_paged"] == {"native"}
    assert served["indexer_topk_paged"] == {"native"}
    assert served["compressor_ragged"] == {"reference"}
