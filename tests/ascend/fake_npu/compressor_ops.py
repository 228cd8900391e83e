"""Stand-in of vllm-ascend's ``torch.ops._C_ascend.compressor`` (``csrc/torch_binding.cpp`` schema; limits of
``csrc/attention/compressor``: README, op_host tiling checks, and the kernel's state addressing).

The documented result, computed here with plain loops over requests and entries (independent of
v4hal's reference): per token, ``kv = x @ wkv^T`` and ``score = x @ wgate^T + ape[p % ratio]`` in
fp32 (bf16/fp16 operands); the row of position ``p`` of request ``i`` is written to
``state_cache[state_block_table[i, p // blk], p % blk] = [kv | score]`` unless that block id is 0;
every entry whose last position lies in the call is pooled (softmax over its candidates, per
channel; coff 2: the first D channels of the previous block then the last D of its own), then
RMSNorm in fp32 with ``norm_weight`` and interleaved rope of the last 64 dims with the call's
``rope_cos`` / ``rope_sin`` row, cast once to x's dtype. Output rows: request after request, entry
after entry, then padding, which the real op leaves unspecified: filled with 7.0 here so that an
adapter that forgets to mask it fails.
"""
from __future__ import annotations

from typing import Any

import torch

from .contract import called, chips, cumulative, desc, require, tensor

TIER = "_C_ascend"
MODES = ((512, 2, 4), (128, 2, 4), (512, 1, 128))
PAD_VALUE = 7.0
HALF = (torch.bfloat16, torch.float16)


def compressor(x, wkv, wgate, state_cache, ape, norm_weight, rope_sin, rope_cos, state_block_table=None,
               cu_seqlens=None, seqused=None, start_pos=None, rope_head_dim=64, cmp_ratio=4, coff=1, norm_eps=1e-6,
               rotary_mode=1, cache_mode=1) -> Any:
    called(TIER, "compressor")
    op = f"{TIER}.compressor"
    chips(op, ("A3", "950"))
    tensor(op, "x", x, dtypes=HALF, ndim=2)
    t, h = x.shape
    require(1024 <= h <= 10240 and h % 512 == 0, op, f"hidden size must be within [1k, 10k] and 512-aligned, got {h}")
    d = norm_weight.shape[0] if isinstance(norm_weight, torch.Tensor) and norm_weight.dim() == 1 else -1
    mode = (d, coff, cmp_ratio)
    require(mode in MODES, op, f"(D, coff, cmp_ratio) must be one of {MODES}, got {mode}")
    require(rope_head_dim == 64 and rotary_mode == 2 and cache_mode == 1, op,
            f"rope_head_dim 64, rotary_mode 2 and cache_mode 1 only, got {rope_head_dim}, {rotary_mode}, {cache_mode}")
    require(seqused is None, op, "seqused is not used by this stand-in's callers")
    cd = coff * d
    for name, w in (("wkv", wkv), ("wgate", wgate)):
        tensor(op, name, w, dtypes=(x.dtype,), shape=(cd, h))
    tensor(op, "norm_weight", norm_weight, dtypes=(torch.float32,) if _chip() == "950" else (x.dtype,), shape=(d,))
    tensor(op, "ape", ape, dtypes=(torch.float32,), shape=(cmp_ratio, cd))
    tensor(op, "state_cache", state_cache, dtypes=(torch.float32,), ndim=3)
    blocks, blk, width = state_cache.shape
    require(width == 2 * cd, op, f"state_cache last dim must be 2*coff*D = {2 * cd}, got {desc(state_cache)}")
    require(blk % 16 == 0 and 16 <= blk <= 1024, op, f"state block size must be a multiple of 16 <= 1024, got {blk}")
    require(state_cache.stride(2) == 1 and state_cache.stride(1) == width, op, "state_cache rows must be dense")
    tensor(op, "start_pos", start_pos, dtypes=(torch.int32,), ndim=1)
    b = start_pos.shape[0]
    cu = cumulative(op, "cu_seqlens", cu_seqlens, total=t, leading_zero=True)
    require(len(cu) == b + 1, op, f"cu_seqlens must be [B+1] = [{b + 1}], got {desc(cu_seqlens)}")
    tensor(op, "state_block_table", state_block_table, dtypes=(torch.int32,), ndim=2)
    require(state_block_table.shape[0] == b, op, f"state_block_table must have B = {b} rows")
    n = min(t, t // cmp_ratio + b)
    for name, r in (("rope_sin", rope_sin), ("rope_cos", rope_cos)):
        tensor(op, name, r, dtypes=(torch.float32,), shape=(n, 64))
    sp = [int(v) for v in start_pos.tolist()]
    table = state_block_table.tolist()
    for i in range(b):
        need = -(-(sp[i] + cu[i + 1] - cu[i]) // blk)
        require(cu[i + 1] == cu[i] or len(table[i]) >= need, op, f"state_block_table row {i} needs {need} columns")

    w = torch.cat([wkv, wgate]).float()
    proj = x.float() @ w.T
    out = torch.full((n, d), PAD_VALUE, dtype=torch.float32)
    row = 0
    for i in range(b):
        s, length = sp[i], cu[i + 1] - cu[i]

        def value(p: int, i: int = i, s: int = s) -> torch.Tensor:
            if p >= s:
                k = proj[cu[i] + p - s]
                return torch.cat([k[:cd], k[cd:] + ape[p % cmp_ratio]])
            return state_cache[table[i][p // blk], p % blk]

        for j in range(s // cmp_ratio, (s + length) // cmp_ratio):
            cur = [value(j * cmp_ratio + k) for k in range(cmp_ratio)]
            kv = torch.stack([c[cd - d:cd] for c in cur])
            sc = torch.stack([c[2 * cd - d:] for c in cur])
            if coff == 2:
                if j > 0:
                    prev = [value((j - 1) * cmp_ratio + k) for k in range(cmp_ratio)]
                    kv = torch.cat([torch.stack([c[:d] for c in prev]), kv])
                    sc = torch.cat([torch.stack([c[cd:cd + d] for c in prev]), sc])
            pooled = (kv * torch.softmax(sc, dim=0)).sum(dim=0)
            normed = pooled * torch.rsqrt(pooled.square().mean() + norm_eps) * norm_weight.float()
            tail = normed[-64:]
            swapped = torch.stack([-tail[1::2], tail[0::2]], dim=-1).flatten()
            normed = torch.cat([normed[:-64], tail * rope_cos[row] + swapped * rope_sin[row]])
            out[row] = normed
            row += 1
        for p in range(s, s + length):
            blk_id = table[i][p // blk]
            if blk_id != 0:
                state_cache[blk_id, p % blk] = value(p)
    return out.to(x.dtype)


def _chip() -> str:
    from .contract import STATE

    return STATE.chip


OPS = {"compressor": compressor}
