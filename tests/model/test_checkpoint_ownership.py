"""Who owns the weights of a loaded model: its own memory by default, the file's memory map with ``mmap=True``.

File-backing is read from ``/proc/self/maps``: a buffer is file-backed when its data pointer lies in a
mapping of the checkpoint file.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from v4hal.hal.errors import RangeError
from v4hal.model import V4Model

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps (Linux)")

PROMPT = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(4))


def _mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges [start, end) of this process mapping ``path``."""
    target = os.path.realpath(path)
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == target:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                out.append((lo, hi))
    return out


def _file_backed(model: V4Model, path: Path) -> list[str]:
    """Names of the model buffers whose memory lies in a mapping of ``path``."""
    ranges = _mappings(path)
    return [n for n, b in model.named_buffers()
            if not b.is_meta and b.numel() and any(lo <= b.data_ptr() < hi for lo, hi in ranges)]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst / "model0-mp1.safetensors"


def _scramble(f: Path, key: str | None = None) -> None:
    """Overwrite in place (same size, same inode) the bytes of tensor ``key`` with bf16 0.25 values, or
    every byte after the header with a pattern when ``key`` is None."""
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    start, end = n + 8, len(raw)
    if key is not None:
        lo, hi = json.loads(raw[8:8 + n])[key]["data_offsets"]
        start, end = n + 8 + lo, n + 8 + hi
    data = b"\x80\x3e" * ((end - start) // 2) if key else bytes((i * 37 + 11) & 0xFF for i in range(end - start))
    with open(f, "r+b") as fh:
        fh.seek(start)
        fh.write(data)


def test_default_load_owns_every_weight(tmp_path, mini_fp8) -> None:
    """In a fresh process: load, then overwrite the file in place and truncate it; every forward gives
    the logits of the first one (no Bus error, no silent change) and no mapping of the file remains."""
    d = tmp_path / "ckpt"
    _copy(mini_fp8, d)
    script = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        torch.set_num_threads(1)
        from test_checkpoint_ownership import PROMPT, _file_backed, _mappings, _scramble
        from v4hal.model import V4Model
        from pathlib import Path
        f = Path({str(d / "model0-mp1.safetensors")!r})
        model = V4Model.from_pretrained(f.parent)
        assert not _file_backed(model, f), _file_backed(model, f)[:5]
        assert not _mappings(f), "a mapping of the checkpoint file outlived the load"
        first = model(PROMPT, 0)
        _scramble(f)
        again = model(PROMPT, 0)
        os.truncate(f, 0)
        last = model(PROMPT, 0)
        assert torch.equal(first, again) and torch.equal(first, last), (first - last).abs().max()
        print("owned ok", flush=True)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]),
                                                       os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=120,
                         env=env)
    assert res.returncode == 0 and "owned ok" in res.stdout, (res.returncode, res.stdout, res.stderr[-2000:])


def test_mmap_load_is_file_backed(tmp_path, mini_fp8) -> None:
    """``mmap=True``: the FP8 / bf16 weights lie in the file's mapping (same logits as an owned load), so
    rewriting the file in place changes what the model computes: the documented hazard.
    (Truncating it would kill this process with SIGBUS at the next forward: not done here.)"""
    f = _copy(mini_fp8, tmp_path / "ckpt")
    owned = V4Model.from_pretrained(f.parent)
    mapped = V4Model.from_pretrained(f.parent, mmap=True)
    backed = set(_file_backed(mapped, f))
    assert {"embed.weight", "head.weight", "layers.0.attn.wq_b.weight", "layers.1.attn.wo_b.weight",
            "layers.1.attn.wo_b.scale", "layers.2.ffn.shared_experts.w2.weight"} <= backed
    assert not _file_backed(owned, f)
    # copied even so: routed experts (stacked into [E, ...] buffers), fused projections (wq_a | wkv)
    assert not any(".experts." in n and "shared" not in n for n in backed)
    assert "layers.0.attn.qkv_a.weight" not in backed
    before, ref = mapped(PROMPT, 0), owned(PROMPT, 0)
    # same weights; mapped ones sit at the file's (unaligned) offsets, so CPU GEMMs may round differently
    torch.testing.assert_close(before, ref, rtol=1e-4, atol=1e-5)
    _scramble(f, "embed.weight")
    assert (mapped(PROMPT, 0) - before).abs().max() > 0.1
    torch.testing.assert_close(owned(PROMPT, 0), ref, rtol=0, atol=0)


def test_mmap_option_is_checked(mini_fp8) -> None:
    with pytest.raises(RangeError, match=r"mmap=True .* only the CPU.*device='cuda'"):
        V4Model.from_pretrained(mini_fp8, device="cuda", mmap=True)
    with pytest.raises(RangeError, match="mmap must be True or False"):
        V4Model.from_pretrained(mini_fp8, mmap="yes")
    with pytest.raises(RangeError, match="device must be a torch device"):
        V4Model.from_pretrained(mini_fp8, device="bogus")


def test_cli_mmap_flag(mini_fp8, capsys) -> None:
    from v4hal.apps.main import cli

    with pytest.raises(SystemExit):
        cli(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--mmap" in help_text and "must not change" in help_text and "SIGBUS" in help_text
    assert cli(["run", "--checkpoint", str(mini_fp8), "--mmap", "--prompt-len", "6", "--max-new-tokens", "2",
                "--no-progress"]) == 0
    assert "tokens[0]:" in capsys.readouterr().out
