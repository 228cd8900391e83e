"""``v4hal run`` and ``v4hal parity --model`` end to end on v4-mini."""
from __future__ import annotations

import json

import pytest
import torch

from v4hal.apps.main import cli
from v4hal.model import ModelConfig
from v4hal.model.parity import BackendRun, compare


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("V4HAL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_run_writes_the_checkpoint_once_and_reports(cache, tmp_path, capsys) -> None:
    out = tmp_path / "run.json"
    args = ["run", "--model", "v4-mini", "--prompt-len", "20", "--max-new-tokens", "5", "--batch", "2",
            "--seed", "3", "--json", str(out), "--no-progress"]
    assert cli(args) == 0
    first = capsys.readouterr()
    assert "writing a random v4-mini checkpoint" in first.err
    assert (cache / "v4-mini" / "model0-mp1.safetensors").exists()
    assert json.loads((cache / "v4-mini" / "config.json").read_text()) == ModelConfig.preset("v4-mini").to_dict()
    res = json.loads(out.read_text())
    assert res["batch"] == 2 and res["prompt_len"] == 20 and res["max_new_tokens"] == 5
    assert len(res["tokens"]) == 2 and all(len(r) == 5 for r in res["tokens"])
    assert all(0 <= t < 512 for r in res["tokens"] for t in r)
    assert res["prefill_tok_s"] > 0 and res["decode_tok_s"] > 0 and res["logits_finite"]
    assert res["threads"] == 1 and res["experts"] == "fp8"
    assert "prefill: 2 x 20 tokens" in first.out and "decode:  2 x 4 tokens" in first.out
    assert "tokens[1]:" in first.out
    # second run: the cached checkpoint, the same prompt -> the same tokens
    assert cli(args) == 0
    assert "writing" not in capsys.readouterr().err
    assert json.loads(out.read_text())["tokens"] == res["tokens"]
    # the experts as stored (FP4): a separate shared-expert call, rounding moved -> tokens may differ
    assert cli(args + ["--experts", "checkpoint"]) == 0
    assert json.loads(out.read_text())["experts"] == "fp4"


def test_run_checkpoint_and_backend_flags(cache, tmp_path, capsys, mini_fp8) -> None:
    assert cli(["run", "--checkpoint", str(mini_fp8), "--backend", "reference", "--prompt-len", "8",
                "--max-new-tokens", "2", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "backend reference" in text and str(mini_fp8) in text
    assert not cache.exists()                                  # nothing written for a given checkpoint
    assert cli(["run", "--checkpoint", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli(["run", "--model", "v4-flash", "--no-progress"]) == 2         # would be a 152 GiB random checkpoint
    assert "give --checkpoint DIR" in capsys.readouterr().err


def test_parity_model_reference_only(cache, tmp_path, capsys) -> None:
    out = tmp_path / "par.json"
    rc = cli(["parity", "--model", "v4-mini", "--backends", "reference", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "only the reference backend was run" in text
    data = json.loads(out.read_text())
    assert data["backends"] == ["reference"] and data["rows"] == []
    assert len(data["reference_tokens"][0]) == 4           # prefill token + 3 decode steps


def test_parity_compare_flags_a_drift() -> None:
    ref = BackendRun("reference", {"prefill": {"layer 0": torch.ones(2, 3), "logits": torch.arange(6.).view(2, 3)}})
    close = BackendRun("x", {"prefill": {"layer 0": torch.ones(2, 3) * 1.001,
                                         "logits": torch.arange(6.).view(2, 3)}})
    far = BackendRun("y", {"prefill": {"layer 0": -torch.ones(2, 3), "logits": torch.arange(6.).view(2, 3).flip(-1)}})
    rows = compare(ref, close, 1e-3, 1e-3)
    assert [r["status"] for r in rows] == ["pass", "pass"] and rows[1]["argmax_agree"] == 1.0
    rows = compare(ref, far, 1e-3, 1e-3)
    assert [r["status"] for r in rows] == ["FAIL", "FAIL"] and rows[1]["argmax_agree"] == 0.0
    missing = BackendRun("z", {})
    assert all(r["status"] == "FAIL" for r in compare(ref, missing, 1, 1))


def test_run_ep2_gives_the_single_process_tokens(cache, tmp_path, capsys) -> None:
    """``v4hal run --ep 2``: two local gloo ranks, each with half the routed experts, same tokens."""
    base = ["run", "--model", "v4-mini", "--prompt-len", "12", "--max-new-tokens", "3", "--no-progress"]
    single, ep = tmp_path / "single.json", tmp_path / "ep.json"
    assert cli(base + ["--json", str(single)]) == 0
    assert cli(base + ["--ep", "2", "--json", str(ep)]) == 0
    out = capsys.readouterr().out
    assert "expert parallel: 2 ranks, transport all_to_all" in out
    assert json.loads(ep.read_text())["tokens"] == json.loads(single.read_text())["tokens"]


def test_run_progress_bar_counts_what_the_summary_counts(mini_fp8, capsys) -> None:
    """``--max-new-tokens 4``: 4 tokens per row, the first from the prefill; the bar and the summary both count
    the 3 decode steps (the bar used to say 4, the summary 3)."""
    assert cli(["run", "--checkpoint", str(mini_fp8), "--prompt-len", "6", "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert "3/3" in err and "4/4" not in err
    assert "decode:  1 x 3 tokens" in out and "(4 new tokens per row: the prefill's and 3 decode steps)" in out
    assert len(out.split("tokens[0]:")[1].splitlines()[0].split()) == 4


@pytest.mark.skipif(not __import__("os").path.exists("/dev/full"), reason="no /dev/full here")
def test_run_reports_a_failed_json_write_in_one_line(mini_fp8, capsys) -> None:
    """The run completes, then writing ``--json`` fails (disk full): one error line, exit 2, no traceback."""
    rc = cli(["run", "--checkpoint", str(mini_fp8), "--prompt-len", "4", "--max-new-tokens", "2", "--no-progress",
              "--json", "/dev/full"])
    out, err = capsys.readouterr()
    assert rc == 2 and "tokens[0]:" in out
    assert err.strip() == "v4hal run: error: --json: cannot write /dev/full: No space left on device"


def test_parity_says_when_nothing_was_compared(capsys) -> None:
    """Without TRITON_INTERPRET on a CPU only the reference runs: the summary says that 0 backends were compared
    and why each other backend was not, and prints no pass count."""
    import os
    import subprocess
    import sys

    from v4hal.apps.parity import summary

    proc = subprocess.run([sys.executable, "-m", "v4hal.apps.main", "parity", "--ops", "rms_norm"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, proc.stderr
    assert "compared 0 backend(s) against the reference: nothing was checked" in proc.stdout
    assert "triton not compared: on CPU tensors Triton runs only under its interpreter" in proc.stdout
    assert "passed" not in proc.stdout
    rows = [{"op": "x", "backend": "reference", "status": "oracle"},
            {"op": "x", "backend": "triton", "status": "pass"}, {"op": "y", "backend": "triton", "status": "FAIL"}]
    assert summary(rows).startswith("compared 1 backend(s) against the reference (triton): 1 passed, 1 failed")


def test_info_explains_an_importable_backend_without_ops() -> None:
    """A backend that imports but serves no op on the listed devices is not printed as plainly "available"."""
    from v4hal.hal.info import format_info

    def row(backend: str, status: str, reason: str | None = None) -> dict:
        return {"backend": backend, "status": status, **({"reason": reason} if reason else {})}

    data = {"torch": "x", "devices": ["cpu"], "backends": {"reference": None, "triton": None},
            "descriptions": {"reference": "r", "triton": "t"}, "notes": {},
            "ops": {"rms_norm": {"cpu": [row("reference", "yes"),
                                         row("triton", "unavailable", "needs TRITON_INTERPRET=1 on the CPU")]}}}
    text = format_info(data)
    assert "  reference  available" in text
    assert "  triton     importable, but serves no op on cpu here: needs TRITON_INTERPRET=1 on the CPU" in text
    data["ops"]["rms_norm"]["cpu"][1] = row("triton", "explicit only")
    assert "  triton     available" in format_info(data)
