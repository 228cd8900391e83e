"""Stand-ins for ``torch.ops._C_ascend.<op>`` with vllm-ascend's ``csrc/torch_binding.cpp`` schemas."""
from __future__ import annotations

from typing import Any

import torch

from . import attention_ops as A
from . import compressor_ops
from . import other_ops as O
from .contract import MAX_TOKENS, called, chips, require

TIER = "_C_ascend"


def npu_sparse_flash_attention(query, key, value, sparse_indices, scale_value, *, block_table=None,
                               actual_seq_lengths_query=None, actual_seq_lengths_kv=None, query_rope=None,
                               key_rope=None, sparse_block_size=1, layout_query="BSND", layout_kv="BSND",
                               sparse_mode=3, pre_tokens=MAX_TOKENS, next_tokens=MAX_TOKENS, attention_mode=2,
                               return_softmax_lse=False) -> tuple[Any, Any, Any]:
    called(TIER, "npu_sparse_flash_attention")
    out = A.sfa("_C_ascend.npu_sparse_flash_attention", TIER, query, key, value, sparse_indices, scale_value,
                block_table, actual_seq_lengths_query, actual_seq_lengths_kv, query_rope, key_rope, sparse_block_size,
                layout_query, layout_kv, sparse_mode, pre_tokens, next_tokens, attention_mode, return_softmax_lse, None)
    empty = out.new_zeros(0).float()
    return out, empty, empty


def npu_lightning_indexer(query, key, weights, *, actual_seq_lengths_query=None, actual_seq_lengths_key=None,
                          block_table=None, layout_query="BSND", layout_key="BSND", sparse_count=2048, sparse_mode=3,
                          pre_tokens=MAX_TOKENS, next_tokens=MAX_TOKENS, return_value=False) -> tuple[Any, Any]:
    called(TIER, "npu_lightning_indexer")
    idx = A.lightning_indexer("_C_ascend.npu_lightning_indexer", query, key, weights, actual_seq_lengths_query,
                              actual_seq_lengths_key, block_table, layout_query, layout_key, sparse_count, sparse_mode,
                              pre_tokens, next_tokens, return_value)
    return idx, query.new_zeros(0)


def npu_sparse_attn_sharedkv_metadata(num_heads_q, num_heads_kv, head_dim, cu_seqlens_q=None, cu_seqlens_ori_kv=None,
                                      cu_seqlens_cmp_kv=None, seqused_q=None, seqused_kv=None, batch_size=0,
                                      max_seqlen_q=0, max_seqlen_kv=0, ori_topk=0, cmp_topk=0, cmp_ratio=4,
                                      ori_mask_mode=4, cmp_mask_mode=3, ori_win_left=128, ori_win_right=0,
                                      layout_q="BSND", layout_kv="PA_ND", has_ori_kv=True, has_cmp_kv=True,
                                      device="npu") -> Any:
    called(TIER, "npu_sparse_attn_sharedkv_metadata")
    chips("npu_sparse_attn_sharedkv_metadata", ("A2", "A3"))
    return A.sharedkv_metadata(
        f"{TIER}.npu_sparse_attn_sharedkv_metadata", num_heads_q=num_heads_q, num_heads_kv=num_heads_kv,
        head_dim=head_dim, cu_seqlens_q=cu_seqlens_q, seqused_kv=seqused_kv, batch_size=batch_size,
        max_seqlen_q=max_seqlen_q, max_seqlen_kv=max_seqlen_kv, cmp_topk=cmp_topk, cmp_ratio=cmp_ratio,
        ori_mask_mode=ori_mask_mode, cmp_mask_mode=cmp_mask_mode, ori_win_left=ori_win_left,
        ori_win_right=ori_win_right, layout_q=layout_q, layout_kv=layout_kv, has_ori_kv=has_ori_kv,
        has_cmp_kv=has_cmp_kv, quant=0, device=device)


def npu_sparse_attn_sharedkv(q, *, ori_kv=None, cmp_kv=None, ori_sparse_indices=None, cmp_sparse_indices=None,
                             ori_block_table=None, cmp_block_table=None, cu_seqlens_q=None, cu_seqlens_ori_kv=None,
                             cu_seqlens_cmp_kv=None, seqused_q=None, seqused_kv=None, sinks=None, metadata=None,
                             softmax_scale=0.0, cmp_ratio=0, ori_mask_mode=4, cmp_mask_mode=3, ori_win_left=128,
                             ori_win_right=0, layout_q="BSND", layout_kv="PA_ND", return_softmax_lse=False) -> Any:
    called(TIER, "npu_sparse_attn_sharedkv")
    op = f"{TIER}.npu_sparse_attn_sharedkv"
    chips(op, ("A2", "A3"))
    return A.sharedkv(op, q, ori_kv=ori_kv, cmp_kv=cmp_kv, ori_sparse_indices=ori_sparse_indices,
                      cmp_sparse_indices=cmp_sparse_indices, ori_block_table=ori_block_table,
                      cmp_block_table=cmp_block_table, cu_seqlens_q=cu_seqlens_q, seqused_kv=seqused_kv, sinks=sinks,
                      metadata=metadata, softmax_scale=softmax_scale, cmp_ratio=cmp_ratio, ori_mask_mode=ori_mask_mode,
                      cmp_mask_mode=cmp_mask_mode, ori_win_left=ori_win_left, ori_win_right=ori_win_right,
                      layout_q=layout_q, layout_kv=layout_kv, return_softmax_lse=return_softmax_lse, quant=False,
                      kv_dim=512, kv_dtypes=A.HALF, heads=(64,), topks=(512,))


def npu_kv_quant_sparse_attn_sharedkv_metadata(num_heads_q, num_heads_kv, head_dim, kv_quant_mode, cu_seqlens_q=None,
                                               cu_seqlens_ori_kv=None, cu_seqlens_cmp_kv=None, seqused_q=None,
                                               seqused_kv=None, batch_size=0, max_seqlen_q=0, max_seqlen_kv=0,
                                               ori_topk=0, cmp_topk=0, tile_size=0, rope_head_dim=0, cmp_ratio=-1,
                                               ori_mask_mode=4, cmp_mask_mode=3, ori_win_left=127, ori_win_right=0,
                                               layout_q="BSND", layout_kv="PA_ND", has_ori_kv=True, has_cmp_kv=True,
                                               device="npu") -> Any:
    called(TIER, "npu_kv_quant_sparse_attn_sharedkv_metadata")
    op = f"{TIER}.npu_kv_quant_sparse_attn_sharedkv_metadata"
    chips(op, ("950",))
    require(kv_quant_mode == 1 and tile_size == 64 and rope_head_dim == 64, op,
            f"kv_quant_mode/tile_size/rope_head_dim must be 1/64/64, got {kv_quant_mode}/{tile_size}/{rope_head_dim}")
    return A.sharedkv_metadata(
        op, num_heads_q=num_heads_q, num_heads_kv=num_heads_kv, head_dim=head_dim, cu_seqlens_q=cu_seqlens_q,
        seqused_kv=seqused_kv, batch_size=batch_size, max_seqlen_q=max_seqlen_q, max_seqlen_kv=max_seqlen_kv,
        cmp_topk=cmp_topk, cmp_ratio=cmp_ratio, ori_mask_mode=ori_mask_mode, cmp_mask_mode=cmp_mask_mode,
        ori_win_left=ori_win_left, ori_win_right=ori_win_right, layout_q=layout_q, layout_kv=layout_kv,
        has_ori_kv=has_ori_kv, has_cmp_kv=has_cmp_kv, quant=1, device=device)


def npu_kv_quant_sparse_attn_sharedkv(q, kv_quant_mode, ori_kv=None, cmp_kv=None, ori_sparse_indices=None,
                                      cmp_sparse_indices=None, ori_block_table=None, cmp_block_table=None,
                                      cu_seqlens_q=None, cu_seqlens_ori_kv=None, cu_seqlens_cmp_kv=None, seqused_q=None,
                                      seqused_kv=None, sinks=None, metadata=None, tile_size=0, rope_head_dim=0,
                                      softmax_scale=0.0, cmp_ratio=0, ori_mask_mode=4, cmp_mask_mode=3,
                                      ori_win_left=127, ori_win_right=0, layout_q="BSND", layout_kv="PA_ND",
                                      return_softmax_lse=False) -> Any:
    called(TIER, "npu_kv_quant_sparse_attn_sharedkv")
    op = f"{TIER}.npu_kv_quant_sparse_attn_sharedkv"
    chips(op, ("950",))
    require(kv_quant_mode == 1 and tile_size == 64 and rope_head_dim == 64, op,
            f"kv_quant_mode/tile_size/rope_head_dim must be 1/64/64, got {kv_quant_mode}/{tile_size}/{rope_head_dim}")
    return A.sharedkv(op, q, ori_kv=ori_kv, cmp_kv=cmp_kv, ori_sparse_indices=ori_sparse_indices,
                      cmp_sparse_indices=cmp_sparse_indices, ori_block_table=ori_block_table,
                      cmp_block_table=cmp_block_table, cu_seqlens_q=cu_seqlens_q, seqused_kv=seqused_kv, sinks=sinks,
                      metadata=metadata, softmax_scale=softmax_scale, cmp_ratio=cmp_ratio, ori_mask_mode=ori_mask_mode,
                      cmp_mask_mode=cmp_mask_mode, ori_win_left=ori_win_left, ori_win_right=ori_win_right,
                      layout_q=layout_q, layout_kv=layout_kv, return_softmax_lse=return_softmax_lse, quant=True,
                      kv_dim=640, kv_dtypes=(torch.float8_e4m3fn,), heads=(64, 128), topks=(512, 1024),
                      unpack=A.unpack_fp8_bytes)


def npu_vllm_quant_lightning_indexer_metadata(num_heads_q, num_heads_k, head_dim, query_quant_mode, key_quant_mode,
                                              actual_seq_lengths_query=None, actual_seq_lengths_key=None, batch_size=0,
                                              max_seqlen_q=0, max_seqlen_k=0, layout_query="BSND", layout_key="BSND",
                                              sparse_count=2048, sparse_mode=3, pre_tokens=MAX_TOKENS,
                                              next_tokens=MAX_TOKENS, cmp_ratio=1, device="npu") -> Any:
    called(TIER, "npu_vllm_quant_lightning_indexer_metadata")
    return A.quant_indexer_metadata(
        f"{TIER}.npu_vllm_quant_lightning_indexer_metadata", num_heads_q=num_heads_q, num_heads_k=num_heads_k,
        head_dim=head_dim, query_quant_mode=query_quant_mode, key_quant_mode=key_quant_mode,
        actual_seq_lengths_query=actual_seq_lengths_query, actual_seq_lengths_key=actual_seq_lengths_key,
        batch_size=batch_size, layout_key=layout_key, sparse_count=sparse_count, sparse_mode=sparse_mode,
        cmp_ratio=cmp_ratio)


def npu_vllm_quant_lightning_indexer(query, key, weights, query_dequant_scale, key_dequant_scale, query_quant_mode=0,
                                     key_quant_mode=0, actual_seq_lengths_query=None, actual_seq_lengths_key=None,
                                     block_table=None, metadata=None, layout_query="BSND", layout_key="BSND",
                                     sparse_count=2048, sparse_mode=3, pre_tokens=MAX_TOKENS, next_tokens=MAX_TOKENS,
                                     cmp_ratio=1, return_value=False) -> Any:
    called(TIER, "npu_vllm_quant_lightning_indexer")
    return A.quant_indexer(f"{TIER}.npu_vllm_quant_lightning_indexer", query, key, weights, query_dequant_scale,
                           key_dequant_scale, query_quant_mode, key_quant_mode, actual_seq_lengths_query,
                           actual_seq_lengths_key, block_table, metadata, layout_query, layout_key, sparse_count,
                           sparse_mode, pre_tokens, next_tokens, cmp_ratio, return_value)


def npu_hc_pre_v2(x, hc_fn, hc_scale, hc_base, hc_mult, hc_sinkhorn_iters, norm_eps, hc_eps) -> Any:
    called(TIER, "npu_hc_pre_v2")
    return O.hc_pre(f"{TIER}.npu_hc_pre_v2", x, hc_fn, hc_scale, hc_base, hc_mult, hc_sinkhorn_iters, norm_eps,
                    hc_eps, dims=(3, 4))


def npu_hc_post(x, residual, post, comb) -> Any:
    called(TIER, "npu_hc_post")
    return O.hc_post(f"{TIER}.npu_hc_post", x, residual, post, comb)


def moe_gating_top_k_hash(x, k, bias=None, input_ids=None, tid2eid=None, k_group=1, group_count=1,
                          routed_scaling_factor=1.0, eps=1e-20, group_select_mode=0, renorm=0, norm_type=0,
                          out_flag=False) -> Any:
    called(TIER, "moe_gating_top_k_hash")
    return O.gating(f"{TIER}.moe_gating_top_k_hash", x, k, bias, input_ids, tid2eid, k_group, group_count,
                    group_select_mode, renorm, norm_type, out_flag, routed_scaling_factor, eps, norm_types=(0, 1, 2))


OPS = {name: fn for name, fn in list(globals().items())
       if (name.startswith("npu_") or name == "moe_gating_top_k_hash") and callable(fn)}
OPS.update(compressor_ops.OPS)
