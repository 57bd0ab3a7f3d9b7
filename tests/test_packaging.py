"""What `pip install` gives a user: server/ and clients/ inside the `fedsd` namespace
(docs/architecture.md), the configs as package data, and a `fedsd` command that works from any directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsd.config import ConfigError, load_config, resolve_config_path, shipped_configs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip wheel .` builds from this checkout's files (no network: the venv's setuptools).

    The build runs on a copy of the files git would commit, as in a fresh clone: setuptools reuses an
    in-tree build/ folder, whose stale files would otherwise hide a file missing from the package data.
    """
    src = tmp_path_factory.mktemp("src")
    parts = ["pyproject.toml", "README.md", "LICENSE", "fedsd", "server", "clients", "configs"]
    git = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "--", *parts],
                         cwd=REPO, capture_output=True, text=True)  # fmt: skip
    if git.returncode == 0:
        listed = git.stdout.splitlines()
    else:  # not a git checkout (an unpacked archive): every file but caches
        listed = [
            p for part in parts
            for p in ([part] if (REPO / part).is_file() else
                      [str(f.relative_to(REPO)) for f in sorted((REPO / part).rglob("*")) if "__pycache__" not in f.parts])
        ]  # fmt: skip
    for rel in listed:
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    wheel_dir = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir),
         str(src)],
        check=True, capture_output=True,
    )  # fmt: skip
    (built,) = wheel_dir.glob("fedsd-*.whl")
    return built

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


def test_regular_install_has_no_generic_top_level_modules(tmp_path: Path, wheel: Path) -> None:
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


def test_wheel_ships_configs_and_license(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in shipped_configs():
        assert f"fedsd/configs/{name}.yaml" in names, sorted(n for n in names if "configs" in n)
    assert "fedsd/configs/backbones/tiny-8layers/config.json" in names
    assert "fedsd-0.1.0.dist-info/licenses/LICENSE" in names
    assert "Apache License" in (REPO / "LICENSE").read_text() and "Version 2.0" in (REPO / "LICENSE").read_text()


def test_wheel_ships_every_source_module(wheel: Path) -> None:
    """A subpackage left out of pyproject's explicit package list would install a broken fedsd."""
    names = set(zipfile.ZipFile(wheel).namelist())
    prefix = {"fedsd": "fedsd", "server": "fedsd/server", "clients": "fedsd/clients"}
    missing = [
        f"{prefix[part]}/{path.relative_to(REPO / part).as_posix()}"
        for part in prefix
        for path in sorted((REPO / part).rglob("*.py"))
        if f"{prefix[part]}/{path.relative_to(REPO / part).as_posix()}" not in names
    ]
    assert missing == []


def test_wheel_in_a_fresh_venv_runs_from_any_directory(tmp_path: Path, wheel: Path) -> None:
    """Install the wheel into a brand-new venv outside the checkout and run `fedsd` from a temp dir.

    Only fedsd itself is installed (`pip install --no-deps`): torch, Flower and the rest come from this
    project's .venv through a .pth file that appends its site-packages to the fresh venv's sys.path, so the
    test takes seconds instead of a 2 GB install. A plain path line in a .pth is not a site dir, so the
    .venv's editable-install finder never runs: `fedsd` must come from the wheel, and the assertion on
    `fedsd.__file__` checks that it does.
    """
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
        check=True, capture_output=True,
    )  # fmt: skip
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())  # fmt: skip
    (site / "zz_fedsd_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def fedsd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([venv / "bin" / "fedsd", *args], cwd=cwd, env=env, capture_output=True, text=True)

    where = subprocess.run([py, "-c", "import fedsd; print(fedsd.__file__)"], cwd=cwd, env=env,
                           check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    assert where == str(site / "fedsd" / "__init__.py")
    shown = fedsd("config", "show", "demo")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == (REPO / "configs" / "demo.yaml").read_text(encoding="utf-8")
    listed = fedsd("config", "list")
    assert listed.returncode == 0 and [ln.split()[0] for ln in listed.stdout.splitlines()] == list(shipped_configs())
    helped = fedsd("--help")
    assert helped.returncode == 0, helped.stderr
    assert all(cmd in helped.stdout for cmd in ("demo", "config", "train", "server"))
    # the documented `--config configs/demo.yaml` resolves to the shipped file, not to a missing cwd path
    probe = "from fedsd.config import load_config, resolve_config_path as r; print(r('configs/demo.yaml'))"
    found = subprocess.run([py, "-c", probe], cwd=cwd, env=env, check=True, capture_output=True, text=True)
    assert found.stdout.strip() == str(site / "fedsd" / "configs" / "demo.yaml")
    assert sorted(p.name for p in cwd.iterdir()) == []  # nothing written into the working directory


def test_config_lookup_by_name_path_and_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/ here, as after `pip install`
    assert resolve_config_path("demo") == REPO / "configs" / "demo.yaml"
    assert resolve_config_path("scratch.yaml") == REPO / "configs" / "scratch.yaml"
    assert resolve_config_path("configs/demo.yaml") == REPO / "configs" / "demo.yaml"
    assert load_config("demo", {"train.epochs": 2}).train.epochs == 2
    mine = tmp_path / "demo"  # an explicit file wins over the shipped name
    mine.write_text("name: mine\n")
    assert resolve_config_path("demo") == Path("demo") and load_config("demo").name == "mine"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text("name: local\n")
    assert load_config("configs/demo.yaml").name == "local"
    for missing in ("nope", "other/demo.yaml", "configs/nope.yaml"):
        with pytest.raises(ConfigError, match=r"config file not found \(shipped configs: crema-d, demo"):
            resolve_config_path(missing)


def test_config_commands() -> None:
    from fedsd.cli.main import app

    runner = CliRunner()
    shown = runner.invoke(app, ["config", "show", "scratch"])
    assert shown.exit_code == 0 and shown.stdout == (REPO / "configs" / "scratch.yaml").read_text()
    listed = runner.invoke(app, ["config", "list"])
    assert listed.exit_code == 0
    assert "demo     The offline demo: synthetic emotional speech" in listed.stdout
    bad = runner.invoke(app, ["config", "show", "nope"])
    assert bad.exit_code == 2 and "nope: config file not found" in bad.output
