"""The compressors keep ``wkv | wgate`` adjacent (the reference projects on the stack without copying it).

On the CPU the step turns the position form of ``sparse_attn_paged`` into slots once (the window band of
every layer, the ratio-128 picks) and every layer passes them in the slot form: each layer's call gives the
bits the position form gives on the same step, and the slots are built once per step, not per layer."""
from __future__ import annotations

import pytest
import torch

import v4hal
from v4hal.backends.reference import ragged_compress
from v4hal.model import V4Model
from v4hal.ops import _define


def _record(monkeypatch: pytest.MonkeyPatch, name: str) -> list[tuple]:
    calls: list[tuple] = []
    inner = _define.OPS[name].call

    def spy(*args):
        calls.append(args)
        return inner(*args)

    monkeypatch.setattr(_define.call, name, spy)
    return calls


def test_cpu_layers_pass_step_slots_with_the_position_forms_bits(mini_fp8, monkeypatch) -> None:
    model = V4Model.from_pretrained(mini_fp8)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 140), generator=torch.Generator().manual_seed(5))
    model(ids[:, :130], 0)                          # past the first ratio-128 entry (position 127)
    steps = []
    build = v4hal.model.step.Step.build

    def keep(*a, **k):
        steps.append(build(*a, **k))
        return steps[-1]

    monkeypatch.setattr(v4hal.model.step.Step, "build", staticmethod(keep))
    attn = _record(monkeypatch, "sparse_attn_paged")
    slots = _record(monkeypatch, "paged_slots")
    model(ids[:, 130:131], 130)                     # one decode step
    assert len(steps) == 1 and len(attn) == len(cfg.compress_ratios) - cfg.n_mtp_layers
    step = steps[0]
    assert len(slots) == 2          # the window and the ratio-128 slots, once each (position 130 completes no entry)
    t = step.positions.shape[0]
    for layer, args in zip(model.layers, attn):
        (q, window, indices, sink, scale, _, extra, extra_idx, _, layout, positions, block_table, window_size,
         extra_table, extra_ratio, _, *_) = args
        assert indices is not None and block_table is None             # the window by slot
        ratio = layer.attn.ratio
        if ratio == 128:
            assert extra_table is None and extra_idx is step.c128_slots()
            picks = step.c128_picks
        else:
            picks = extra_idx
        kind = "c4" if ratio == 4 else "c128"
        want = v4hal.sparse_attn_paged(
            q, window, None, sink, scale, extra_kv_cache=extra, extra_indices=picks if extra is not None else None,
            layout=layout, positions=step.positions.view(t, 1), block_table=step.request_rows("token"),
            window_size=cfg.window_size, extra_block_table=step.request_rows(kind) if extra is not None else None,
            extra_ratio=ratio if extra is not None else 0)
        got = _define.OPS["sparse_attn_paged"].call(*args)[0]
        assert torch.equal(got, want), layer.layer_id


def test_prepared_compressor_weights_are_adjacent(mini_fp8) -> None:
    model = V4Model.from_pretrained(mini_fp8)
    comps = [m for m in model.modules() if type(m).__name__ == "Compressor"]
    assert comps
    for c in comps:
        wkv, wgate = c.ragged_weights[:2] if c.ragged_weights else (c.wkv.weight, c.wgate.weight)
        assert ragged_compress._stacked(wkv, wgate) is not None
