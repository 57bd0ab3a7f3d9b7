"""`fedsd config list|show`: the configs that come with fedsd, to run by name or copy and edit.

Why: after `pip install fedsd` the YAML files live inside the package; `fedsd config show demo >
my.yaml` is how a user gets one to edit (`data.root`, `data.manifest` for their own corpus).
"""

from __future__ import annotations

import sys

import typer

from fedsd.config import ConfigError, resolve_config_path, shipped_configs

app = typer.Typer(no_args_is_help=True)


def _summary(text: str) -> str:
    """The first comment line of a config file (its one-line description), without the ``#``."""
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


@app.command("list")
def list_command() -> None:
    """List the shipped configs (usable as `--config NAME` anywhere) with their first comment line."""
    configs = shipped_configs()
    if not configs:
        typer.echo("error: no shipped configs found (a broken install?)", err=True)
        raise typer.Exit(1)
    width = max(len(n) for n in configs)
    for name, path in configs.items():
        typer.echo(f"{name:<{width}}  {_summary(path.read_text(encoding='utf-8'))}".rstrip())


@app.command("show")
def show_command(
    name: str = typer.Argument(..., help="A shipped config name (`fedsd config list`) or a YAML path."),
) -> None:
    """Print a config's YAML, comments included, to copy and edit: `fedsd config show demo > my.yaml`."""
    try:
        path = resolve_config_path(name)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    sys.stdout.write(path.read_text(encoding="utf-8"))


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="config", help="Shipped experiment configs: list them, print one to copy.")
