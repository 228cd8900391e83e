"""The documented results of the stand-in CANN ops, in plain torch (fp32 math).

Written from the op documentation (op-plugin docs, vllm-ascend READMEs and bindings), not from
v4hal's reference backend, so an adapter that mistranslates our contract into theirs shows up as a
mismatch against the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn


def paged_raw(cache: torch.Tensor, table: torch.Tensor, batch: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rows of a paged cache ``[blocks, blk, 1, w]`` at token positions ``pos`` of sequences ``batch``
    (same shapes, int64, pos >= 0) -> ``[..., w]`` in the cache's dtype."""
    blk = cache.shape[1]
    flat = cache.reshape(-1, cache.shape[-1])
    block = table.long()[batch, pos // blk]
    return flat[block * blk + pos % blk]


def paged_rows(cache: torch.Tensor, table: torch.Tensor, batch: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """:func:`paged_raw` as fp32."""
    return paged_raw(cache, table, batch, pos).float()


def token_batches(cu_ends: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From cumulative query ends (one per batch): per token its batch, its index inside the batch,
    and the batch's query count."""
    ends = torch.tensor(cu_ends, dtype=torch.long, device=device)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    t = int(ends[-1]) if len(cu_ends) else 0
    tok = torch.arange(t, device=device)
    batch = torch.bucketize(tok, ends, right=True)
    return batch, tok - starts[batch], (ends - starts)[batch]


def softmax_attend(scores: torch.Tensor, valid: torch.Tensor, values: torch.Tensor,
                   sinks: torch.Tensor | None) -> torch.Tensor:
    """scores fp32 ``[T, N, K]``, valid bool ``[T, K]``, values fp32 ``[T, K, D]`` -> ``[T, N, D]``.
    A row with nothing valid and no sink is undefined on the NPU: NaN here."""
    s = scores.masked_fill(~valid.unsqueeze(1), float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.float().view(1, -1, 1).expand(s.shape[0], -1, 1)], dim=-1)
    p = torch.softmax(s, dim=-1)                                   # all -inf -> NaN (undefined)
    if sinks is not None:
        p = p[..., :-1]
    return torch.matmul(p, values)


def indexer_scores(q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """q ``[T, N, D]``, keys ``[T, S, D]`` (per token), w ``[T, N]`` -> fp32 ``[T, S]``."""
    dots = torch.einsum("tnd,tsd->tns", q.float(), keys.float()).relu()
    return torch.einsum("tns,tn->ts", dots, w.float())


def topk_padded(scores: torch.Tensor, valid: torch.Tensor, count: int) -> torch.Tensor:
    """Top ``count`` valid columns per row (descending), -1 padded -> int32 ``[T, count]``."""
    t, s = scores.shape
    masked = scores.masked_fill(~valid, float("-inf"))
    width = min(count, s)
    vals, idx = masked.topk(width, dim=-1) if width else (masked[:, :0], masked[:, :0].long())
    idx = torch.where(torch.isfinite(vals), idx, torch.full_like(idx, -1))
    if width < count:
        idx = torch.cat([idx, idx.new_full((t, count - width), -1)], dim=-1)
    return idx.to(torch.int32)


def gating(x: torch.Tensor, k: int, bias: torch.Tensor | None, input_ids: torch.Tensor | None,
           tid2eid: torch.Tensor | None, k_group: int, group_count: int, group_select_mode: int, norm_type: int,
           routed_scaling_factor: float, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op-plugin doc's numpy reference of npu_moe_gating_top_k, plus norm_type 2 (sqrt(softplus))
    of vllm-ascend's moe_gating_top_k_hash and its hash path (indices from tid2eid[input_ids])."""
    xf = x.float()
    if norm_type == 0:
        norm = torch.softmax(xf, dim=-1)
    elif norm_type == 1:
        norm = torch.sigmoid(xf)
    else:
        norm = torch.sqrt(Fn.softplus(xf))
    if tid2eid is not None and input_ids is not None:
        idx = tid2eid.long()[input_ids.long()]
    else:
        sel = norm + bias.float() if bias is not None else norm
        if group_count > 1:
            g = sel.view(sel.shape[0], group_count, -1)
            score = g.amax(-1) if group_select_mode == 0 else g.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(k_group, dim=-1).indices, True)
            sel = g.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(sel)
        idx = torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, :k]
    y = norm.gather(1, idx)
    if norm_type in (1, 2):
        y = y / (y.sum(dim=-1, keepdim=True) + eps)
    y = y * routed_scaling_factor
    return y.to(x.dtype), idx.to(torch.int32), norm


def hc_pre(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, hc: int,
           iters: int, norm_eps: float, hc_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek-V4 hc_pre as the vllm-ascend op test's CPU golden computes it: x ``[T, hc, D]``."""
    xf = x.float().flatten(1)
    mixes = (xf @ hc_fn.float().t()) * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm_eps)
    pre = torch.sigmoid(mixes[:, :hc] * hc_scale[0] + hc_base[:hc]) + hc_eps
    post = 2 * torch.sigmoid(mixes[:, hc:2 * hc] * hc_scale[1] + hc_base[hc:2 * hc])
    comb = (mixes[:, 2 * hc:] * hc_scale[2] + hc_base[2 * hc:]).view(-1, hc, hc)
    comb = torch.softmax(comb, dim=-1) + hc_eps
    comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    y = (pre.unsqueeze(-1) * x.float()).sum(1)
    return y, post, comb


def hc_post(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """``out[.., k, :] = post[k] * x + sum_j comb[j, k] * residual[.., j, :]`` (fp32)."""
    mixed = torch.einsum("...jk,...jd->...kd", comb.float(), residual.float())
    return post.float().unsqueeze(-1) * x.float().unsqueeze(-2) + mixed
