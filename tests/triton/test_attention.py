"""Triton sparse_attn against the reference backend (under the interpreter on the CPU).

Outputs start poisoned (NaN) so an element the kernel never writes fails. Each case is
compared with ``assert_close`` at the output dtype's tolerance and with ``calc_diff`` (FlashMLA's
decode criterion, < 5e-6) for every dtype. Under the interpreter bf16 tiles are converted to
fp32 before ``tl.dot`` (the probabilities stay fp32 as in the reference), so a bf16 output must
also be the correctly rounded exact result (within half an ulp of the reference on fp32 copies,
within one ulp of the reference's bf16 output on all elements, equal on >= 99%). fp16 rounds the
probabilities to fp16 before the value product (the MMA operand dtype, as a GPU does), which is
not a single rounding of the output, so fp16 keeps the ``assert_close`` + ``calc_diff`` checks.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import v4hal
from tests.numerics import assert_close, calc_diff, poison_like
from tests.triton.rounding import assert_matches_rounded_reference, assert_rounded
from v4hal.backends.reference import attention as ref
from v4hal.backends.triton import attention as tri
from v4hal.backends.triton._attn_common import dot_upcast

DIFF_BOUND = 5e-6


def check_output(out: torch.Tensor, q, kv, sink, idx, scale: float) -> None:
    """The kernel's output against the reference (see the module docstring for what each dtype must meet)."""
    exp = ref.sparse_attn(q, kv, sink, idx, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not torch.isnan(out).any()
    assert_close(out, exp, q.dtype)
    assert calc_diff(out, exp) < DIFF_BOUND
    if q.dtype == torch.bfloat16 and dot_upcast(q.dtype, q.device):
        exact = ref.sparse_attn(q.float(), kv.float(), sink, idx, scale)
        assert_rounded(out, exact, what="sparse_attn bf16")
        assert_matches_rounded_reference(out, exp, what="sparse_attn bf16")


def make_inputs(b: int, m: int, h: int, d: int, n: int, k: int, dtype: torch.dtype, seed: int,
                minus_one: float = 0.25, empty_rows: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, m, h, d, generator=g).to(dtype)
    kv = torch.randn(b, n, d, generator=g).to(dtype)
    sink = torch.randn(h, generator=g)
    idx = torch.randint(0, n, (b, m, k), generator=g)          # drawn with replacement: duplicates
    idx[torch.rand(b, m, k, generator=g) < minus_one] = -1
    flat = idx.view(b * m, k)
    for r in torch.randperm(b * m, generator=g)[:empty_rows].tolist():
        flat[r] = -1
    return q, kv, sink, idx.to(torch.int32)


def run_poisoned(q, kv, sink, idx, scale):
    out = poison_like(q)
    got = tri.sparse_attn_into(out, q, kv, sink, idx, scale)
    assert got is out
    return out


@pytest.mark.parametrize("b,m,h,d,n,k,dtype", [
    (1, 1, 1, 64, 9, 5, torch.float32),         # h = 1, decode, k odd
    (2, 1, 3, 64, 50, 37, torch.float32),       # h = 3, decode, topk not a power of two
    (2, 3, 16, 64, 40, 33, torch.float16),      # prefill m > 1
    (1, 2, 64, 512, 30, 21, torch.float16),     # V4 head dim, 64 heads (two 32-head blocks)
    (1, 1, 64, 512, 80, 48, torch.float32),     # V4 decode shape, small
    (2, 2, 3, 512, 20, 17, torch.bfloat16),     # bf16 (fp32 tiles under the interpreter)
    (1, 2, 16, 128, 25, 40, torch.bfloat16),    # k > n: duplicates guaranteed
    (1, 1, 40, 64, 16, 7, torch.float32),       # h not a multiple of the head block
])
def test_sparse_attn_matches_reference(b, m, h, d, n, k, dtype) -> None:
    q, kv, sink, idx = make_inputs(b, m, h, d, n, k, dtype, seed=b * 1000 + m * 100 + h + d,
                                   empty_rows=1 if b * m > 1 else 0)
    scale = d ** -0.5
    check_output(run_poisoned(q, kv, sink, idx, scale), q, kv, sink, idx, scale)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(b=st.integers(1, 2), m=st.integers(1, 3), h=st.integers(1, 70), d=st.sampled_from([16, 32, 48, 64]),
       n=st.integers(1, 40), k=st.integers(1, 45), minus_one=st.sampled_from([0.0, 0.3, 1.0]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_sparse_attn_property(b, m, h, d, n, k, minus_one, dtype, seed) -> None:
    """Random shapes (any head count, d not a power of two, -1 density from none to all)."""
    q, kv, sink, idx = make_inputs(b, m, h, d, n, k, dtype, seed=seed, minus_one=minus_one)
    check_output(run_poisoned(q, kv, sink, idx, d ** -0.5), q, kv, sink, idx, d ** -0.5)


def test_all_minus_one_rows_are_exact_zero() -> None:
    q, kv, sink, idx = make_inputs(2, 3, 3, 64, 12, 10, torch.float32, seed=7)
    idx[0, 1] = -1
    idx[1] = -1
    out = run_poisoned(q, kv, sink, idx, 0.125)
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[0, 0].abs().sum() > 0
    assert_close(out, ref.sparse_attn(q, kv, sink, idx, 0.125), torch.float32)


def test_sink_extremes() -> None:
    """sink = -inf (no sink), a sink far above every score, and an all -1 row with sink -inf."""
    q, kv, sink, idx = make_inputs(1, 2, 3, 64, 12, 9, torch.float32, seed=11, minus_one=0.0)
    sink = torch.tensor([float("-inf"), 60.0, 0.5])
    idx[0, 1, :] = -1
    out = run_poisoned(q, kv, sink, idx, 0.125)
    exp = ref.sparse_attn(q, kv, sink, idx, 0.125)
    assert_close(out, exp, torch.float32)
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))
    # no sink: the row is a plain softmax average of the selected rows
    rows = kv[0, idx[0, 0].long()]
    p = torch.softmax(q[0, 0, 0] @ rows.T * 0.125, dim=-1)
    assert_close(out[0, 0, 0], p @ rows, torch.float32)


def test_large_scores_do_not_overflow() -> None:
    q, kv, sink, idx = make_inputs(1, 1, 16, 64, 40, 30, torch.float32, seed=3)
    q = q * 30.0
    out = run_poisoned(q, kv, sink, idx, 1.0)
    assert torch.isfinite(out).all()
    assert_close(out, ref.sparse_attn(q, kv, sink, idx, 1.0), torch.float32)


def test_strided_inputs() -> None:
    """Non-contiguous q (a head slice) and kv (a column-slice view) give the contiguous result."""
    q_full, kv_full, sink, idx = make_inputs(2, 2, 6, 64, 20, 11, torch.float16, seed=5)
    q = q_full[:, :, ::2]
    kv = torch.cat([kv_full, kv_full], dim=-1)[..., :64]
    exp = ref.sparse_attn(q.contiguous(), kv.contiguous(), sink[::2].contiguous(), idx, 0.2)
    out = tri.sparse_attn(q, kv, sink[::2], idx, 0.2)
    assert_close(out, exp, torch.float16)


def test_empty_index_list_and_limits() -> None:
    q, kv, sink, _ = make_inputs(1, 2, 3, 64, 5, 1, torch.float32, seed=1)
    idx = torch.empty(1, 2, 0, dtype=torch.int32)
    out = run_poisoned(q, kv, sink, idx, 0.1)
    assert torch.equal(out, torch.zeros_like(out))
    big = torch.zeros(1, 1, 1, 1024)
    with v4hal.use_backend("triton"), pytest.raises(v4hal.BackendUnavailableError, match="head dim"):
        v4hal.sparse_attn(big, torch.zeros(1, 3, 1024), torch.zeros(1), torch.zeros(1, 1, 2, dtype=torch.int32), 1.0)


# ---------------------------------------------------------------------------------------------
# registration and dispatch


def test_registration_on_cpu_is_explicit_and_explains_limits() -> None:
    from v4hal.backends import triton as tri_backend
    from v4hal.hal import registry

    tri_backend.load()
    ops = ("sparse_attn", "index_scores", "indexer_topk", "hc_split_sinkhorn", "hc_pre", "hc_post", "hc_head",
           "rms_norm", "rotary_emb", "hadamard_transform")
    for op in ops:
        cpu = [i for i in registry.implementations(op, "cpu") if i.backend == "triton"]
        cuda = [i for i in registry.implementations(op, "cuda") if i.backend == "triton"]
        assert len(cpu) == 1 and not cpu[0].auto and tri_backend.INTERPRETER in cpu[0].requires
        assert len(cuda) == 1 and cuda[0].auto and cuda[0].priority == tri_backend.PRIORITY
    impl = next(i for i in registry.implementations("sparse_attn", "cpu") if i.backend == "triton")
    assert impl.fn.__wrapped__ is tri.sparse_attn          # served under the interpreter lock
    small_args = {"q": torch.zeros(1, 1, 2, 64), "kv": torch.zeros(1, 3, 64)}
    big_args = {"q": torch.zeros(1, 1, 2, 1024), "kv": torch.zeros(1, 3, 1024)}
    assert impl.why_not(small_args) == []
    assert any("head dim d must be <= 512" in r for r in impl.why_not(big_args))


def test_public_op_runs_the_triton_kernel_when_asked() -> None:
    q, kv, sink, idx = make_inputs(1, 2, 3, 64, 10, 6, torch.float32, seed=2)
    with v4hal.use_backend("triton"):
        got = v4hal.sparse_attn(q, kv, sink, idx, 0.125)
        scores = v4hal.index_scores(q, kv, torch.randn(1, 2, 3))
        with pytest.raises(v4hal.BackendUnavailableError, match="head dim"):
            v4hal.sparse_attn(torch.zeros(1, 1, 1, 1024), torch.zeros(1, 2, 1024), torch.zeros(1),
                              torch.zeros(1, 1, 1, dtype=torch.int32), 1.0)
    assert_close(got, ref.sparse_attn(q, kv, sink, idx, 0.125), torch.float32)
    assert scores.shape == (1, 2, 10)
