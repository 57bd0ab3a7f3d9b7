"""`fedsd model import`: turn a CTranslate2 Whisper model into a directory `model.backbone` can load.

Why a command: faster-whisper users already hold Whisper as a CTranslate2 ``model.bin`` and may have no
network; the converter (``fedsd.model.ct2_import``) verifies what it reads and records the source's
sha256 beside the output, so the conversion is done once, checked, and reusable.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from fedsd.cli.errors import ExitCode, fail
from fedsd.cli.output import console, err_console, json_option, json_output

app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich")


@app.command("import")
def import_command(
    src: Path = typer.Argument(..., help="CTranslate2 Whisper directory (holding model.bin) or the model.bin."),
    out: Path = typer.Argument(..., help="Directory to write (Hugging Face layout, float32)."),
    encoder_only: bool = typer.Option(
        False, "--encoder-only", help="Write only the encoder (what a fedsd backbone needs; 1/5 of tiny.en)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists and is not empty."),
    json_: bool = json_option(),
) -> None:
    """Convert a CTranslate2 Whisper model (faster-whisper's format) for `model.backbone: OUT`.

    Checks every variable's shape and dtype, that Whisper's k projection has no bias, and that every
    weight is filled; OUT/fedsd_import.json records the input's sha256.
    """
    from fedsd.model.ct2_import import CT2Error, import_ct2

    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        fail(f"{out} exists and is not empty; pass --force to replace it", ExitCode.USAGE)
    with json_output(json_) as output:
        try:
            with err_console.status("importing") as status:
                record = import_ct2(src, out, encoder_only=encoder_only, step=lambda m: status.update(escape(m)))
        except CT2Error as err:
            fail(str(err))
        console.print(
            f"wrote {escape(str(out))}: {record['content']}, d_model {record['d_model']}, "
            f"{record['encoder_layers']} encoder layers, from {record['spec']} "
            f"({', '.join(record['source_dtypes'])}) sha256 {record['source_sha256'][:16]}…",
            highlight=False,
        )
        console.print(f"use it with: model.backbone: {escape(str(out))}", highlight=False)
        output.document({"out": out, **record})


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="model", help="Pretrained backbones: import a CTranslate2 Whisper model.")
