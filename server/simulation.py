"""`fedsd simulate`: the whole federation on one machine with Flower's simulation engine (Ray).

The corpus is partitioned by the data layer, a base model is prepared if the config names none, and
every partition becomes a virtual device (one CPU each) running the real ClientApp. ``engine="inprocess"``
swaps Ray for an in-process grid: same apps, no worker processes — for tests and quick looks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsd.clients.app import make_client_app
from fedsd.clients.device import (
    SIM_CACHE,
    SIM_DEVICE,
    SIM_EXITS_MIX,
    SIM_MANIFEST,
    SIM_MODEL,
    SIM_PARTITION,
    SIM_ROOT,
)
from fedsd.config import ExperimentConfig
from fedsd.data.partition import Partition
from fedsd.server.federation import FederationResult, FederationSpec, run_federation
from fedsd.server.inprocess import InProcessGrid
from fedsd.server.prepare import Prepared

Engine = Literal["ray", "inprocess"]


def client_run_config(
    cfg: ExperimentConfig, prepared: Prepared, run_dir: Path, device: str = "cpu"
) -> dict[str, Any]:
    """What each virtual device needs to find its shard and model (absolute paths)."""
    mix = cfg.federated.exits_mix or [cfg.model.exits[-1]]
    return {
        SIM_PARTITION: str(prepared.partition.resolve()),
        SIM_MANIFEST: str(cfg.data.manifest_path.resolve()),
        SIM_ROOT: str(cfg.data.root.resolve()),
        SIM_MODEL: str(prepared.base_model.resolve()),
        SIM_EXITS_MIX: ",".join(str(k) for k in mix),
        SIM_CACHE: str((run_dir / "cache").resolve()),
        SIM_DEVICE: device,
    }


def run_simulation_engine(
    cfg: ExperimentConfig,
    spec: FederationSpec,
    prepared: Prepared,
    *,
    engine: Engine = "ray",
    log: Callable[[str], None] = print,
    cpus_per_client: float = 1.0,
) -> FederationResult:
    run_dir = Path(spec.run_dir)
    n = len(Partition.load(prepared.partition).clients)
    client_app = make_client_app(client_run_config(cfg, prepared, run_dir))
    if engine == "inprocess":
        grid = InProcessGrid(client_app, [{"partition-id": i, "num-partitions": n} for i in range(n)])
        return run_federation(grid, spec, log=log)

    from flwr.simulation import run_simulation

    results: list[FederationResult] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        results.append(run_federation(grid, spec, log=log))

    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=n,
        backend_config={
            "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": os.cpu_count() or 1,
                "include_dashboard": False,
                "log_to_driver": False,
            },
        },
    )
    if not results:
        raise RuntimeError("the simulation ended without completing the federated run (see the log above)")
    return results[0]
