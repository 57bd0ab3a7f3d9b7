"""The README's Python-API example runs as written: train, evaluate, predict, export to ONNX, predict again.

The example is read from README.md's "## Python API" section (else from .notes/readme-api.md, where it
waits to be merged), so the documented code is the tested code.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def api_example() -> str:
    """The first ```python block of the "## Python API" section (README.md first)."""
    for source in (REPO / "README.md", REPO / ".notes" / "readme-api.md"):
        if not source.is_file():
            continue
        text = source.read_text(encoding="utf-8")
        section = re.search(r"^## Python API\n(.*?)(?=^## |\Z)", text, re.S | re.M)
        if section:
            block = re.search(r"```python\n(.*?)```", section.group(1), re.S)
            assert block, f"{source}: the Python API section has no ```python block"
            return block.group(1)
    pytest.fail("no '## Python API' section in README.md or .notes/readme-api.md")


def test_readme_python_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    monkeypatch.chdir(tmp_path)  # the example's runs/ land here
    ns: dict = {}
    exec(compile(api_example(), "README.md (Python API)", "exec"), ns)

    report, preds, onnx_preds, graph = ns["report"], ns["preds"], ns["onnx_preds"], ns["graph"]
    assert sorted(report.reports) == [1, 2, 3, 4] and report.n > 0
    assert set(report.to_dict()["exits"]) == {"1", "2", "3", "4"}
    assert len(preds) == len(onnx_preds) == 2 and not any(p.error for p in preds + onnx_preds)
    assert all(p.exit in (1, 2, 3, 4) for p in preds)
    assert graph.path.is_file() and graph.exits == [2] and graph.format == "onnx"
    assert all(p.exit == 2 for p in onnx_preds)  # a single-exit graph answers at its exit
    names = set(report.label_names)
    assert all(p.label in names and abs(sum(p.probs.values()) - 1) < 1e-4 for p in preds + onnx_preds)
