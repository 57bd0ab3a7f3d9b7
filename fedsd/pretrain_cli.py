"""`fedsd pretrain`: a self-supervised encoder from unlabelled speech (see ``fedsd.pretrain``)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def _fail(msg: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {msg}", highlight=False)
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
) -> None:
    """Pretrain an encoder on unlabelled speech by masked prediction of MFCC clusters (HuBERT iteration 1).

    The output is a Hugging Face checkpoint: train on it with [bold]model.backbone: DIR[/] and
    [bold]model.pretrained: true[/]. Labels in the manifest are ignored; use speakers that are not your
    test speakers.

    Example: [bold]fedsd pretrain --manifest data/unlabelled/manifest.csv --out runs/ssl-tiny[/]
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from fedsd.audio import AudioError
    from fedsd.checkpoint import sha256_file
    from fedsd.data.manifest import ManifestError, read_manifest
    from fedsd.pretrain import PretrainSettings, pretrain

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
    columns = (TextColumn("pretrain"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("pretrain", total=None)
        try:
            pretrain(
                rows, root or manifest.parent, out, settings, log=console.print,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
                source={"manifest": str(manifest.resolve()), "sha256": sha256_file(manifest)},
            )  # fmt: skip
        except (AudioError, ValueError) as e:
            _fail(str(e), 1)


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain_command)
