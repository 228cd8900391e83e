"""The DeepSeek-V4 graph on v4hal ops: configs, checkpoints, caches, generation.

- `ModelConfig` (``config.py``): inference / Hugging Face ``config.json`` keys and presets.
- `V4Model` (``model.py``): ``V4Model.from_pretrained(path, device)``,
  ``model(input_ids, start_pos) -> logits``, ``model.generate(...)``, ``model.forward_batch(batch, pool)``.
- One graph path: every call is a `Step` (``step.py``) over paged caches; the batch it reads
  (`ForwardBatch`, ``batch.py``) and what it needs of a pool (`CacheSource`, ``caches.py``) live here, so
  the serving layer depends on the model and not the reverse. ``forward`` runs on the model's own
  `PrivatePool`.
- `read_checkpoint` (``checkpoint.py``: the reader), `write_random_checkpoint` (``random_checkpoint.py``),
  `load_checkpoint` (= `V4Model.from_pretrained`).
- ``parity.py``: the per-layer comparison behind ``v4hal parity --model``.

Every attention, MoE, GEMM, quantization and mHC step is a v4hal op call (``v4hal.<op>``), so
``v4hal.use_backend(name)`` moves the whole graph. Plain torch appears only as glue:

- the embedding lookup (``F.embedding``) and its copy into ``hc_mult`` residual copies;
- reshapes, slicing, ``cat``/``split`` of fused projections, the last-position slice;
- the int32 positions of the sliding window and of the compressed entries (made slots by ``paged_slots``);
- ``.float()`` / ``.to(bf16)`` casts where the public code casts (the fp32 compressor input, a
  bf16 part of a fused fp32 GEMM), the scalar scaling of the indexer head weights;
- the sum of routed and shared expert outputs when the two cannot share one ``moe_experts``
  call (different weight formats), and ``argmax`` in greedy generation;
- DeepSeek-V4.1 attention (``attention_v41.py``): the window and compressed caches' round trips
  (`v4hal.hal.formats`, the bit-exact format code every backend shares) and the weight product of V4.1's
  RMSNorm (rounded to bf16 before and after it).

No ``F.linear``/``matmul`` is used for model math: float (bf16/fp32) projections go through
``grouped_gemm`` with a single group.
"""
from __future__ import annotations

import os

import torch

from .batch import ForwardBatch
from .caches import CacheSource, LayerCaches, PrivatePool
from .checkpoint import CheckpointDTypeError, CheckpointError, CheckpointShapeError, read_checkpoint
from .config import ModelConfig
from .model import ForwardResult, V4Model
from .random_checkpoint import write_random_checkpoint
from .spec import checkpoint_spec
from .step import Step

__all__ = ["ModelConfig", "V4Model", "ForwardResult", "write_random_checkpoint", "load_checkpoint",
           "read_checkpoint", "checkpoint_spec", "CheckpointError", "CheckpointShapeError",
           "CheckpointDTypeError", "ForwardBatch", "CacheSource", "LayerCaches", "PrivatePool", "Step"]


def load_checkpoint(path: str | os.PathLike[str], device: torch.device | str | None = None, *,
                    experts_fp8: bool = False, mmap: bool = False) -> V4Model:
    """Load a V4 checkpoint directory (either layout) into a `V4Model` on ``device`` (default CPU): the same as
    `V4Model.from_pretrained`, which documents ``experts_fp8`` and ``mmap``. Raises a `CheckpointError` (see
    `read_checkpoint`) and never returns a partly loaded model."""
    return V4Model.from_pretrained(path, device, experts_fp8=experts_fp8, mmap=mmap)
