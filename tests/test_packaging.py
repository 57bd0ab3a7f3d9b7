"""The installed package keeps server/ and clients/ inside the `fedsd` namespace (DESIGN.md §2)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, json, sys
out = {m: (importlib.util.find_spec(m).origin if importlib.util.find_spec(m) else None)
       for m in ("fedsd", "fedsd.server", "fedsd.clients", "server", "clients")}
print(json.dumps(out))
"""


def _probe(cwd: Path, extra_path: Path | None = None) -> dict[str, str | None]:
    import json
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    res = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, check=True
    )
    return json.loads(res.stdout)


def test_editable_install_maps_namespace(tmp_path: Path) -> None:
    found = _probe(tmp_path)
    assert found["fedsd.server"] == str(REPO / "server" / "__init__.py")
    assert found["fedsd.clients"] == str(REPO / "clients" / "__init__.py")
    assert found["server"] is None and found["clients"] is None


@pytest.mark.slow
def test_regular_install_has_no_generic_top_level_modules(tmp_path: Path) -> None:
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheel_dir.glob("fedsd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "server" not in tops and "clients" not in tops, tops
    assert "fedsd/server/__init__.py" in names and "fedsd/clients/__init__.py" in names
    assert "fedsd/clients/training.py" in names

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    found = _probe(run_dir, extra_path=target)
    assert found["fedsd.server"] == str(target / "fedsd" / "server" / "__init__.py")
    assert found["fedsd.clients"] == str(target / "fedsd" / "clients" / "__init__.py")
    assert found["server"] is None and found["clients"] is None
