"""v4hal bench: timers, ceilings, cases, checks, the runner, reports, the CLI and the GPU script's logic."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

import v4hal
from v4hal import cases as catalogue
from v4hal.apps.bench import add_arguments, main
from v4hal.bench import cases as casemod
from v4hal.bench import gpu_check, report, runner
from v4hal.bench.ceilings import Ceilings, measure_ceilings
from v4hal.bench.timing import time_fn, value_checks_off
from v4hal.hal import registry
from v4hal.hal.errors import RangeError, ShapeError
from v4hal.hal.platform import platform_of


def test_time_fn_rotates_and_takes_the_median() -> None:
    seen: list[int] = []
    t = time_fn(lambda i: seen.append(i), "cpu", warmup=2, repeats=5)
    assert seen == list(range(7))  # warm-up calls first, then the timed ones, each with its own index
    assert t.n == 5 and t.timer == "perf_counter" and 0 <= t.p10 <= t.median <= t.p90
    with pytest.raises(ValueError, match="repeats"):
        time_fn(lambda i: None, "cpu", repeats=0)


def test_value_checks_off_restores_env(monkeypatch) -> None:
    monkeypatch.setenv("V4HAL_CHECK_VALUES", "1")
    import os

    with value_checks_off():
        assert os.environ["V4HAL_CHECK_VALUES"] == "0"
    assert os.environ["V4HAL_CHECK_VALUES"] == "1"


def test_ceilings_on_cpu() -> None:
    c = measure_ceilings("cpu", quick=True)
    assert c.copy_bytes_per_s > 1e8 and c.matmul_flops_per_s["fp32"] > 1e8
    assert c.matmul("fp8") == c.matmul_flops_per_s["bf16"] and "fp8" in c.notes
    assert c.to_dict()["copy_GBps"] == pytest.approx(c.copy_bytes_per_s / 1e9)


def test_quick_set_covers_every_public_op() -> None:
    quick = casemod.quick_cases()
    ops = {c.op for c in quick}
    assert ops == {op for op in v4hal.public_ops() if op in catalogue.CASES}
    # every quick shape of every op (each layout / format / generation variant), once
    want = [(op, f"quick/{label}") for op in catalogue.case_ops()
            for label, _ in catalogue.CASES[op].shape_set("quick")]
    assert sorted((c.op, c.name) for c in quick) == sorted(want)
    layouts = {c.name for c in quick if c.op == "paged_cache_write"}
    assert {"quick/v41_window_fp8", "quick/v41_compressed_fp4"} <= layouts
    assert set(v4hal.PUBLIC_OPS) <= set(casemod.known_ops())


def test_work_counts_by_hand() -> None:
    c = casemod.bench_case("fp8_gemm", {"m": 2, "n": 128, "k": 256}, "t")
    assert c.flops == 2 * 2 * 128 * 256
    # a (fp8) + b (fp8) + out (bf16) + a scales (fp32, 2 per row) + b scales (e8m0, 1x2 blocks)
    assert c.bytes == 2 * 256 + 128 * 256 + 2 * 2 * 128 + 4 * 2 * 2 + 1 * 2
    assert c.dtype == "fp8->bf16" and c.compute_dtype == "fp8"
    s = casemod.bench_case("sparse_attn", {"b": 2, "m": 1, "h": 4, "d": 64, "n": 100, "topk": 10}, "t")
    assert s.flops == 2 * 4 * 10 * (4 * 64 + 5)
    assert s.bytes == 2 * 2 * 4 * 64 * 2 + 2 * 10 * (2 * 64 + 4) + 4 * 4
    # the op's own checks refuse a shape when the case is made (on fake tensors, before anything runs)
    with pytest.raises(ShapeError, match="divisible by block_size"):
        casemod.bench_case("fp8_gemm", {"m": 2, "n": 128, "k": 100}, "t")


def test_preset_cases_build_for_both_models() -> None:
    for preset in ("v4-flash", "v4-pro"):
        for mode in ("decode", "prefill"):
            cs = casemod.preset_cases(preset, mode)
            assert {"fp8_gemm", "sparse_attn", "indexer_topk", "moe_experts", "hc_pre"} <= {c.op for c in cs}
    flash = {(c.op, c.name): c for c in casemod.preset_cases("v4-flash", "decode")}   # names are per op
    attn = flash["sparse_attn", "v4-flash/decode/csa"]
    assert attn.params["b"] == 64 and attn.params["h"] == 64 and attn.params["topk"] == 640
    with pytest.raises(RangeError, match="mode"):
        casemod.preset_cases("v4-flash", "train")


def test_cases_from_specs(tmp_path) -> None:
    path = tmp_path / "shapes.yaml"
    path.write_text("- {op: fp8_gemm, m: 4, n: 128, k: 128}\n- {op: rms_norm, name: mine, t: 3, d: 64}\n")
    cs = casemod.cases_from_yaml(str(path))
    assert [c.op for c in cs] == ["fp8_gemm", "rms_norm"] and cs[1].name == "mine"
    with pytest.raises(RangeError, match="unknown parameters"):
        casemod.cases_from_specs([{"op": "fp8_gemm", "m": 1, "n": 128, "k": 128, "q": 3}])
    with pytest.raises(RangeError, match="op must be one of"):
        casemod.cases_from_specs([{"op": "conv2d"}])


@pytest.mark.parametrize("op", ["act_quant", "fp4_act_quant", "quant_weight_fp8", "fp8_gemm", "indexer_topk",
                                "moe_gate", "moe_dispatch", "hc_pre"])
def test_compare_accepts_equal_and_rejects_perturbed(op: str) -> None:
    case = next(c for c in casemod.quick_cases() if c.op == op)
    inputs = case.make(torch.device("cpu"), 0)
    with v4hal.use_backend("reference"):
        ref = case.run(inputs)
        again = case.run(inputs)
    ok, _ = runner.verify(case, again, ref, inputs)
    assert ok

    def perturb(x):
        if isinstance(x, torch.Tensor):
            if x.dtype == torch.float8_e4m3fn:
                return (x.float() * -1).to(x.dtype)
            if x.dtype == torch.uint8:
                return x ^ 0x88  # flip both nibbles' signs
            if x.is_floating_point():
                return x * 1.5 + 0.1
            if op == "indexer_topk":
                return x.flip(0) if x.shape[0] > 1 else torch.roll(x, 1, dims=1)
            return torch.roll(x, 1, dims=0)
        if isinstance(x, tuple):
            return (perturb(x[0]), *x[1:]) if op != "moe_gate" else (x[0], torch.roll(x[1], 1, 0))
        return x

    bad = perturb(ref)
    if op == "indexer_topk":  # replace picks with the lowest-scoring entries
        bad = torch.where(ref >= 0, (ref + 1).clamp(max=ref.max()), ref)
        bad[..., 0] = torch.where(ref[..., 0] >= 0, 128 + 0, ref[..., 0])
    ok, metrics = runner.verify(case, bad, ref, inputs)
    assert not ok, metrics


def test_runner_reference_rows_and_peers() -> None:
    keep = {"fp8_gemm", "sparse_attn", "rms_norm"}
    cs = [c for c in casemod.quick_cases() if c.op in keep]
    ceil = Ceilings("cpu", "test", 1e10, {"bf16": 1e13, "fp32": 1e13})  # ridge 1000 FLOP/B: all memory-bound
    rows = runner.run_cases(cs, ["reference"], "cpu", ceilings=ceil, repeats=3, warmup=1, progress=False)
    assert [r.op for r in rows] == [c.op for c in cs]
    for r in rows:
        assert r.status == "ok" and r.verified == "oracle" and r.time_s > 0 and r.n_timed == 3
        assert r.bound == "memory" and r.pct_of_ceiling == pytest.approx(100 * r.bytes / r.time_s / 1e10)
    gemm = next(r for r in rows if r.op == "fp8_gemm")
    attn = next(r for r in rows if r.op == "sparse_attn")
    # the peers were verified against the reference before being timed
    assert gemm.peers["bf16 matmul (dequantized)"]["status"] == "ok"
    assert attn.peers["gather + SDPA"]["status"] == "ok"
    assert gemm.peers["torch._scaled_mm blockwise"]["status"] == "unavailable"
    assert attn.best_peer[0] == "gather + SDPA"


def test_runner_does_not_time_a_wrong_backend() -> None:
    case = casemod.bench_case("rms_norm", {"t": 4, "d": 64}, "wrong")

    def wrong_rms_norm(x, weight, eps):
        return x * 2

    registry.register_impl("rms_norm", "cuda", wrong_rms_norm, devices=("cpu",), auto=False)
    try:
        rows = runner.run_cases([case], ["reference", "cuda"], "cpu", repeats=2, warmup=1, progress=False)
    finally:
        registry.unregister_backend("cuda", devices=("cpu",))
    bad = next(r for r in rows if r.backend == "cuda")
    assert bad.status == "check-failed" and bad.time_s is None and bad.check["calc_diff"] > 0.01
    assert next(r for r in rows if r.backend == "reference").status == "ok"


def test_rotation_count() -> None:
    small = casemod.bench_case("rms_norm", {"t": 4, "d": 64}, "s")
    big = casemod.bench_case("rms_norm", {"t": 1 << 14, "d": 4096}, "b")
    assert runner.rotation_count(small, "cpu") == platform_of("cpu").bench.max_sets
    assert runner.rotation_count(big, "cpu") == 1


def test_cli_quick_json_holds_every_op(tmp_path, capsys) -> None:
    p = argparse.ArgumentParser()
    add_arguments(p)
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = p.parse_args(["--quick", "--device", "cpu", "--backends", "reference", "--repeats", "2", "--warmup", "1",
                         "--max-case-seconds", "0.2", "--no-progress", "--json", str(out), "--plot", str(png)])
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "ceilings on cpu" in text and "fp8_gemm" in text
    doc = json.loads(out.read_text())
    ops = {r["op"] for r in doc["rows"] if r["backend"] == "reference" and r["status"] == "ok"}
    assert ops == set(casemod.known_ops()) and set(v4hal.PUBLIC_OPS) <= ops
    assert doc["ceilings"]["copy_GBps"] > 0 and doc["set"] == "quick"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_rejects_unknown_backend_and_op(capsys) -> None:
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert main(p.parse_args(["--quick", "--device", "cpu", "--backends", "ascend"])) == 2
    assert main(p.parse_args(["--quick", "--device", "cpu", "--ops", "conv2d"])) == 2
    assert "conv2d" in capsys.readouterr().err


def test_gpu_check_without_gpu_and_target_logic() -> None:
    if not torch.cuda.is_available():
        assert gpu_check.main(["--json", "/dev/null"]) == 2
    ceil = Ceilings("cuda", "H200", 4.0e12, {"bf16": 8e14, "fp8": 1.6e15})

    def row(op, case, **kw):
        r = runner.Row(op, case, "triton", "cuda", "x", "", kw.pop("params", {}), time_s=1e-3, **kw)
        return r

    rows = [
        row("fp8_gemm", "v4-flash/decode/wq_a", params={"m": 128},
            peers={gpu_check.SCALED_MM: {"speedup": 0.9}}),
        row("fp8_gemm", "v4-flash/prefill/wq_a", params={"m": 4096},
            peers={gpu_check.SCALED_MM: {"speedup": 0.7}}),
        row("sparse_attn", "v4-flash/decode/csa", params={"b": 64, "m": 1, "h": 64, "d": 512, "topk": 640}),
        row("act_quant", "target/act_quant_large", gbps=3500.0),
        row("grouped_gemm", "target/grouped_fp8", tflops=900.0),
    ]
    res = {t["target"].split(" ")[0] + (" fp4" if "fp4" in t["target"] else ""): t
           for t in gpu_check.evaluate_targets(rows, ceil)}
    assert res["fp8_gemm"]["status"] == "FAIL" and res["fp8_gemm"]["worst"] == 0.7
    assert res["fp4_gemm fp4"]["status"] == "not measured"
    read = 64 * 64 * 512 * 2 + 64 * 640 * (2 * 512 + 4) + 4 * 64   # q, gathered rows + indices, sink
    assert res["sparse_attn"]["worst"] == pytest.approx(100 * read / 1e-3 / 4.0e12)
    assert res["sparse_attn"]["status"] == "FAIL"  # 46.2 MB in 1 ms is 1.2% of 4 TB/s
    assert res["act_quant"]["status"] == "pass"
    assert res["grouped"]["status"] == "pass" and res["grouped"]["worst"] == pytest.approx(56.25)
    text = gpu_check.render_targets(gpu_check.evaluate_targets(rows, ceil))
    assert "[FAIL]" in text and "[not measured]" in text


def test_gpu_check_paged_decode_targets() -> None:
    """The paged targets take the exact (op, case) row of the backend asked for, in % of copy on the case's bytes."""
    ceil = Ceilings("cuda", "H200", 4.0e12, {"bf16": 8e14})

    def row(op, case, nbytes, time_s, backend="triton"):
        return runner.Row(op, case, backend, "cuda", "x", "", {}, time_s=time_s, bytes=nbytes)

    def by_op(rows):     # keyed by op ("<op> v41" for the V4.1 target of an op)
        return {t["target"].split(" ")[0] + (" v41" if "V4.1" in t["target"] else ""): t
                for t in gpu_check.evaluate_targets(rows, ceil)}

    empty = by_op([])
    for op, case, _, _ in gpu_check.PAGED_TARGETS:
        key = op + (" v41" if "v41" in case else "")
        assert empty[key]["status"] == "not measured" and empty[key]["note"] == f"no timed {op} row for {case}"
    rows = [
        row("sparse_attn_paged", "v4-flash/decode/csa", 32e6, 10e-6),      # 32 MB in 10 us: 80% of 4 TB/s
        row("sparse_attn_paged", "v4-flash/decode/hca", 1e6, 1e-3),        # another case: not counted
        row("sparse_attn_paged", "v4-flash/decode/csa", 1e6, 1e-3, "reference"),
        row("sparse_attn_paged", "v4-flash/decode/v41_csa", 22.3e6, 1e-3),   # 0.56%
        row("indexer_logits_paged", "v4-flash/decode/fp4", 76e6, 1e-3),   # 1.9%
        row("indexer_logits_paged", "v4-flash/decode/fp4 mtp", 1e9, 1e-3),
        row("indexer_topk_paged", "v4-flash/decode/fp4", 1e9, 1e-3),      # same case name, other op
        row("paged_cache_write", "v4-flash/decode/model1_fp8", 206848, 4e-6),   # 1.29%
        row("paged_cache_write", "v4-flash/decode/indexer_fp4", 1.0, 1.0),
        runner.Row("paged_cache_write", "v4-pro/decode/model1_fp8", "triton", "cuda", "x", "", {}, status="error"),
    ]
    res = by_op(rows)
    attn, logits, write = res["sparse_attn_paged"], res["indexer_logits_paged"], res["paged_cache_write"]
    assert attn["status"] == "pass" and attn["worst"] == pytest.approx(80.0) and attn["threshold"] == 50.0
    assert list(attn["values"]) == ["v4-flash/decode/csa"] and attn["unit"] == "% of copy"
    v41 = res["sparse_attn_paged v41"]
    assert v41["status"] == "FAIL" and list(v41["values"]) == ["v4-flash/decode/v41_csa"]
    assert logits["status"] == "FAIL" and logits["worst"] == pytest.approx(1.9)
    assert list(logits["values"]) == ["v4-flash/decode/fp4"]
    assert write["status"] == "pass" and write["worst"] == pytest.approx(100 * 206848 / 4e-6 / 4e12)
    assert list(write["values"]) == ["v4-flash/decode/model1_fp8"]
    assert by_op(rows[:1])["sparse_attn"]["status"] == "not measured"   # sparse_attn keeps its own rows
    text = gpu_check.render_targets(gpu_check.evaluate_targets(rows, ceil))
    assert "[pass] sparse_attn_paged" in text and "[FAIL] indexer_logits_paged" in text


def test_gpu_check_lists_its_cases_without_a_gpu(capsys) -> None:
    ops = "sparse_attn_paged,indexer_logits_paged,paged_cache_write"
    assert gpu_check.main(["--list", "--presets", "v4-flash", "--ops", ops]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = {tuple(line.split()[:2]) for line in lines[:-1]}
    for op, case, _, _ in gpu_check.PAGED_TARGETS:
        assert (op, case) in listed
    assert {line.split()[0] for line in lines[:-1]} == set(ops.split(","))
    assert lines[-1] == f"{len(lines) - 1} cases"


def test_render_table_marks_interpreter_rows() -> None:
    r = runner.Row("rms_norm", "quick/x", "triton", "cpu", "bf16", "t=4", {}, time_s=2e-3, interpreter=True)
    text = report.render_table([r])
    assert "triton (interp)" in text and "say nothing about GPU speed" in text


def test_gpu_check_flow_dry_run_on_cpu(tmp_path, capsys) -> None:
    out = tmp_path / "gpu.json"
    rc = gpu_check.main(["--device", "cpu", "--quick", "--backends", "reference", "--ops", "rms_norm,fp8_gemm",
                         "--repeats", "2", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "targets" in text and "[not measured]" in text
    doc = json.loads(out.read_text())
    assert {r["op"] for r in doc["rows"]} == {"rms_norm", "fp8_gemm"} and len(doc["targets"]) == 9
    assert gpu_check.main(["--device", "cpu", "--quick", "--backends", "ascend"]) == 2
