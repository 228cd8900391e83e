"""Hostile checkpoints: file kinds that are not regular files, broken config.json and index files, NaN/inf
scales. Each must raise a v4hal error naming the file (and the key or tensor), quickly."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from v4hal.hal.errors import V4HalError
from v4hal.model import CheckpointError, ModelConfig, V4Model, write_random_checkpoint
from v4hal.model.checkpoint import CheckpointRangeError

SHARD = "model0-mp1.safetensors"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / SHARD), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)


_FIFO_CHILD = """
import sys, time
from v4hal.hal.errors import V4HalError
from v4hal.model import V4Model
for path in sys.argv[1:]:
    t0 = time.perf_counter()
    try:
        V4Model.from_pretrained(path)
        print("LOADED", path)
    except V4HalError as e:
        print(f"{time.perf_counter() - t0:.3f}", e)
"""


def _load_in_child(paths: list[Path]) -> list[tuple[float, str]]:
    """Load each path in a fresh process (a blocked ``open`` holds the GIL: no in-process watchdog can
    end it); returns (seconds, v4hal error message) per path."""
    repo = str(Path(__file__).parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", _FIFO_CHILD, *map(str, paths)], capture_output=True, text=True,
                         check=False, timeout=60, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    out = []
    for line in res.stdout.splitlines():
        secs, msg = line.split(" ", 1)
        assert secs != "LOADED", line
        out.append((float(secs), msg))
    assert len(out) == len(paths), res.stdout
    return out


def test_fifos_are_refused_at_once(tmp_path, mini_fp8) -> None:
    """A FIFO as a shard, as the checkpoint path, as config.json, as the index: a v4hal error naming it
    within a second (opening a FIFO for reading blocks until a writer comes)."""
    d = _copy(mini_fp8, tmp_path / "shard")
    (d / SHARD).unlink()
    os.mkfifo(d / SHARD)
    c = _copy(mini_fp8, tmp_path / "config")
    (c / "config.json").unlink()
    os.mkfifo(c / "config.json")
    h = write_random_checkpoint(ModelConfig.preset("v4-mini"), tmp_path / "hf", seed=0, layout="hf", shards=2)
    (h / "model.safetensors.index.json").unlink()
    os.mkfifo(h / "model.safetensors.index.json")
    results = _load_in_child([d, d / SHARD, c, h])
    expected = [f"{d / SHARD} is not a regular file (a FIFO)",
                f"{d / SHARD} is a FIFO, neither a directory nor a .safetensors file",
                f"config.json: {c / 'config.json'} is not a regular file (a FIFO)",
                f"{h / 'model.safetensors.index.json'} is not a regular file (a FIFO)"]
    for (secs, msg), text in zip(results, expected):
        assert text in msg, (text, msg)
        assert secs < 1.0, (secs, msg)


def test_other_file_kinds(tmp_path, mini_fp8) -> None:
    d = _copy(mini_fp8, tmp_path / "c")
    (d / SHARD).unlink()
    (d / SHARD).symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match=r"model0-mp1\.safetensors is not a regular file \(a character device\)"):
        V4Model.from_pretrained(d)
    (d / SHARD).unlink()
    (d / SHARD).mkdir()
    with pytest.raises(CheckpointError, match=r"model0-mp1\.safetensors is not a regular file \(a directory\)"):
        V4Model.from_pretrained(d)
    (d / SHARD).rmdir()
    (d / SHARD).symlink_to(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"cannot read .*model0-mp1\.safetensors"):
        V4Model.from_pretrained(d)
    (d / SHARD).unlink()
    (d / SHARD).symlink_to(mini_fp8 / SHARD)                  # a symlink to a regular file is fine
    assert V4Model.from_pretrained(d).config.dim == 256


# ------------------------------------------------------------------------------ config.json
def _with_config(tmp_path: Path, mini_fp8: Path, text: bytes | str) -> Path:
    d = _copy(mini_fp8, tmp_path / f"c{len(list(tmp_path.iterdir()))}")
    (d / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    return d


@pytest.mark.parametrize("edit,match", [
    (lambda c: ("\ufeff" + json.dumps(c)).encode("utf-16"), r"is not UTF-8 text"),
    (lambda c: "[" * 100_000 + "]" * 100_000, r"nested too deeply"),
    (lambda c: '{"dim": ' + "{" * 50_000, r"nested too deeply|not valid JSON"),
    (lambda c: json.dumps(c)[:-9], r"is not valid JSON"),
    (lambda c: json.dumps([c]), r"must be a mapping"),
    (lambda c: json.dumps(dict(c, compress_ratios=None)), r"compress_ratios must be a list of ints.*NoneType"),
    (lambda c: json.dumps(dict(c, compress_ratios="04128")), r"compress_ratios must be a list of ints.*str"),
    (lambda c: json.dumps(dict(c, compress_ratios=["0", "4", "128", "4", "0"])),
     r"compress_ratios entries must be ints"),
    (lambda c: json.dumps(dict(c, compress_ratios={"0": 0})), r"compress_ratios must be a list of ints.*dict"),
    (lambda c: json.dumps(dict(c, compress_ratios=[0, 4, 128, 4, True])), r"compress_ratios entries must be ints"),
    (lambda c: json.dumps(dict(c, dim="256")), r"dim must be an int, got '256'"),
    (lambda c: json.dumps(dict(c, norm_eps=float("nan"))), r"norm_eps must be a finite number"),
    (lambda c: json.dumps(dict(c, quantization_config={"weight_block_size": 128})), r"weight_block_size"),
    (lambda c: json.dumps(dict(c, rope_parameters={"main": 5})), r"rope_parameters\.main must be a dict"),
    (lambda c: json.dumps(dict(c, n_layers=10**9, compress_ratios=[0] * 3)), r"compress_ratios|n_layers"),
    (lambda c: json.dumps(dict(c, n_routed_experts=10**12, n_layers=4)), r"needs at least \d+ tensors"),
])
def test_bad_config_json(tmp_path, mini_fp8, edit, match) -> None:
    cfg = json.loads((mini_fp8 / "config.json").read_text())
    d = _with_config(tmp_path, mini_fp8, edit(cfg))
    t0 = time.perf_counter()
    with pytest.raises(V4HalError, match=match) as info:
        V4Model.from_pretrained(d)
    assert str(d / "config.json") in str(info.value)
    assert time.perf_counter() - t0 < 5


# ------------------------------------------------------------------------------ index
@pytest.mark.parametrize("weight_map,match", [
    (["model-00001-of-00002.safetensors"], r"'weight_map' must be an object .* got list"),
    ({"embed.weight": 1}, r"weight_map\['embed\.weight'\] must be a file name \(string\), got int"),
    ({"embed.weight": "../model-00001-of-00002.safetensors"}, r"weight_map\['embed\.weight'\] must name a file"),
    ({"embed.weight": "/etc/passwd"}, r"must name a file inside"),
    ({}, r"lists no tensor"),
    (None, r"'weight_map' must be an object .* got NoneType"),
])
def test_bad_index(tmp_path, weight_map, match) -> None:
    h = write_random_checkpoint(ModelConfig.preset("v4-mini"), tmp_path / "hf", seed=0, layout="hf", shards=2)
    idx = h / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    data["weight_map"] = weight_map
    idx.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=match) as info:
        V4Model.from_pretrained(h)
    assert str(idx) in str(info.value)


def test_index_not_json(tmp_path) -> None:
    h = write_random_checkpoint(ModelConfig.preset("v4-mini"), tmp_path / "hf", seed=0, layout="hf", shards=2)
    idx = h / "model.safetensors.index.json"
    for text, match in ((b"\xff\xfe{}", "not UTF-8"), (b"[" * 100_000, "nested too deeply"),
                        (b'{"metadata": {}}', "no 'weight_map' object"), (b"{", "not valid JSON")):
        idx.write_bytes(text)
        with pytest.raises(V4HalError, match=match) as info:
            V4Model.from_pretrained(h)
        assert str(idx) in str(info.value)


# ------------------------------------------------------------------------------ scales
@pytest.mark.parametrize("name,value", [
    ("layers.1.attn.wkv.scale", float("nan")),
    ("layers.1.attn.wkv.scale", float("inf")),
    ("layers.2.ffn.shared_experts.w2.scale", -float("inf")),
    ("layers.0.attn.wq_b.scale", "e8m0-nan"),
    ("layers.3.ffn.experts.5.w1.scale", "e8m0-nan"),
])
def test_non_finite_scales_are_named_at_load(tmp_path, mini_fp8, name, value) -> None:
    t = _tensors(mini_fp8)
    s = t[name]
    if value == "e8m0-nan":
        raw = s.view(torch.uint8).clone()
        raw.view(-1)[-1] = 255                                     # the e8m0 NaN encoding
        s = raw.view(torch.float8_e8m0fnu)
    else:
        s = s.float()
        s.view(-1)[0] = value
    t[name] = s
    d = tmp_path / "c"
    d.mkdir()
    shutil.copy(mini_fp8 / "config.json", d)
    save_file(t, str(d / SHARD))
    with pytest.raises(CheckpointRangeError, match=re.escape(f"scale tensor {name} ({SHARD}) holds 1 NaN or "
                                                             f"infinite")):
        V4Model.from_pretrained(d)


def test_non_finite_fp8_wo_a_scale_in_hf_layout(tmp_path) -> None:
    h = write_random_checkpoint(ModelConfig.preset("v4-mini"), tmp_path / "hf", seed=0, layout="hf", shards=1)
    f = next(h.glob("*.safetensors"))
    with safe_open(str(f), framework="pt") as fh:
        t = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is no dict)
    t["layers.2.attn.wo_a.scale"] = t["layers.2.attn.wo_a.scale"].float() * float("nan")
    save_file(t, str(f))
    with pytest.raises(CheckpointRangeError, match=r"scale tensor layers\.2\.attn\.wo_a\.scale"):
        V4Model.from_pretrained(h)
