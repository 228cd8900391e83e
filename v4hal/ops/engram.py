"""Engram of DeepSeek-V4.1: n-gram hashing of compressed token ids, the FP8 table lookup, and the
gated residual update per mHC stream.

Three device ops and three host helpers:

- :func:`engram_hash`: compressed ids of a ragged batch + each request's history -> table rows;
- :func:`engram_lookup`: gather + dequantize FP8 rows (the table on the device or in host memory);
- :func:`engram_gate`: the gate and the residual update, given the ``wkv`` projection of the rows
  (a plain matmul / ``fp8_gemm`` between lookup and gate);
- :func:`engram_vocab_map`, :func:`engram_primes`, :func:`engram_multipliers`: the tokenizer-derived
  compressed vocabulary and the per-layer hash constants, built once on the host.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Sequence

import torch

from v4hal.extras import require

from . import _checks as C
from ._checks import FLOATS, FP8, INTS
from ._define import call, define_op

#: History entry of a dead (masked / image) token, and of the positions before a sequence's start.
DEAD = -1
#: ``|dot|`` is clamped to at least this before its square root in the gate.
GATE_CLAMP = 1e-6
#: Table channels per scale.
SCALE_BLOCK = 32
#: Largest n-gram size (``multipliers.shape[0]``) an op call takes; V4.1 uses 4.
MAX_NGRAM = 16
_INT64_MAX = 2**63 - 1


# ---------------------------------------------------------------- host helpers: vocabulary and constants

_SPACES = re.compile(r"[ \t\r\n]+")
_SENTINEL = "\ue000"   # keeps a token that is exactly one space from stripping to ""
#: Unicode White_Space (what the tokenizer library's Strip trims; Python's default strip also trims U+001C..U+001F)
_WHITE_SPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
                + "\u2028\u2029\u202f\u205f\u3000")


def engram_normalize(text: str) -> str:
    """The Engram key of a decoded token, as the tokenizer library's normalizer sequence computes it:
    NFKC, NFD, every combining mark (General_Category M: Mn, Mc, Me) dropped, each character lowercased
    on its own (no final-sigma rule), runs of space/tab/CR/LF as one space, White_Space stripped at both
    ends; a token that normalizes to a single space keeps it, one that normalizes to nothing keeps its
    own text."""
    s = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    s = "".join(ch.lower() for ch in s if not unicodedata.category(ch).startswith("M"))
    s = _SPACES.sub(" ", s)
    if s == " ":
        s = _SENTINEL
    s = s.strip(_WHITE_SPACE).replace(_SENTINEL, " ")
    return s or text


def engram_vocab_map(token_strings: Sequence[str], raw_tokens: Sequence[str] | None = None
                     ) -> tuple[torch.Tensor, int]:
    """(int64 map ``[V]``, compressed vocabulary size) from the decoded string of every token id.

    Token ids are visited in order; a key not seen before gets the next compressed id, so equal keys
    share the id of their first token. A decoded string holding U+FFFD (a partial UTF-8 byte token) is
    keyed by its raw token string (``raw_tokens[i]``, else the decoded string) without normalizing."""
    if raw_tokens is not None and len(raw_tokens) != len(token_strings):
        raise C.ShapeError(f"engram_vocab_map: raw_tokens must have one entry per token string "
                           f"({len(token_strings)}), got {len(raw_tokens)}")
    ids: dict[str, int] = {}
    out = []
    for i, text in enumerate(token_strings):
        if not isinstance(text, str):
            raise C.DTypeError(f"engram_vocab_map: token_strings[{i}] must be a str, got {type(text).__name__}")
        if "\ufffd" in text:
            key = raw_tokens[i] if raw_tokens is not None else text
        else:
            key = engram_normalize(text)
        out.append(ids.setdefault(key, len(ids)))
    return torch.tensor(out, dtype=torch.int64), len(ids)


_WITNESSES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


def is_prime(n: int) -> bool:
    """Miller-Rabin with the first twelve primes as witnesses: exact for every ``n < 3.3e24``."""
    if n < 2:
        return False
    for p in _WITNESSES:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in _WITNESSES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def prime_table(layer_ids: Sequence[int], max_ngram: int, n_heads: int, vocab_size: int) -> list[list[list[int]]]:
    """``[L][max_ngram - 1][n_heads]`` primes: for each layer, n-gram size (2..max_ngram) and head, the next
    prime above the previous one, starting from the smallest prime >= ``vocab_size`` for every
    (layer, n-gram size); a prime is never used twice across the whole table."""
    if max_ngram < 2 or n_heads < 1 or vocab_size < 1:
        raise C.RangeError(f"engram_primes: need max_ngram >= 2, n_heads >= 1, vocab_size >= 1, got "
                           f"{max_ngram}, {n_heads}, {vocab_size}")
    seen: set[int] = set()
    layers = []
    for _ in layer_ids:
        per_n = []
        for _ in range(max_ngram - 1):
            p, heads = vocab_size - 1, []
            for _ in range(n_heads):
                p += 1
                while p in seen or not is_prime(p):
                    p += 1
                seen.add(p)
                heads.append(p)
            per_n.append(heads)
        layers.append(per_n)
    return layers


def engram_primes(layer_ids: Sequence[int], max_ngram: int, n_heads: int, vocab_size: int) -> torch.Tensor:
    """int64 ``[L, max_ngram - 1, n_heads]``: :func:`prime_table` as a tensor."""
    return torch.tensor(prime_table(layer_ids, max_ngram, n_heads, vocab_size), dtype=torch.int64)


def multiplier_table(layer_ids: Sequence[int], max_ngram: int, compressed_vocab: int) -> list[list[int]]:
    """``[L][max_ngram]`` odd multipliers ``2 r + 1``, ``r`` drawn uniformly in ``[0, bound)`` by numpy's
    ``default_rng(10007 * layer_id)`` with ``bound = (2**63 - 1) // compressed_vocab // 2``, so
    ``id * multiplier`` fits int64 for every compressed id."""
    np = require("numpy", "engram_multipliers (numpy's default_rng draws the multipliers)")
    bound = max(1, (_INT64_MAX // compressed_vocab) // 2)
    return [(np.random.default_rng(10007 * int(layer)).integers(0, bound, size=(max_ngram,), dtype=np.int64) * 2
             + 1).tolist() for layer in layer_ids]


def engram_multipliers(layer_ids: Sequence[int], max_ngram: int, compressed_vocab: int) -> torch.Tensor:
    """int64 ``[L, max_ngram]``: :func:`multiplier_table` as a tensor."""
    return torch.tensor(multiplier_table(layer_ids, max_ngram, compressed_vocab), dtype=torch.int64).view(
        len(layer_ids), max_ngram)


def engram_row_offsets(primes: torch.Tensor) -> torch.Tensor:
    """int64 ``[(N-1) * H]``: where each (n-gram size, head) bucket range of one layer's ``primes
    [N-1, H]`` starts in that layer's table (exclusive running sum in (n-gram, head) order)."""
    flat = primes.reshape(-1)
    return torch.cumsum(flat, 0) - flat


# ---------------------------------------------------------------- engram_hash

def _check_hash(ids, cu_seqlens, history, multipliers, primes, pad_id):
    op = "engram_hash"
    C.dtype(op, "ids", ids, (torch.int64,))
    C.rank(op, "ids", ids, (1,), "[T]")
    C.dtype(op, "cu_seqlens", cu_seqlens, INTS)
    C.rank(op, "cu_seqlens", cu_seqlens, (1,), "[B + 1]")
    if cu_seqlens.shape[0] < 1:
        raise C.ShapeError(f"{op}: cu_seqlens must be [B + 1] (at least one entry), got {C.describe(cu_seqlens)}")
    C.dtype(op, "multipliers", multipliers, (torch.int64,))
    C.rank(op, "multipliers", multipliers, (1,), "[N] (one per look-back 0..N-1)")
    n = multipliers.shape[0]
    C.in_range(op, "multipliers.shape[0] (max n-gram size N)", n, 2, MAX_NGRAM)
    C.dtype(op, "history", history, (torch.int64,))
    C.shape(op, "history", history, (cu_seqlens.shape[0] - 1, n - 1), "[B, N - 1]")
    C.dtype(op, "primes", primes, (torch.int64,))
    C.rank(op, "primes", primes, (2,), "[N - 1, heads]")
    if primes.shape[0] != n - 1 or primes.shape[1] < 1:
        raise C.ShapeError(f"{op}: primes must be [N - 1, heads] = [{n - 1}, >= 1], got {C.describe(primes)}")
    C.in_range(op, "pad_id", pad_id, 0, C.INT32_MAX)
    C.same_device(op, ids=ids, cu_seqlens=cu_seqlens, history=history, multipliers=multipliers, primes=primes)


def _value_check_hash(ids, cu_seqlens, history, multipliers, primes, pad_id):
    op = "engram_hash"
    cu = cu_seqlens.long()
    if int(cu[0]) != 0 or int(cu[-1]) != ids.shape[0] or bool((cu[1:] < cu[:-1]).any()):
        raise C.RangeError(f"{op}: cu_seqlens must rise from 0 to T = {ids.shape[0]}, got {cu.tolist()[:16]}")
    if int(multipliers.min()) < 1 or bool((multipliers % 2 == 0).any()):
        raise C.RangeError(f"{op}: multipliers must be odd and >= 1, got {multipliers.tolist()}")
    flat = primes.reshape(-1)
    if int(flat.min()) < 3 or bool((flat % 2 == 0).any()) or flat.unique().numel() != flat.numel():
        raise C.RangeError(f"{op}: primes must be distinct odd primes, got {flat.tolist()[:32]}")
    top = _INT64_MAX // int(multipliers.max())
    C.index_range(op, "ids (compressed ids, -1 for dead tokens; id * multiplier must fit int64)", ids, DEAD, top + 1)
    C.index_range(op, "history", history, DEAD, top + 1)
    if pad_id > top:
        raise C.RangeError(f"{op}: pad_id * multiplier must fit int64: pad_id <= {top}, got {pad_id}")


def _fake_hash(ids, cu_seqlens, history, multipliers, primes, pad_id):
    cols = primes.shape[0] * primes.shape[1]
    return ids.new_empty(ids.shape[0], cols), torch.empty_like(history)


define_op("engram_hash",
          "(Tensor ids, Tensor cu_seqlens, Tensor history, Tensor multipliers, Tensor primes, int pad_id) "
          "-> (Tensor, Tensor)",
          check=_check_hash, fake=_fake_hash, value_check=_value_check_hash,
          doc=C.ranges_doc(pad_id=C.interval(0, C.INT32_MAX), **{"N = multipliers.shape[0]": C.interval(2, MAX_NGRAM)})
          + " Checked values: `cu_seqlens` rises from 0 to T; `multipliers` odd and >= 1; `primes` distinct, "
          "odd, >= 3; `ids`, `history` in "
          "`[-1, (2**63 - 1) // max(multipliers)]`.")


def engram_hash(ids: torch.Tensor, cu_seqlens: torch.Tensor, history: torch.Tensor, multipliers: torch.Tensor,
                primes: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Table rows of the n-grams ending at every token of a ragged batch, for one Engram layer.

    ids int64 ``[T]`` (compressed ids, -1 = dead token) of B requests by ``cu_seqlens [B + 1]``;
    history int64 ``[B, N - 1]``: each request's last N - 1 ids before this step, oldest first (-1 for
    dead tokens and for positions before the sequence start); multipliers int64 ``[N]``; primes int64
    ``[N - 1, H]``; pad_id: the compressed pad id. Look-back s = 0..N-1 stops at the first dead token or
    the sequence start (those and all older take ``pad_id``); ``h_n = XOR_{s<n} (tok_s * mult_s)``
    for n = 2..N; row = ``h_n % primes[n-2, head]`` + the bucket range's start (:func:`engram_row_offsets`).
    Returns (rows int64 ``[T, (N - 1) * H]``, the new history ``[B, N - 1]``)."""
    return call.engram_hash(ids, cu_seqlens, history, multipliers, primes, int(pad_id))


def engram_history(batch: int, max_ngram: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The history of ``batch`` new requests: int64 ``[batch, max_ngram - 1]`` of -1 (nothing before)."""
    return torch.full((batch, max_ngram - 1), DEAD, dtype=torch.int64, device=device)


# ---------------------------------------------------------------- engram_lookup

SCALE_DTYPES = (torch.float32, C.E8M0)


def _check_lookup(rows, table, scales, out_dtype):
    op = "engram_lookup"
    C.dtype(op, "rows", rows, INTS)
    C.rank(op, "rows", rows, (2,), "[T, n]")
    C.dtype(op, "table", table, (FP8,))
    C.rank(op, "table", table, (2,), "[R, W]")
    C.divisible(op, "table.shape[1] (W)", table.shape[1], SCALE_BLOCK, "the scale block")
    C.dtype(op, "scales", scales, SCALE_DTYPES)
    C.shape(op, "scales", scales, (table.shape[0], table.shape[1] // SCALE_BLOCK), "[R, W / 32]")
    C.dtype_arg(op, "out_dtype", out_dtype, FLOATS)
    C.same_device(op, table=table, scales=scales)
    if table.device != rows.device and (table.device.type != "cpu" or rows.device.type == "meta"):
        raise C.DeviceError(f"{op}: table must be on rows' device ({rows.device}) or in host memory, "
                            f"got table on {table.device}")


def _value_check_lookup(rows, table, scales, out_dtype):
    C.index_range("engram_lookup", "rows", rows, 0, table.shape[0])


define_op("engram_lookup", "(Tensor rows, Tensor table, Tensor scales, ScalarType out_dtype=bfloat16) -> Tensor",
          check=_check_lookup, value_check=_value_check_lookup,
          fake=lambda rows, table, scales, out_dtype: torch.empty(
              (*rows.shape, table.shape[1]), dtype=out_dtype, device=rows.device),
          doc="Checked values: `rows` in `[0, R)`. The table and scales may live in host memory while rows "
              "are on an accelerator; the output is on rows' device.")


def engram_lookup(rows: torch.Tensor, table: torch.Tensor, scales: torch.Tensor,
                  out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``table[rows] * scales[rows]`` per block of 32 channels: rows int ``[T, n]``, table float8_e4m3fn
    ``[R, W]``, scales fp32 or float8_e8m0fnu ``[R, W / 32]`` -> ``out_dtype [T, n, W]`` on rows' device.
    The table may sit on rows' device or in host memory (pinned for the direct device read on CUDA)."""
    return call.engram_lookup(rows, table, scales, out_dtype)


# ---------------------------------------------------------------- engram_gate

def _check_gate(streams, kv, q_weight, k_weight, token_mask, eps):
    op = "engram_gate"
    C.dtype(op, "streams", streams, FLOATS)
    C.rank(op, "streams", streams, (3,), "[T, hc, D]")
    t, hc, d = streams.shape
    C.in_range(op, "streams.shape[1] (hc)", hc, 1, C.MAX_HC_MULT)
    C.dtype(op, "kv", kv, FLOATS)
    C.shape(op, "kv", kv, (t, (hc + 1) * d), "[T, (hc + 1) * D] (hc keys then the value)")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        C.dtype(op, name, w, FLOATS)
        C.shape(op, name, w, (hc, d), "[hc, D]")
    if token_mask is not None:
        C.dtype(op, "token_mask", token_mask, (torch.bool,))
        C.shape(op, "token_mask", token_mask, (t,), "[T]")
    C.eps_arg(op, "eps", eps)
    C.same_device(op, streams=streams, kv=kv, q_weight=q_weight, k_weight=k_weight, token_mask=token_mask)


define_op("engram_gate",
          "(Tensor streams, Tensor kv, Tensor q_weight, Tensor k_weight, Tensor? token_mask, float eps) -> Tensor",
          check=_check_gate, fake=lambda streams, *a: torch.empty_like(streams),
          doc=C.ranges_doc(eps=C.EPS_RANGE, hc=C.interval(1, C.MAX_HC_MULT)))


def engram_gate(streams: torch.Tensor, kv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                token_mask: torch.Tensor | None = None, eps: float = 1e-20) -> torch.Tensor:
    """The Engram residual update, fp32 math: streams ``[T, hc, D]``, kv ``[T, (hc + 1) * D]`` (``wkv`` of
    the looked-up rows: hc keys, then one value), q_weight / k_weight ``[hc, D]``, token_mask bool ``[T]``
    (False: the token passes unchanged). Per (token, stream):
    ``dot = sum(h * q * k * key) * rsqrt(mean(h^2) + eps) * rsqrt(mean(key^2) + eps) / sqrt(D)``,
    ``gate = sigmoid(sign(dot) * sqrt(max(|dot|, 1e-6)))``, out = ``h + gate * value`` in streams' dtype."""
    return call.engram_gate(streams, kv, q_weight, k_weight, token_mask, float(eps))
