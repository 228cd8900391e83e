"""Reference of the V4.1 (CSA2) ragged compressor (``csa2_compressor_ragged``): the CPU oracle, also what
runs on NPU tensors (no CANN compressor mode pools without overlap at ratio 2 or runs ratio 1).

Steps, as V4.1's compressor on its cache path:

1. projections ``kv = x @ wkv^T`` (and at ratio 2 ``gate = x @ wgate^T``) in fp32, over tiles of
   :data:`.ragged_compress.TILE` rows so a row's bits do not depend on the batch (:func:`project`);
2. per entry, the ``ratio`` rows of its group, from this call's tokens or from the state rows of the
   earlier tokens; ratio 2: ``sum_k kv_k * softmax_k(gate_k)`` per channel in fp32; ratio 1: ``kv``;
3. :func:`finish`: the entry cast to x's dtype, RMSNorm as V4.1's (normalized in fp32, rounded to x's
   dtype, then times the weight, rounded again) -> the latent; rope on its last dims at ``g * ratio``.
"""
from __future__ import annotations

import torch

from v4hal.hal.registry import implements
from v4hal.ops.ragged_compress import max_entries

from . import small
from .ragged_compress import TILE, _column, _state_table, entry_rows


def project(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 ``[T, N]`` = ``x [T, H] @ w [N, H]^T`` (bf16 weights widened exactly), one GEMM over tiles of
    ``TILE`` zero-padded rows, so the bits of a row do not depend on ``T``."""
    t, h = x.shape
    tiles = -(-t // TILE)
    xp = x.new_zeros(tiles * TILE, h, dtype=torch.float32)
    xp[:t] = x
    wf = w.float()
    y = torch.bmm(xp.view(tiles, TILE, h), wf.t().unsqueeze(0).expand(tiles, -1, -1))
    return y.reshape(tiles * TILE, w.shape[0])[:t]


def rms_norm_v41(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """V4.1's RMSNorm, ``[..., D]`` in x's dtype: ``x * rsqrt(mean(x**2) + eps)`` in fp32 rounded to x's dtype,
    then times ``weight`` (fp32 or bf16) and rounded once more."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
    return (weight.float() * y.float()).to(x.dtype)


def finish(pooled: torch.Tensor, norm_weight: torch.Tensor, freqs_cis: torch.Tensor, entry: torch.Tensor,
           ratio: int, norm_eps: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(entries, latent)`` ``[n, D]`` in ``dtype`` from fp32 ``pooled [n, D]``: the latent is the normed
    entry; entries rope its last ``2 * freqs_cis.shape[1]`` dims at position ``entry * ratio``."""
    latent = rms_norm_v41(pooled.to(dtype), norm_weight, norm_eps)
    rd = 2 * freqs_cis.shape[1]
    f = freqs_cis[(entry * ratio).clamp(0, freqs_cis.shape[0] - 1)].unsqueeze(1)                  # [n, 1, rd/2]
    tail = small.rotary_emb(latent[:, -rd:].unsqueeze(1), f).squeeze(1)
    return torch.cat([latent[:, :-rd], tail], dim=-1), latent


def gather_group(kv_t: torch.Tensor, gate_t: torch.Tensor | None, state_cache: torch.Tensor,
                 table: torch.Tensor, cols: int, cu: torch.Tensor, sp: torch.Tensor, req: torch.Tensor,
                 entry: torch.Tensor, ratio: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 ``(kv, gate) [n, ratio, D]``: the rows of each entry's group, from this call's tokens (position >=
    the request's start) or else from the state cache (``table`` from ``_state_table``)."""
    d = kv_t.shape[1]
    t = kv_t.shape[0]
    blk = state_cache.shape[1]
    pos = (entry * ratio).unsqueeze(1) + torch.arange(ratio, device=kv_t.device)                 # [n, r]
    start = sp[req].unsqueeze(1)
    in_call = (pos >= start).unsqueeze(-1)
    src = (cu[req].unsqueeze(1) + pos - start).clamp(0, max(t - 1, 0))
    if ratio == 1:
        return kv_t[src], None
    blocks = table[req.unsqueeze(1).expand_as(pos), _column(pos, blk, cols)]
    cached = state_cache[blocks, pos % blk]                                                       # [n, r, 2D]
    kv = torch.where(in_call, kv_t[src], cached[..., :d])
    gate = torch.where(in_call, gate_t[src], cached[..., d:])
    return kv, gate


def write_state(state_cache: torch.Tensor, table: torch.Tensor, cols: int, tok_req: torch.Tensor,
                tok_pos: torch.Tensor, kv_t: torch.Tensor, gate_t: torch.Tensor) -> None:
    """Write ``[kv | gate]`` of this call's tokens into their state rows; a block id 0 keeps its old value."""
    blk = state_cache.shape[1]
    tok_block = table[tok_req, _column(tok_pos, blk, cols)]
    tok_off = tok_pos % blk
    rows = torch.cat([kv_t, gate_t], dim=-1)
    old = state_cache[tok_block, tok_off]
    state_cache[tok_block, tok_off] = torch.where((tok_block != 0).unsqueeze(1), rows, old)


def token_rows(cu_seqlens: torch.Tensor, start_pos: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 ``(request, position) [T]`` of this call's tokens."""
    cu = cu_seqlens.long()
    sp = start_pos.long()
    tok = torch.arange(t, device=cu.device)
    req = torch.searchsorted(cu[1:], tok, right=True).clamp_max(start_pos.shape[0] - 1)
    return req, sp[req] + tok - cu[req]


@implements("csa2_compressor_ragged", "reference")
def csa2_compressor_ragged(x: torch.Tensor, wkv: torch.Tensor, wgate: torch.Tensor | None,
                           norm_weight: torch.Tensor, freqs_cis: torch.Tensor, state_cache: torch.Tensor,
                           state_block_table: torch.Tensor, cu_seqlens: torch.Tensor, start_pos: torch.Tensor,
                           ratio: int, norm_eps: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """See :func:`v4hal.ops.csa2.csa2_compressor_ragged`; state_cache is updated in place at ratio 2."""
    t, b, d = x.shape[0], start_pos.shape[0], norm_weight.shape[0]
    n = max_entries(t, ratio, b)
    dev = x.device
    none = torch.full((n,), -1, dtype=torch.int32, device=dev)
    if t == 0 or b == 0:
        return x.new_zeros(n, d), x.new_zeros(n, d), none, none.clone()
    cu, sp = cu_seqlens.long(), start_pos.long()
    table = _state_table(state_block_table, state_cache.shape[0])
    cols = state_block_table.shape[1]
    kv_t = project(x, wkv)
    gate_t = project(x, wgate) if ratio > 1 else None
    valid, req, entry = entry_rows(cu_seqlens, start_pos, ratio, n)
    kv, gate = gather_group(kv_t, gate_t, state_cache, table, cols, cu, sp, req, entry, ratio)
    pooled = kv[:, 0] if gate is None else (kv * torch.softmax(gate, dim=1)).sum(dim=1)
    entries, latent = finish(pooled, norm_weight, freqs_cis, entry, ratio, norm_eps, x.dtype)
    zero = torch.zeros((), dtype=x.dtype, device=dev)
    keep = valid.unsqueeze(1)
    if ratio > 1:
        tok_req, tok_pos = token_rows(cu_seqlens, start_pos, t)
        write_state(state_cache, table, cols, tok_req, tok_pos, kv_t, gate_t)
    return (torch.where(keep, entries, zero), torch.where(keep, latent, zero),
            torch.where(valid, req, -1).to(torch.int32), torch.where(valid, entry, -1).to(torch.int32))
