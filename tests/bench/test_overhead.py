"""``v4hal bench --overhead``: the per-op table of what the op layer adds to a call."""
from __future__ import annotations

import json

from v4hal.apps.main import cli
from v4hal.bench.overhead import measure_overhead, render_overhead, torch_ops_floor_us


def test_overhead_rows_for_two_ops() -> None:
    rows = measure_overhead(["rms_norm", "moe_combine"], "cpu", max_calls=50, budget_s=0.05)
    assert [r.op for r in rows] == ["rms_norm", "moe_combine"]
    for r in rows:
        assert r.backend == "reference" and r.calls >= 5
        assert 0 < r.impl_us and 0 < r.public_us
        assert abs(r.diff_us - (r.public_us - r.impl_us)) < 1e-9
        assert 0 < r.kernel_us < r.added_us < 1000
    floor = torch_ops_floor_us("cpu", max_calls=50, budget_s=0.05)
    text = render_overhead(rows, floor, "cpu")
    assert "rms_norm" in text and "torch.ops floor" in text and "median over 2 ops" in text


def test_bench_overhead_cli_writes_json(tmp_path, capsys) -> None:
    path = tmp_path / "overhead.json"
    assert cli(["bench", "--overhead", "--ops", "rms_norm,hc_post", "--repeats", "20", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "hc_post" in out and "added" in out
    doc = json.loads(path.read_text())
    assert doc["device"] == "cpu" and doc["torch_ops_floor_us"] > 0
    assert [r["op"] for r in doc["rows"]] == ["rms_norm", "hc_post"]
    assert cli(["bench", "--overhead", "--ops", "no_such_op"]) == 2
