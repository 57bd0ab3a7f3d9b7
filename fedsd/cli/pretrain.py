"""`fedsd pretrain`: a self-supervised encoder from unlabelled speech (see ``fedsd.training.pretrain``)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from fedsd.cli.errors import ExitCode, fail
from fedsd.cli.output import console, err_console, json_option, json_output, progress_bar
from fedsd.tracking import MLFLOW_HELP, TENSORBOARD_HELP, Tracker, finish_run


class Family(StrEnum):
    """The built-in architectures a pretraining run can build."""

    wav2vec2 = "wav2vec2"
    hubert = "hubert"
    wavlm = "wavlm"


def pretrain_command(
    manifest: Path = typer.Option(..., "--manifest", help="Manifest of the unlabelled speech (labels ignored)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the pretrained encoder (save_pretrained)."),
    root: Path | None = typer.Option(None, "--root", help="Audio root (default: the manifest's folder)."),
    backbone: str = typer.Option("tiny", help="Architecture: tiny, tiny-preln, base, or a config directory."),
    family: Family = typer.Option(Family.wav2vec2, help="Architecture family of the built-in backbones."),
    epochs: int = typer.Option(20, min=1, help="Passes over the unlabelled speech."),
    clusters: int = typer.Option(64, min=2, help="k-means targets (HuBERT iteration 1: MFCC clusters)."),
    lr: float = typer.Option(1e-3, min=0.0, help="Peak learning rate (linear warm-up over 10 % of the steps, then cosine decay)."),
    batch_size: int = typer.Option(16, min=1, help="Clips per optimizer step."),
    crop_seconds: float = typer.Option(2.0, min=0.1, help="Random window per clip and epoch."),
    seed: int = typer.Option(0, min=0, help="Random seed (crops, masks, k-means, init)."),
    threads: int | None = typer.Option(None, min=1, help="torch threads (default: torch's choice)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    tensorboard: Path | None = typer.Option(None, "--tensorboard", metavar="DIR", help=TENSORBOARD_HELP),
    mlflow_uri: str | None = typer.Option(None, "--mlflow-uri", metavar="URI", help=MLFLOW_HELP),
    json_: bool = json_option(),
) -> None:
    """Pretrain an encoder on unlabelled speech by masked prediction of MFCC clusters (HuBERT iteration 1).

    The output is a Hugging Face checkpoint: train on it with [bold]model.backbone: DIR[/] and
    [bold]model.pretrained: true[/]. Labels in the manifest are ignored; use speakers that are not your
    test speakers.

    Example: [bold]fedsd pretrain --manifest data/unlabelled/manifest.csv --out runs/ssl-tiny[/]
    """
    from fedsd.training.pretrain import PretrainSettings

    rows = _read_rows(manifest, out, force)
    settings = PretrainSettings(
        backbone=backbone, family=family.value, epochs=epochs, clusters=clusters, lr=lr, batch_size=batch_size,
        crop_seconds=crop_seconds, seed=seed, threads=threads,
    )  # fmt: skip
    with json_output(json_) as output:
        tracker = _tracker(out, settings, manifest, tensorboard, mlflow_uri)
        result = _run(rows, root or manifest.parent, out, settings, manifest, tracker)
        finish_run(tracker, out)
        console.print(f"pretrained encoder: [bold]{escape(str(out))}[/] ({result.seconds:.0f} s)", highlight=False)
        output.document(result)


def _read_rows(manifest: Path, out: Path, force: bool) -> list[Any]:
    """The manifest's rows; a missing or empty manifest, or an --out in the way, is a usage error (2)."""
    from fedsd.data.manifest import ManifestError, read_manifest

    if not manifest.is_file():
        fail(f"--manifest {manifest}: not a file", ExitCode.USAGE)
    if out.exists() and any(out.iterdir()) and not force:
        fail(f"--out {out}: exists and is not empty; pass --force to replace it", ExitCode.USAGE)
    try:
        rows = read_manifest(manifest)
    except ManifestError as e:
        fail(str(e), ExitCode.USAGE)
    if not rows:
        fail(f"--manifest {manifest}: no rows", ExitCode.USAGE)
    return rows


def _run(rows: list[Any], root: Path, out: Path, settings: Any, manifest: Path, tracker: Tracker) -> Any:
    """Pretrain with a progress bar on stderr; unreadable audio or a bad setting exits 1."""
    from fedsd.checkpoint import sha256_file
    from fedsd.data.audio import AudioError
    from fedsd.training.pretrain import pretrain

    with progress_bar("pretrain", remaining=True) as bar:
        task = bar.add_task("pretrain", total=None)
        try:
            return pretrain(
                rows, root, out, settings, log=err_console.print,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
                source={"manifest": str(manifest.resolve()), "sha256": sha256_file(manifest)}, tracker=tracker,
            )  # fmt: skip
        except (AudioError, ValueError) as e:
            fail(str(e))


def _tracker(out: Path, settings: Any, manifest: Path, tensorboard: Path | None, mlflow_uri: str | None) -> Tracker:
    """The --tensorboard / --mlflow-uri tracker of a pretraining run (MLflow experiment `pretrain`)."""
    from dataclasses import asdict

    from fedsd.tracking import TrackingError, open_tracker, tracking_overrides

    try:
        where = tracking_overrides(tensorboard, mlflow_uri)
        return open_tracker(
            phase="pretrain", run_dir=out, tensorboard=where.get("log.tensorboard"),
            mlflow_uri=where.get("log.mlflow_uri"), experiment="pretrain",
            params=asdict(settings) | {"manifest": str(manifest.resolve())}, log=err_console.print,
        )  # fmt: skip
    except TrackingError as e:
        fail(str(e), ExitCode.USAGE)


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain_command)
