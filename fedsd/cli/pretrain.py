"""`fedsd pretrain`: a self-supervised encoder from unlabelled speech (see ``fedsd.training.pretrain``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from fedsd.tracking import MLFLOW_HELP, TENSORBOARD_HELP, Tracker, finish_run

console = Console()
err_console = Console(stderr=True)


def _fail(msg: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)  # paths never wrap
    raise typer.Exit(code)


def pretrain_command(
    manifest: Path = typer.Option(..., "--manifest", help="Manifest of the unlabelled speech (labels ignored)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the pretrained encoder (save_pretrained)."),
    root: Path | None = typer.Option(None, "--root", help="Audio root (default: the manifest's folder)."),
    backbone: str = typer.Option("tiny", help="Architecture: tiny, tiny-preln, base, or a config directory."),
    family: str = typer.Option("wav2vec2", help="wav2vec2, hubert or wavlm (built-in architectures)."),
    epochs: int = typer.Option(20, min=1),
    clusters: int = typer.Option(64, min=2, help="k-means targets (HuBERT iteration 1: MFCC clusters)."),
    lr: float = typer.Option(1e-3, min=0.0),
    batch_size: int = typer.Option(16, min=1),
    crop_seconds: float = typer.Option(2.0, min=0.1, help="Random window per clip and epoch."),
    seed: int = typer.Option(0, min=0),
    threads: int | None = typer.Option(None, min=1, help="torch threads (default: torch's choice)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    tensorboard: Path | None = typer.Option(None, "--tensorboard", metavar="DIR", help=TENSORBOARD_HELP),
    mlflow_uri: str | None = typer.Option(None, "--mlflow-uri", metavar="URI", help=MLFLOW_HELP),
) -> None:
    """Pretrain an encoder on unlabelled speech by masked prediction of MFCC clusters (HuBERT iteration 1).

    The output is a Hugging Face checkpoint: train on it with [bold]model.backbone: DIR[/] and
    [bold]model.pretrained: true[/]. Labels in the manifest are ignored; use speakers that are not your
    test speakers.

    Example: [bold]fedsd pretrain --manifest data/unlabelled/manifest.csv --out runs/ssl-tiny[/]
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from fedsd.checkpoint import sha256_file
    from fedsd.data.audio import AudioError
    from fedsd.data.manifest import ManifestError, read_manifest
    from fedsd.training.pretrain import PretrainSettings, pretrain

    if not manifest.is_file():
        _fail(f"--manifest {manifest}: not a file")
    if out.exists() and any(out.iterdir()) and not force:
        _fail(f"--out {out}: exists and is not empty; pass --force to replace it")
    try:
        rows = read_manifest(manifest)
    except ManifestError as e:
        _fail(str(e))
    if not rows:
        _fail(f"--manifest {manifest}: no rows")
    settings = PretrainSettings(
        backbone=backbone, family=family, epochs=epochs, clusters=clusters, lr=lr, batch_size=batch_size,
        crop_seconds=crop_seconds, seed=seed, threads=threads,
    )  # fmt: skip
    tracker = _tracker(out, settings, manifest, tensorboard, mlflow_uri)
    columns = (TextColumn("pretrain"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("pretrain", total=None)
        try:
            pretrain(
                rows, root or manifest.parent, out, settings, log=console.print,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
                source={"manifest": str(manifest.resolve()), "sha256": sha256_file(manifest)}, tracker=tracker,
            )  # fmt: skip
        except (AudioError, ValueError) as e:
            _fail(str(e), 1)
    finish_run(tracker, out)


def _tracker(out: Path, settings: Any, manifest: Path, tensorboard: Path | None, mlflow_uri: str | None) -> Tracker:
    """The --tensorboard / --mlflow-uri tracker of a pretraining run (MLflow experiment `pretrain`)."""
    from dataclasses import asdict

    from fedsd.tracking import TrackingError, open_tracker, tracking_overrides

    try:
        where = tracking_overrides(tensorboard, mlflow_uri)
        return open_tracker(
            phase="pretrain", run_dir=out, tensorboard=where.get("log.tensorboard"),
            mlflow_uri=where.get("log.mlflow_uri"), experiment="pretrain",
            params=asdict(settings) | {"manifest": str(manifest.resolve())}, log=console.print,
        )  # fmt: skip
    except TrackingError as e:
        _fail(str(e), 2)
        raise  # unreachable: _fail exits


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain_command)
