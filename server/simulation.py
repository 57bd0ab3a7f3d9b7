"""`fedsd simulate`: the whole federation on one machine, or on a Ray cluster, with Flower's simulation engine.

The corpus is partitioned by the data layer, a base model is prepared if the config names none, and
every partition becomes a virtual device running the real ClientApp. Ray places the devices: on a private
Ray started on this machine (all its cores), or — with ``ray_address`` — on a running cluster that this
process joins as a driver and only disconnects from at the end (the cluster keeps running).
``engine="inprocess"`` swaps Ray for an in-process grid: same apps, no workers — tests and quick looks.

On a cluster every worker needs the same fedsd environment and must see the same paths (corpus, run
directory, base model) as this machine, e.g. through a shared file system.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsd.checkpoint import atomic_write_json
from fedsd.clients.client_app import make_client_app
from fedsd.clients.device import simulated_device_config
from fedsd.config import ExperimentConfig, config_to_yaml, load_config, resolve_config_path
from fedsd.data.partition import Partition
from fedsd.server.federation import FederationResult as RunResult
from fedsd.server.federation import FederationSpec, exits_in, run_federation
from fedsd.server.inprocess import InProcessGrid
from fedsd.server.prepare import Prepared, prepare_run

Engine = Literal["ray", "inprocess"]
Log = Callable[[str], None]
SETTINGS_FILE = "simulation.json"
"""How a simulation ran (engine, client resources, the Ray cluster it saw), in the run directory."""
WORKER_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE")
"""Forwarded to Ray workers (a cluster's workers were started elsewhere, with their own environment)."""


@dataclass
class FederationResult(RunResult):
    """What a simulation gives back (besides everything it wrote into ``run_dir``)."""

    report: Path | None = None
    """``report.md`` of the run (tables and plots beside it)."""
    global_metrics: dict[int, list[dict[str, float]]] = field(default_factory=dict)
    """Exit → one entry per round (round 0 = the base model): ``round``, ``uar``, ``wa``, ``f1`` on the
    server's unseen speakers."""
    personal: dict[str, Any] = field(default_factory=dict)
    """Devices' final personal-test metrics: tag (``global``, ``personal``) → exit → metric → mean, std, n."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Engine, devices, client resources and the Ray cluster seen (also in ``RUN/simulation.json``)."""

    @classmethod
    def from_run(cls, run: RunResult, settings: Mapping[str, Any]) -> FederationResult:
        per_exit: dict[int, list[dict[str, float]]] = {}
        for k in exits_in(run.history):
            per_exit[k] = [
                {"round": float(r["round"])} | {m: float(r[f"exit{k}/{m}"]) for m in ("uar", "wa", "f1")}
                for r in run.history
                if all(f"exit{k}/{m}" in r for m in ("uar", "wa", "f1"))
            ]
        final = (run.history[-1].get("final") or {}) if run.history else {}
        report = run.run_dir / "report.md"
        return cls(
            run.run_dir, run.rounds_done, run.history, run.final_dir,
            report=report if report.exists() else None, global_metrics=per_exit,
            personal=dict(final.get("personal") or {}), settings=dict(settings),
        )  # fmt: skip


def check_simulation_args(
    engine: str = "ray",
    ray_address: str | None = None,
    cpus_per_client: float | None = None,
    gpus_per_client: float | None = None,
) -> None:
    """Refuse unusable engine/resource settings before any work starts (ValueError naming the flag)."""
    if engine not in ("ray", "inprocess"):
        raise ValueError(f"--engine {engine!r}: use ray (Flower's simulation engine) or inprocess")
    if cpus_per_client is not None and not _number(cpus_per_client, lambda v: v > 0):
        raise ValueError(
            f"--cpus-per-client {cpus_per_client!r} (federated.cpus_per_client): CPU cores per virtual "
            "device must be > 0; fractions are allowed (0.5 puts two devices on one core)"
        )
    if gpus_per_client is not None and not _number(gpus_per_client, lambda v: v >= 0):
        raise ValueError(
            f"--gpus-per-client {gpus_per_client!r} (federated.gpus_per_client): GPUs per virtual "
            "device must be >= 0 (0: CPU only; 0.25: four devices share one GPU)"
        )
    if ray_address is not None:
        if (
            not isinstance(ray_address, str)
            or not ray_address.strip()
            or any(c.isspace() for c in ray_address)
        ):
            raise ValueError(
                f"--ray-address {ray_address!r}: give the head's HOST:PORT (what `ray start --head` printed) or auto"
            )
        if engine != "ray":
            raise ValueError("--ray-address joins a Ray cluster: it needs --engine ray")


def _number(value: Any, ok: Callable[[float], bool]) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and ok(value)
    )


def _worker_env() -> dict[str, str]:
    """Ray workers import fedsd from this interpreter's path, offline and without Flower telemetry."""
    from fedsd.process.launch import FLOWER_ENV

    paths = [*sys.path, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    return env | FLOWER_ENV | {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}


@contextmanager
def ray_session(address: str | None) -> Iterator[dict[str, Any]]:
    """Connect this process to Ray for one simulation and describe the cluster it sees.

    ``address=None`` starts a private Ray on this machine (all its cores; GPUs detected) that ends
    with the session; otherwise this process joins the running cluster as a driver, and leaving it
    only disconnects (``ray.shutdown`` on a joined driver never stops the cluster). If Ray is already
    connected in this process, that connection is used.
    """
    import ray

    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING,
                                  "runtime_env": {"env_vars": _worker_env()}}  # fmt: skip
        if address is None:  # "local": never join a cluster named by RAY_ADDRESS by accident
            kwargs |= {"address": "local", "num_cpus": os.cpu_count() or 1, "include_dashboard": False}
        else:
            kwargs["address"] = address
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            if address is None:
                raise
            raise ConnectionError(
                f"cannot join the Ray cluster at {address}: {e}. Start one with `ray start --head --port 6379` "
                "(on each worker: `ray start --address HEAD:6379`), or drop --ray-address to run on this machine"
            ) from None
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources")]
        yield {
            "address": address,
            "joined_cluster": address is not None,
            "job_id": ray.get_runtime_context().get_job_id(),
            "cluster_resources": {
                k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")
            },
            "nodes": [
                {
                    "node_id": n["NodeID"],
                    "address": n["NodeManagerAddress"],
                    "CPU": n["Resources"].get("CPU", 0.0),
                    "GPU": n["Resources"].get("GPU", 0.0),
                }
                for n in nodes
            ],  # fmt: skip
        }
    finally:
        if ray.is_initialized():  # Flower's backend normally disconnected already
            ray.shutdown()


def devices_at_once(nodes: list[dict[str, Any]], cpus: float, gpus: float) -> int:
    """How many virtual devices the cluster runs in parallel (Flower's per-node actor count)."""
    fits = 0
    for n in nodes:
        here = int(n["CPU"] / cpus)
        if gpus > 0:
            here = min(here, int(n["GPU"] / gpus))
        fits += here
    return fits


def run_simulation_engine(
    cfg: ExperimentConfig,
    spec: FederationSpec,
    prepared: Prepared,
    *,
    engine: Engine = "ray",
    log: Log = print,
    cpus_per_client: float | None = None,
    gpus_per_client: float | None = None,
    ray_address: str | None = None,
    device_models: Path | None = None,
) -> FederationResult:
    """Run ``spec`` over one virtual device per partition client; with ``device_models`` every device
    writes its deployable model (and personal heads) to ``<device_models>/<client id>``. Resources and
    the cluster address default to the config's ``federated.cpus_per_client/gpus_per_client/ray_address``."""
    fc = cfg.federated
    cpus = fc.cpus_per_client if cpus_per_client is None else cpus_per_client
    gpus = fc.gpus_per_client if gpus_per_client is None else gpus_per_client
    address = ray_address or (fc.ray_address if engine == "ray" else None)  # inprocess ignores the config's
    check_simulation_args(engine, address, cpus, gpus)
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    n = len(Partition.load(prepared.partition).clients)
    device = "cuda" if gpus > 0 else "cpu"
    client_app = make_client_app(
        simulated_device_config(
            cfg, prepared.partition, prepared.base_model, run_dir, device=device, device_models=device_models
        )
    )
    settings: dict[str, Any] = {"engine": engine, "num_clients": n, "device": device,
                                "client_resources": {"num_cpus": float(cpus), "num_gpus": float(gpus)}}  # fmt: skip
    if engine == "inprocess":
        grid = InProcessGrid(client_app, [{"partition-id": i, "num-partitions": n} for i in range(n)])
        atomic_write_json(run_dir / SETTINGS_FILE, settings)
        return FederationResult.from_run(run_federation(grid, spec, log=log), settings)

    with ray_session(address) as ray_info:
        ray_info["devices_at_once"] = devices_at_once(ray_info["nodes"], cpus, gpus)
        settings["ray"] = ray_info
        atomic_write_json(run_dir / SETTINGS_FILE, settings)
        res = ray_info["cluster_resources"]
        where = f"the Ray cluster at {address}" if address else "a private Ray on this machine"
        log(
            f"{where}: {len(ray_info['nodes'])} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU; "
            f"{n} devices, up to {ray_info['devices_at_once']} at once ({cpus:g} CPU, {gpus:g} GPU each)"
        )
        if ray_info["devices_at_once"] < 1:
            raise ValueError(
                f"no Ray node can host one virtual device with --cpus-per-client {cpus:g} and "
                f"--gpus-per-client {gpus:g} (cluster: {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU); "
                "lower them or add workers (`ray start --address HEAD:PORT`)"
            )
        results = _run_on_ray(client_app, spec, n, cpus, gpus, log)
    if not results:
        raise RuntimeError("the simulation ended without completing the federated run (see the log above)")
    return FederationResult.from_run(results[0], settings)


def _run_on_ray(
    client_app: ClientApp, spec: FederationSpec, n: int, cpus: float, gpus: float, log: Log
) -> list[RunResult]:
    """Flower's simulation engine over ``n`` virtual devices: a ServerApp that runs the federation
    beside the real ClientApp; returns the run's result (none when the ServerApp failed)."""
    from flwr.simulation import run_simulation

    results: list[RunResult] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        results.append(run_federation(grid, spec, log=log))

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=n,
        backend_config={"client_resources": {"num_cpus": float(cpus), "num_gpus": float(gpus)}},
    )
    return results


def simulate(
    config: ExperimentConfig | str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None = None,
    engine: Engine = "ray",
    resume: bool = False,
    device_models: bool = False,
    base_model: str | os.PathLike[str] | None = None,
    ray_address: str | None = None,
    cpus_per_client: float | None = None,
    gpus_per_client: float | None = None,
    progress: Any | None = None,
    log: Log = print,
    federation_dir: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> FederationResult:
    """Partition the config's corpus into virtual devices, prepare the base model (trained centrally if
    the config names none) and federate the devices for ``federated.rounds`` rounds.

    ``config``: a YAML path or an ExperimentConfig; ``overrides``: dotted fields (``{"federated.rounds":
    2}``). ``out`` holds data split, central model and the run (default ``runs/<name>-sim``);
    ``federation_dir`` puts the federated run elsewhere (the demo: ``out/federated``). ``ray_address``,
    ``cpus_per_client`` and ``gpus_per_client`` override the config's ``federated.*`` fields of the same
    names. ``progress`` (a rich Progress) shows the central training. ``device_models``: every device
    keeps its deployable model in ``<run>/device-models/<client id>``.
    """
    check_simulation_args(engine, ray_address, cpus_per_client, gpus_per_client)
    over = dict(overrides or {})
    for key, value in (("ray_address", ray_address), ("cpus_per_client", cpus_per_client),
                       ("gpus_per_client", gpus_per_client)):  # fmt: skip
        if value is not None:
            over[f"federated.{key}"] = value
    if isinstance(config, ExperimentConfig):  # the server side reloads its config by path
        config = _written(config, Path(out or Path("runs") / f"{config.name}-sim"))
    cfg = load_config(config, over)
    run_dir = Path(out or Path("runs") / f"{cfg.name}-sim").resolve()
    fed_dir = Path(federation_dir).resolve() if federation_dir else run_dir
    prepared = prepare_run(
        cfg, run_dir, log=log, progress=progress, base_model=Path(base_model) if base_model else None
    )
    spec = FederationSpec(
        config=str(resolve_config_path(config).resolve()), run_dir=str(fed_dir), base_model=str(prepared.base_model),
        partition=str(prepared.partition), resume=resume, overrides=over,
    )  # fmt: skip
    log(f"simulating {cfg.federated.rounds} rounds with the {engine} engine → {fed_dir}")
    return run_simulation_engine(
        cfg, spec, prepared, engine=engine, log=log,
        device_models=fed_dir / "device-models" if device_models else None,
    )  # fmt: skip


def _written(cfg: ExperimentConfig, run_dir: Path) -> Path:
    """An in-memory config as ``<run_dir>/config.yaml``."""
    path = run_dir.resolve() / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_yaml(cfg), encoding="utf-8")
    return path
