"""``v4hal run --backend triton`` on the CPU (the Triton interpreter): the ops Triton has no implementation of run
on the reference, named in a note, `V4Model.forward`'s private pool takes the quantized pages the Triton indexer
reads, and a DeepSeek-V4.1 run generates the reference's tokens."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from v4hal.apps.common import backend_gaps, backend_scope, kernel_private_pages
from v4hal.apps.main import cli
from v4hal.hal import registry

pytest.importorskip("triton")
pytest.importorskip("tokenizers")          # the Engram vocabulary map of a V4.1 checkpoint


def test_backend_gaps_name_the_ops_without_an_implementation(capsys: pytest.CaptureFixture[str]) -> None:
    assert backend_gaps(None) == [] and backend_gaps("reference") == []
    gaps = backend_gaps("triton")
    assert "compressor_ragged" in gaps and gaps == sorted(set(registry.OPS) - set(registry.declarations("triton")))
    assert f"note: --backend triton has no implementation of {', '.join(gaps)}" in capsys.readouterr().err
    assert backend_gaps("triton", note=False) == gaps and capsys.readouterr().err == ""


def test_kernel_private_pages_only_for_a_kernel_backend_on_the_cpu() -> None:
    from v4hal.model import ModelConfig, V4Model
    from v4hal.model.random_checkpoint import random_tensors

    cfg = ModelConfig.preset("v41-mini").replace(engram_layers=[], engram_num_embeddings=[], max_seq_len=64)
    model = V4Model.from_tensors(cfg, random_tensors(cfg, 0))
    kernel_private_pages(model, "reference")
    assert model.private_layouts is None
    kernel_private_pages(model, "triton")
    assert model.private_layouts == ("v41_window_fp8", "indexer_fp4")
    bf16 = cfg.replace(dtype="bf16", expert_dtype=None, head_dim=80, rope_head_dim=16)   # 80 holds no V4.1 record
    other = V4Model.from_tensors(bf16, random_tensors(bf16, 0))
    kernel_private_pages(other, "triton")
    assert other.private_layouts is None
    with backend_scope("triton", ["compressor_ragged"]):
        pass


def test_run_v41_mini_with_the_triton_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A 5-token prompt and one decode step through the whole v41-mini graph with every op Triton implements on
    Triton (interpreted): the reference's tokens."""
    monkeypatch.setenv("V4HAL_CACHE_DIR", str(tmp_path / "cache"))
    prev = torch.get_num_threads()
    argv = ["run", "--model", "v41-mini", "--prompt-len", "5", "--max-new-tokens", "2", "--no-progress",
            "--threads", "1", "--json"]
    try:
        assert cli([*argv, str(tmp_path / "ref.json")]) == 0
        assert cli([*argv, str(tmp_path / "tri.json"), "--backend", "triton"]) == 0
    finally:
        torch.set_num_threads(prev)
    ref, tri = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ref", "tri"))
    assert tri["backend"] == "triton" and tri["logits_finite"]
    assert tri["tokens"] == ref["tokens"]
    # every op of the V4.1 graph has a Triton kernel (compressor_ragged is V4's)
    assert "has no implementation of compressor_ragged: that op runs" in capsys.readouterr().err
