"""`fedsd simulate`: partition a corpus into virtual devices and federate them with Flower's simulation engine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from fedsd.cli.errors import ExitCode, fail
from fedsd.cli.options import Engine, FederatedMode, PartitionBy
from fedsd.cli.output import console, err_console, json_option, json_output, progress_bar
from fedsd.cli.overrides import SET_HELP, parse_set
from fedsd.tracking import MLFLOW_HELP, TENSORBOARD_HELP, tracking_overrides

_PersonalizeEpochs = Annotated[int | None, typer.Option(
    "--personalize-epochs", min=0,
    help="After the last round each device fine-tunes private heads this many epochs (federated.personalize_epochs).",
)]  # fmt: skip
_DeviceModels = Annotated[bool, typer.Option(
    "--device-models",
    help="Every device writes its deployable model to RUN/device-models/<client id> (+ personal/).",
)]  # fmt: skip
_RayAddress = Annotated[str | None, typer.Option(
    "--ray-address", help="Join this running Ray cluster (HOST:PORT of `ray start --head`, or auto)."
)]  # fmt: skip


def simulate_command(
    config: Path = typer.Option(..., "--config", "-c", help="Experiment YAML or shipped config name."),
    clients: int | None = typer.Option(None, "--clients", help="Number of devices (federated.num_clients)."),
    rounds: int | None = typer.Option(None, "--rounds", help="Federated rounds (federated.rounds)."),
    label_fraction: float | None = typer.Option(None, help="Labelled fraction on each device."),
    exits_mix: str | None = typer.Option(None, help="Device exits dealt round-robin, e.g. 3,6,9."),
    by: PartitionBy | None = typer.Option(None, help="How the corpus is dealt into devices (federated.by)."),
    alpha: float | None = typer.Option(None, help="Dirichlet concentration (with --by dirichlet)."),
    mode: FederatedMode | None = typer.Option(None, help="Devices' loss: sd, ce (labels only) or pl (+ pseudo-labels)."),
    base_model: Path | None = typer.Option(None, help="Federate this checkpoint instead of training one."),
    out: Path | None = typer.Option(None, "--out", help="Run directory (default runs/<name>-sim)."),
    engine: Engine = typer.Option(Engine.ray, help="ray (Flower's simulation engine) or inprocess (no workers)."),
    resume: bool = typer.Option(False, help="Continue an interrupted run from its last completed round."),
    personalize_epochs: _PersonalizeEpochs = None,
    device_models: _DeviceModels = False,
    ray_address: _RayAddress = None,
    cpus_per_client: float | None = typer.Option(None, help="CPU cores per device, > 0, fractions allowed (1)."),
    gpus_per_client: float | None = typer.Option(None, help="GPUs per device, >= 0; 0.25: four share a GPU (0)."),
    tensorboard: Path | None = typer.Option(None, "--tensorboard", metavar="DIR", help=TENSORBOARD_HELP),
    mlflow_uri: str | None = typer.Option(None, "--mlflow-uri", metavar="URI", help=MLFLOW_HELP),
    set_: list[str] | None = typer.Option(None, "--set", metavar="KEY=VALUE", help=SET_HELP),
    json_: bool = json_option(),
) -> None:
    """Simulate federated self-distillation over devices partitioned from a corpus.

    Example: [bold]fedsd simulate --config configs/demo.yaml --clients 8 --rounds 5 --label-fraction 0.2 --exits-mix 1,2,3[/]
    On a Ray cluster: [bold]fedsd simulate -c configs/demo.yaml --ray-address HEAD:6379 --cpus-per-client 2[/]
    """
    from fedsd.config import ConfigError
    from fedsd.server.federation import FederationError
    from fedsd.server.simulation import simulate

    check_flags(engine.value, ray_address, cpus_per_client, gpus_per_client)
    overrides = flag_overrides(
        set_, num_clients=clients, rounds=rounds, label_fraction=label_fraction, by=by, alpha=alpha, mode=mode,
        personalize_epochs=personalize_epochs, exits_mix=_exits(exits_mix),
    )  # fmt: skip
    with json_output(json_) as output:
        try:
            overrides |= tracking_overrides(tensorboard, mlflow_uri)
            with progress_bar() as progress:
                result = simulate(
                    config, out=out, engine=engine.value, resume=resume, device_models=device_models,  # type: ignore[arg-type]
                    base_model=base_model, ray_address=ray_address, cpus_per_client=cpus_per_client,
                    gpus_per_client=gpus_per_client, progress=progress, log=err_console.print, overrides=overrides,
                )  # fmt: skip
        except ConfigError as e:
            fail(str(e), ExitCode.USAGE)
        except (ValueError, OSError, FederationError) as e:  # ConnectionError is an OSError
            fail(str(e))
        last = {k: rows[-1]["uar"] for k, rows in result.global_metrics.items() if rows}
        console.print("final UAR on unseen speakers: " + ", ".join(f"exit {k} {u:.3f}" for k, u in last.items()))
        console.print(f"[bold green]done[/]: {result.rounds_done} rounds; report {escape(str(result.report))}")
        output.document({"final_uar": last} | {k: v for k, v in vars(result).items() if k != "history"})


def _exits(exits_mix: str | None) -> list[int] | None:
    """``--exits-mix 1,2,3`` → ``[1, 2, 3]``; anything else is a usage error (exit 2)."""
    if not exits_mix:
        return None
    try:
        return [int(x) for x in exits_mix.split(",")]
    except ValueError:
        fail(f"--exits-mix {exits_mix!r}: expected exit numbers separated by commas, e.g. 1,2,3", ExitCode.USAGE)


def check_flags(engine: str, ray_address: str | None, cpus: float | None, gpus: float | None) -> None:
    """Exit 2 (a usage error) with the reason for an unknown engine, a bad address or bad resources."""
    from fedsd.server.simulation import check_simulation_args

    try:
        check_simulation_args(engine, ray_address, cpus, gpus)
    except ValueError as e:
        fail(str(e), ExitCode.USAGE)


def flag_overrides(set_: list[str] | None, **flags: Any) -> dict[str, Any]:
    """``--set`` items, then the shortcut flags that were given as ``federated.*`` overrides (they win)."""
    given = {k: (v.value if isinstance(v, PartitionBy | FederatedMode) else v) for k, v in flags.items() if v is not None}
    return parse_set(set_) | {f"federated.{k}": v for k, v in given.items()}


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate_command)
