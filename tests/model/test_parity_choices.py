"""Model parity's replay of discrete choices (`v4hal.model.parity.Decisions`) and its cache layouts.

A backend run takes the reference run's top-k choices where its own differ (rounding near a tie), as it takes
the reference's tokens; these tests pin what is replayed, what is counted, and that a replayed run must make
the same calls as the recorded one."""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import v4hal
from v4hal.model import ModelConfig
from v4hal.model.caches import private_layouts
from v4hal.model.parity import DECISION_OPS, Decisions, format_replays, parity_layouts


def _gate(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return v4hal.moe_gate(x, w, topk=2, bias=bias, score_func="sqrtsoftplus", route_scale=1.5, norm_eps=1e-20)


def _scores(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.softplus(x.float() @ w.float().T).sqrt()


@pytest.fixture()
def near_tie() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two tokens whose 2nd and 3rd experts are near a tie in x and swap in ``x2`` (token 0 only)."""
    w = torch.eye(4, 8, dtype=torch.bfloat16)                  # expert e scores x[:, e]
    x = torch.tensor([[3.0, 2.0, 1.0, 0.0, 0, 0, 0, 0], [0.0, 0.5, 2.0, 3.0, 0, 0, 0, 0]], dtype=torch.bfloat16)
    s = _scores(x, w)[0]
    bias = torch.zeros(4)
    bias[2] = float(s[1] - s[2]) - 1e-3                        # token 0: expert 1 beats expert 2 by 1e-3
    x2 = x.clone()
    x2[0, 1] = 1.9921875                                       # one bf16 ulp below 2.0: expert 2 wins
    return x, x2, w, bias


def test_replay_takes_the_recorded_experts_with_own_weights(near_tie) -> None:
    x, x2, w, bias = near_tie
    with v4hal.use_backend("reference"):
        rec = Decisions()
        with rec:
            want_w, want_i = _gate(x, w, bias)
        own_w, own_i = _gate(x2, w, bias)
        assert set(own_i[0].tolist()) != set(want_i[0].tolist())      # the perturbation flips token 0's choice
        play = Decisions(rec.log)
        with play:
            got_w, got_i = _gate(x2, w, bias)
    assert [op for op, _ in rec.log] == ["moe_gate"]
    assert torch.equal(got_i, want_i)
    # the weights of the replayed experts come from the perturbed scores, normalised as the router does
    s = _scores(x2, w).gather(1, want_i.long())
    assert torch.allclose(got_w, s / s.sum(-1, keepdim=True) * 1.5, rtol=0, atol=1e-6)
    assert not torch.equal(got_w, want_w)
    assert play.replayed == {"moe_gate": [1, 2]}
    assert format_replays("triton", play.replayed) == ("note: triton: took the reference's top-k choices where its "
                                                      "own differed (--own-choices keeps them): moe_gate 1 of 2 rows")


def test_agreeing_choices_are_left_alone(near_tie) -> None:
    x, _, w, bias = near_tie
    with v4hal.use_backend("reference"):
        rec = Decisions()
        with rec:
            _gate(x, w, bias)
        # the same set in another order counts as the same choice: the run's own output is returned
        flipped = [("moe_gate", rec.log[0][1].flip(-1))]
        play = Decisions(flipped)
        with play:
            own_w, own_i = _gate(x, w, bias)
    assert torch.equal(own_i, rec.log[0][1])
    assert play.replayed == {"moe_gate": [0, 2]}
    assert format_replays("triton", play.replayed) is None


def test_replays_indexer_choices_and_ignores_other_ops() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0, 2.0, 3.0, 0.5, 0.25]])
    ctx = torch.tensor([8], dtype=torch.int32)
    with v4hal.use_backend("reference"):
        rec = Decisions()
        with rec:
            v4hal.rms_norm(torch.ones(2, 8), torch.ones(8), 1e-6)          # not a choice: not recorded
            want = v4hal.indexer_candidate_blocks(logits, ctx, 2, candidate_block=2)
        other = logits.clone()
        other[0, 1] = -1.0                                                  # block 0 loses its best score
        play = Decisions(rec.log)
        with play:
            got = v4hal.indexer_candidate_blocks(other, ctx, 2, candidate_block=2)
        own = v4hal.indexer_candidate_blocks(other, ctx, 2, candidate_block=2)
    assert [op for op, _ in rec.log] == ["indexer_candidate_blocks"]
    assert not torch.equal(own, want) and torch.equal(got, want)
    assert play.replayed == {"indexer_candidate_blocks": [1, 1]}


def test_a_replayed_run_must_make_the_recorded_calls(near_tie) -> None:
    x, _, w, bias = near_tie
    logits = torch.zeros(1, 4)
    ctx = torch.tensor([4], dtype=torch.int32)
    with v4hal.use_backend("reference"):
        rec = Decisions()
        with rec:
            _gate(x, w, bias)
        with pytest.raises(RuntimeError, match="reference made moe_gate there"), Decisions(rec.log):
            v4hal.indexer_candidate_blocks(logits, ctx, 1, candidate_block=2)
        with pytest.raises(RuntimeError, match="no further choice"), Decisions(rec.log) as play:
            _gate(x, w, bias)
            _gate(x, w, bias)
    assert play.pos == 1


@pytest.mark.parametrize("preset,pair", [("v4-mini", ("model1_fp8", "indexer_fp4")),
                                         ("v41-mini", ("v41_window_fp8", "indexer_fp4"))])
def test_parity_pages_the_caches_as_the_gpu_kernels_read_them(preset: str, pair: tuple[str, str]) -> None:
    cfg = ModelConfig.preset(preset)
    assert parity_layouts(cfg, "cpu") == pair
    assert private_layouts(cfg, torch.device("cpu")) == ("bf16", "bf16")    # forward's own pool is unchanged


class _NudgeMix(TorchFunctionMode):
    """Every ``hc_mix`` output one fp32 ulp up: the size of a correct kernel's summation-order difference."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "_qualified_op_name", "") == "v4hal::hc_mix":
            out = tuple(torch.nextafter(o, torch.full_like(o, float("inf"))) for o in out)
        return out


@pytest.fixture(scope="module")
def v41_mini(tmp_path_factory: pytest.TempPathFactory):
    from v4hal.apps.common import DEFAULT_WEIGHT_SEED
    from v4hal.model import write_random_checkpoint

    return write_random_checkpoint(ModelConfig.preset("v41-mini"), tmp_path_factory.mktemp("v41_mini"),
                                   seed=DEFAULT_WEIGHT_SEED)


def test_an_ulp_in_the_mhc_mix_fails_v41_parity_unless_choices_are_replayed(v41_mini) -> None:
    """The reference against itself with every mHC mix one fp32 ulp off: its own top-k choices flip (an expert,
    indexer picks) and the logits leave the bound (on at least one of three prompts: the first, as the graph
    stands); with the reference's choices replayed every row of every prompt stays well inside it."""
    from v4hal.apps.run import make_prompt
    from v4hal.model.parity import DEFAULT_TOL_HIDDEN, DEFAULT_TOL_LOGITS, compare, run_backend

    own_worst = []
    for seed in range(3):
        prompt = make_prompt(1, 24, 512, seed, "cpu")
        ref = run_backend(str(v41_mini), "reference", "cpu", prompt, 1, None)
        assert {op for op, _ in ref.decisions} == set(DECISION_OPS)          # every kind of choice V4.1 makes
        with _NudgeMix():
            own = run_backend(str(v41_mini), "reference", "cpu", prompt, 1, ref.tokens)
            replayed = run_backend(str(v41_mini), "reference", "cpu", prompt, 1, ref.tokens,
                                   decisions=ref.decisions)
        own_worst.append(max(r["calc_diff"] for r in compare(ref, own, DEFAULT_TOL_HIDDEN, DEFAULT_TOL_LOGITS)
                             if r["tensor"] == "logits"))
        rows = compare(ref, replayed, DEFAULT_TOL_HIDDEN, DEFAULT_TOL_LOGITS)
        assert all(r["status"] == "pass" for r in rows), seed
        assert max(r["calc_diff"] for r in rows if r["tensor"] == "logits") < DEFAULT_TOL_LOGITS / 4
        assert own.replayed == {} and sum(n for n, _ in replayed.replayed.values()) > 0
    assert max(own_worst) > DEFAULT_TOL_LOGITS, own_worst


def test_parity_command_reports_its_layouts_and_choice_mode(tmp_path, monkeypatch, capsys) -> None:
    import json

    from v4hal.apps.main import cli

    monkeypatch.setenv("V4HAL_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "par.json"
    assert cli(["parity", "--model", "v4-mini", "--backends", "reference", "--decode-steps", "1",
                "--own-choices", "--json", str(out)]) == 0
    assert "caches: model1_fp8 attention, indexer_fp4 indexer pages" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["layouts"] == ["model1_fp8", "indexer_fp4"] and res["own_choices"] is True and res["replayed"] == {}
