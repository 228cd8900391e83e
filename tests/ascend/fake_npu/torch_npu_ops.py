"""Stand-ins for ``torch_npu.<op>`` with the torch_npu 2.14 signatures ([WHL] in shared/spec/ASCEND.md)."""
from __future__ import annotations

from typing import Any

from . import attention_ops as A
from . import other_ops as O
from .contract import MAX_TOKENS, called

TIER = "torch_npu"


def npu_sparse_flash_attention(query, key, value, sparse_indices, scale_value, *, block_table=None,
                               actual_seq_lengths_query=None, actual_seq_lengths_kv=None, query_rope=None,
                               key_rope=None, sparse_block_size=1, layout_query="BSND", layout_kv="BSND",
                               sparse_mode=3, pre_tokens=MAX_TOKENS, next_tokens=MAX_TOKENS, attention_mode=0,
                               return_softmax_lse=False, sinks=None) -> tuple[Any, Any, Any]:
    called(TIER, "npu_sparse_flash_attention")
    out = A.sfa("torch_npu.npu_sparse_flash_attention", TIER, query, key, value, sparse_indices, scale_value,
                block_table, actual_seq_lengths_query, actual_seq_lengths_kv, query_rope, key_rope, sparse_block_size,
                layout_query, layout_kv, sparse_mode, pre_tokens, next_tokens, attention_mode, return_softmax_lse,
                sinks)
    empty = out.new_zeros(0).float()
    return out, empty, empty


def npu_lightning_indexer(query, key, weights, *, actual_seq_lengths_query=None, actual_seq_lengths_key=None,
                          block_table=None, layout_query="BSND", layout_key="BSND", sparse_count=2048, sparse_mode=3,
                          pre_tokens=MAX_TOKENS, next_tokens=MAX_TOKENS, return_value=False) -> tuple[Any, Any]:
    called(TIER, "npu_lightning_indexer")
    idx = A.lightning_indexer("torch_npu.npu_lightning_indexer", query, key, weights, actual_seq_lengths_query,
                              actual_seq_lengths_key, block_table, layout_query, layout_key, sparse_count, sparse_mode,
                              pre_tokens, next_tokens, return_value)
    return idx, query.new_zeros(0)


def npu_moe_gating_top_k(x, k, *, bias=None, input_ids=None, tid2eid=None, k_group=1, group_count=1,
                         group_select_mode=0, renorm=0, norm_type=0, out_flag=False, routed_scaling_factor=1.0,
                         eps=1e-20) -> tuple[Any, Any, Any]:
    called(TIER, "npu_moe_gating_top_k")
    return O.gating("torch_npu.npu_moe_gating_top_k", x, k, bias, input_ids, tid2eid, k_group, group_count,
                    group_select_mode, renorm, norm_type, out_flag, routed_scaling_factor, eps, norm_types=(0, 1))


def npu_moe_init_routing_v2(x, expert_idx, *, scale=None, offset=None, active_num=-1, expert_capacity=-1,
                            expert_num=-1, drop_pad_mode=0, expert_tokens_num_type=0, expert_tokens_num_flag=False,
                            quant_mode=-1, active_expert_range=[], row_idx_type=0, x_dtype=None) -> tuple[Any, ...]:  # noqa: B006
    called(TIER, "npu_moe_init_routing_v2")
    return O.init_routing_v2("torch_npu.npu_moe_init_routing_v2", x, expert_idx, scale, offset, active_num,
                             expert_capacity, expert_num, drop_pad_mode, expert_tokens_num_type, expert_tokens_num_flag,
                             quant_mode, list(active_expert_range), row_idx_type)


def npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None) -> Any:
    called(TIER, "npu_moe_token_unpermute")
    return O.token_unpermute("torch_npu.npu_moe_token_unpermute", permuted_tokens, sorted_indices, probs, padded_mode,
                             restore_shape)


def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None, antiquant_offset=None,
                       per_token_scale=None, group_list=None, activation_input=None, activation_quant_scale=None,
                       activation_quant_offset=None, split_item=0, group_type=None, group_list_type=0, act_type=0,
                       tuning_config=None, output_dtype=None, x_dtype=None, weight_dtype=None, scale_dtype=None,
                       per_token_scale_dtype=None) -> list[Any]:
    called(TIER, "npu_grouped_matmul")
    quant = dict(bias=bias, scale=scale, offset=offset, antiquant_scale=antiquant_scale,
                 antiquant_offset=antiquant_offset, per_token_scale=per_token_scale, activation_input=activation_input,
                 activation_quant_scale=activation_quant_scale, activation_quant_offset=activation_quant_offset,
                 x_dtype=x_dtype, weight_dtype=weight_dtype, scale_dtype=scale_dtype,
                 per_token_scale_dtype=per_token_scale_dtype)
    return O.grouped_matmul("torch_npu.npu_grouped_matmul", x, weight, quant, group_list, split_item, group_type,
                            group_list_type, act_type, output_dtype)


def npu_dynamic_quant(input, *, smooth_scales=None, group_index=None, dst_type=None, quant_mode="pertoken",  # noqa: A002
                      dst_type_max=0.0) -> tuple[Any, Any]:
    called(TIER, "npu_dynamic_quant")
    return O.dynamic_quant("torch_npu.npu_dynamic_quant", input, smooth_scales, group_index, dst_type, quant_mode,
                           dst_type_max)


def npu_dynamic_mx_quant(input, *, axis=-1, round_mode="rint", dst_type=296, block_size=32, scale_alg=0,  # noqa: A002
                         dst_type_max=0.0, max_low_bound=0.0) -> tuple[Any, Any]:
    called(TIER, "npu_dynamic_mx_quant")
    return O.dynamic_mx_quant("torch_npu.npu_dynamic_mx_quant", input, axis, round_mode, dst_type, block_size,
                              scale_alg, dst_type_max, max_low_bound)


def npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None, x1_dtype=None,
                     x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None, group_sizes=None, y_scale=None) -> Any:
    called(TIER, "npu_quant_matmul")
    return O.quant_matmul("torch_npu.npu_quant_matmul", x1, x2, scale, offset, pertoken_scale, bias, output_dtype,
                          x1_dtype, x2_dtype, pertoken_scale_dtype, scale_dtype, group_sizes, y_scale)


def npu_rms_norm(self, gamma, epsilon=1e-06) -> tuple[Any, Any]:
    called(TIER, "npu_rms_norm")
    return O.rms_norm("torch_npu.npu_rms_norm", self, gamma, epsilon)


def npu_rotary_mul(input, r1, r2, rotary_mode="half", rotate=None) -> Any:  # noqa: A002
    called(TIER, "npu_rotary_mul")
    return O.rotary_mul("torch_npu.npu_rotary_mul", input, r1, r2, rotary_mode, rotate)


OPS = {name: fn for name, fn in list(globals().items()) if name.startswith("npu_") and callable(fn)}
