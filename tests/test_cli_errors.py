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
from v4hal import cliargs
from v4hal.cli import cli
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
    (["run", "--threads", "-1"], "argument --threads: expected an integer >= 1, got '-1'"),
    (["parity", "--backends", "bogus"], "argument --backends: unknown backend 'bogus'"),
    (["parity", "--model", "v4-bogus"], "argument --model: unknown model preset 'v4-bogus'"),
    (["bench", "--quick", "--repeats", "-1"], "argument --repeats: expected an integer >= 1"),
    (["run", "--checkpoint", "{utf8}"], "not UTF-8"),
    (["run", "--checkpoint", "{null}"], "compress_ratios"),
    (["parity", "--model", "v4-mini", "--checkpoint", "{utf8}"], "not UTF-8"),
    (["parity", "--model", "v4-mini", "--checkpoint", "{null}"], "compress_ratios"),
    (["run", "--ep", "3"], "--ep 3: the 8 routed experts of --model v4-mini do not split evenly"),
    (["run", "--ep", "64"], "--ep must divide 8"),
    (["run", "--checkpoint", "{null}", "--ep", "3"], "compress_ratios"),
    (["parity", "--ops", "bogus"], "argument --ops: unknown op 'bogus'"),
    (["run", "--ep", "0"], "argument --ep: expected an integer >= 1, got '0'"),
    (["run", "--ep", "-2"], "argument --ep: expected an integer >= 1, got '-2'"),
    (["bench", "--quick", "--repeats", "0"], "argument --repeats"),
    (["bench", "--quick", "--warmup", "-1"], "argument --warmup: expected an integer >= 0"),
    (["bench", "--quick", "--max-case-seconds", "-1"], "argument --max-case-seconds: expected a number >= 0"),
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
    (["cost", "--measure", "--measure-contexts", "1"], "--measure-contexts: each context must be >= 2"),
    (["run", "--requests", "0"], "argument --requests: expected an integer >= 1, got '0'"),
    (["run", "--requests", "4", "--chunk", "0"], "argument --chunk: expected an integer >= 1"),
    (["run", "--requests", "4", "--arrival", "-1"], "argument --arrival: expected an integer >= 0"),
    (["run", "--requests", "4", "--block-size", "0"], "argument --block-size: expected an integer >= 1"),
    (["run", "--requests", "4", "--layout", "fp8"], "argument --layout: unknown layout 'fp8'"),
    (["run", "--requests", "4", "--shared-prefix", "-1"], "argument --shared-prefix: expected an integer >= 0"),
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
    assert_one_line_error(argv[0], rc, out, err, fragment)
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
    import v4hal.cli as cli_module

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
    """``python -m v4hal.cli``: the same one line and exit status 2 from a fresh interpreter."""
    argv = [a.format(**places) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "v4hal.cli", *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TRITON_INTERPRET": "0"})
    assert_one_line_error(argv[0], proc.returncode, proc.stdout, proc.stderr, fragment)
    assert proc.stdout == ""
