"""`fedsd train`, `fedsd evaluate`, `fedsd predict` and `fedsd export`: the centralized side of the toolkit."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def _fail(msg: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {msg}", highlight=False)
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
    set_: list[str] | None = typer.Option(
        None, "--set", help="Any config field: --set train.warmup_epochs=2"
    ),
) -> None:
    """Train every exit centrally with self-distillation (or CE only).

    Example: [bold]fedsd train --config configs/demo.yaml --out runs/demo-central[/]
    """
    from fedsd.config import ConfigError, load_config
    from fedsd.data.prepare import ensure_corpus
    from fedsd.report import exit_table
    from fedsd.train import train

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
        cfg = load_config(config, overrides)
        ensure_corpus(cfg.data, log=console.print)
        run_dir = out or Path("runs") / cfg.name
        with progress_bar() as progress:
            result = train(cfg, run_dir, progress=progress, log=console.print)
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
    if model.suffix.lower() == ".onnx":  # before anything imports torch
        from fedsd.onnx_cli import evaluate_onnx

        evaluate_onnx(model, manifest, root, split, json_out, plot, batch_size, latency_utts)
        return
    from fedsd.checkpoint import atomic_write_json
    from fedsd.data.manifest import read_manifest
    from fedsd.model.multiexit import MultiExitSER
    from fedsd.report import exit_table, plot_uar_vs_latency
    from fedsd.train import evaluate_loader, make_loader, measure_exit_latency

    try:
        net = MultiExitSER.from_pretrained(model).to(device)
        rows = read_manifest(manifest)
        if split and split != "all":
            rows = [r for r in rows if r.split == split]
            if not rows:
                _fail(f"{manifest}: no rows with split={split!r} (use --split all)")
        rows = [r for r in rows if r.label]
        unknown = sorted({r.label for r in rows} - set(net.label_names))
        if unknown:
            _fail(
                f"{manifest}: labels {unknown} are not in the model's label set {net.label_names} ({model})"
            )
        crop = _model_eval_crop(net)
        loader = make_loader(rows, root, net.label_names, crop, batch_size=batch_size)
        reports = evaluate_loader(net, loader, device)
        timed = [loader.dataset[i]["input_values"] for i in range(min(latency_utts, len(rows)))]
        latency = measure_exit_latency(net, timed, device)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    console.print(exit_table(reports, latency, title=f"{model} on {manifest} ({len(rows)} utterances)"))
    result = {
        "model": str(model),
        "manifest": str(manifest),
        "split": split,
        "label_names": net.label_names,
        "exits": {str(k): reports[k].to_dict() | {"latency_s": latency[k]} for k in reports},
    }
    if json_out:
        atomic_write_json(json_out, result)
        console.print(f"metrics: {json_out}")
    plot = plot or (json_out.with_suffix(".png") if json_out else None)
    if plot:
        plot_uar_vs_latency({"model": {k: (reports[k].uar, latency[k]) for k in reports}}, plot)
        console.print(f"plot: {plot}")


def _model_eval_crop(net: Any):
    from fedsd.audio import CropPolicy

    return CropPolicy.for_evaluation(net.meta.get("crop"), int(net.meta.get("sample_rate", 16000)))


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
    if model.suffix.lower() == ".onnx":  # before anything imports torch
        from fedsd.onnx_cli import predict_onnx

        predict_onnx(files, model, exit_, threshold, json_out)
        return
    import torch
    from rich.table import Table

    from fedsd.audio import AudioError, apply_crop, load_audio, normalize_waveform
    from fedsd.model.multiexit import MultiExitSER

    try:
        net = MultiExitSER.from_pretrained(model).to(device).eval()
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    if exit_ != "auto":
        try:
            k = int(exit_)
        except ValueError:
            _fail(f"--exit {exit_!r}: give an exit layer number ({net.exits}) or 'auto'", 2)
        if k not in net.exits:
            _fail(f"--exit {k}: this model has exits {net.exits}", 2)
    crop = _model_eval_crop(net)
    results: list[dict[str, Any]] = []
    failures = 0
    for f in files:
        try:
            wav = normalize_waveform(apply_crop(load_audio(f, crop.sample_rate), crop))
        except AudioError as e:
            failures += 1
            results.append({"file": str(f), "error": e.reason})
            continue
        x = torch.from_numpy(wav)[None].to(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            if exit_ == "auto":
                used, probs = net.predict_early_exit(x, threshold=threshold)
            else:
                used = int(exit_)
                probs = torch.softmax(net(x, exits=[used])[used].logits[0], -1)
        dt = time.perf_counter() - t0
        top = int(probs.argmax())
        results.append(
            {
                "file": str(f),
                "label": net.label_names[top],
                "confidence": float(probs[top]),
                "exit": used,
                "latency_ms": dt * 1000,
                "probs": {n: float(p) for n, p in zip(net.label_names, probs.tolist(), strict=True)},
            }
        )
    if json_out:
        for r in results:
            sys.stdout.write(json.dumps(r) + "\n")
    else:
        t = Table(title=f"predictions ({model}, exit {exit_})")
        for col in ("file", "label", "confidence", "exit", "latency ms"):
            t.add_column(col)
        for r in results:
            if "error" in r:
                t.add_row(r["file"], f"[red]error: {r['error']}[/]", "", "", "")
            else:
                t.add_row(
                    r["file"], r["label"], f"{r['confidence']:.3f}", str(r["exit"]), f"{r['latency_ms']:.1f}"
                )
        console.print(t)
    if failures:
        err_console.print(f"[yellow]{failures} of {len(files)} file(s) could not be read[/]")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("evaluate")(evaluate_command)
    app.command("predict")(predict_command)
