"""The README's DeepSeek-V4.1 section quotes the errors v4hal raises word for word."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from v4hal.extras import missing
from v4hal.hal.errors import MissingPackageError, RangeError, V4HalError
from v4hal.model import ModelConfig, V4Model
from v4hal.model.random_checkpoint import random_tensors
from v4hal.model.tokenizer import load_tokenizer
from v4hal.serve.engine import Engine

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _section() -> str:
    start = README.index("## DeepSeek-V4.1\n")
    return re.sub(r"\s+", " ", README[start:README.index("\n## ", start + 1)])


def _quoted(text: str) -> None:
    assert text in _section(), text


def test_readme_quotes_the_dspark_and_tokenizer_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = ModelConfig.preset("v41-mini").replace(engram_layers=[], engram_num_embeddings=[], max_seq_len=64)
    with pytest.raises(RangeError) as e:
        cfg.replace(n_mtp_layers=1).validate()
    _quoted(str(e.value))
    model = V4Model.from_tensors(cfg, random_tensors(cfg, 0))
    out = model.forward_full(torch.zeros(1, 2, dtype=torch.long), 0)
    with pytest.raises(V4HalError) as e:
        model.mtp_forward(out.final, torch.zeros(1, 2, dtype=torch.long), 0)
    _quoted(str(e.value))
    from v4hal.serve import CachePool

    with pytest.raises(RangeError) as e:
        Engine(model, CachePool(cfg, block_size=16), mtp=True)
    _quoted(str(e.value))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tokenizers" else real(name, *a))
    assert missing("tokenizers", "x") is not None
    with pytest.raises(MissingPackageError) as e:
        load_tokenizer(tmp_path)
    _quoted(str(e.value))
