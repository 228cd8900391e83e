"""Cross-layer reuse of V4.1's compressed KV ("Reuse"): only the KV-source layer runs
``csa2_compressor_ragged`` and writes its paged compressed cache; the layers after it pass that same cache
tensor (and the source's top-k slots) to ``sparse_attn_paged`` as ``extra_kv_cache`` / ``extra_indices``
next to their own window caches. Shown here: two consumer layers reading one cache give each the dense
attention over [own window ; shared picks] (an oracle written here), the reads leave the cache alone, and
an entry the source writes later is seen by both without anything done on their side (they hold the
cache itself, not a copy).

The compressed cache is a real ``v41_compressed_fp4`` cache (288 bytes per 512-wide entry; here 36 per
64-wide one), read through ``sparse_attn_paged(..., extra_layout="v41_compressed_fp4")`` next to ``bf16``
window caches; the oracle's keys are the entries through a local oracle of that layout's FP4 round trip
(`oracle_fp4_round_trip`, written from the format's rule), itself checked against
`v4hal.hal.formats.fp4_e4m3_round_trip`.
"""
from __future__ import annotations

import torch

from v4hal.hal.formats import fp4_e4m3_round_trip
from v4hal.ops.csa2 import csa2_compressor_ragged
from v4hal.ops.paged import new_paged_cache, paged_cache_write
from v4hal.ops.paged_attention import sparse_attn_paged

D, H, RD, HEADS, BLK = 64, 96, 16, 4, 8
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def oracle_fp4_round_trip(x: torch.Tensor, block: int = 16) -> torch.Tensor:
    """Oracle of the compressed cache's quantization: per block of 16, scale
    ``e4m3(clamp(amax / 6, 2**-9, 448))``, each value ``x / scale`` clamped to [-6, 6] and rounded to the
    nearest e2m1 value (ties to the even code), times the scale; bf16 out (exact)."""
    v = x.double().view(*x.shape[:-1], -1, block)
    scale = (v.abs().amax(-1, keepdim=True) / 6).clamp(2 ** -9, 448).float().to(torch.float8_e4m3fn).double()
    q = (v / scale).clamp(-6, 6)
    dist = (q.abs().unsqueeze(-1) - E2M1).abs()
    best = dist == dist.min(-1, keepdim=True).values
    even = torch.arange(8) % 2 == 0
    code = (best.double() * 2 + (best & even).double()).argmax(-1)
    return (E2M1[code] * q.sign() * scale).view(x.shape).to(torch.bfloat16)


def fp4_round_trip(x: torch.Tensor) -> torch.Tensor:
    """The ``v41_compressed_fp4`` round trip, bf16 out (exact)."""
    return fp4_e4m3_round_trip(x).to(torch.bfloat16)


def _dense(q: torch.Tensor, keys: torch.Tensor, sink: torch.Tensor, scale: float) -> torch.Tensor:
    """Oracle: per head, softmax over the keys' scaled scores with ``exp(sink)`` in the denominator; fp32."""
    s = q.float() @ keys.float().t() * scale                                # [heads, n]
    m = torch.maximum(s.max(-1, keepdim=True).values, sink.view(-1, 1))
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True) + torch.exp(sink.view(-1, 1) - m)
    return (e / den) @ keys.float()


def test_two_layers_read_one_compressed_cache():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, H, generator=g).to(torch.bfloat16)
    wkv = (torch.randn(D, H, generator=g) * H ** -0.5).to(torch.bfloat16)
    wgate = (torch.randn(D, H, generator=g) * H ** -0.5).to(torch.bfloat16)
    norm = (torch.rand(D, generator=g) + 0.5).to(torch.bfloat16)
    inv = 1.0 / (160000.0 ** (torch.arange(0, RD, 2, dtype=torch.float32) / RD))
    freqs = torch.polar(torch.ones(16, RD // 2), torch.outer(torch.arange(16, dtype=torch.float32), inv))
    state = torch.zeros(3, BLK, 2 * D)
    table = torch.tensor([[1, 2]], dtype=torch.int32)

    # the source layer: 11 tokens -> 5 entries into its compressed cache (slot = entry index)
    ent, _, req, pos = csa2_compressor_ragged(x[:11], wkv, wgate, norm, freqs, state, table,
                                              torch.tensor([0, 11], dtype=torch.int32),
                                              torch.tensor([0], dtype=torch.int32), 2, 1e-20)
    n = int((req >= 0).sum())
    assert n == 5
    compressed = new_paged_cache(2, BLK, "v41_compressed_fp4", dim=D)
    paged_cache_write(compressed, ent[:n], pos[:n], "v41_compressed_fp4")
    shared_topk = torch.tensor([[[4, 0, 2, -1, -1]]], dtype=torch.int32)      # the source's picks (slots)

    def layer(seed: int):
        lg = torch.Generator().manual_seed(seed)
        window = new_paged_cache(2, BLK, "bf16", dim=D)
        wk = torch.randn(6, D, generator=lg).to(torch.bfloat16)
        paged_cache_write(window, wk, torch.arange(6), "bf16")
        q = torch.randn(1, 1, HEADS, D, generator=lg).to(torch.bfloat16)
        sink = torch.randn(HEADS, generator=lg)
        return window, wk, q, sink

    layers = [layer(1), layer(2)]
    before = compressed.clone()
    scale = D ** -0.5
    outs = []
    for window, wk, q, sink in layers:
        out = sparse_attn_paged(q, window, torch.arange(6, dtype=torch.int32).view(1, 1, 6), sink, scale,
                                extra_kv_cache=compressed, extra_indices=shared_topk, layout="bf16",
                                extra_layout="v41_compressed_fp4")
        keys = torch.cat([wk, oracle_fp4_round_trip(ent[[4, 0, 2]])])
        want = _dense(q[0, 0], keys, sink, scale)
        torch.testing.assert_close(out[0, 0].float(), want, atol=1e-2, rtol=1e-2)
        outs.append(out)
    assert torch.equal(compressed, before)
    assert not torch.equal(outs[0], outs[1])

    # the source completes entry 5 (the 12th token pairs with the 11th from the state row) and writes it;
    # both consumers see it through the same cache tensor at their next step
    ent2, _, req2, pos2 = csa2_compressor_ragged(x[11:], wkv, wgate, norm, freqs, state, table,
                                                 torch.tensor([0, 1], dtype=torch.int32),
                                                 torch.tensor([11], dtype=torch.int32), 2, 1e-20)
    assert req2.tolist() == [0] and pos2.tolist() == [5]
    paged_cache_write(compressed, ent2[:1], pos2[:1], "v41_compressed_fp4")
    picks = torch.tensor([[[5, -1, -1, -1, -1]]], dtype=torch.int32)
    for window, wk, q, sink in layers:
        out = sparse_attn_paged(q, window, torch.full((1, 1, 6), -1, dtype=torch.int32), sink, scale,
                                extra_kv_cache=compressed, extra_indices=picks, layout="bf16",
                                extra_layout="v41_compressed_fp4")
        want = _dense(q[0, 0], oracle_fp4_round_trip(ent2[:1]), sink, scale)
        torch.testing.assert_close(out[0, 0].float(), want, atol=1e-2, rtol=1e-2)


def test_the_fp4_round_trip_follows_the_format_rule():
    """The local helper's e2m1 rounding (scale 1 by a block whose amax is 6): 0.25 -> 0, 0.75 -> 1,
    1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4."""
    x = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -5.0, 0, 0, 0, 0, 0, 0])
    got = oracle_fp4_round_trip(x.view(1, 16)).float().view(-1)
    assert got[:10].tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -1.0, -4.0]
    assert torch.equal(fp4_round_trip(x.view(1, 16)).float().view(-1), got)
    wide = torch.randn(64, 512, generator=torch.Generator().manual_seed(3)) * 4
    assert torch.equal(fp4_round_trip(wide), oracle_fp4_round_trip(wide))
