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
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write the exported model to."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists and is not empty."),
) -> None:
    """Export the model a device at one exit needs: front end, layers 1..K and heads <= K.

    Outputs at every kept exit equal the full model's exactly; the parent fingerprint is recorded so the device still matches the server's full model.

    Example: [bold]fedsd export --model runs/demo/best --exit 2 --out runs/demo/exit2[/]
    """
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


def register(app: typer.Typer) -> None:
    """Mount ``export`` as a top-level command of the ``fedsd`` app."""
    app.command("export")(export_command)
