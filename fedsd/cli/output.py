"""Where a command's output goes: the `--json` convention, the consoles and the progress bar.

The rule (docs/cli.md, "Output"): progress bars and logs always go to stderr. Without ``--json`` a
command prints its report (tables, summary lines) on stdout; with ``--json`` stdout carries exactly one
JSON document (JSON lines for a stream: ``predict``, ``client run``) and everything meant for a person
moves to stderr. Inside :func:`json_output` ``sys.stdout`` itself points at stderr, so a stray ``print``
of a library cannot corrupt the document; the document is written to the real stdout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from enum import Enum
from pathlib import PurePath
from typing import IO, Any

import typer
from rich.console import Console

from fedsd.cli.errors import err_console

console = Console()
"""The report console: stdout (stderr inside :func:`json_output` with ``--json``)."""

JSON_HELP = "Print the result as one JSON document on stdout; tables and messages go to stderr."
JSONL_HELP = "Print one JSON object a line on stdout (a stream); messages go to stderr."

__all__ = ["JSONL_HELP", "JSON_HELP", "Output", "console", "err_console", "json_option", "json_output",
           "jsonable", "progress_bar", "progress_callback"]  # fmt: skip


def json_option(help: str = JSON_HELP) -> Any:
    """The ``--json`` flag, the same on every command that reports."""
    return typer.Option(False, "--json", help=help)


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types: dataclasses, pydantic models and ``to_dict()`` objects become
    objects, paths strings, dict keys strings, NaN and infinities null (strict JSON)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (PurePath, Enum)):
        return str(value.value if isinstance(value, Enum) else value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if hasattr(value, "to_dict"):
        return jsonable(value.to_dict())
    if hasattr(value, "model_dump"):
        return jsonable(value.model_dump(mode="json"))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "item"):  # a numpy scalar
        return jsonable(value.item())
    return str(value)


@dataclasses.dataclass
class Output:
    """One command's output: ``json`` is whether ``--json`` was given; ``stdout`` the real stdout."""

    json: bool
    stdout: IO[str]

    def document(self, doc: Any) -> None:
        """The command's one JSON document (only with ``--json``)."""
        if self.json:
            self.stdout.write(json.dumps(jsonable(doc), indent=2, allow_nan=False) + "\n")
            self.stdout.flush()

    def line(self, record: Any) -> None:
        """One JSON line of a stream (only with ``--json``)."""
        if self.json:
            self.stdout.write(json.dumps(jsonable(record), allow_nan=False) + "\n")
            self.stdout.flush()


@contextlib.contextmanager
def json_output(enabled: bool) -> Iterator[Output]:
    """The block of a command's work; with ``enabled`` (``--json``) every write to stdout inside it,
    the report console's included, lands on stderr, and only ``Output.document``/``line`` reach stdout."""
    out = Output(enabled, sys.stdout)
    if not enabled:
        yield out
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield out


def progress_bar(description: str = "{task.description}", *, remaining: bool = False) -> Any:
    """The rich progress bar every long command shows, on stderr, gone when it ends."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    clock = TimeRemainingColumn() if remaining else TimeElapsedColumn()
    return Progress(
        TextColumn(description), BarColumn(), MofNCompleteColumn(), clock, console=err_console, transient=True
    )


@contextlib.contextmanager
def progress_callback(description: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr driven by ``callback(done, total)`` (the library functions' hook)."""
    with progress_bar(remaining=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
