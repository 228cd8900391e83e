"""The DeepSeek-V4 graph on v4hal ops: configs, checkpoints, caches, generation.

- `ModelConfig` (``config.py``): inference / Hugging Face ``config.json`` keys and presets.
- `V4Model` (``model.py``): ``V4Model.from_pretrained(path, device)``,
  ``model(input_ids, start_pos) -> logits``, ``model.generate(...)``.
- `write_random_checkpoint`, `load_checkpoint`, `read_checkpoint` (``checkpoint.py``).
- ``cli.py`` (``v4hal run``) and ``parity.py`` (``v4hal parity --model``).
"""
from __future__ import annotations

from .checkpoint import (CheckpointDTypeError, CheckpointError, CheckpointShapeError, load_checkpoint,
                         read_checkpoint, write_random_checkpoint)
from .config import ModelConfig
from .model import ForwardResult, V4Model
from .spec import checkpoint_spec

__all__ = ["ModelConfig", "V4Model", "ForwardResult", "write_random_checkpoint", "load_checkpoint",
           "read_checkpoint", "checkpoint_spec", "CheckpointError", "CheckpointShapeError",
           "CheckpointDTypeError"]
