"""Every ``v4hal`` command with bad values: exit status 2, one stderr line ``v4hal <command>: error: ...``, no
traceback, and nothing done first (no output, no checkpoint written, no rank started)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import v4hal
from v4hal.apps import args as cliargs
from v4hal.apps.main import cli
from v4hal.model import ModelConfig

# a device of a registered type that is not usable here: the CPU-only build's cuda, else a missing index
CUDA = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"

# (argv, a fragment the message must hold); "{no}" is a path in a missing folder, "{dir}" an existing folder,
# "{utf8}" / "{null}" checkpoints whose config.json is not UTF-8 / has compress_ratios null
CASES: list[tuple[list[str], str]] = [
    (["info", "--json", "{no}/m.json"], "argument --json: cannot write"),
    (["parity", "--ops", "rms_norm", "--json", "{no}/p.json"], "argument --json: cannot write"),
    (["parity", "--model", "v4-mini", "--json", "{no}/p.json"], "argument --json: cannot write"),
    (["run", "--json", "{no}/r.json"], "argument --json: cannot write"),
    (["run", "--json", "{dir}"], "is a folder"),
    (["cost", "--json", "{no}/"], "argument --json: {no}/ is a folder, expected a file path"),
    (["bench", "--quick", "--json", "{no}/b.json"], "argument --json: cannot write"),
    (["bench", "--quick", "--plot", "{no}/b.png"], "argument --plot: cannot write"),
    (["bench", "--overhead", "--json", "{no}/o.json"], "argument --json: cannot write"),
    (["cost", "--json", "{no}/c.json"], "argument --json: cannot write"),
    (["cost", "--plot", "{no}/c.png"], "argument --plot: cannot write"),
    (["run", "--device", "bogus"], "argument --device: expected a torch device"),
    (["run", "--device", CUDA], "argument --device: device"),
    (["parity", "--device", "bogus"], "argument --device"),
    (["parity", "--device", CUDA], "argument --device"),
    (["bench", "--quick", "--device", "bogus"], "argument --device"),
    (["bench", "--quick", "--device", CUDA], "argument --device"),
    (["run", "--threads", "-1"], "argument --threads: expected an integer in [1, "),
    (["parity", "--backends", "bogus"], "argument --backends: unknown backend 'bogus'"),
    (["parity", "--model", "v4-bogus"], "argument --model: unknown model preset 'v4-bogus'"),
    (["bench", "--quick", "--repeats", "-1"], "argument --repeats: expected an integer in [1, 1000000]"),
    (["run", "--checkpoint", "{utf8}"], "not UTF-8"),
    (["run", "--checkpoint", "{null}"], "compress_ratios"),
    (["parity", "--model", "v4-mini", "--checkpoint", "{utf8}"], "not UTF-8"),
    (["parity", "--model", "v4-mini", "--checkpoint", "{null}"], "compress_ratios"),
    (["run", "--ep", "3"], "--ep 3: the 8 routed experts of --model v4-mini do not split evenly"),
    (["run", "--ep", "64"], "--ep must divide 8"),
    (["run", "--checkpoint", "{null}", "--ep", "3"], "compress_ratios"),
    (["parity", "--ops", "bogus"], "argument --ops: unknown op 'bogus'"),
    (["run", "--ep", "0"], "argument --ep: expected an integer in [1, 64], got '0'"),
    (["run", "--ep", "-2"], "argument --ep: expected an integer in [1, 64], got '-2'"),
    (["bench", "--quick", "--repeats", "0"], "argument --repeats"),
    (["bench", "--quick", "--warmup", "-1"], "argument --warmup: expected an integer in [0, 10000]"),
    (["bench", "--quick", "--max-case-seconds", "-1"], "argument --max-case-seconds: expected a number in [0, 3600]"),
    (["bench", "--quick", "--preset", "bogus"], "argument --preset: unknown preset 'bogus'"),
    (["bench", "--quick", "--mode", "bogus"], "argument --mode: unknown mode 'bogus'"),
    (["info", "--devices", "bogus"], "argument --devices: unknown device type 'bogus'"),
    (["run", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["parity", "--bogus-flag", "1"], "unrecognized arguments"),
    (["run", "--backend", "bogus"], "argument --backend: unknown backend"),
    (["run", "--backend", "cuda"], "--backend: backend 'cuda' serves no op on cpu"),
    (["run", "--max-new-tokens", "5000", "--prompt-len", "4"], "exceed the max_seq_len 4096"),
    (["run", "--experts", "bogus"], "argument --experts: invalid choice"),
    (["run", "--prompt-len", "0"], "argument --prompt-len"),
    (["parity", "--backends", "ascend"], "--backends: backend 'ascend' serves no op on cpu"),
    (["parity", "--model", "v4-mini", "--backends", "cuda"], "--backends: backend 'cuda'"),
    (["parity", "--model", "v4-mini", "--tol-hidden", "nan"], "argument --tol-hidden: expected a finite number"),
    (["parity", "--model", "v4-mini", "--decode-steps", "-1"], "argument --decode-steps"),
    (["bench", "--quick", "--backends", "ascend"], "--backends: backend 'ascend' serves no op on cpu"),
    (["bench", "--quick", "--ops", "bogus"], "--ops names ops without a case ['bogus']"),
    (["bench", "--overhead", "--ops", ","], "--ops: expected a comma-separated list"),
    (["bench", "--shapes", "{no}/s.yaml"], "argument --shapes"),
    (["bench", "--overhead", "--repeats", "-1"], "argument --repeats"),
    (["cost", "--measure", "--repeats", "0"], "argument --repeats"),
    (["cost", "--models", "bogus"], "--models: cost: model must be one of"),
    (["cost", "--context", "0"], "argument --context"),
    (["cost", "--measure", "--measure-contexts", "1"], "argument --measure-contexts: context length must be a "
                                                     "whole number in [2, 256K], got '1'"),
    (["run", "--requests", "0"], "argument --requests: expected an integer in [1, 1048576], got '0'"),
    (["run", "--requests", "4", "--chunk", "0"], "argument --chunk: expected an integer in [1, 65536]"),
    (["run", "--requests", "4", "--arrival", "-1"], "argument --arrival: expected an integer in [0, 1048576]"),
    (["run", "--requests", "4", "--block-size", "0"], "argument --block-size: expected an integer in [1, 1024]"),
    (["run", "--requests", "4", "--layout", "fp8"], "argument --layout: unknown layout 'fp8'"),
    (["run", "--requests", "4", "--shared-prefix", "-1"], "argument --shared-prefix: expected an integer in [0, "),
    (["run", "--chunk", "8"], "--chunk only applies to a continuous-batching run; add --requests N"),
    (["run", "--arrival", "1", "--layout", "bf16"], "--arrival, --layout only apply to a continuous-batching run"),
    (["run", "--requests", "4", "--ep", "3"], "--ep 3: the 8 routed experts of --model v4-mini do not split evenly"),
    (["run", "--requests", "4", "--ep", "2", "--batch", "2"], "--batch 2 sets the rows of a single-sequence run"),
    (["run", "--requests", "4", "--batch", "2"], "--batch 2 sets the rows of a single-sequence run"),
    (["run", "--requests", "4", "--prompt-len", "2048"], "the longest prompt (--shared-prefix 0 + 2 x --prompt-len "
                                                         "2048 = 4096) + --max-new-tokens 32 - 1 exceeds"),
    (["run", "--requests", "4", "--shared-prefix", "4000"], "exceeds the max_seq_len 4096"),
    (["run", "--requests", "4", "--checkpoint", "{null}"], "compress_ratios"),
    (["cost", "--pool", "--json", "{no}/c.json"], "argument --json: cannot write"),
    # every numeric flag is bounded on both sides (a value past the top is refused, not run or overflowed)
    (["run", "--seed", "99999999999999999999999"], "argument --seed: expected an integer in [0, 4294967295]"),
    (["run", "--seed", "-1"], "argument --seed: expected an integer in [0, 4294967295], got '-1'"),
    (["run", "--prompt-len", "99999999999999"], "argument --prompt-len: expected an integer in [1, 16777216]"),
    (["run", "--max-new-tokens", "99999999999999"], "argument --max-new-tokens: expected an integer in [1, "),
    (["run", "--batch", "100000"], "argument --batch: expected an integer in [1, 1024]"),
    (["run", "--batch", "1024", "--prompt-len", "2048"], "--batch 1024 x --prompt-len 2048 = 2097152 tokens in one "
                                                         "prefill call; at most 1048576"),
    (["run", "--threads", "100000"], "(the CPUs this process may use)"),
    (["run", "--ep", "65"], "argument --ep: expected an integer in [1, 64], got '65'"),
    (["run", "--requests", "1000000000"], "argument --requests: expected an integer in [1, 1048576]"),
    (["run", "--requests", "1000000"], "--requests 1000000 x up to 160 tokens each (prompt and output) = 160000000 "
                                       "tokens: a run makes and records at most 8388608; give at most --requests"),
    (["run", "--requests", "4", "--chunk", "1000000"], "argument --chunk: expected an integer in [1, 65536]"),
    (["run", "--requests", "4", "--arrival", "99999999"], "argument --arrival: expected an integer in [0, 1048576]"),
    (["run", "--requests", "4", "--block-size", "4096"], "argument --block-size: expected an integer in [1, 1024]"),
    (["run", "--requests", "4", "--shared-prefix", "999999999"], "argument --shared-prefix: expected an integer"),
    (["run", "--requests", "4", "--pool-memory", "1k"], "argument --pool-memory: expected a size in [1 MiB, "),
    (["run", "--requests", "4", "--pool-memory", "lots"], "argument --pool-memory: expected a size such as 512M"),
    (["run", "--requests", "4", "--pool-memory", "2000T"], "argument --pool-memory: expected a size in [1 MiB, 1 PiB]"),
    (["run", "--requests", "4", "--prompt-len", "1024", "--pool-memory", "1M"],
     "the longest request (2079 positions) needs 1.21 MiB of cache pages, more than the pool's --pool-memory 1 MiB"),
    (["run", "--pool-memory", "1G"], "--pool-memory only applies to a continuous-batching run"),
    (["parity", "--seed", "99999999999999999999999"], "argument --seed: expected an integer in [0, 4294967295]"),
    (["parity", "--model", "v4-mini", "--seed", "-5"], "argument --seed"),
    (["parity", "--model", "v4-mini", "--prompt-len", "99999999999"], "argument --prompt-len: expected an integer"),
    (["parity", "--model", "v4-mini", "--decode-steps", "99999999999"], "argument --decode-steps: expected an "
                                                                        "integer in [0, 16777216]"),
    (["parity", "--model", "v4-mini", "--batch", "5000"], "argument --batch: expected an integer in [1, 1024]"),
    (["parity", "--model", "v4-mini", "--tol-logits", "3"], "argument --tol-logits: expected a number in [0, 2]"),
    (["bench", "--quick", "--repeats", "99999999999"], "argument --repeats: expected an integer in [1, 1000000]"),
    (["bench", "--quick", "--warmup", "99999999999"], "argument --warmup: expected an integer in [0, 10000]"),
    (["bench", "--quick", "--max-case-seconds", "1e300"], "argument --max-case-seconds: expected a number in "),
    (["bench", "--overhead", "--repeats", "99999999999"], "argument --repeats"),
    (["cost", "--context", "99999999999999999999999"], "argument --context: context length must be a whole number "
                                                       "in [1, 16M]"),
    (["cost", "--measure", "--measure-contexts", "1G"], "argument --measure-contexts: context length must be a whole "
                                                        "number in [2, 256K]"),
    (["cost", "--measure", "--repeats", "99999999999"], "argument --repeats: expected an integer in [1, 10000]"),
    (["cost", "--measure", "--seed", "99999999999999999999999"], "argument --seed: expected an integer in [0, "),
]


@pytest.fixture()
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The paths the table refers to; the checkpoint cache points into ``tmp_path`` (and must stay unwritten)."""
    monkeypatch.setenv("V4HAL_CACHE_DIR", str(tmp_path / "cache"))
    cfg = ModelConfig.preset("v4-mini").to_dict()
    utf8, null = tmp_path / "utf8", tmp_path / "null"
    utf8.mkdir()
    (utf8 / "config.json").write_bytes(b'{"dim": "\xff\xfe"}')
    null.mkdir()
    (null / "config.json").write_text(json.dumps({**cfg, "compress_ratios": None}))
    return {"no": str(tmp_path / "missing"), "dir": str(tmp_path), "utf8": str(utf8), "null": str(null)}


def _status(argv: list[str]) -> int:
    try:
        return cli(argv)
    except SystemExit as e:          # argparse's own exits (none expected: `cli` returns 2)
        return int(e.code or 0)


def assert_one_line_error(command: str, rc: int, out: str, err: str, fragment: str = "") -> str:
    """Exit 2, exactly one non-empty stderr line ``v4hal <command>: error: ...`` holding ``fragment``."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, err)
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"v4hal {command}: error: "), lines[0]
    assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("argv, fragment", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_command_line(argv: list[str], fragment: str, places: dict[str, str], tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.format(**places) for a in argv]
    rc = _status(argv)
    out, err = capsys.readouterr()
    assert_one_line_error(argv[0], rc, out, err, fragment.format(**places))
    assert out == ""                                       # refused before doing anything
    assert not (tmp_path / "cache").exists()               # no random checkpoint written
    assert not (tmp_path / "missing").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".v4hal-write-probe")]


@pytest.mark.parametrize("argv, message", [
    ([], "v4hal: error: the following arguments are required: command"),
    (["bogus"], "v4hal: error: argument command: invalid choice: 'bogus'"),
])
def test_bad_command_name(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _status(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith(message) and len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(places: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """``--debug``, before or after the command name, re-raises the v4hal error instead of one line."""
    null = places["null"]
    for argv in (["--debug", "run", "--checkpoint", null], ["run", "--checkpoint", null, "--debug"]):
        with pytest.raises(v4hal.RangeError, match="compress_ratios"):
            cli(argv)
    assert cli(["run", "--checkpoint", places["null"]]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_unexpected_exceptions_keep_their_traceback(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import v4hal.apps.info as cli_module

    def broken(args: object) -> int:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli_module, "main", broken)
    with pytest.raises(ZeroDivisionError):
        cli(["info"])

    def multiline(args: object) -> int:
        raise v4hal.BackendUnavailableError("first reason\n  second reason\n")

    monkeypatch.setattr(cli_module, "main", multiline)
    assert cli(["info"]) == 2
    assert capsys.readouterr().err == "v4hal info: error: first reason; second reason\n"


def test_writable_path_probe(tmp_path: Path) -> None:
    """The probe leaves the folder as it was and does not touch an existing target."""
    target = tmp_path / "keep.json"
    target.write_text("old")
    assert cliargs.writable_path(str(target)) == str(target)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.json"]
    assert cliargs.writable_path(str(tmp_path / "new.json")) == str(tmp_path / "new.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json"]
    with pytest.raises(Exception, match="is not a folder"):
        cliargs.writable_path(str(target / "under_a_file.json"))
    if os.geteuid() != 0:                                   # root writes anywhere: the mode bits do not stop it
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(Exception, match="cannot create a file"):
            cliargs.writable_path(str(ro / "x.json"))


@pytest.mark.parametrize("argv, fragment", [
    (["run", "--ep", "3", "--prompt-len", "4", "--max-new-tokens", "2"], "--ep must divide 8"),
    (["parity", "--model", "v4-mini", "--json", "{no}/p.json"], "argument --json: cannot write"),
])
def test_end_to_end_no_traceback(argv: list[str], fragment: str, places: dict[str, str]) -> None:
    """``python -m v4hal.apps.main``: the same one line and exit status 2 from a fresh interpreter."""
    argv = [a.format(**places) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "v4hal.apps.main", *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TRITON_INTERPRET": "0"})
    assert_one_line_error(argv[0], proc.returncode, proc.stdout, proc.stderr, fragment)
    assert proc.stdout == ""


FULL = "/dev/full"          # every write to it fails with ENOSPC once the data is flushed
needs_dev_full = pytest.mark.skipif(not os.path.exists(FULL), reason="no /dev/full here")


def assert_error_last(command: str, rc: int, err: str, fragment: str) -> None:
    """Exit 2 and one ``v4hal <command>: error: ...`` line holding ``fragment`` (progress bars may precede it)."""
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert rc == 2, (rc, err)
    assert "Traceback" not in err
    assert len(errors) == 1 and errors[0].startswith(f"v4hal {command}: error: "), err
    assert fragment in errors[0], errors[0]


@needs_dev_full
@pytest.mark.parametrize("argv, flag", [
    (["info", "--json", FULL], "--json"),
    (["parity", "--ops", "rms_norm", "--json", FULL], "--json"),
    (["cost", "--context", "4096", "--json", FULL], "--json"),
    (["cost", "--context", "4096", "--plot", FULL], "--plot"),
    (["bench", "--overhead", "--ops", "rms_norm", "--repeats", "10", "--json", FULL], "--json"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_a_failed_write_at_the_end_is_one_line(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The output path passes the up-front checks; the write itself fails after the work: one line, exit 2."""
    rc = _status(argv)
    out, err = capsys.readouterr()
    assert_error_last(argv[0], rc, err, f"{flag}: cannot write {FULL}: No space left on device")
    assert out                                      # the work was done and printed before the write failed


@needs_dev_full
def test_parallel_bench_bounds_and_write_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m v4hal.apps.ep_bench``: bounded flags, checks across flags, and a failed JSON write, each one
    line ``v4hal ep_bench: error: ...`` and exit 2."""
    from v4hal.apps.ep_bench import main

    for argv, fragment in ((["--tokens", "999999999"], "argument --tokens: expected an integer in [1, 65536]"),
                           (["--ep", "0"], "argument --ep: expected an integer in [1, 64]"),
                           (["--topk", "9", "--experts", "8"], "--topk 9 exceeds --experts 8"),
                           (["--experts", "9"], "--experts 9 do not split evenly over --ep 2 ranks"),
                           (["--json", str(tmp_path)], "is a folder"),
                           (["--payloads", "bogus"], "argument --payloads: unknown payload 'bogus'")):
        rc = main(argv)
        out, err = capsys.readouterr()
        assert_one_line_error("ep_bench", rc, out, err, fragment)
        assert out == ""
    tiny = ["--ep", "2", "--tokens", "4", "--dim", "128", "--experts", "4", "--topk", "2", "--iters", "1",
            "--warmup", "0", "--payloads", "bf16", "--threads", "1"]
    rc = main([*tiny, "--json", FULL])
    out, err = capsys.readouterr()
    assert_error_last("ep_bench", rc, err, f"--json: cannot write {FULL}: No space left on device")
    assert "EP 2 x 4 tokens/rank" in out


def test_output_errors_name_the_flag_and_remove_a_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    with pytest.raises(cliargs.OutputError, match=r"^--plot: cannot write .*out\.json: No space left on device$"):
        with cliargs.output_errors(str(target), "--plot"):
            target.write_text("half")
            raise OSError(28, "No space left on device")
    assert not target.exists()                        # no truncated file left behind
    with pytest.raises(cliargs.OutputError, match="--json: cannot write .*: Is a directory"):
        cliargs.write_json(str(tmp_path), {"a": 1})
    cliargs.write_json(str(target), {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}


def test_pool_memory_above_what_is_available(places: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """``--pool-memory`` larger than the memory the device has free is refused before anything is loaded."""
    from v4hal.apps import serve

    monkeypatch.setattr(serve, "available_memory", lambda device: 64 << 20)
    rc = _status(["run", "--requests", "4", "--pool-memory", "1G"])
    out, err = capsys.readouterr()
    assert_one_line_error("run", rc, out, err, "--pool-memory 1 GiB is more than the 64 MiB available on cpu")


def test_bounded_number_types() -> None:
    import argparse

    check = cliargs.int_in(2, 5, "why not")
    assert check("2") == 2 and check("5") == 5
    for bad in ("1", "6", "x", "2.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            check(bad)
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected an integer in \[2, 5\], got '6' \(why not\)"):
        check("6")
    assert cliargs.float_in(0, 2)("2") == 2.0
    with pytest.raises(argparse.ArgumentTypeError, match="a finite number"):
        cliargs.float_in(0, 2)("inf")
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected a number > 0 and <= 1"):
        cliargs.float_in(0, 1, strict=True)("0")
    assert cliargs.parse_bytes("1.5G") == 3 << 29 and cliargs.parse_bytes("512MiB") == 512 << 20
    assert cliargs.parse_bytes("4096") == 4096 and cliargs.format_bytes(3 << 29) == "1.5 GiB"
    assert cliargs.seed(str(cliargs.MAX_SEED)) == cliargs.MAX_SEED
    for huge in ("9" * 400, "9" * 5000):               # past a float, past Python's int() digit limit
        for check in (cliargs.byte_size(1, 1 << 50), cliargs.seed, cliargs.float_in(0, 1)):
            with pytest.raises(argparse.ArgumentTypeError):
                check(huge)
