"""`fedsd simulate`: partition a corpus into virtual devices and federate them with Flower's simulation engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from fedsd.tracking import MLFLOW_HELP, TENSORBOARD_HELP, tracking_overrides

console = Console()


def simulate_command(
    config: Path = typer.Option(..., "--config", "-c", help="Experiment YAML (see configs/)."),
    clients: int | None = typer.Option(None, "--clients", help="Number of devices (federated.num_clients)."),
    rounds: int | None = typer.Option(None, "--rounds", help="Federated rounds (federated.rounds)."),
    label_fraction: float | None = typer.Option(None, help="Labelled fraction on each device."),
    exits_mix: str | None = typer.Option(None, help="Device exits dealt round-robin, e.g. 3,6,9."),
    by: str | None = typer.Option(None, help="Partition by speaker, dirichlet or iid."),
    alpha: float | None = typer.Option(None, help="Dirichlet concentration (with --by dirichlet)."),
    mode: str | None = typer.Option(None, help="sd (self-distillation) or ce (labelled CE only)."),
    base_model: Path | None = typer.Option(None, help="Federate this checkpoint instead of training one."),
    out: Path | None = typer.Option(None, "--out", help="Run directory (default runs/<name>-sim)."),
    engine: str = typer.Option("ray", help="ray (Flower's simulation engine) or inprocess (no workers)."),
    resume: bool = typer.Option(False, help="Continue an interrupted run from its last completed round."),
    personalize_epochs: int | None = typer.Option(
        None, "--personalize-epochs", min=0,
        help="After the last round each device fine-tunes private heads this many epochs (federated.personalize_epochs).",
    ),
    device_models: bool = typer.Option(
        False, "--device-models",
        help="Every device writes its deployable model to RUN/device-models/<client id> (+ personal/).",
    ),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="Join this running Ray cluster (HOST:PORT of `ray start --head`, or auto)."
    ),
    cpus_per_client: float | None = typer.Option(None, help="CPU cores per device, > 0, fractions allowed (1)."),
    gpus_per_client: float | None = typer.Option(None, help="GPUs per device, >= 0; 0.25: four share a GPU (0)."),
    tensorboard: Path | None = typer.Option(None, "--tensorboard", metavar="DIR", help=TENSORBOARD_HELP),
    mlflow_uri: str | None = typer.Option(None, "--mlflow-uri", metavar="URI", help=MLFLOW_HELP),
    set_: list[str] | None = typer.Option(None, "--set", help="Any config field: --set federated.lr=0.01"),
) -> None:
    """Simulate federated self-distillation over devices partitioned from a corpus.

    Example: [bold]fedsd simulate --config configs/demo.yaml --clients 8 --rounds 5 --label-fraction 0.2 --exits-mix 1,2,3[/]
    On a Ray cluster: [bold]fedsd simulate -c configs/demo.yaml --ray-address HEAD:6379 --cpus-per-client 2[/]
    """
    from fedsd.cli.train import _fail, progress_bar
    from fedsd.server.federation import FederationError
    from fedsd.server.simulation import simulate

    check_flags(engine, ray_address, cpus_per_client, gpus_per_client)
    overrides = flag_overrides(
        set_, num_clients=clients, rounds=rounds, label_fraction=label_fraction, by=by, alpha=alpha, mode=mode,
        personalize_epochs=personalize_epochs, exits_mix=[int(x) for x in exits_mix.split(",")] if exits_mix else None,
    )  # fmt: skip
    try:
        overrides |= tracking_overrides(tensorboard, mlflow_uri)
        with progress_bar() as progress:
            result = simulate(
                config, out=out, engine=engine, resume=resume, device_models=device_models, base_model=base_model,  # type: ignore[arg-type]
                ray_address=ray_address, cpus_per_client=cpus_per_client, gpus_per_client=gpus_per_client,
                progress=progress, log=console.print, overrides=overrides,
            )  # fmt: skip
    except (ValueError, OSError, FederationError) as e:  # ConfigError is a ValueError, ConnectionError an OSError
        _fail(str(e))
    last = {k: rows[-1]["uar"] for k, rows in result.global_metrics.items() if rows}
    console.print("final UAR on unseen speakers: " + ", ".join(f"exit {k} {u:.3f}" for k, u in last.items()))
    console.print(f"[bold green]done[/]: {result.rounds_done} rounds; report {result.report}")


def check_flags(engine: str, ray_address: str | None, cpus: float | None, gpus: float | None) -> None:
    """Exit 2 (a usage error) with the reason for an unknown engine, a bad address or bad resources."""
    from fedsd.cli.train import _fail
    from fedsd.server.simulation import check_simulation_args

    try:
        check_simulation_args(engine, ray_address, cpus, gpus)
    except ValueError as e:
        _fail(str(e), 2)


def flag_overrides(set_: list[str] | None, **flags: Any) -> dict[str, Any]:
    """``--set`` items, then the shortcut flags that were given as ``federated.*`` overrides (they win)."""
    from fedsd.cli.train import _parse_overrides

    return _parse_overrides(set_) | {f"federated.{k}": v for k, v in flags.items() if v is not None}


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate_command)
