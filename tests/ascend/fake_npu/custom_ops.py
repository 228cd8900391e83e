"""Stand-ins for ``torch.ops.custom.<op>`` with the cann-recipes-infer / sgl-kernel-npu schemas."""
from __future__ import annotations

from typing import Any

from . import attention_ops as A
from . import other_ops as O
from .contract import MAX_TOKENS, called, chips

TIER = "custom"


def npu_sparse_flash_attention(query, key, value, sparse_indices, scale_value, sparse_block_size, *, block_table=None,
                               actual_seq_lengths_query=None, actual_seq_lengths_kv=None, query_rope=None,
                               key_rope=None, layout_query="BSND", layout_kv="BSND", sparse_mode=3) -> Any:
    called(TIER, "npu_sparse_flash_attention")
    return A.sfa("custom.npu_sparse_flash_attention", TIER, query, key, value, sparse_indices, scale_value, block_table,
                 actual_seq_lengths_query, actual_seq_lengths_kv, query_rope, key_rope, sparse_block_size, layout_query,
                 layout_kv, sparse_mode, MAX_TOKENS, MAX_TOKENS, 2, False, None)


def npu_lightning_indexer(query, key, weights, *, actual_seq_lengths_query=None, actual_seq_lengths_key=None,
                          block_table=None, layout_query="BSND", layout_key="PA_BSND", sparse_count=2048,
                          sparse_mode=3) -> Any:
    called(TIER, "npu_lightning_indexer")
    return A.lightning_indexer("custom.npu_lightning_indexer", query, key, weights, actual_seq_lengths_query,
                               actual_seq_lengths_key, block_table, layout_query, layout_key, sparse_count, sparse_mode,
                               MAX_TOKENS, MAX_TOKENS, False)


def npu_hc_pre(x, hc_fn, hc_scale, hc_base, *, hc_mult, hc_sinkhorn_iters, norm_eps, hc_eps) -> Any:
    called(TIER, "npu_hc_pre")
    return O.hc_pre("custom.npu_hc_pre", x, hc_fn, hc_scale, hc_base, hc_mult, hc_sinkhorn_iters, norm_eps, hc_eps,
                    dims=(4,))


def npu_hc_post(x, residual, post, comb) -> Any:
    called(TIER, "npu_hc_post")
    return O.hc_post("custom.npu_hc_post", x, residual, post, comb)


def npu_sparse_attn_sharedkv(q, *, ori_kv=None, cmp_kv=None, ori_sparse_indices=None, cmp_sparse_indices=None,
                             ori_block_table=None, cmp_block_table=None, cu_seqlens_q=None, cu_seqlens_ori_kv=None,
                             cu_seqlens_cmp_kv=None, seqused_q=None, seqused_kv=None, sinks=None, metadata=None,
                             softmax_scale=0.0, cmp_ratio=0, ori_mask_mode=4, cmp_mask_mode=3, ori_win_left=128,
                             ori_win_right=0, layout_q="BSND", layout_kv="PA_ND", return_softmax_lse=False) -> Any:
    """Same schema as the ``_C_ascend`` op (the README calls it as ``torch.ops.custom``)."""
    called(TIER, "npu_sparse_attn_sharedkv")
    op = "custom.npu_sparse_attn_sharedkv"
    chips(op, ("A2", "A3"))
    return A.sharedkv(op, q, ori_kv=ori_kv, cmp_kv=cmp_kv, ori_sparse_indices=ori_sparse_indices,
                      cmp_sparse_indices=cmp_sparse_indices, ori_block_table=ori_block_table,
                      cmp_block_table=cmp_block_table, cu_seqlens_q=cu_seqlens_q, seqused_kv=seqused_kv, sinks=sinks,
                      metadata=metadata, softmax_scale=softmax_scale, cmp_ratio=cmp_ratio, ori_mask_mode=ori_mask_mode,
                      cmp_mask_mode=cmp_mask_mode, ori_win_left=ori_win_left, ori_win_right=ori_win_right,
                      layout_q=layout_q, layout_kv=layout_kv, return_softmax_lse=return_softmax_lse, quant=False,
                      kv_dim=512, kv_dtypes=A.HALF, heads=(64,), topks=(512,))


def npu_sparse_attn_sharedkv_metadata(num_heads_q, num_heads_kv, head_dim, cu_seqlens_q=None, cu_seqlens_ori_kv=None,
                                      cu_seqlens_cmp_kv=None, seqused_q=None, seqused_kv=None, batch_size=0,
                                      max_seqlen_q=0, max_seqlen_kv=0, ori_topk=0, cmp_topk=0, cmp_ratio=4,
                                      ori_mask_mode=4, cmp_mask_mode=3, ori_win_left=128, ori_win_right=0,
                                      layout_q="BSND", layout_kv="PA_ND", has_ori_kv=True, has_cmp_kv=True,
                                      device="npu") -> Any:
    called(TIER, "npu_sparse_attn_sharedkv_metadata")
    op = "custom.npu_sparse_attn_sharedkv_metadata"
    chips(op, ("A2", "A3"))
    return A.sharedkv_metadata(
        op, num_heads_q=num_heads_q, num_heads_kv=num_heads_kv, head_dim=head_dim, cu_seqlens_q=cu_seqlens_q,
        seqused_kv=seqused_kv, batch_size=batch_size, max_seqlen_q=max_seqlen_q, max_seqlen_kv=max_seqlen_kv,
        cmp_topk=cmp_topk, cmp_ratio=cmp_ratio, ori_mask_mode=ori_mask_mode, cmp_mask_mode=cmp_mask_mode,
        ori_win_left=ori_win_left, ori_win_right=ori_win_right, layout_q=layout_q, layout_kv=layout_kv,
        has_ori_kv=has_ori_kv, has_cmp_kv=has_cmp_kv, quant=0, device=device)


OPS = {name: fn for name, fn in list(globals().items()) if name.startswith("npu_") and callable(fn)}
