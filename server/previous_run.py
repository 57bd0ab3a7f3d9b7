"""An earlier run in the run directory: what a resume reuses, what a fresh start sets aside, what it read back.

Why set aside: without it a fresh run that fails before its round 0 leaves the old ``state.json`` in
place, and the printed ``--resume`` hint would continue the *previous* run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedsd.config import ExperimentConfig
    from fedsd.server.federation import FederationSpec

PREVIOUS_RUN_FILES = (
    "state.json",
    "spec.json",
    "metrics.jsonl",
    "rounds",
    "final",
    "outcome.json",
    "central_dp.json",
)
"""What a fresh start moves out of the run directory (never the data, partition or base model)."""


def resume_spec(run_dir: Path) -> tuple[FederationSpec, str] | None:
    """(spec, where it came from) of an earlier run in ``run_dir``, or None."""
    from fedsd.server.federation import FederationSpec

    spec_path = run_dir / "spec.json"
    if spec_path.is_file():
        return FederationSpec.from_json(spec_path.read_text(encoding="utf-8")), str(spec_path)
    state_path = run_dir / "state.json"
    if state_path.is_file():
        state = json.loads(state_path.read_text(encoding="utf-8"))
        if isinstance(state.get("spec"), dict):
            return FederationSpec(**state["spec"]), str(state_path)
    return None


def set_aside_previous_run(run_dir: Path) -> Path | None:
    """Move an earlier run's progress out of ``run_dir`` before a fresh (not resumed) start.

    Without this a fresh run that fails before its round 0 leaves the old ``state.json`` in place,
    and the printed ``--resume`` hint would continue the *previous* run. Everything goes to
    ``run_dir/previous/<UTC time>/`` (nothing is deleted); returns that directory, or None when
    there was nothing to move.
    """
    present = [run_dir / name for name in PREVIOUS_RUN_FILES if (run_dir / name).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest = run_dir / "previous" / stamp
    n = 1
    while dest.exists():
        n += 1
        dest = run_dir / "previous" / f"{stamp}-{n}"
    dest.mkdir(parents=True)
    for path in present:
        os.replace(path, dest / path.name)
    return dest


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def central_dp_change(state: dict[str, Any], cfg: ExperimentConfig) -> tuple[str, str] | None:
    """(message, level) when a resume changes central DP from what ``state.json`` says the run used.

    Nothing is refused: the ServerApp composes ε over every σ (``fedsd.server.central_dp``); this says
    so before the run starts, and warns where the accounting can no longer promise a bound.
    """
    done = int(state.get("completed_round") or 0)
    if done <= 0:
        return None
    saved = state.get("central_dp")
    rounds = saved.get("rounds") if isinstance(saved, dict) else None
    used = sorted({float(v) for v in (rounds or {}).values() if isinstance(v, int | float)})
    new = cfg.federated.central_dp
    if new is None and saved:
        return (
            f"resume: central DP is off from round {done + 1} on (rounds 1..{done} used σ "
            f"{', '.join(f'{v:g}' for v in used) or '?'}): the heads released from now on are not noised "
            "and no ε is reported for them",
            "warn",
        )
    if new is not None and not saved:
        return (
            f"resume: central DP is switched on after {done} round(s) released without it: its ε is ∞ "
            "(no bound covers those rounds); start a new run for a finite ε",
            "warn",
        )
    if new is not None and used and used != [float(new.noise_multiplier)]:
        return (
            f"resume: central DP σ {new.noise_multiplier:g} after σ {', '.join(f'{v:g}' for v in used)}: "
            "ε composes over every round's σ (state.json keeps them)",
            "info",
        )
    return None
