"""The candidate indexer (V4.1) on the Ascend backend: no CANN op takes a candidate set, so every op runs the
reference on the NPU tensors, with the recorded reason, and gives the reference's results."""
from __future__ import annotations

import torch

import v4hal

from .conftest import both, fell_back
from .test_paged_indexer import BS, inputs


def test_candidate_ops_run_the_reference(npu):
    q, cache, w, lens, bt = inputs(n=2)
    dense = v4hal.indexer_logits_paged(q, cache, w, lens, bt, 3 * BS)
    got, want = both(v4hal.indexer_candidate_blocks, dense, lens, 3)
    assert torch.equal(got, want) and fell_back("indexer_candidate_blocks", "no CANN op needed")
    cand = want
    got, want = both(v4hal.indexer_logits_paged_sparse, q, cache, w, lens, bt, cand)
    assert torch.equal(got, want) and fell_back("indexer_logits_paged_sparse", "not logits at candidate blocks")
    got, want = both(v4hal.indexer_topk_paged_sparse, q, cache, w, lens, bt, cand, 10, offset=5)
    assert torch.equal(got, want) and fell_back("indexer_topk_paged_sparse", "no candidate set")
    assert int((got[0] >= 0).sum(-1).min()) == 10                 # request 0: 24 candidate positions per row
