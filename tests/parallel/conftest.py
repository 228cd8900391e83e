"""Fixtures of the EP tests: launched ranks use fork (a spawned interpreter re-imports torch: ~15 s on
2 cores) and one thread each; the v4-mini checkpoint is written once per session."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def mini_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random v4-mini checkpoint as released models are stored (FP8 linears, FP4 routed experts)."""
    from v4hal.model import ModelConfig, write_random_checkpoint

    return write_random_checkpoint(ModelConfig.preset("v4-mini"), tmp_path_factory.mktemp("ep_mini"), seed=0)
