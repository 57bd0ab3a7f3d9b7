"""The exit-latency benchmark runs end to end on the tiny backbone and writes its table, JSON and plot.

Only the plumbing is checked: timings on a shared CI machine are too noisy for assertions on targets.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "exit_latency.py"

pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")


def load_script():
    spec = importlib.util.spec_from_file_location("exit_latency", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exit_latency_smoke(tmp_path, capsys):
    bench = load_script()
    assert bench.default_exits(12) == [3, 6, 9, 12] and bench.default_exits(4) == [1, 2, 3, 4]
    assert set(bench.CLOCKS) == {"wall", "cpu"}
    out = bench.main(
        [
            "--backbone",
            "tiny",
            "--seconds",
            "0.5",
            "--repeats",
            "3",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--json",
            str(tmp_path / "r.json"),
            "--plot",
            str(tmp_path / "r.png"),
        ]
    )
    printed = capsys.readouterr().out
    assert "| exit | median ms |" in printed and "plain HF" in printed and "targets:" in printed
    data = json.loads((tmp_path / "r.json").read_text())
    assert [r["exit"] for r in data["rows"]] == [1, 2, 3, 4] == [r["exit"] for r in out["rows"]]
    assert data["setup"]["threads"] == 1 and data["setup"]["samples"] == 8000
    for r in data["rows"]:
        assert r["median_ms"] > 0 and r["ideal_ms"] > 0 and r["ratio_to_ideal"] > 0
    assert set(data["samples_s"]) >= {"hf", "front", "head", "layer1", "layer4", "exit4"}
    assert all(len(v) == 3 for v in data["samples_s"].values())
    assert set(data["targets"]) == {"exits_within_10pct_of_ideal", "full_within_5pct_of_hf"}
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
