"""`fedsd simulate`: the whole federation on one machine with Flower's simulation engine (Ray).

The corpus is partitioned by the data layer, a base model is prepared if the config names none, and
every partition becomes a virtual device (one CPU each) running the real ClientApp. ``engine="inprocess"``
swaps Ray for an in-process grid: same apps, no worker processes — for tests and quick looks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsd.clients.app import make_client_app
from fedsd.clients.device import simulated_device_config
from fedsd.config import ExperimentConfig
from fedsd.data.partition import Partition
from fedsd.server.federation import FederationResult, FederationSpec, run_federation
from fedsd.server.inprocess import InProcessGrid
from fedsd.server.prepare import Prepared

Engine = Literal["ray", "inprocess"]


def run_simulation_engine(
    cfg: ExperimentConfig,
    spec: FederationSpec,
    prepared: Prepared,
    *,
    engine: Engine = "ray",
    log: Callable[[str], None] = print,
    cpus_per_client: float = 1.0,
    device_models: Path | None = None,
) -> FederationResult:
    """Run ``spec`` over one virtual device per partition client; with ``device_models`` every device
    writes its deployable model (and personal heads) to ``<device_models>/<client id>``."""
    run_dir = Path(spec.run_dir)
    n = len(Partition.load(prepared.partition).clients)
    client_app = make_client_app(
        simulated_device_config(cfg, prepared.partition, prepared.base_model, run_dir, device_models=device_models)
    )
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
