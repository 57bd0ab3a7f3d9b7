"""`fedsd export`: write the slice of a trained model that a device at one exit needs.

Why a command: the server side trains the full multi-exit model, but a device deployed at exit K should
download and load only the front end, layers 1..K and the heads <= K (``fedsd.model.export``).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def _fail(msg: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {msg}", highlight=False)
    raise typer.Exit(code)


def _dir_bytes(path: Path) -> int:
    """Size on disk of every file under ``path`` (what a device would download)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def export_command(
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint directory of the full model."),
    exit_: int = typer.Option(..., "--exit", "-k", help="The exit the device runs (one of the model's)."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Directory to write the exported model to (--format onnx: X.onnx or a directory)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists and is not empty."),
    format_: str = typer.Option(
        "pytorch", "--format", help="pytorch (a fedsd checkpoint directory) or onnx (one graph file)."
    ),
    quantize: str | None = typer.Option(None, "--quantize", help="With --format onnx: int8."),
    exits: str | None = typer.Option(
        None, "--exits", help="With --format onnx: several exits in one graph, e.g. 1,2,3 (default: --exit)."
    ),
    calibration: Path | None = typer.Option(
        None, "--calibration", help="int8: manifest CSV of your own speech (default: the demo corpus)."
    ),
    root: Path | None = typer.Option(None, "--root", help="Corpus root --calibration's paths are relative to."),
    calibration_clips: int = typer.Option(300, help="int8: at most this many clips calibrate the ranges."),
    quant_mode: str = typer.Option(
        "static",
        help="int8 method: static (calibrated QDQ of the transformer MatMuls; default, see README), "
        "static-all (every op, front end included), dynamic (MatMul weights), dynamic-all.",
    ),
) -> None:
    """Export the model a device at one exit needs: front end, layers 1..K and heads <= K.

    Outputs at every kept exit equal the full model's exactly; the parent fingerprint is recorded so the device still matches the server's full model.
    With [bold]--format onnx[/] one ONNX graph (waveform + mask in, logits + probs out) is written, optionally int8-quantised with ONNX Runtime; it runs without torch (`fedsd predict --model X.onnx`).

    Example: [bold]fedsd export --model runs/demo/best --exit 2 --out runs/demo/exit2[/]
    Example: [bold]fedsd export --model runs/demo/best --exit 2 --format onnx --quantize int8 --out runs/demo/exit2-int8.onnx[/]
    """
    if format_ not in ("pytorch", "onnx"):
        _fail(f"--format {format_!r}: valid values: pytorch, onnx", 2)
    if format_ == "onnx":
        _export_onnx(
            model, exit_, out, force, quantize, exits, calibration, root, calibration_clips, quant_mode
        )
        return
    if quantize or exits or calibration:
        _fail("--quantize, --exits and --calibration need --format onnx", 2)
    from fedsd.model.backbone import ConfigError
    from fedsd.model.export import export_exit, parameter_count, parent_fingerprint
    from fedsd.model.multiexit import MultiExitSER

    if not model.is_dir():
        _fail(f"--model {model}: not a directory (expected a checkpoint written by `fedsd train`)", 2)
    if out.exists() and out.resolve() == model.resolve():
        _fail(f"--out {out}: is the --model directory; export to a new directory", 2)
    if out.exists() and not out.is_dir():
        _fail(f"--out {out}: exists and is not a directory", 2)
    if out.is_dir() and any(out.iterdir()) and not force:
        _fail(f"--out {out}: exists and is not empty; pass --force to replace it", 2)
    try:
        net = MultiExitSER.from_pretrained(model)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    if exit_ not in net.exits:
        _fail(f"--exit {exit_}: not an exit of {model}; valid exits: {net.exits}", 2)
    try:
        small = export_exit(net, exit_)
    except ConfigError as e:  # pragma: no cover - the check above catches it first
        _fail(str(e), 2)
    small.save_pretrained(out)

    size_in, size_out = _dir_bytes(model), _dir_bytes(out)
    params_in, params_out = parameter_count(net), parameter_count(small)
    table = Table(title=f"export exit {exit_}: {model} -> {out}")
    for col in ("", "layers", "exits", "parameters", "size MB"):
        table.add_column(col, justify="right" if col not in ("", "exits") else "left")
    table.add_row(
        "before",
        str(net.encoder.num_layers),
        str(net.exits),
        f"{params_in:,}",
        f"{size_in / 1e6:.2f}",
    )
    table.add_row(
        "after",
        str(small.encoder.num_layers),
        str(small.exits),
        f"{params_out:,}",
        f"{size_out / 1e6:.2f}",
    )
    console.print(table)
    console.print(
        f"size {size_out / max(size_in, 1):.0%} of the original, parameters "
        f"{params_out / max(params_in, 1):.0%}; parent fingerprint {parent_fingerprint(small)[:12]}…",
        highlight=False,
    )


def _calibration_clips(
    info: dict, manifest: Path | None, root: Path | None, limit: int
) -> tuple[list, str]:
    """Normalised clips (as the graph sees them) for int8 calibration, and where they came from."""
    from fedsd.audio import AudioError
    from fedsd.data.manifest import read_manifest
    from fedsd.onnx_runtime import load_clip

    if manifest is None:
        manifest = Path("data/synth/manifest.csv")
        root = root or manifest.parent
        if not manifest.is_file():
            _fail(
                "--quantize int8 needs calibration speech: pass --calibration manifest.csv --root DIR "
                "(a few hundred clips of your own speech), or run `fedsd demo` first for the demo corpus",
                2,
            )
    if root is None:
        root = manifest.parent
    try:
        rows = read_manifest(manifest)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e), 2)
    train = [r for r in rows if r.split == "train"]
    rows = train or rows
    if not rows:
        _fail(f"--calibration {manifest}: no rows", 2)
    step = max(1, len(rows) // max(1, limit))
    chosen = rows[::step][:limit]
    clips = []
    for r in chosen:
        try:
            clips.append(load_clip(root / r.path, info["preprocessing"]))
        except AudioError as e:
            err_console.print(f"[yellow]calibration: skipping {e}[/]", highlight=False)
    if not clips:
        _fail(f"--calibration {manifest}: none of the chosen clips could be read under {root}", 2)
    return clips, f"{manifest} ({len(clips)} clips)"


def _export_onnx(
    model: Path,
    exit_: int,
    out: Path,
    force: bool,
    quantize: str | None,
    exits: str | None,
    calibration: Path | None,
    root: Path | None,
    limit: int,
    quant_mode: str,
) -> None:
    from fedsd.model.backbone import ConfigError
    from fedsd.model.multiexit import MultiExitSER
    from fedsd.onnx_export import QUANT_DETAIL, QUANT_MODES, export_onnx, graph_info

    if quantize not in (None, "int8"):
        _fail(f"--quantize {quantize!r}: valid values: int8", 2)
    if quant_mode not in QUANT_MODES:
        _fail(f"--quant-mode {quant_mode!r}: valid values: {', '.join(QUANT_MODES)}", 2)
    if not model.is_dir():
        _fail(f"--model {model}: not a directory (expected a checkpoint written by `fedsd train`)", 2)
    try:
        wanted = [int(x) for x in exits.split(",") if x.strip()] if exits else [exit_]
    except ValueError:
        _fail(f"--exits {exits!r}: give comma-separated exit numbers, e.g. 1,2,3", 2)
    if out.suffix.lower() != ".onnx":
        if out.exists() and not out.is_dir():
            _fail(f"--out {out}: give a .onnx file name or a directory", 2)
        tag = "-".join(str(k) for k in sorted(set(wanted)))
        out = out / f"exit{tag}{'-int8' if quantize else ''}.onnx"
    if out.exists() and not force:
        _fail(f"--out {out}: exists; pass --force to replace it", 2)
    try:
        net = MultiExitSER.from_pretrained(model)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    bad = [k for k in wanted if k not in net.exits]
    if bad:
        _fail(f"--exit/--exits {bad}: not exits of {model}; valid exits: {net.exits}", 2)
    clips = None
    source = None
    if quantize and quant_mode.startswith("static"):
        clips, source = _calibration_clips(graph_info(net, wanted, None), calibration, root, limit)
    try:
        info = export_onnx(net, wanted, out, quantize=quantize, calibration=clips, quant_mode=quant_mode)
    except ConfigError as e:
        _fail(str(e), 2)
    size = out.stat().st_size
    what = f"int8 ({QUANT_DETAIL[quant_mode]})" if quantize else "fp32"
    console.print(
        f"wrote {out} ({size / 1e6:.2f} MB, {what}): exits {info['exits']}, layers 1..{info['exits'][-1]}, "
        f"labels {info['label_names']}; metadata also in {out.with_suffix('.json')}",
        highlight=False,
    )
    if source:
        console.print(f"calibrated on {source}", highlight=False)
    console.print(f"run it without torch: fedsd predict --model {out} a.wav", highlight=False)


def register(app: typer.Typer) -> None:
    """Mount ``export`` as a top-level command of the ``fedsd`` app."""
    app.command("export")(export_command)
