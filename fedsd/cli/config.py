"""`fedsd config list|show`: the configs that come with fedsd, to run by name or copy and edit.

Why: after `pip install fedsd` the YAML files live inside the package; `fedsd config show demo >
my.yaml` is how a user gets one to edit (`data.root`, `data.manifest` for their own corpus).
"""

from __future__ import annotations

import sys

import typer

from fedsd.cli.errors import ExitCode, fail
from fedsd.cli.output import json_option, json_output
from fedsd.config import ConfigError, load_config, resolve_config_path, shipped_configs

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
def list_command(json_: bool = json_option()) -> None:
    """List the shipped configs (usable as `--config NAME` anywhere) with their first comment line."""
    configs = shipped_configs()
    if not configs:
        fail("no shipped configs found (a broken install?)")
    with json_output(json_) as output:
        summaries = {name: _summary(path.read_text(encoding="utf-8")) for name, path in configs.items()}
        if not json_:
            width = max(len(n) for n in configs)
            for name, summary in summaries.items():
                typer.echo(f"{name:<{width}}  {summary}".rstrip())
        output.document([{"name": n, "path": configs[n], "summary": s} for n, s in summaries.items()])


@app.command("show")
def show_command(
    name: str = typer.Argument(..., help="A shipped config name (`fedsd config list`) or a YAML path."),
    json_: bool = json_option(
        "Print the validated config, every default filled in, as one JSON document instead of the YAML file."
    ),
) -> None:
    """Print a config's YAML, comments included, to copy and edit: `fedsd config show demo > my.yaml`."""
    try:
        path = resolve_config_path(name)
        with json_output(json_) as output:
            if json_:
                output.document(load_config(path).model_dump(mode="json"))
            else:
                sys.stdout.write(path.read_text(encoding="utf-8"))
    except ConfigError as e:
        fail(str(e), ExitCode.USAGE)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="config", help="Shipped experiment configs: list them, print one to copy.")
