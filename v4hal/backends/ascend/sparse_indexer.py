"""The candidate indexer (V4.1) on Ascend: every op is the reference on the NPU tensors.

- ``indexer_logits_paged_sparse``: the CANN indexers (``npu_lightning_indexer``,
  ``npu_vllm_quant_lightning_indexer``) score every position of a context and return top-k indices,
  never logits, and take no candidate set; no CANN op scores given candidate blocks.
- ``indexer_topk_paged_sparse``: the same indexers cannot be restricted to candidate blocks (a row's
  candidates are scattered positions, not a context length), so top-k inside them is the reference's.
- ``indexer_candidate_blocks``: a block max and a sort of given logits, plain tensor ops; no CANN op.
"""
from __future__ import annotations

import torch

from v4hal.backends.reference import sparse_indexer as ref
from v4hal.hal.registry import implements

from . import limits
from ._route import always_reference
from .limits import always

limits.plan("indexer_logits_paged_sparse", {})
limits.plan("indexer_topk_paged_sparse", {})
limits.plan("indexer_candidate_blocks", {})


@implements("indexer_logits_paged_sparse", "ascend", requires=(
    always("the CANN indexers return top-k indices over whole contexts, not logits at candidate blocks"),))
def indexer_logits_paged_sparse(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor,
                                context_lens: torch.Tensor, block_table: torch.Tensor, candidates: torch.Tensor,
                                candidate_block: int = 8, layout: str = "indexer_fp4") -> torch.Tensor:
    """Reference logits fp32 ``[b * next_n, K * candidate_block]`` on the NPU tensors."""
    return always_reference("indexer_logits_paged_sparse", ref.indexer_logits_paged_sparse, q, kv_cache, weights,
                            context_lens, block_table, candidates, candidate_block, layout)


@implements("indexer_topk_paged_sparse", "ascend", requires=(
    always("the CANN indexers take no candidate set (they rank every position of a context)"),))
def indexer_topk_paged_sparse(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor,
                              context_lens: torch.Tensor, block_table: torch.Tensor, candidates: torch.Tensor,
                              topk: int, candidate_block: int = 8, layout: str = "indexer_fp4",
                              offset: int = 0) -> torch.Tensor:
    """Reference picks int32 ``[b, next_n, topk]`` on the NPU tensors."""
    return always_reference("indexer_topk_paged_sparse", ref.indexer_topk_paged_sparse, q, kv_cache, weights,
                            context_lens, block_table, candidates, topk, candidate_block, layout, offset)


@implements("indexer_candidate_blocks", "ascend", requires=(
    always("a block max and a sort of given logits in plain tensor ops; no CANN op needed"),))
def indexer_candidate_blocks(logits: torch.Tensor, context_lens: torch.Tensor, n_blocks: int,
                             candidate_block: int = 8) -> torch.Tensor:
    """Reference candidate blocks int32 ``[b, next_n, n_blocks]`` on the NPU tensors."""
    return always_reference("indexer_candidate_blocks", ref.indexer_candidate_blocks, logits, context_lens,
                            n_blocks, candidate_block)
