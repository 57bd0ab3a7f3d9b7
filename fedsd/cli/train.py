"""`fedsd train`, `fedsd evaluate`, `fedsd predict` and `fedsd export`: the centralized side of the toolkit."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from fedsd.tracking import MLFLOW_HELP, TENSORBOARD_HELP, tracking_overrides

console = Console()
err_console = Console(stderr=True)


def _fail(msg: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)  # paths never wrap
    raise typer.Exit(code)


def progress_bar():
    """The rich progress bar every long command uses."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    )  # fmt: skip


def _parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``--set train.epochs=2`` → ``{"train.epochs": 2}``; a malformed item exits 2 with the reason."""
    from fedsd.config import ConfigError, parse_overrides

    try:
        return parse_overrides(items)
    except ConfigError as e:
        _fail(str(e), 2)
        raise  # unreachable: _fail exits


def train_command(
    config: Path = typer.Option(..., "--config", "-c", help="Experiment YAML (see configs/)."),
    out: Path | None = typer.Option(None, "--out", help="Run directory (default runs/<config name>)."),
    mode: str | None = typer.Option(None, help="sd (self-distillation) or ce (CE at every exit)."),
    label_fraction: float | None = typer.Option(None, help="Labelled fraction of the training split."),
    epochs: int | None = typer.Option(None),
    lr: float | None = typer.Option(None),
    batch_size: int | None = typer.Option(None),
    grad_accum: int | None = typer.Option(None),
    seed: int | None = typer.Option(None),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1, mps ..."),
    freeze_feature_encoder: bool | None = typer.Option(
        None, "--freeze-feature-encoder/--train-feature-encoder", help="Freeze the CNN front end."
    ),
    scratch: bool = typer.Option(False, "--scratch", help="Train the backbone from random init."),
    tensorboard: Path | None = typer.Option(None, "--tensorboard", metavar="DIR", help=TENSORBOARD_HELP),
    mlflow_uri: str | None = typer.Option(None, "--mlflow-uri", metavar="URI", help=MLFLOW_HELP),
    set_: list[str] | None = typer.Option(
        None, "--set", help="Any config field: --set train.warmup_epochs=2"
    ),
) -> None:
    """Train every exit centrally with self-distillation (or CE only).

    Example: [bold]fedsd train --config configs/demo.yaml --out runs/demo-central[/]
    """
    from fedsd.config import ConfigError
    from fedsd.report import exit_table
    from fedsd.training.central import train_experiment

    overrides = _parse_overrides(set_)
    for key, value in {
        "train.mode": mode,
        "train.label_fraction": label_fraction,
        "train.epochs": epochs,
        "train.lr": lr,
        "train.batch_size": batch_size,
        "train.grad_accum": grad_accum,
        "train.seed": seed,
        "train.device": device,
        "train.freeze_feature_encoder": freeze_feature_encoder,
    }.items():
        if value is not None:
            overrides[key] = value
    if scratch:
        overrides["model.pretrained"] = False
    try:
        overrides |= tracking_overrides(tensorboard, mlflow_uri)
        with progress_bar() as progress:
            result = train_experiment(config, out, overrides=overrides, progress=progress, log=console.print)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    if result.test:
        console.print(exit_table(result.test, title=f"Test (best epoch {result.best_epoch})"))
    console.print(f"run directory: [bold]{result.run_dir}[/] (best checkpoint: {result.best_dir})")


def evaluate_command(
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint directory (e.g. runs/demo/best)."),
    manifest: Path = typer.Option(..., "--manifest", help="Manifest CSV."),
    root: Path = typer.Option(..., "--root", help="Corpus root the manifest's paths are relative to."),
    split: str | None = typer.Option("test", help="Rows of this split ('all' for every row)."),
    json_out: Path | None = typer.Option(None, "--json", help="Write all metrics here."),
    plot: Path | None = typer.Option(
        None, "--plot", help="PNG of UAR against latency (default next to --json)."
    ),
    batch_size: int = typer.Option(8),
    latency_utts: int = typer.Option(10, help="Utterances timed per exit (batch 1) for the latency column."),
    device: str = typer.Option("cpu"),
) -> None:
    """Per-exit UAR, WA, macro-F1, per-class recall, confusion matrix and latency.

    Example: [bold]fedsd evaluate --model runs/demo/best --manifest data/synth/manifest.csv --root data/synth --json runs/demo/eval.json[/]
    An exported [bold]X.onnx[/] graph (`fedsd export --format onnx`) is evaluated with ONNX Runtime, without torch.
    """
    from fedsd.runtime.inference import InferenceError, evaluate

    try:
        result = evaluate(
            model, manifest, root=root, split=split, batch_size=batch_size, latency_utts=latency_utts, device=device
        )
    except InferenceError as e:
        _fail(str(e), e.code)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    console.print(result.table())
    overlap = evaluated_speaker_overlap(result.model, manifest, split, result.label_names)
    if overlap["status"] == "overlap":
        err_console.print(
            f"[bold yellow]warning:[/] {escape(str(result.model))} was trained or selected on "
            f"{len(overlap['speakers'])} of the {overlap['evaluated_speakers']} evaluated speakers "
            f"({escape(', '.join(overlap['speakers']))}): these scores are not on unseen speakers",
            highlight=False,
            soft_wrap=True,
        )
    elif overlap["status"] == "unknown":
        err_console.print(
            f"note: {escape(str(result.model))} records no training speakers; whether the evaluated "
            "speakers are unseen is unknown",
            highlight=False,
            soft_wrap=True,
        )
    if json_out:
        from fedsd.checkpoint import atomic_write_json

        atomic_write_json(json_out, result.to_dict() | {"speaker_overlap": overlap})
        console.print(f"metrics: {json_out}")
    plot = plot or (json_out.with_suffix(".png") if json_out else None)
    if plot:
        result.save_plot(plot)
        console.print(f"plot: {plot}")


def evaluated_speaker_overlap(
    model: Path, manifest: Path, split: str | None, label_names: list[str]
) -> dict[str, Any]:
    """Which evaluated speakers the model was trained or selected on (``fedsd.checkpoint.speaker_overlap``
    plus ``evaluated_speakers``); "unknown" for a model that records none (older checkpoints, ONNX graphs)."""
    from fedsd.checkpoint import read_model_meta, speaker_overlap
    from fedsd.runtime.inference import select_rows

    speakers = {r.speaker for r in select_rows(manifest, split, label_names, model)}
    meta = read_model_meta(model) if Path(model).is_dir() else None
    return speaker_overlap(meta, speakers) | {"evaluated_speakers": len(speakers)}


def predict_command(
    files: list[Path] = typer.Argument(..., help="Audio files (WAV, FLAC, OGG)."),
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint directory."),
    exit_: str = typer.Option(
        "auto", "--exit", help="Exit layer number, or 'auto' for early exit by confidence."
    ),
    threshold: float = typer.Option(0.9, help="With --exit auto: stop at the first exit this confident."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON lines instead of a table."),
    device: str = typer.Option("cpu"),
) -> None:
    """Classify audio files at one exit, or with confidence-based early exit.

    Example: [bold]fedsd predict --model runs/demo/best --exit auto --threshold 0.9 a.wav b.wav[/]
    An exported [bold]X.onnx[/] graph runs on ONNX Runtime + soundfile + numpy only (torch is never imported).
    """
    from fedsd.runtime.inference import (
        InferenceError,
        load_model,
        predict,
        predictions_jsonl,
        predictions_table,
    )

    try:
        net = load_model(model, device=device)
        chosen = net.resolve_exit(exit_)
        preds = predict(net, files, exit=chosen, threshold=threshold)
    except InferenceError as e:
        _fail(str(e), e.code)
    if json_out:
        sys.stdout.write(predictions_jsonl(preds))
    else:
        console.print(predictions_table(preds, model=model, exit=chosen, runtime=net.runtime))
    failures = sum(p.error is not None for p in preds)
    if failures:
        err_console.print(f"[yellow]{failures} of {len(files)} file(s) could not be read[/]")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("evaluate")(evaluate_command)
    app.command("predict")(predict_command)
