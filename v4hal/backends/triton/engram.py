"""Triton Engram kernels: the FP8 table gather + dequantization, and the gate with the residual update.

- ``engram_lookup``: each program gathers ``BLOCK_R`` table rows (``[W]`` e4m3 bytes each, ``W / 32``
  scales, fp32 or e8m0) and writes ``e4m3 * scale`` in the output dtype. The table may live in host
  memory when rows are on a GPU: a pinned (page-locked) host tensor is mapped into the GPU's address
  space (unified addressing), so the kernel reads it over the bus with no staging copy; an unpinned host
  table runs the reference (gathered on the host), as its requirement says. :func:`map_host_table` pins
  an existing host tensor in place (``cudaHostRegister``, mapped + portable).
- ``engram_gate``: one program per token; per mHC stream two passes over ``D`` in chunks of ``BLOCK_D``:
  the sums of ``h^2``, ``key^2`` and ``h * q * k * key``, then ``h + gate * value``, all fp32.
- ``engram_hash``: one launch for the whole ragged batch. Token programs (``BLOCK_T`` tokens each) find
  each token's request by a binary search of ``cu_seqlens``, walk the look-back ``s = 0 .. N-1`` (this
  step's ids, then the request's history; pad from the first dead token or the sequence start on), keep
  the rolling XOR of ``id * multiplier`` in int64 and write ``hash % prime + row offset`` for every
  (n-gram size, head) column, the offsets being the running sum of the primes (computed in the program).
  History programs (``BLOCK_B`` requests each) write the new history: the last ``N - 1`` ids of
  ``[history ; this step's ids]``. The reference's version is some 30 small torch launches per layer.

Outputs are rounded to nearest even from fp32 (:func:`._cast.cast_out`). Verified where: numerics under
the Triton interpreter (CPU tables, fp32/bf16/fp16 outputs, fp32 and e8m0 scales; the hash bit for bit
against the reference on ragged batches with dead tokens, empty requests and long look-backs); the kernels compile
for sm_90a without spills (``tests/triton/sm90_compile.py``). The host-mapped read and all speeds only
on a GPU.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import triton
import triton.language as tl

from v4hal.hal import requirements as R
from v4hal.hal.errors import DeviceError
from v4hal.hal.registry import implements
from v4hal.ops.engram import GATE_CLAMP, SCALE_BLOCK

from ._attn_common import cdiv, next_pow2
from ._cast import cast_out
from .quant import _scale_arg, interpreting, load_scale

_TILE = 4096          # gathered elements per lookup program
_GATE_BLOCK = 1024    # channels per pass step of the gate
_HASH_TOKENS = 64     # tokens per hash program
_HASH_REQUESTS = 64   # requests per history program of the hash


# ---------------------------------------------------------------------------------------------
# engram_lookup


@triton.jit
def _lookup_kernel(rows_ptr, table_ptr, s_ptr, out_ptr, N, W,
                   S_E8M0: tl.constexpr, SOFT: tl.constexpr, BLOCK_R: tl.constexpr, WP: tl.constexpr, SB: tl.constexpr):
    """out[i, :] = e4m3(table[rows[i], :]) * s[rows[i], : // SB] for i in this program's BLOCK_R rows."""
    ri = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rok = ri < N
    src = tl.load(rows_ptr + ri, mask=rok, other=0).to(tl.int64)
    col = tl.arange(0, WP)
    mask = rok[:, None] & (col < W)[None, :]
    yb = tl.load(table_ptr + src[:, None] * W + col[None, :], mask=mask, other=0)
    y = yb.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    if SOFT:    # the interpreter widens the e4m3 NaN codes to inf: torch's NaN bits instead
        nan_bits = 0x7FF00000 | ((yb.to(tl.int32) & 0x80) << 24)
        y = tl.where((yb & 0x7F) == 0x7F, nan_bits, y.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)
    s = load_scale(s_ptr, src[:, None] * (W // SB) + (col // SB)[None, :], mask, S_E8M0)
    o = ri.to(tl.int64)[:, None] * W + col[None, :]
    tl.store(out_ptr + o, cast_out(y * s, out_ptr.dtype.element_ty, SOFT), mask=mask)


def _host_table_pinned(args: Mapping[str, Any]) -> str | None:
    if args["rows"].device.type != "cuda":
        return None
    for name in ("table", "scales"):
        t = args[name]
        if t.device.type == "cpu" and not t.is_pinned():
            return (f"{name} is in pageable host memory: pin it (map_host_table, or allocate with "
                    "pin_memory=True) for the GPU to read it")
    return None


_FP8_ROWS = R.min_capability(8, 9, tensor="rows", why="FP8 e4m3 conversions of the table rows")
HOST_TABLE_PINNED = R.when("a host-memory table and its scales are pinned (mapped into the GPU's address space)",
                           _host_table_pinned)


def map_host_table(t: torch.Tensor) -> torch.Tensor:
    """Page-lock host tensor ``t`` in place and map it into every GPU's address space (``cudaHostRegister``
    with the mapped and portable flags), so ``engram_lookup`` kernels read it directly; returns ``t``.
    A tensor already pinned is returned as is. Needs a CUDA device."""
    if t.device.type != "cpu":
        raise DeviceError(f"map_host_table: t must be a host (cpu) tensor, got one on {t.device}")
    if t.is_pinned():
        return t
    if not t.is_contiguous():
        raise DeviceError("map_host_table: t must be contiguous (one registered range)")
    flags = 0x01 | 0x02   # cudaHostRegisterPortable | cudaHostRegisterMapped
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), flags)
    code = int(getattr(err, "value", err))
    if code != 0:
        raise DeviceError(f"map_host_table: cudaHostRegister failed with CUDA error {code} "
                          f"for {t.numel() * t.element_size()} bytes")
    return t


@implements("engram_lookup", "triton", requires=(_FP8_ROWS, HOST_TABLE_PINNED))
def engram_lookup(rows: torch.Tensor, table: torch.Tensor, scales: torch.Tensor,
                  out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """rows int ``[T, n]``, table e4m3 ``[R, W]`` (rows' device, or pinned host memory), scales fp32/e8m0
    ``[R, W / 32]`` -> ``out_dtype [T, n, W]`` on rows' device."""
    t, n = rows.shape
    w = table.shape[1]
    out = torch.empty((t, n, w), dtype=out_dtype, device=rows.device)
    total = t * n
    if total == 0 or w == 0:
        return out
    sc, e8m0 = _scale_arg(scales)
    wp = next_pow2(w)
    block_r = max(1, min(_TILE // wp, next_pow2(total)))
    _lookup_kernel[(cdiv(total, block_r),)](
        rows.reshape(-1).contiguous(), table.contiguous().view(torch.uint8), sc, out, total, w,
        S_E8M0=e8m0, SOFT=interpreting(rows), BLOCK_R=block_r, WP=wp, SB=SCALE_BLOCK, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------
# engram_gate


@triton.jit
def _gate_kernel(h_ptr, kv_ptr, q_ptr, k_ptr, m_ptr, out_ptr, HC, D, eps, inv_sqrt_d, clamp,
                 HAS_MASK: tl.constexpr, SOFT: tl.constexpr, BLOCK_D: tl.constexpr):
    """Token t: for each stream j, dot = sum(h * q * k * key) * rsqrt(mean(h^2) + eps) * rsqrt(mean(key^2) + eps)
    / sqrt(D); gate = sigmoid(sign(dot) sqrt(max(|dot|, clamp))) (0 when masked off); out = h + gate * value."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    h_row = h_ptr + t * HC * D
    o_row = out_ptr + t * HC * D
    kv_row = kv_ptr + t * (HC + 1) * D
    live = 1.0
    if HAS_MASK:
        live = tl.load(m_ptr + t).to(tl.float32)
    for j in range(HC):
        hh = tl.zeros([BLOCK_D], tl.float32)
        kk = tl.zeros([BLOCK_D], tl.float32)
        hk = tl.zeros([BLOCK_D], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ok = d0 + offs < D
            h = tl.load(h_row + j * D + d0 + offs, mask=ok, other=0.0).to(tl.float32)
            key = tl.load(kv_row + j * D + d0 + offs, mask=ok, other=0.0).to(tl.float32)
            w = tl.load(q_ptr + j * D + d0 + offs, mask=ok, other=0.0).to(tl.float32) * \
                tl.load(k_ptr + j * D + d0 + offs, mask=ok, other=0.0).to(tl.float32)
            hh += h * h
            kk += key * key
            hk += h * w * key
        rstd = tl.rsqrt(tl.sum(hh, 0) / D + eps) * tl.rsqrt(tl.sum(kk, 0) / D + eps)
        dot = tl.sum(hk, 0) * rstd * inv_sqrt_d
        root = tl.sqrt(tl.maximum(tl.abs(dot), clamp))
        gate = tl.sigmoid(tl.where(dot < 0, -root, root)) * live
        for d0 in range(0, D, BLOCK_D):
            ok = d0 + offs < D
            h = tl.load(h_row + j * D + d0 + offs, mask=ok, other=0.0).to(tl.float32)
            v = tl.load(kv_row + HC * D + d0 + offs, mask=ok, other=0.0).to(tl.float32)
            tl.store(o_row + j * D + d0 + offs, cast_out(h + gate * v, out_ptr.dtype.element_ty, SOFT), mask=ok)


@implements("engram_gate", "triton")
def engram_gate(streams: torch.Tensor, kv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                token_mask: torch.Tensor | None, eps: float) -> torch.Tensor:
    """streams ``[T, hc, D]``, kv ``[T, (hc + 1) D]``, q/k weights ``[hc, D]``, mask bool ``[T]`` -> like streams."""
    t, hc, d = streams.shape
    out = torch.empty_like(streams, memory_format=torch.contiguous_format)
    if t == 0 or d == 0:
        return out
    mask = token_mask if token_mask is not None else streams
    _gate_kernel[(t,)](
        streams.contiguous(), kv.contiguous(), q_weight.contiguous(), k_weight.contiguous(),
        mask.contiguous() if token_mask is not None else mask, out, hc, d, float(eps), float(d ** -0.5),
        GATE_CLAMP, HAS_MASK=token_mask is not None, SOFT=interpreting(streams),
        BLOCK_D=min(_GATE_BLOCK, next_pow2(d)), num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------
# engram_hash


@triton.jit
def _hash_kernel(ids_ptr, cu_ptr, hist_ptr, mult_ptr, primes_ptr, rows_ptr, new_hist_ptr, T, B, pad_id,
                 token_programs, search_steps,
                 N: tl.constexpr, H: tl.constexpr, CP: tl.constexpr, BP: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_B: tl.constexpr):
    """Programs ``0 .. token_programs-1``: rows ``[T, (N-1) H]`` of ``BLOCK_T`` tokens; the others: the new
    history ``[B, N-1]`` of ``BLOCK_B`` requests. ``CP`` / ``BP``: ``(N-1) H`` / ``N-1`` rounded up to powers of 2."""
    pid = tl.program_id(0)
    back = N - 1
    if pid < token_programs:
        t = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        ok = t < T
        # the token's request: the last b in [0, B) with cu[b] <= t (cu rises from 0)
        lo = tl.zeros([BLOCK_T], dtype=tl.int64)
        hi = tl.zeros([BLOCK_T], dtype=tl.int64) + (B - 1)
        for _ in range(search_steps):
            mid = (lo + hi + 1) // 2
            go = tl.load(cu_ptr + mid).to(tl.int64) <= t
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid - 1)
        req = lo
        pos = t - tl.load(cu_ptr + req).to(tl.int64)
        cols = tl.arange(0, CP)
        cok = cols < back * H
        primes = tl.load(primes_ptr + cols, mask=cok, other=1)
        offsets = tl.cumsum(tl.where(cok, primes, 0), 0) - tl.where(cok, primes, 0)
        rolling = tl.zeros([BLOCK_T], dtype=tl.int64)
        blocked = tl.zeros([BLOCK_T], dtype=tl.int1)
        rows = tl.zeros([BLOCK_T, CP], dtype=tl.int64)
        for s in tl.static_range(N):
            in_chunk = pos >= s
            own = tl.load(ids_ptr + tl.maximum(t - s, 0), mask=ok & in_chunk, other=0)
            h_col = tl.minimum(tl.maximum(back - (s - pos), 0), back - 1)
            old = tl.load(hist_ptr + req * back + h_col, mask=ok & (pos < s), other=0)
            src = tl.where(in_chunk, own, old)
            blocked = blocked | (src == -1)
            word = tl.where(blocked, pad_id, src).to(tl.int64) * tl.load(mult_ptr + s)
            rolling = rolling ^ word
            if s >= 1:
                mine = (cols >= (s - 1) * H) & (cols < s * H)
                rows = tl.where(mine[None, :], rolling[:, None] % primes[None, :], rows)
        out = rows + offsets[None, :]
        tl.store(rows_ptr + t[:, None] * (back * H) + cols[None, :], out, mask=ok[:, None] & cok[None, :])
    else:
        b = (pid - token_programs).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
        bok = b < B
        start = tl.load(cu_ptr + b, mask=bok, other=0).to(tl.int64)
        end = tl.load(cu_ptr + b + 1, mask=bok, other=0).to(tl.int64)
        k = tl.arange(0, BP)
        kok = k < back
        from_end = back - k                                      # 1-based distance from the request's end
        in_new = (end - start)[:, None] >= from_end[None, :]
        live = bok[:, None] & kok[None, :]
        new = tl.load(ids_ptr + end[:, None] - from_end[None, :], mask=live & in_new, other=0)
        shifted = tl.minimum(k[None, :] + (end - start)[:, None], back - 1)
        kept = tl.load(hist_ptr + b[:, None] * back + shifted, mask=live & ~in_new, other=0)
        tl.store(new_hist_ptr + b[:, None] * back + k[None, :], tl.where(in_new, new, kept), mask=live)


@implements("engram_hash", "triton")
def engram_hash(ids: torch.Tensor, cu_seqlens: torch.Tensor, history: torch.Tensor, multipliers: torch.Tensor,
                primes: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids int64 ``[T]``, cu_seqlens int ``[B + 1]``, history int64 ``[B, N - 1]``, multipliers int64 ``[N]``,
    primes int64 ``[N - 1, H]`` -> (rows int64 ``[T, (N - 1) H]``, new history int64 ``[B, N - 1]``)."""
    t, b, n = ids.shape[0], history.shape[0], multipliers.shape[0]
    heads = primes.shape[1]
    rows = torch.empty(t, (n - 1) * heads, dtype=torch.int64, device=ids.device)
    new_hist = torch.empty_like(history, memory_format=torch.contiguous_format)
    token_programs = cdiv(t, _HASH_TOKENS) if b else 0
    grid = token_programs + cdiv(b, _HASH_REQUESTS)
    if grid == 0:
        return rows, new_hist
    _hash_kernel[(grid,)](
        ids.contiguous(), cu_seqlens.contiguous(), history.contiguous(), multipliers.contiguous(),
        primes.contiguous(), rows, new_hist, t, b, int(pad_id), token_programs, max(1, b).bit_length(),
        N=n, H=heads, CP=next_pow2((n - 1) * heads), BP=next_pow2(n - 1), BLOCK_T=_HASH_TOKENS,
        BLOCK_B=_HASH_REQUESTS, num_warps=4)
    return rows, new_hist
