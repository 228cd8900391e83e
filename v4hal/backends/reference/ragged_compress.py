"""Reference of the ragged KV compressor (``compressor_ragged``): the CPU oracle, also what runs on NPU
tensors outside the CANN op's limits.

Every step is the computation of V4's ``Compressor`` (prefill and decode give the same entries):

1. projections ``kv = x @ wkv^T``, ``score = x @ wgate^T`` in fp32 (:func:`project`);
2. the gated pooling of :func:`.attention.compress_kv`, fed from this call's tokens and from the state
   rows of the earlier tokens of the same entries;
3. the pooled entry cast to x's dtype, :func:`.small.rms_norm`, :func:`.small.rotary_emb` on its last
   ``rope_head_dim`` dims at position ``j * ratio``.

The projection runs over tiles of :data:`TILE` token rows (zero padded): a CPU GEMM may round a row
differently depending on how many rows share the call (a few-row GEMM takes another kernel), and a
ragged batch must not change a request's entries. No host sync: request and entry indices are built
on the device (``searchsorted`` over ``cu_seqlens`` and the per-request entry counts); tokens whose
state block is 0 write their row's old value back instead of being filtered out. On CPU tensors only
(`CPU_SHORTCUTS`), where reading a value is no sync, the index work of a step is planned once and reused by
its other compressors, and a call that completes no entry skips the pooling (a decode step, 3 of 4 times).
"""
from __future__ import annotations

import torch

from v4hal.hal.registry import implements
from v4hal.ops.ragged_compress import coff_of, max_entries

from . import small

#: Token rows per projection tile (see the module doc).
TILE = 16

#: On CPU tensors (where reading a value back costs no device sync) reuse a step's plan across its compressors
#: and skip the pooling when no entry completes; on a device the reference reads nothing back.
CPU_SHORTCUTS = True


def project(x: torch.Tensor, wkv: torch.Tensor, wgate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x @ wkv^T, x @ wgate^T)``, fp32 ``[T, coff*D]`` each, from x float ``[T, H]`` and fp32/bf16 weights
    ``[coff*D, H]`` (bf16 widened exactly); one GEMM over tiles of ``TILE`` rows, so the bits of a row do not
    depend on ``T``."""
    t, h = x.shape
    cd = wkv.shape[0]
    w = _stacked(wkv, wgate)
    w = (torch.cat([wkv, wgate], dim=0) if w is None else w).float()       # [2cd, H]
    tiles = -(-t // TILE)
    xp = x.new_zeros(tiles * TILE, h, dtype=torch.float32)
    xp[:t] = x
    xp = xp.view(tiles, TILE, h)
    y = torch.bmm(xp, w.unsqueeze(0).expand(tiles, -1, -1).transpose(1, 2)).reshape(tiles * TILE, 2 * cd)[:t]
    return y[:, :cd], y[:, cd:]


def _stacked(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """``cat([a, b])`` without a copy when ``b``'s rows follow ``a``'s in one storage (both contiguous, same
    dtype and width: the model keeps its compressor weights so), else None."""
    if not (a.is_contiguous() and b.is_contiguous() and a.dtype == b.dtype and a.dim() == b.dim() == 2
            and a.shape[1] == b.shape[1] and a.device == b.device
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and b.data_ptr() == a.data_ptr() + a.numel() * a.element_size()):
        return None
    return a.as_strided((a.shape[0] + b.shape[0], a.shape[1]), (a.shape[1], 1))


def entry_rows(cu_seqlens: torch.Tensor, start_pos: torch.Tensor, ratio: int,
               n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The entries one call completes, as output rows: ``(valid bool [n], request int64 [n], entry int64 [n])``.

    Request i completes entries ``start_pos[i] // ratio .. (start_pos[i] + len_i) // ratio - 1``; rows list
    them request after request, then ``valid`` is False (request and entry are 0 there)."""
    dev = start_pos.device
    b = start_pos.shape[0]
    cu = cu_seqlens.long()
    sp = start_pos.long()
    end = sp + (cu[1:] - cu[:-1])
    first = sp // ratio
    counts = (end // ratio - first).clamp_min(0)
    incl = torch.cumsum(counts, 0)
    rows = torch.arange(n, device=dev)
    req = torch.searchsorted(incl, rows, right=True)
    valid = req < b
    req = torch.where(valid, req, torch.zeros_like(req))
    entry = first[req] + rows - (incl - counts)[req]
    return valid, req, torch.where(valid, entry, torch.zeros_like(entry))


def _state_table(state_block_table: torch.Tensor, blocks: int) -> torch.Tensor:
    """int64 ``[B, M + 1]``: the table with every id outside ``[0, blocks)`` replaced by 0 (not kept) and a
    column of 0 appended, the block of every position past its row (see :func:`_column`). With value
    checks on neither occurs; with them off no id ever indexes outside the state cache."""
    table = state_block_table.long()
    table = table.masked_fill((table < 0) | (table >= blocks), 0)
    return torch.cat([table, table.new_zeros(table.shape[0], 1)], dim=1)


def _column(pos: torch.Tensor, blk: int, cols: int) -> torch.Tensor:
    """int64 like ``pos``: the table column of each position, ``cols`` (the appended 0 column of
    :func:`_state_table`) for a position before 0 or past the row's ``cols`` columns."""
    col = pos // blk
    return torch.where((col >= 0) & (col < cols), col, torch.full_like(col, cols))


class _Plan:
    """What a call derives from its batch alone (token and entry rows, state blocks, candidate positions): the
    same for every compressor of a step that shares the step's ``cu_seqlens``, ``start_pos`` and state table,
    so on the CPU it is made once and reused (the plan of a plan/run split). Reused only for the very same
    tensors (the plan holds them, so no other tensor can take their identity) still holding the same values
    (compared with copies kept at planning: inference tensors have no version counter) and the same shapes."""

    __slots__ = ("key", "tensors", "copies", "tok_req", "tok_pos", "valid", "req", "entry", "pos", "in_call",
                 "src_tok", "blocks", "cand_off", "tok_block", "tok_off", "entry_req", "entry_pos", "rope_rows", "none")

    def matches(self, tensors: tuple[torch.Tensor, ...], key: tuple) -> bool:
        return self.key == key and all(a is b for a, b in zip(self.tensors, tensors)) and \
            all(torch.equal(a, c) for a, c in zip(tensors, self.copies))


#: the last plan per ratio (a step's ratio-4 and ratio-128 layers interleave)
_LAST: dict[int, _Plan] = {}


def _plan(cu_seqlens: torch.Tensor, start_pos: torch.Tensor, state_block_table: torch.Tensor, t: int, n: int,
          ratio: int, blocks: int, blk: int, rope_len: int) -> _Plan:
    tensors = (cu_seqlens, start_pos, state_block_table)
    key = (t, n, ratio, blocks, blk, rope_len)
    cpu = CPU_SHORTCUTS and cu_seqlens.device.type == "cpu"    # elsewhere a comparison would wait for the device
    last = _LAST.get(ratio) if cpu else None
    if last is not None and last.matches(tensors, key):
        return last
    p = _Plan()
    p.key, p.tensors, p.copies = key, tensors, tuple(x.clone() for x in tensors)
    dev = cu_seqlens.device
    b = start_pos.shape[0]
    coff = 2 if ratio == 4 else 1
    cu = cu_seqlens.long()
    sp = start_pos.long()
    table = _state_table(state_block_table, blocks)
    cols = state_block_table.shape[1]
    tok = torch.arange(t, device=dev)
    p.tok_req = torch.searchsorted(cu[1:], tok, right=True).clamp_max(b - 1)
    p.tok_pos = sp[p.tok_req] + tok - cu[p.tok_req]
    p.valid, p.req, p.entry = entry_rows(cu_seqlens, start_pos, ratio, n)
    p.tok_block = table[p.tok_req, _column(p.tok_pos, blk, cols)]
    p.tok_off = p.tok_pos % blk
    p.entry_req = torch.where(p.valid, p.req, -1).to(torch.int32)
    p.entry_pos = torch.where(p.valid, p.entry, -1).to(torch.int32)
    p.none = cpu and not bool(p.valid.any())        # no entry completes (a host read: CPU only)
    if not p.none:      # what the pooling reads (a call that completes nothing skips it)
        span = coff * ratio
        pos = (p.entry * ratio - (coff - 1) * ratio).unsqueeze(1) + torch.arange(span, device=dev)  # [n, span]
        start = sp[p.req].unsqueeze(1)
        p.pos, p.in_call = pos, pos >= start
        p.src_tok = (cu[p.req].unsqueeze(1) + pos - start).clamp(0, t - 1)
        p.blocks = table[p.req.unsqueeze(1).expand_as(pos), _column(pos.clamp_min(0), blk, cols)]
        p.cand_off = pos.clamp_min(0) % blk
        p.rope_rows = (p.entry * ratio).clamp(0, rope_len - 1)
    if cpu:
        _LAST[ratio] = p
    return p


@implements("compressor_ragged", "reference")
def compressor_ragged(x: torch.Tensor, wkv: torch.Tensor, wgate: torch.Tensor, ape: torch.Tensor,
                      norm_weight: torch.Tensor, freqs_cis: torch.Tensor, state_cache: torch.Tensor,
                      state_block_table: torch.Tensor, cu_seqlens: torch.Tensor, start_pos: torch.Tensor,
                      ratio: int, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See :func:`v4hal.ops.ragged_compress.compressor_ragged`; state_cache is updated in place."""
    t = x.shape[0]
    b = start_pos.shape[0]
    d = norm_weight.shape[0]
    coff = coff_of(ratio)
    cd = coff * d
    blk = state_cache.shape[1]
    n = max_entries(t, ratio, b)
    dev = x.device
    if t == 0 or b == 0:
        none = torch.full((n,), -1, dtype=torch.int32, device=dev)
        return x.new_zeros(n, d), none, none.clone()
    p = _plan(cu_seqlens, start_pos, state_block_table, t, n, ratio, state_cache.shape[0], blk, freqs_cis.shape[0])

    # this call's tokens: projections, logits (score + ape, as compress_kv adds them)
    kv_t, score_t = project(x, wkv, wgate)
    lg_t = score_t + ape[p.tok_pos % ratio]

    if p.none:          # what the pooling below gives when no row is valid: zeros, -1, -1
        entries = x.new_zeros(n, d)
    else:
        entries = _pool(p, kv_t, lg_t, x.dtype, state_cache, cd, d, ratio, coff, norm_weight, norm_eps, freqs_cis)

    # state rows of this call's tokens (after the reads above); block 0 keeps its old value
    rows = torch.cat([kv_t, lg_t], dim=-1)
    old = state_cache[p.tok_block, p.tok_off]
    state_cache[p.tok_block, p.tok_off] = torch.where((p.tok_block != 0).unsqueeze(1), rows, old)
    return entries, p.entry_req.clone(), p.entry_pos.clone()


def _pool(p: _Plan, kv_t: torch.Tensor, lg_t: torch.Tensor, dtype: torch.dtype, state_cache: torch.Tensor, cd: int,
          d: int, ratio: int, coff: int, norm_weight: torch.Tensor, norm_eps: float,
          freqs_cis: torch.Tensor) -> torch.Tensor:
    """The completed entries ``[n, d]`` in ``dtype`` (zeros on rows that complete none) from this call's
    projections and the state cache (read before this call's rows are written)."""
    # the completed entries and the candidate positions of each: block j-1 (overlap) then block j
    cached = state_cache[p.blocks, p.cand_off]                                                    # [n, span, 2cd]
    mask = p.in_call.unsqueeze(-1)
    kv_c = torch.where(mask, kv_t[p.src_tok], cached[..., :cd])
    lg_c = torch.where(mask, lg_t[p.src_tok], cached[..., cd:])
    if coff == 2:
        # candidates: the first d channels of block j-1, then the last d of block j; block -1 is padding
        before = (p.pos[:, :ratio] < 0).unsqueeze(-1)
        prev_kv = kv_c[:, :ratio, :d].masked_fill(before, 0.0)
        prev_lg = lg_c[:, :ratio, :d].masked_fill(before, float("-inf"))
        kv_c = torch.cat([prev_kv, kv_c[:, ratio:, d:]], dim=1)                                   # [n, 2r, d]
        lg_c = torch.cat([prev_lg, lg_c[:, ratio:, d:]], dim=1)
    pooled = (kv_c * torch.softmax(lg_c, dim=1)).sum(dim=1)                                      # fp32 [n, d]

    # norm and rope as the model's Compressor: in x's dtype, rope at the entry's first position
    normed = small.rms_norm(pooled.to(dtype), norm_weight, norm_eps)
    rd = 2 * freqs_cis.shape[1]
    f = freqs_cis[p.rope_rows].unsqueeze(1)                                                      # [n, 1, rd/2]
    tail = small.rotary_emb(normed[:, -rd:].unsqueeze(1), f).squeeze(1)
    out = torch.cat([normed[:, :-rd], tail], dim=-1)
    return torch.where(p.valid.unsqueeze(1), out, torch.zeros((), dtype=out.dtype, device=out.device))
