"""Reference (pure PyTorch) Engram of DeepSeek-V4.1: hashing, FP8 table lookup, gate.

Semantics follow ``docs/ops.md`` (Engram) and the public V4.1 model's Engram module and n-gram hash
state: the hash keeps int64 products and XORs them (no overflow by the multipliers' bound), the gate
computes in fp32 and casts once at the end.
"""
from __future__ import annotations

import torch

from v4hal.hal.registry import implements
from v4hal.ops.engram import DEAD, GATE_CLAMP, SCALE_BLOCK, engram_row_offsets


def _request_of(cu: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(request index, position within the request) of each of the ``t`` tokens, int64 ``[T]``."""
    lens = cu[1:] - cu[:-1]
    req = torch.repeat_interleave(torch.arange(lens.shape[0], device=cu.device), lens, output_size=t)
    return req, torch.arange(t, device=cu.device) - cu[req]


@implements("engram_hash", "reference")
def engram_hash(ids: torch.Tensor, cu_seqlens: torch.Tensor, history: torch.Tensor, multipliers: torch.Tensor,
                primes: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids int64 ``[T]``, cu_seqlens ``[B + 1]``, history int64 ``[B, N - 1]``, multipliers ``[N]``, primes
    ``[N - 1, H]`` -> (rows int64 ``[T, (N - 1) H]``, new history ``[B, N - 1]``)."""
    t, n = ids.shape[0], multipliers.shape[0]
    back = n - 1
    cu = cu_seqlens.long()
    req, pos = _request_of(cu, t)
    tok = torch.arange(t, device=ids.device)
    blocked = torch.zeros(t, dtype=torch.bool, device=ids.device)
    rolling = torch.zeros(t, dtype=torch.int64, device=ids.device)
    hashes = []
    for s in range(n):
        in_chunk = pos >= s
        # look-back s: this chunk's token t - s, else the history's entry (s - pos) places before the chunk
        from_hist = history[req, (back - (s - pos)).clamp(0, back - 1)]
        src = torch.where(in_chunk, ids[(tok - s).clamp_min(0)], from_hist)
        blocked = blocked | (src == DEAD)
        word = torch.where(blocked, torch.full_like(src, pad_id), src) * multipliers[s]
        rolling = word if s == 0 else torch.bitwise_xor(rolling, word)
        if s >= 1:
            hashes.append(rolling[:, None] % primes[s - 1])
    rows = torch.cat(hashes, dim=1) + engram_row_offsets(primes)
    # the new history: the last N - 1 ids of [history ; chunk] per request
    lens = cu[1:] - cu[:-1]
    k = torch.arange(back, device=ids.device)
    from_end = back - k                                        # 1-based distance from the request's end
    in_new = lens[:, None] >= from_end[None, :]
    new_tok = (cu[1:, None] - from_end[None, :]).clamp(0, max(t - 1, 0))
    shifted = history.gather(1, (k[None, :] + lens[:, None]).clamp_max(back - 1))
    new_hist = torch.where(in_new, ids[new_tok] if t else shifted, shifted)
    return rows, new_hist


def dequant_rows(table: torch.Tensor, scales: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """fp32 ``[*rows.shape, W]``: ``table[rows]`` times its scale per block of 32 channels (on table's device)."""
    r = rows.long()
    vals = table[r].float().unflatten(-1, (-1, SCALE_BLOCK))
    return (vals * scales[r].float().unsqueeze(-1)).flatten(-2)


@implements("engram_lookup", "reference")
def engram_lookup(rows: torch.Tensor, table: torch.Tensor, scales: torch.Tensor,
                  out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """rows ``[T, n]`` -> ``out_dtype [T, n, W]`` on rows' device. A host-memory table is gathered on the
    host and only the gathered rows cross to the device."""
    if table.device != rows.device:
        got = dequant_rows(table, scales, rows.to(table.device)).to(out_dtype)
        return got.to(rows.device, non_blocking=True)
    return dequant_rows(table, scales, rows).to(out_dtype)


@implements("engram_gate", "reference")
def engram_gate(streams: torch.Tensor, kv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                token_mask: torch.Tensor | None, eps: float) -> torch.Tensor:
    """streams ``[T, hc, D]``, kv ``[T, (hc + 1) D]``, weights ``[hc, D]``, mask bool ``[T]`` -> like streams."""
    t, hc, d = streams.shape
    h = streams.float()
    key = kv[:, : hc * d].float().view(t, hc, d)
    value = kv[:, hc * d:].float()
    w = q_weight.float() * k_weight.float()
    rstd = torch.rsqrt(h.square().mean(-1) + eps) * torch.rsqrt(key.square().mean(-1) + eps)
    dot = (h * w * key).sum(-1) * rstd * d ** -0.5
    gate = torch.sigmoid(torch.copysign(dot.abs().clamp_min(GATE_CLAMP).sqrt(), dot))
    if token_mask is not None:
        gate = gate.masked_fill(~token_mask[:, None], 0.0)
    return (h + gate[..., None] * value[:, None, :]).to(streams.dtype)
