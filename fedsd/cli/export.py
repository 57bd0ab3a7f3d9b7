"""`fedsd export`: write the slice of a trained model that a device at one exit needs.

Flags → ``fedsd.runtime.export.export`` (which does the work and the checks) → a before/after table or one line
per ONNX graph. Why a command: a device deployed at exit K should download and load only the front end,
layers 1..K and the heads <= K.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.table import Table

from fedsd.cli.errors import fail
from fedsd.cli.output import console, err_console, json_option, json_output
from fedsd.runtime.onnx_runtime import AUTO_MIN_AGREEMENT

if TYPE_CHECKING:
    from fedsd.runtime.export import ExportResult


class Format(StrEnum):
    """What is written: a fedsd checkpoint directory, or one ONNX graph."""

    pytorch = "pytorch"
    onnx = "onnx"


class Quantize(StrEnum):
    """Weight precision of an ONNX graph (default: fp32)."""

    int8 = "int8"


class QuantMode(StrEnum):
    """How int8 is applied (``fedsd.runtime.onnx_export.QUANT_MODES``)."""

    auto = "auto"
    static = "static"
    static_cnn = "static-cnn"
    static_all = "static-all"
    dynamic = "dynamic"
    dynamic_all = "dynamic-all"


def export_command(
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint directory of the full model."),
    exit_: int = typer.Option(..., "--exit", "-k", help="The exit the device runs (one of the model's)."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Directory to write the exported model to (--format onnx: X.onnx or a directory)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists and is not empty."),
    format_: Format = typer.Option(
        Format.pytorch, "--format", help="pytorch (a fedsd checkpoint directory) or onnx (one graph file)."
    ),
    quantize: Quantize | None = typer.Option(None, "--quantize", help="With --format onnx: int8 weights."),
    exits: str | None = typer.Option(
        None, "--exits", help="With --format onnx: several exits in one graph, e.g. 1,2,3 (default: --exit)."
    ),
    calibration: Path | None = typer.Option(
        None, "--calibration", help="int8: manifest CSV of your own speech (default: the demo corpus)."
    ),
    root: Path | None = typer.Option(None, "--root", help="Corpus root --calibration's paths are relative to."),
    calibration_clips: int = typer.Option(300, help="int8: at most this many clips calibrate the ranges."),
    quant_mode: QuantMode = typer.Option(
        QuantMode.auto,
        help="int8 method: auto (default: static-cnn if it keeps --min-agreement of the fp32 answers on "
        "held-out clips at every exit, else static), static (calibrated QDQ of the transformer MatMuls), "
        "static-cnn (MatMuls and every conv but the first: 1.7-1.9x eager at the base shape, changes some "
        "close calls), static-all (every op), dynamic (MatMul weights), dynamic-all. See README.",
    ),
    min_agreement: float = typer.Option(
        AUTO_MIN_AGREEMENT, help="int8 auto: share of held-out clips whose answer must not change, at every exit."
    ),
    check_clips: int = typer.Option(
        100, help="int8 auto: held-out clips it checks on (--calibration's valid rows, else every 5th row)."
    ),
    json_: bool = json_option(),
) -> None:
    """Export the model a device at one exit needs: front end, layers 1..K and heads <= K.

    Outputs at every kept exit equal the full model's exactly; the parent fingerprint is recorded so the device still matches the server's full model.
    With [bold]--format onnx[/] one ONNX graph (waveform + mask in, logits + probs out) is written, optionally int8-quantised with ONNX Runtime; it runs without torch (`fedsd predict --model X.onnx`).

    Example: [bold]fedsd export --model runs/demo/best --exit 2 --out runs/demo/exit2[/]
    Example: [bold]fedsd export --model runs/demo/best --exit 2 --format onnx --quantize int8 --out runs/demo/exit2-int8.onnx[/]
    """
    from fedsd.runtime.export import ExportError, export

    with json_output(json_) as output:
        try:
            with err_console.status("exporting", spinner="dots") as status:
                result = export(
                    model, out, exit=exit_, format=format_.value, quantize=quantize.value if quantize else None,
                    quant_mode=quant_mode.value, exits=exits, calibration=calibration, root=root,
                    calibration_clips=calibration_clips, check_clips=check_clips, min_agreement=min_agreement,
                    force=force, warn=_warn, step=status.update,
                )  # fmt: skip
        except ExportError as e:
            fail(str(e), e.code)
        (_print_onnx if result.format == "onnx" else _print_pytorch)(result)
        output.document(result)


def _warn(msg: str) -> None:
    err_console.print(f"[yellow]{escape(msg)}[/]", highlight=False)


def _print_pytorch(r: ExportResult) -> None:
    """Before/after table: layers, exits, parameters and size of the full and the exported model."""
    table = Table(title=f"export exit {r.exits[-1]}: {r.model} -> {r.path}")
    for col in ("", "layers", "exits", "parameters", "size MB"):
        table.add_column(col, justify="right" if col not in ("", "exits") else "left")
    for name, layers, exits, params, size in (
        ("before", r.source_layers, r.source_exits, r.source_parameters, r.source_bytes),
        ("after", r.layers, r.exits, r.parameters, r.size_bytes),
    ):
        table.add_row(name, str(layers), str(exits), f"{params:,}", f"{size / 1e6:.2f}")
    console.print(table)
    console.print(
        f"size {r.size_bytes / max(r.source_bytes, 1):.0%} of the original, parameters "
        f"{(r.parameters or 0) / max(r.source_parameters or 0, 1):.0%}; parent fingerprint {(r.parent_fingerprint or '')[:12]}…",
        highlight=False,
    )


def _print_onnx(r: ExportResult) -> None:
    console.print(
        f"wrote {r.path} ({r.size_bytes / 1e6:.2f} MB, {r.quantization or 'fp32'}): exits {r.exits}, layers 1..{r.layers}, "
        f"labels {r.label_names}; metadata also in {r.path.with_suffix('.json')}",
        highlight=False,
    )
    if r.calibration:
        console.print(f"calibrated on {r.calibration}", highlight=False)
    if r.quant_choice:
        c = r.quant_choice
        agree = "; ".join(
            f"{m}: " + " / ".join(f"exit {k} {v:.1%}" for k, v in a.items()) for m, a in c["agreement"].items()
        )
        console.print(
            f"int8 auto chose {c['chosen']} (answers unchanged vs fp32 on {c['check_clips']} held-out clips: "
            f"{agree}; needed {c['min_agreement']:.0%})",
            highlight=False,
        )
    console.print(f"run it without torch: fedsd predict --model {r.path} a.wav", highlight=False)


def register(app: typer.Typer) -> None:
    """Mount ``export`` as a top-level command of the ``fedsd`` app."""
    app.command("export")(export_command)
