"""`measure_ep` and ``python -m v4hal.apps.ep_bench``: byte counts follow the row format, FP8 halves the dispatch."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from v4hal.apps.ep_bench import main
from v4hal.hal.errors import RangeError
from v4hal.parallel.bench import PAYLOADS, format_table, measure_ep

D, E, K = 256, 8, 3


@pytest.fixture(scope="module")
def measured() -> dict:
    return measure_ep(2, tokens=24, dim=D, experts=E, topk=K, iters=2, warmup=1, threads=1, timeout_s=60)


def test_bytes_per_token_follow_the_row_format(measured: dict) -> None:
    p = measured["payloads"]
    assert set(p) == set(PAYLOADS)
    for name, scale_bytes in (("bf16", None), ("fp8", 4 * D // 128), ("fp8-ue8m0", D // 128)):
        v = p[name]
        row = 2 * D + 8 * K if scale_bytes is None else D + scale_bytes + 8 * K
        assert 1.0 <= v["ranks_per_token"] <= 2.0
        assert v["dispatch_bytes_per_token_total"] == pytest.approx(v["ranks_per_token"] * row)
        assert 0 < v["dispatch_bytes_per_token"] < v["dispatch_bytes_per_token_total"]
        assert v["combine_bytes_per_token_total"] == pytest.approx(K * 2 * D)          # one bf16 row per copy
        assert v["partial_combine_bytes_per_token_total"] == pytest.approx(v["ranks_per_token"] * 2 * D)
        for key in ("dispatch_ms", "combine_ms", "layer_ms", "partial_combine_ms"):
            assert v[key] > 0
    assert p["fp8"]["dispatch_bytes_ratio"] < 0.6 and p["fp8-ue8m0"]["dispatch_bytes_ratio"] < 0.6
    assert p["bf16"]["identity_roundtrip_exact"] is True
    table = format_table(measured)
    assert "fp8-ue8m0" in table and "gloo" in table


def test_cli_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ep.json"
    assert main(["--ep", "2", "--tokens", "8", "--dim", "128", "--experts", "4", "--topk", "2", "--iters", "1",
                 "--warmup", "0", "--payloads", "bf16,fp8", "--threads", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["payloads"]) == {"bf16", "fp8"} and data["config"]["ep"] == 2
    assert "dispatch B/tok" in capsys.readouterr().out


def test_cli_model_sets_the_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--model v41-flash``: V4.1-Flash's hidden size, routed experts and top-k, each overridable by its flag."""
    out = tmp_path / "ep.json"
    base = ["--ep", "2", "--tokens", "2", "--iters", "1", "--warmup", "0", "--payloads", "bf16", "--threads", "1",
            "--json", str(out)]
    assert main([*base, "--model", "v41-flash"]) == 0
    cfg = json.loads(out.read_text())["config"]
    assert (cfg["dim"], cfg["experts"], cfg["topk"]) == (5120, 384, 6)
    assert main([*base, "--model", "v41-flash", "--dim", "256", "--topk", "2"]) == 0
    cfg = json.loads(out.read_text())["config"]
    assert (cfg["dim"], cfg["experts"], cfg["topk"]) == (256, 384, 2)
    assert "dispatch B/tok" in capsys.readouterr().out


def test_unknown_payload() -> None:
    with pytest.raises(RangeError, match="payloads"):
        measure_ep(2, payloads=("int4",))
