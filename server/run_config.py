"""What the ServerApp does with its run config: build the run spec, run the federation, record an early end.

Two ways in:
- a complete JSON spec under the run-config key ``spec``, or the absolute path of a JSON file holding
  it under ``spec-file`` (what `fedsd server start` passes);
- `flwr run .` (plain Flower) gives ``config`` (a YAML path) and ``num-server-rounds`` from
  ``[tool.flwr.app.config]``; the server then prepares what the config lacks (data, base model).

``fedsd.server.server_app`` only wires Flower's ``ServerApp`` to :func:`serve`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid

from fedsd.checkpoint import atomic_write_json
from fedsd.config import load_config
from fedsd.server.federation import FederationSpec, run_federation
from fedsd.server.strategy import NotEnoughDevices

OUTCOME_FILE = "outcome.json"
"""Why a run ended early, for `fedsd server start` (Flower's run status has no room for it)."""


def spec_from_run_config(run_config: dict, log: Callable[[str], None]) -> FederationSpec:
    """The run spec the run config names (``spec``/``spec-file``), else one prepared from ``config``."""
    if run_config.get("spec"):
        return FederationSpec.from_json(str(run_config["spec"]))
    if run_config.get("spec-file"):  # `fedsd server start` writes the spec next to the run
        path = Path(str(run_config["spec-file"]))
        try:
            return FederationSpec.from_json(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise FileNotFoundError(f"run config spec-file {path}: cannot read it ({e})") from None
    from fedsd.server.prepare import prepare_run

    cfg_path = Path(str(run_config.get("config", "configs/demo.yaml"))).resolve()
    cfg = load_config(cfg_path)
    run_dir = Path(str(run_config.get("run-dir") or f"runs/{cfg.name}-flwr")).resolve()
    prepared = prepare_run(cfg, run_dir, log=log)
    return FederationSpec(
        config=str(cfg_path),
        run_dir=str(run_dir),
        base_model=str(prepared.base_model),
        rounds=int(run_config.get("num-server-rounds", cfg.federated.rounds)),
        partition=str(prepared.partition),
    )


def serve(grid: Grid, run_config: dict, log: Callable[[str], None]) -> None:
    """Run the federation the run config names; "not enough devices" is written to ``outcome.json``."""
    spec = spec_from_run_config(run_config, log)
    try:
        result = run_federation(grid, spec, log=log)
    except NotEnoughDevices as e:
        flwr_log(logging.ERROR, f"not enough devices: {e}")
        atomic_write_json(
            Path(spec.run_dir) / OUTCOME_FILE, {"status": "not-enough-devices", "message": str(e)}
        )
        raise
    log(f"federated run finished: {result.rounds_done} rounds, final model {result.final_dir}")
