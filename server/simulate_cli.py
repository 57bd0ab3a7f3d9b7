"""`fedsd simulate`: partition a corpus into virtual devices and federate them with Flower's simulation engine."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

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
    set_: list[str] | None = typer.Option(None, "--set", help="Any config field: --set federated.lr=0.01"),
) -> None:
    """Simulate federated self-distillation over devices partitioned from a corpus.

    Example: [bold]fedsd simulate --config configs/demo.yaml --clients 8 --rounds 5 --label-fraction 0.2 --exits-mix 1,2,3[/]
    """
    from fedsd.config import ConfigError, load_config
    from fedsd.server.federation import FederationError, FederationSpec
    from fedsd.server.prepare import prepare_run
    from fedsd.server.simulation import run_simulation_engine
    from fedsd.train_cli import _fail, _parse_overrides, progress_bar

    if engine not in ("ray", "inprocess"):
        _fail(f"--engine {engine!r}: use ray or inprocess", 2)
    overrides = _parse_overrides(set_)
    for key, value in {
        "federated.num_clients": clients,
        "federated.rounds": rounds,
        "federated.label_fraction": label_fraction,
        "federated.by": by,
        "federated.alpha": alpha,
        "federated.mode": mode,
        "federated.personalize_epochs": personalize_epochs,
        "federated.exits_mix": [int(x) for x in exits_mix.split(",")] if exits_mix else None,
    }.items():
        if value is not None:
            overrides[key] = value
    try:
        cfg = load_config(config, overrides)
        run_dir = (out or Path("runs") / f"{cfg.name}-sim").resolve()
        with progress_bar() as progress:
            prepared = prepare_run(cfg, run_dir, log=console.print, progress=progress, base_model=base_model)
        spec = FederationSpec(
            config=str(config.resolve()),
            run_dir=str(run_dir),
            base_model=str(prepared.base_model),
            partition=str(prepared.partition),
            resume=resume,
            overrides=overrides,
        )
        console.print(f"simulating {cfg.federated.rounds} rounds with the {engine} engine → {run_dir}")
        result = run_simulation_engine(
            cfg, spec, prepared, engine=engine, log=console.print,  # type: ignore[arg-type]
            device_models=run_dir / "device-models" if device_models else None,
        )  # fmt: skip
    except (ConfigError, FederationError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    console.print(f"[bold green]done[/]: {result.rounds_done} rounds; report {result.run_dir / 'report.md'}")


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate_command)
