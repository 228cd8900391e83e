"""DeepSeek-V4.1 logits against the public Hugging Face code (bench/compare_hf_v41_cpu.py), on a small run.

Skipped unless transformers is importable and ``V4HAL_HF_V41_DIR`` names a folder holding the HF V4.1 files
(``modeling_deepseek_v41.py``, ``configuration_deepseek_v41.py``; they are not part of this repository), e.g.

    V4HAL_HF_V41_DIR=/path/to/hf_v41 PYTHONPATH=. /path/to/venv/bin/python -m pytest tests/model/test_v41_hf_parity.py

Every v4hal run (``forward`` one-shot and in chunks that cut ratio-2 groups, ``forward_batch`` beside other
requests; prefill and decode) must sit within 4x HF's own bf16-vs-fp32 spread with every decisive argmax
agreeing: bf16 weights against HF fp32, FP8 / FP4 weights against HF fp32 with v4hal's FP8 activations; and with
bf16 weights every part of every layer, started from HF fp32's inputs to that layer, within 4x HF bf16's error
(per-row medians).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "compare_hf_v41_cpu.py"
HF_DIR = os.environ.get("V4HAL_HF_V41_DIR")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or not HF_DIR
    or not all((Path(HF_DIR) / f).is_file() for f in ("modeling_deepseek_v41.py", "configuration_deepseek_v41.py")),
    reason="needs transformers and V4HAL_HF_V41_DIR with the HF DeepSeek-V4.1 files")


@pytest.fixture(scope="module")
def cmp():
    spec = importlib.util.spec_from_file_location("compare_hf_v41_cpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_v41_logits_match_the_public_cache_path(cmp, tmp_path: Path, dtype: str) -> None:
    args = ["--hf-dir", HF_DIR, "--out", str(tmp_path / "r.json"), "--workdir", str(tmp_path / "ckpt"),
            "--prompt-len", "40", "--decode", "6", "--chunks", "3,5,1,7", "--v4hal-dtype", dtype]
    # the FP8 copy against HF with FP8 activations; the bf16 copy also layer by layer (--bisect), which sees
    # what the logits cannot: dropping the candidate restriction or collapsing with the wrong mHC pre mix moves
    # the logits within HF's bf16 noise but a teacher-forced layer's output 5-70x beyond it
    args.append("--hf-fp8-act" if dtype == "fp8" else "--bisect")
    a = cmp.build_parser().parse_args(args)
    result = cmp.run(a)
    assert result["v4hal_error"] is None
    rows = {(r["run"], r["ref"], r["phase"]): r for r in result["rows"]}
    chunked = rows[("hf_fp32_chunked", "hf_fp32", "prompt")]
    assert chunked["calc_diff"] < 1e-9 and chunked["argmax_agree"] == 1.0     # the reference's own consistency
    ref = "hf_fp32" if dtype == "bf16" else "hf_fp32_fp8act"
    judged = [r for r in result["rows"] if r["run"].startswith("v4hal") and r["ref"] == ref]
    assert len(judged) == 6
    bad = [(r["run"], r["phase"], r["calc_diff"], r["spread"], r["decisive_disagree"]) for r in judged
           if r["verdict"] != "pass"]
    assert not bad
    if dtype == "bf16":
        assert result["bisect_verdict"]["verdict"] == "pass", result["bisect_verdict"]
