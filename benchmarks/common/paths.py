"""Where things are, and the environment every benchmark runs in (offline, no telemetry).

Importing this module makes the checkout's ``fedsd`` importable without an install.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
ROOT = BENCH.parent
if str(ROOT) not in sys.path:  # a checkout without an install still runs
    sys.path.insert(0, str(ROOT))
DEMO = ROOT / "configs" / "demo.yaml"  # the demo: Whisper tiny.en, pretrained
# The benchmarks' default recipe: the from-scratch tiny model, the setting of the published from-scratch
# results (a pretrained run passes --config configs/demo.yaml).
RECIPE = ROOT / "configs" / "scratch.yaml"
RESULTS = BENCH / "results"
EMOTIONS = ("neutral", "happy", "angry", "sad")
# what decides a benchmark's numbers: an uncommitted change here makes the tree's code "dirty"
CODE_PATHS = ("fedsd", "server", "clients", "benchmarks", "configs", "pyproject.toml")
WORK_STAMP = "bench-work.json"
FEDERATED_WORK = "federated"  # the default work directory of the federated benchmarks

# offline, no telemetry or update checks: set unless the caller chose otherwise (child processes get it too)
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_DISABLE_USAGE_STATS": "1",
}
for _key, _value in ENV.items():
    os.environ.setdefault(_key, _value)


def quiet(_: str) -> None:
    """A log that says nothing (for library calls that take a ``log``)."""
