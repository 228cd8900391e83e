"""Shared fixtures of the model tests: random v4-mini checkpoints written once per session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))       # ref_v4 (the float64 re-implementation)

from v4hal.model import ModelConfig, write_random_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def mini_cfg() -> ModelConfig:
    return ModelConfig.preset("v4-mini")


@pytest.fixture(scope="session")
def mini_fp8(tmp_path_factory: pytest.TempPathFactory, mini_cfg: ModelConfig) -> Path:
    """v4-mini as published models are stored: FP8 Linear weights, FP4 routed experts (F4 storage)."""
    return write_random_checkpoint(mini_cfg, tmp_path_factory.mktemp("mini_fp8"), seed=0)


@pytest.fixture(scope="session")
def mini_bf16(tmp_path_factory: pytest.TempPathFactory, mini_cfg: ModelConfig) -> Path:
    """v4-mini with bf16 weights everywhere (experts too)."""
    return write_random_checkpoint(mini_cfg, tmp_path_factory.mktemp("mini_bf16"), seed=1, dtype="bf16")


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny GEMMs: one thread is faster and immune to a busy machine; also, fp32 GEMM results depend on
    the thread count, and the comparisons here need the same count for every run."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
