"""The candidate indexer tests of ``tests/reference/test_sparse_indexer.py`` on the Triton backend (under the
interpreter): the sparse logits the kernel computes are its own dense logits at the candidates, bit for bit."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from tests.reference.test_sparse_indexer import (  # noqa: F401  (the tests, run again with backend = "triton")
    test_candidate_blocks_keep_the_newest_block_and_break_ties_by_lower_id,
    test_candidate_blocks_match_the_loop_oracle,
    test_candidate_blocks_rank_a_nan_block_first,
    test_candidate_blocks_skip_blocks_without_a_scored_position,
    test_candidate_blocks_with_logits_past_the_contexts,
    test_candidate_values_are_checked,
    test_candidates_outside_the_table_have_no_key_with_checks_off,
    test_shapes_and_scalars_are_checked,
    test_sparse_logits_are_the_dense_logits_at_the_candidates,
    test_sparse_logits_bf16_queries_match_dense_bit_for_bit,
    test_sparse_topk_matches_the_sort_oracle,
    test_two_levels_pick_only_inside_the_published_blocks,
    test_two_levels_with_every_block_a_candidate_equal_the_dense_topk,
    test_v41_score_by_a_per_position_formula,
)


@pytest.fixture
def backend() -> str:
    return "triton"
