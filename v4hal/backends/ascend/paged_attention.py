"""Sparse attention over paged caches on Ascend: the reference runs on the NPU tensors, on every chip.

``sparse_attn_paged`` returns the output and the log-sum-exp of every query, picks its entries by
explicit slot in two caches, and reads the ``model1_fp8`` or ``bf16`` layouts. The two CANN ops that
attend over paged caches were checked against that contract:

- ``npu_sparse_attn_sharedkv`` (A2/A3; ``npu_kv_quant_sparse_attn_sharedkv`` on 950) returns no
  LSE; its window picks come from its band mask over positions (``ori_sparse_indices`` is ignored
  in its PA_ND layout), not from slots; it takes only 64 heads and exactly 512 compressed picks; the
  950 variant reads its own 640-byte FP8 packing, not the 584-byte ``model1_fp8`` pages.
- ``npu_sparse_flash_attention`` takes explicit indices into a PA_BSND cache through a block table
  (an identity table over all pages would turn our slots into its positions, for one bf16 cache),
  but it cannot return the LSE with the PA_BSND layout, takes one cache per call, and has no sink
  argument on A2/A3.

Without the LSE, neither can produce the op's second output, and merging the two caches' softmaxes
needs it too; recomputing it on the side would gather and score every pick a second time. So every
call runs the reference on the NPU tensors, and ``v4hal info`` lists the reasons.
"""
from __future__ import annotations

import torch

from v4hal.backends.reference import paged_attention as ref
from v4hal.hal.registry import implements

from . import limits
from ._route import always_reference
from .limits import always

limits.plan("sparse_attn_paged", {})
SPARSE_ATTN_PAGED_LIMITS = (
    always("no CANN attention op over paged caches returns the log-sum-exp this op returns "
           "(npu_sparse_flash_attention: not with PA_BSND; npu_sparse_attn_sharedkv: none, and its window picks "
           "come from a band mask, not from slots), and none reads the 584-byte model1_fp8 pages"),
)


@implements("sparse_attn_paged", "ascend", requires=SPARSE_ATTN_PAGED_LIMITS)
def sparse_attn_paged(q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor, attn_sink: torch.Tensor,
                      softmax_scale: float, topk_length: torch.Tensor | None = None,
                      extra_kv_cache: torch.Tensor | None = None, extra_indices: torch.Tensor | None = None,
                      extra_topk_length: torch.Tensor | None = None,
                      layout: str = "model1_fp8") -> tuple[torch.Tensor, torch.Tensor]:
    """(out bf16 ``[b, s_q, h, 512]``, lse fp32 ``[b, h, s_q]``): the reference on the NPU tensors."""
    return always_reference("sparse_attn_paged", ref.sparse_attn_paged, q, kv_cache, indices, attn_sink,
                            softmax_scale, topk_length, extra_kv_cache, extra_indices, extra_topk_length, layout)
