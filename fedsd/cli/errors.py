"""The exit codes every `fedsd` command ends with, and the one helper that reports an error.

Why one table: a script that runs `fedsd` needs to tell "I called it wrong" from "the work failed" from
"the other side was not there" without parsing messages. The values are the ones the server
(``fedsd.server.service.EXIT_*``) and the device supervisor (``fedsd.clients.supervisor.EXIT_*``)
already return, and 2 is click's own code for a usage error, so one table holds for every command
(docs/cli.md, "Exit codes").
"""

from __future__ import annotations

from enum import IntEnum
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

err_console = Console(stderr=True)


class ExitCode(IntEnum):
    """What a `fedsd` command's exit status means."""

    OK = 0
    """The command did what it was asked."""
    FAILURE = 1
    """The work ran and failed: unusable or missing data, a training, export or federated run that failed,
    unreadable files among those given (the others are still reported)."""
    USAGE = 2
    """Bad input, caught before any work started: an unknown or contradicting flag or value (click's own
    usage errors included), a config file that is missing or invalid, a bad ``--set`` key or value."""
    UNAVAILABLE = 3
    """The other side was not there: `server start` got too few devices within ``--device-wait``;
    `client run` could not reach the server for ``--server-timeout`` seconds."""
    REFUSED = 4
    """`client run`: the server refused this device (TLS or node authentication)."""
    INTERRUPTED = 130
    """Stopped by SIGINT or SIGTERM (after its clean-up)."""


def fail(message: str, code: int = ExitCode.FAILURE) -> NoReturn:
    """Print ``error: message`` on stderr and end the command with ``code`` (never a traceback).

    The message is printed as text, not rich markup, and never wrapped: a path in it stays one piece.
    """
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(int(code))


def warn(message: str) -> None:
    """A yellow ``warning:`` line on stderr (the command goes on)."""
    err_console.print(f"[bold yellow]warning:[/] {escape(message)}", soft_wrap=True, highlight=False)
