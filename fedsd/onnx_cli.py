"""`fedsd predict` / `fedsd evaluate` on an exported ``.onnx`` graph: ONNX Runtime, no torch.

``fedsd.train_cli`` hands over here when ``--model`` ends in ``.onnx``, before anything imports torch
(``tests/test_onnx.py`` checks ``sys.modules``). Same output as the PyTorch commands.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def _fail(msg: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {msg}", highlight=False)
    raise typer.Exit(code)


def _load(model: Path) -> Any:
    from fedsd.onnx_runtime import OnnxExitModel

    try:
        return OnnxExitModel.load(model)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))


def predict_onnx(files: list[Path], model: Path, exit_: str, threshold: float, json_out: bool) -> None:
    """``fedsd predict --model X.onnx``: one record per file, as the PyTorch path prints."""
    from rich.table import Table

    from fedsd.onnx_runtime import predict_files

    net = _load(model)
    if exit_ == "auto" and len(net.exits) == 1:
        exit_ = str(net.exits[0])  # a single-exit graph: its exit is the only answer
    if exit_ != "auto":
        try:
            k = int(exit_)
        except ValueError:
            _fail(f"--exit {exit_!r}: give an exit layer number ({net.exits}) or 'auto'", 2)
        if k not in net.exits:
            _fail(f"--exit {k}: this graph has exits {net.exits}", 2)
    results = predict_files(net, files, exit_, threshold)
    failures = sum("error" in r for r in results)
    if json_out:
        for r in results:
            sys.stdout.write(json.dumps(r) + "\n")
    else:
        t = Table(title=f"predictions ({model}, exit {exit_}, ONNX Runtime)")
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


def evaluate_onnx(
    model: Path,
    manifest: Path,
    root: Path,
    split: str | None,
    json_out: Path | None,
    plot: Path | None,
    batch_size: int,
    latency_utts: int,
) -> None:
    """``fedsd evaluate --model X.onnx``: the per-exit report of an exported graph."""
    from fedsd.checkpoint import atomic_write_json
    from fedsd.data.manifest import read_manifest
    from fedsd.metrics import classification_report
    from fedsd.onnx_runtime import evaluate_clips, measure_latency
    from fedsd.report import exit_table, plot_uar_vs_latency

    net = _load(model)
    try:
        rows = read_manifest(manifest)
        if split and split != "all":
            rows = [r for r in rows if r.split == split]
            if not rows:
                _fail(f"{manifest}: no rows with split={split!r} (use --split all)")
        rows = [r for r in rows if r.label]
        unknown = sorted({r.label for r in rows} - set(net.label_names))
        if unknown:
            _fail(f"{manifest}: labels {unknown} are not in the model's label set {net.label_names} ({model})")
        wavs = [net.load_clip(root / r.path) for r in rows]
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    y = [net.label_names.index(r.label) for r in rows]
    preds = evaluate_clips(net, wavs, batch_size)
    reports = {k: classification_report(y, p, net.label_names) for k, p in preds.items()}
    latency = measure_latency(net, wavs[:latency_utts])
    console.print(exit_table(reports, latency, title=f"{model} on {manifest} ({len(rows)} utterances, ONNX)"))
    result = {
        "model": str(model),
        "manifest": str(manifest),
        "split": split,
        "label_names": net.label_names,
        "runtime": "onnxruntime",
        "quantization": net.info.get("quantization"),
        "exits": {str(k): reports[k].to_dict() | {"latency_s": latency[k]} for k in reports},
    }
    if json_out:
        atomic_write_json(json_out, result)
        console.print(f"metrics: {json_out}")
    plot = plot or (json_out.with_suffix(".png") if json_out else None)
    if plot:
        plot_uar_vs_latency({"model": {k: (reports[k].uar, latency[k]) for k in reports}}, plot)
        console.print(f"plot: {plot}")
