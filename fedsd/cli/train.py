"""`fedsd train`, `fedsd evaluate` and `fedsd predict`: the centralized side of the toolkit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from fedsd.cli.errors import ExitCode, fail, warn
from fedsd.cli.options import TrainMode, device_option
from fedsd.cli.output import (
    JSONL_HELP,
    console,
    err_console,
    json_option,
    json_output,
    progress_bar,
)
from fedsd.cli.overrides import SET_HELP, parse_set
from fedsd.tracking import MLFLOW_HELP, TENSORBOARD_HELP, tracking_overrides

__all__ = ["evaluate_command", "evaluated_speaker_overlap", "predict_command", "progress_bar", "register",
           "train_command"]  # fmt: skip


def _flag_overrides(set_: list[str] | None, scratch: bool, **flags: Any) -> dict[str, Any]:
    """``--set`` items, then the shortcut flags that were given, as ``train.*`` overrides (flags win)."""
    overrides = parse_set(set_)
    overrides |= {f"train.{k}": (v.value if isinstance(v, TrainMode) else v) for k, v in flags.items() if v is not None}
    if scratch:
        overrides["model.pretrained"] = False
    return overrides


def train_command(
    config: Path = typer.Option(..., "--config", "-c", help="Experiment YAML or shipped config name (`fedsd config list`)."),
    out: Path | None = typer.Option(None, "--out", help="Run directory (default runs/<config name>)."),
    mode: TrainMode | None = typer.Option(None, help="sd: self-distillation; ce: cross-entropy at every exit (baseline)."),
    label_fraction: float | None = typer.Option(None, help="Labelled fraction of the training split (train.label_fraction)."),
    epochs: int | None = typer.Option(None, min=1, help="Training epochs (train.epochs)."),
    lr: float | None = typer.Option(None, min=0.0, help="Learning rate of the backbone (train.lr)."),
    batch_size: int | None = typer.Option(None, min=1, help="Utterances per batch (train.batch_size)."),
    grad_accum: int | None = typer.Option(None, min=1, help="Batches per optimizer step (train.grad_accum)."),
    seed: int | None = typer.Option(None, help="Random seed of data order and init (train.seed)."),
    device: str | None = device_option(None, help="torch device (train.device): cpu, cuda, cuda:N, mps or xpu[:N]."),
    freeze_feature_encoder: bool | None = typer.Option(
        None, "--freeze-feature-encoder/--train-feature-encoder", help="Freeze the CNN front end (train.freeze_feature_encoder)."
    ),
    scratch: bool = typer.Option(False, "--scratch", help="Train the backbone from random init (model.pretrained=false)."),
    tensorboard: Path | None = typer.Option(None, "--tensorboard", metavar="DIR", help=TENSORBOARD_HELP),
    mlflow_uri: str | None = typer.Option(None, "--mlflow-uri", metavar="URI", help=MLFLOW_HELP),
    set_: list[str] | None = typer.Option(None, "--set", metavar="KEY=VALUE", help=SET_HELP),
    json_: bool = json_option(),
) -> None:
    """Train every exit centrally with self-distillation (or CE only).

    Example: [bold]fedsd train --config configs/demo.yaml --out runs/demo-central[/]
    """
    from fedsd.config import ConfigError
    from fedsd.training.central import train_experiment

    overrides = _flag_overrides(
        set_, scratch, mode=mode, label_fraction=label_fraction, epochs=epochs, lr=lr, batch_size=batch_size,
        grad_accum=grad_accum, seed=seed, device=device, freeze_feature_encoder=freeze_feature_encoder,
    )  # fmt: skip
    with json_output(json_) as output:
        try:
            overrides |= tracking_overrides(tensorboard, mlflow_uri)
            with progress_bar() as progress:
                result = train_experiment(config, out, overrides=overrides, progress=progress, log=err_console.print)
        except ConfigError as e:
            fail(str(e), ExitCode.USAGE)
        except (ValueError, FileNotFoundError) as e:
            fail(str(e))
        _print_train(result)
        output.document(result)


def _print_train(result: Any) -> None:
    from fedsd.report import exit_table

    if result.test:
        console.print(exit_table(result.test, title=f"Test (best epoch {result.best_epoch})"))
    console.print(f"run directory: [bold]{escape(str(result.run_dir))}[/] (best checkpoint: {escape(str(result.best_dir))})")


def evaluate_command(
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint directory (e.g. runs/demo/best) or an exported X.onnx."),
    manifest: Path = typer.Option(..., "--manifest", help="Manifest CSV."),
    root: Path = typer.Option(..., "--root", help="Corpus root the manifest's paths are relative to."),
    split: str | None = typer.Option("test", help="Rows of this split ('all' for every row)."),
    out: Path | None = typer.Option(None, "--out", "-o", metavar="FILE", help="Also write all metrics to this JSON file."),
    plot: Path | None = typer.Option(None, "--plot", help="PNG of UAR against latency (default next to --out)."),
    batch_size: int = typer.Option(8, min=1, help="Utterances per forward pass."),
    latency_utts: int = typer.Option(10, min=1, help="Utterances timed per exit (batch 1) for the latency column."),
    device: str = device_option("cpu"),
    json_: bool = json_option(),
) -> None:
    """Per-exit UAR, WA, macro-F1, per-class recall, confusion matrix and latency.

    Example: [bold]fedsd evaluate --model runs/demo/best --manifest data/synth/manifest.csv --root data/synth --out runs/demo/eval.json[/]
    An exported [bold]X.onnx[/] graph (`fedsd export --format onnx`) is evaluated with ONNX Runtime, without torch.
    """
    from fedsd.runtime.inference import InferenceError, evaluate

    with json_output(json_) as output:
        try:
            result = evaluate(
                model, manifest, root=root, split=split, batch_size=batch_size, latency_utts=latency_utts, device=device
            )
        except InferenceError as e:
            fail(str(e), e.code)
        except (ValueError, FileNotFoundError) as e:
            fail(str(e))
        console.print(result.table())
        overlap = evaluated_speaker_overlap(result.model, manifest, split, result.label_names)
        _warn_overlap(result.model, overlap)
        doc = result.to_dict() | {"speaker_overlap": overlap}
        if out:
            from fedsd.checkpoint import atomic_write_json

            atomic_write_json(out, doc)
            console.print(f"metrics: {escape(str(out))}", highlight=False)
        plot = plot or (out.with_suffix(".png") if out else None)
        if plot:
            result.save_plot(plot)
            console.print(f"plot: {escape(str(plot))}", highlight=False)
        output.document(doc)


def _warn_overlap(model: Path, overlap: dict[str, Any]) -> None:
    """Say on stderr when the evaluated speakers are not (or not known to be) unseen by the model."""
    if overlap["status"] == "overlap":
        warn(
            f"{model} was trained or selected on {len(overlap['speakers'])} of the "
            f"{overlap['evaluated_speakers']} evaluated speakers ({', '.join(overlap['speakers'])}): "
            "these scores are not on unseen speakers"
        )
    elif overlap["status"] == "unknown":
        err_console.print(
            f"note: {escape(str(model))} records no training speakers; whether the evaluated speakers are "
            "unseen is unknown",
            highlight=False,
            soft_wrap=True,
        )


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
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint directory or an exported X.onnx."),
    exit_: str = typer.Option("auto", "--exit", help="Exit layer number, or 'auto' for early exit by confidence."),
    threshold: float = typer.Option(0.9, help="With --exit auto: stop at the first exit this confident."),
    json_: bool = json_option(JSONL_HELP + " One line per file, in order."),
    device: str = device_option("cpu"),
) -> None:
    """Classify audio files at one exit, or with confidence-based early exit.

    Example: [bold]fedsd predict --model runs/demo/best --exit auto --threshold 0.9 a.wav b.wav[/]
    An exported [bold]X.onnx[/] graph runs on ONNX Runtime + soundfile + numpy only (torch is never imported).
    Exit code 1 when a file could not be read (its line has an "error"; the others are still classified).
    """
    from fedsd.runtime.inference import InferenceError, load_model, predict, predictions_table

    with json_output(json_) as output:
        try:
            net = load_model(model, device=device)
            chosen = net.resolve_exit(exit_)
            preds = predict(net, files, exit=chosen, threshold=threshold)
        except InferenceError as e:
            fail(str(e), e.code)
        for p in preds:
            output.line(p)
        if not json_:
            console.print(predictions_table(preds, model=model, exit=chosen, runtime=net.runtime))
    failures = sum(p.error is not None for p in preds)
    if failures:
        err_console.print(f"[yellow]{failures} of {len(files)} file(s) could not be read[/]")
        raise typer.Exit(int(ExitCode.FAILURE))


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("evaluate")(evaluate_command)
    app.command("predict")(predict_command)
