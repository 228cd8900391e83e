"""The attention / indexer / mHC / small-op kernels compile for sm_90 (H100/H200) with the
launch configurations their launchers use, and the serving-dtype configurations do not spill.

Runs the real Triton compiler and ptxas in a subprocess without ``TRITON_INTERPRET`` (see
``tests/triton/sm90_compile.py``); no GPU is needed. This catches what the interpreter lets
through (constructs the compiler rejects, shared-memory or register blow-ups). It says nothing
about numerics on the GPU or speed.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _nvidia_backend_present() -> bool:
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return False
    bindir = Path(spec.origin).parent / "backends" / "nvidia" / "bin"
    return (bindir / "ptxas").exists() or (bindir / "ptxas-blackwell").exists()


@pytest.mark.skipif(not _nvidia_backend_present(), reason="triton wheel without the NVIDIA backend / ptxas")
def test_kernels_compile_for_sm90_without_spills() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-m", "tests.triton.sm90_compile", "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(rows) >= 20
    for row in rows:
        assert row["regs"] is not None, row
        assert row["smem"] <= 227 * 1024, f"{row['name']}: {row['smem']} bytes of shared memory"
        if row["serving"]:
            assert row["spill_bytes"] == 0, f"{row['name']} spills {row['spill_bytes']} bytes"
        if row["bf16_out"]:
            # bf16 outputs use the hardware round-to-nearest-even conversion (the interpreter's integer
            # rounding, SOFT=True, is never compiled)
            assert row["bf16_cvt"] > 0, f"{row['name']}: no cvt.rn.bf16 in the PTX"
    names = {r["name"]: r for r in rows}
    # the V4 decode tile that holds 64 heads uses Hopper's warpgroup MMA
    assert names["sparse_attn bf16 d=512 BH=64 BN=16 w=8 s=3"]["mma"] == "wgmma"
