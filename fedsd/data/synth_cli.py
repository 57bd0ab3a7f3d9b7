"""`fedsd data synth`: generate the synthetic emotional speech corpus."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
