"""The documented Python API runs as written, and tools see it.

The examples are the ```python blocks of docs/python-api.md (the first: train, evaluate, predict, export to
ONNX, predict again; the "Data and pretraining" one: synthetic corpus, manifest check, partition), so the
documented code is the tested code.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "python-api.md"


def doc_example(section: str | None = None) -> str:
    """The first ```python block of docs/python-api.md, or of its ``## <section>`` part."""
    text = DOC.read_text(encoding="utf-8")
    if section is not None:
        found = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
        assert found, f"{DOC}: no '## {section}' section"
        text = found.group(1)
    block = re.search(r"```python\n(.*?)```", text, re.S)
    assert block, f"{DOC}: no ```python block" + (f" in '## {section}'" if section else "")
    return block.group(1)


def test_documented_python_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/ here: "scratch" is the shipped config; runs/ land here
    ns: dict = {}
    exec(compile(doc_example(), "docs/python-api.md (Python API)", "exec"), ns)
    report, preds, onnx_preds, graph = ns["report"], ns["preds"], ns["onnx_preds"], ns["graph"]
    assert sorted(report.reports) == [1, 2, 3, 4] and report.n > 0
    assert set(report.to_dict()["exits"]) == {"1", "2", "3", "4"}
    assert len(preds) == len(onnx_preds) == 2 and not any(p.error for p in preds + onnx_preds)
    assert all(p.exit in (1, 2, 3, 4) for p in preds)
    assert graph.path.is_file() and graph.exits == [2] and graph.format == "onnx"
    assert all(p.exit == 2 for p in onnx_preds)  # a single-exit graph answers at its exit
    names = set(report.label_names)
    assert all(p.label in names and abs(sum(p.probs.values()) - 1) < 1e-4 for p in preds + onnx_preds)


def test_documented_data_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(doc_example("Data and pretraining from Python"), "docs/python-api.md (data)", "exec"), ns)
    corpus, rows, checked, part, csvs = ns["corpus"], ns["rows"], ns["checked"], ns["part"], ns["device_csvs"]
    assert corpus.n_files == len(rows) == 6 * 2 * 4 and checked.ok and len(checked.usable) == len(rows)
    assert part.num_clients == 2 and len(csvs) == 2 and all(p.is_file() for p in csvs)
    assert (tmp_path / "runs" / "data-example" / "part.json").is_file()


# --- the API as tools see it: TYPE_CHECKING imports, laziness, a type checker, the data functions


def _type_checking_imports() -> dict[str, str]:
    """name → "module:attr" of every import inside fedsd/api.py's ``if TYPE_CHECKING:`` block."""
    import ast

    tree = ast.parse((REPO / "fedsd" / "api.py").read_text(encoding="utf-8"))
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom), ast.dump(imp)
                for alias in imp.names:
                    found[alias.asname or alias.name] = f"{imp.module}:{alias.name}"
    return found


def test_type_checking_imports_are_the_lazy_names() -> None:
    from fedsd import api

    assert _type_checking_imports() == api._TARGETS  # same names, same targets: they cannot drift apart
    assert dir(api) == api.__all__ == sorted(api._TARGETS)
    for name in api.__all__:
        assert getattr(api, name) is not None
    with pytest.raises(AttributeError, match="the API is: BadFile, CheckResult"):
        api.nope  # noqa: B018


def test_import_stays_light_and_data_api_needs_no_torch() -> None:
    import subprocess
    import sys

    probe = (
        "import sys\nfrom fedsd import api\n"
        "api.load_config; api.check_manifest; api.scan_corpus; api.read_manifest; api.partition_manifest\n"
        "print(sorted(m for m in ('torch', 'flwr', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_type_checker_sees_the_api(tmp_path: Path) -> None:
    """mypy resolves `api.X` to the real signatures: a misuse is an error, the documented use is clean.

    Without the TYPE_CHECKING imports every `api.X` is Any (module `__getattr__`) and `bad.py` passes.
    """
    import subprocess
    import sys

    (tmp_path / "good.py").write_text(
        "from pathlib import Path\nfrom fedsd import api\n\n"
        "cfg: api.ExperimentConfig = api.load_config('demo', overrides={'train.epochs': 1})\n"
        "checked: api.CheckResult = api.check_manifest('m.csv', 'data')\n"
        "rows: list[api.ManifestRow] = checked.usable\n"
        "names: list[str] = list(api.shipped_configs())\n"
        "settings = api.PretrainSettings(epochs=2)\n"
    )
    (tmp_path / "bad.py").write_text(
        "from fedsd import api\n\n"
        "epochs: str = api.load_config('demo').train.epochs\n"
        "api.check_manifest('m.csv', 'data', min_seconds='long')\n"
        "api.PretrainSettings(epoch=2)\n"
    )
    res = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"),
         str(tmp_path / "good.py"), str(tmp_path / "bad.py")],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    errors = [ln for ln in res.stdout.splitlines() if ": error:" in ln]
    assert not [e for e in errors if "good.py" in e], res.stdout
    assert any(
        'bad.py:3: error: Incompatible types in assignment (expression has type "int"' in e for e in errors
    )
    assert any('bad.py:4: error: Argument "min_seconds" to "check_manifest"' in e for e in errors), res.stdout
    assert any('bad.py:5: error: Unexpected keyword argument "epoch"' in e for e in errors), res.stdout


def test_check_manifest_reports_each_unusable_file(tmp_path: Path) -> None:
    import numpy as np
    import soundfile as sf

    from fedsd import api

    sr = 16000
    sf.write(tmp_path / "ok.wav", (0.1 * np.sin(np.arange(sr) / 5)).astype("float32"), sr)
    sf.write(tmp_path / "short.wav", np.zeros(160, dtype="float32") + 0.1, sr)
    (tmp_path / "junk.wav").write_bytes(b"not a wav at all")

    def row(name: str) -> object:
        return api.ManifestRow(utt_id=name, path=f"{name}.wav", label="happy", orig_label="happy", speaker="s1",
                               dataset="t", duration=1.0, sample_rate=sr)  # fmt: skip

    manifest = api.write_manifest([row(n) for n in ("ok", "short", "junk", "gone")], tmp_path / "m.csv")
    seen: list[tuple[int, int]] = []
    res = api.check_manifest(manifest, tmp_path, min_seconds=0.5, progress=lambda d, t: seen.append((d, t)))
    assert not res.ok and [r.utt_id for r in res.usable] == ["ok"]
    reasons = {b.row.utt_id: b.reason for b in res.bad}
    assert sorted(reasons) == ["gone", "junk", "short"]
    assert reasons["gone"] == "file not found" and "shorter" in reasons["short"]
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert api.check_manifest(manifest, tmp_path).bad[0].row.utt_id == "junk"  # min_seconds 0: short is fine
