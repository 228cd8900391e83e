"""The shipped docs agree with the code and stand alone.

``docs/op_contract.md`` is generated from the op table (``python -m v4hal.ops.contract``); these
tests fail when it is stale, when ``docs/ops.md`` lacks a section for a declared op, or when a doc
links to a file that is not in the repository.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from v4hal.ops import OPS, contract

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SHIPPED_TEXT = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def test_op_contract_is_generated_from_the_op_table() -> None:
    text = (DOCS / "op_contract.md").read_text(encoding="utf-8")
    assert text == contract.render(), "docs/op_contract.md is stale: run python -m v4hal.ops.contract"


def test_check_mode_reports_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    page = tmp_path / "op_contract.md"
    assert contract.main(["--path", str(page)]) == 0
    assert contract.main(["--check", "--path", str(page)]) == 0
    page.write_text(page.read_text(encoding="utf-8").replace("### `rms_norm`", "### `rms_norm_old`"),
                    encoding="utf-8")
    assert contract.main(["--check", "--path", str(page)]) == 1
    out = capsys.readouterr().out
    assert "-### `rms_norm_old`" in out and "+### `rms_norm`" in out


def test_contract_lists_every_declared_op_in_declaration_order() -> None:
    text = contract.render()
    headings = re.findall(r"^### `(\w+)`$", text, flags=re.M)
    assert headings == [o.name for o in contract.own_ops()]
    assert set(headings) == {name for name, o in OPS.items() if o.module.startswith("v4hal.")}
    for name in ("act_quant_inplace", "fp4_act_quant_inplace"):   # variants: reached through their op
        section = text.split(f"### `{name}`", 1)[1].split("\n### ", 1)[0]
        assert "inplace=True" in section and "Writes `x` in place" in section


def test_contract_shows_each_wrapper_signature_and_docstring() -> None:
    text = contract.render()
    section = text.split("### `grouped_gemm`", 1)[1].split("\n### ", 1)[0]
    assert "v4hal.grouped_gemm(x, w, group_offsets, *, x_scale=None, w_scale=None, out_dtype=torch.bfloat16)" in section
    assert "| `out_dtype` | `ScalarType` | `torch.bfloat16` |" in section
    assert "Recipes:" in section                                   # from the wrapper's docstring


def test_ops_md_has_a_section_for_every_declared_op() -> None:
    text = (DOCS / "ops.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^### `(\w+)`$", text, flags=re.M))
    missing = [o.name for o in contract.own_ops() if o.name not in headings]
    assert not missing, f"docs/ops.md has no section for {missing}"


@pytest.mark.parametrize("path", SHIPPED_TEXT, ids=lambda p: p.name)
def test_docs_stand_alone(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    for outside in ("../shared", "shared/spec", "V4_OPS", "ANCHORS", "ASCEND.md", "CHECKPOINT.md", "/work/"):
        assert outside not in text, f"{path.name} refers to {outside!r}, which is not in the repository"
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"^[a-z]+://", target):
            continue
        assert (path.parent / target).exists(), f"{path.name} links to {target}, which does not exist"


def test_docs_have_no_work_history() -> None:
    pattern = re.compile(r"\bissue[- ]?#?\d|\bsessions?\b|\bso far\b|\bwas lent\b", re.I)
    for path in SHIPPED_TEXT:
        hits = [line for line in path.read_text(encoding="utf-8").splitlines() if pattern.search(line)]
        assert not hits, f"{path.name}: {hits}"
