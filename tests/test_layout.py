"""The house's import rules (docs/architecture.md §2): each side imports only what is its own or shared.

A device install must never need the server's modules, nor the server the device's: shared pieces
(managed processes and addresses in ``fedsd.process.launch``, heads on cached features in ``fedsd.training.cached``)
live in ``fedsd/``. The simulation engines are the one place both sides meet (virtual devices run the
real ClientApp next to the ServerApp), so they alone may import the device side.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MEETING_POINTS = {"server/simulation.py"}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def crossings(side: str, other: str) -> dict[str, list[str]]:
    files = sorted((ROOT / side).glob("*.py"))
    assert files, f"no Python files under {side}/"
    found = {}
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        if rel in MEETING_POINTS:
            continue
        bad = sorted(m for m in imported_modules(path) if m == f"fedsd.{other}" or m.startswith(f"fedsd.{other}."))
        if bad:
            found[rel] = bad
    return found


@pytest.mark.parametrize(("side", "other"), [("clients", "server"), ("server", "clients")])
def test_a_side_never_imports_the_other(side: str, other: str) -> None:
    assert crossings(side, other) == {}


def test_the_library_never_imports_either_side_at_import_time() -> None:
    """``fedsd/`` is below both sides: only lazy, in-function imports (the CLI's command groups, the
    API's lazy names) may reach up, never a module-level one."""
    offenders = {}
    for path in sorted((ROOT / "fedsd").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            mods = (
                [a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            )
            bad = [m for m in mods if m.startswith(("fedsd.server", "fedsd.clients"))]
            if bad:
                offenders[path.relative_to(ROOT).as_posix()] = bad
    assert offenders == {}


def test_the_rule_sees_a_crossing(tmp_path: Path) -> None:
    """The check itself can fail: a nested import of the other side is found."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from fedsd.server.deploy import free_port\n", encoding="utf-8")
    assert "fedsd.server.deploy" in imported_modules(f)


# ------------------------------------------------------------------ the house's size rules (issue 24)
SOURCE_DIRS = ("fedsd", "server", "clients")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60
TOP_LEVEL = {"__init__.py", "api.py", "checkpoint.py", "config.py", "demo.py", "metrics.py", "report.py", "tracking.py"}
SUBPACKAGES = {"cli", "data", "model", "process", "runtime", "security", "training"}


def _sources() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py"))


def test_no_module_over_600_lines() -> None:
    long = {
        p.relative_to(ROOT).as_posix(): n
        for p in _sources()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}, f"split these modules by job (limit {MAX_MODULE_LINES} lines): {long}"


def test_no_function_over_60_lines() -> None:
    long = {}
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT).as_posix()}:{node.name}"] = n
    assert long == {}, f"split these into named helpers (limit {MAX_FUNCTION_LINES} lines): {long}"


def test_the_library_reads_as_the_architecture_page_says() -> None:
    """fedsd/ keeps a few core modules at its top and one subpackage per job, each named on the page."""
    top = {p.name for p in (ROOT / "fedsd").glob("*.py")}
    subs = {p.name for p in (ROOT / "fedsd").iterdir() if (p / "__init__.py").is_file()}
    assert top == TOP_LEVEL
    assert subs == SUBPACKAGES
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert all(f"  {name}/" in page for name in SUBPACKAGES)
    for side, glue in (("server", "server_app.py"), ("clients", "client_app.py")):
        text = (ROOT / side / glue).read_text(encoding="utf-8")
        assert len(text.splitlines()) <= 120, f"{side}/{glue} is Flower glue and stays thin"
