"""`fedsd data ...` commands: scan corpora, import tables, check audio, synthesize, partition, stats."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)

# --- `synth` is defined in fedsd/data/synth_cli.py and mounted here (keeps this file's owners apart).
from fedsd.data.synth_cli import register as _register_synth  # noqa: E402

_register_synth(app)

# --- scan / import-csv / check / partition / stats below.
