"""What the :class:`~fedsd.server.service.Server` and its helpers share: exit codes, errors, results, the log sink."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_DEVICES = 3
"""Fewer than min_clients devices were connected within device_wait seconds."""
EXIT_INTERRUPTED = 130

Log = Callable[[str, str], None]
"""``log(message, level)``; level is ``"info"``, ``"warn"`` or ``"ok"`` (a step that succeeded)."""

_logger = logging.getLogger("fedsd.server")


def log_to_logging(message: str, level: str) -> None:
    _logger.log(logging.WARNING if level == "warn" else logging.INFO, message)


class ServerError(RuntimeError):
    """The server could not start (or read its run's outcome); the message says why and what to do.

    ``code`` is the exit code `fedsd server start` ends with: 2 for options that do not fit, else 1.
    """

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class DeviceSlot:
    """One device of the prepared run: its manifest and the command that starts it."""

    name: str
    manifest: Path
    utterances: int
    labelled: int
    exit: int
    """The exit the config's ``federated.exits_mix`` suggests for it."""
    command: str
    """A ready-to-paste ``fedsd client run ...`` line (add ``--model DIR`` if the device has the model)."""


@dataclass
class ServerSummary:
    """How a submitted run ended, as the SuperLink recorded it (``flwr ls``) plus the run directory."""

    run_id: int
    status: str
    """Flower's run status, e.g. ``finished:completed``, ``finished:failed``, ``finished:stopped``."""
    details: str
    exit_code: int
    """0 completed, 3 not enough devices, 1 any other failure."""
    run_dir: Path
    message: str
    """One line for a person: what happened and where the results are."""
    hint: str | None = None
    """For a failed run: where the SuperLink log is and the command that resumes the run."""
    outcome: dict[str, Any] = field(default_factory=dict)
    """What the ServerApp wrote about an early end (``outcome.json``), or {}."""
    metrics: list[dict[str, Any]] = field(default_factory=list)
    """The records of ``metrics.jsonl`` (one per evaluated round)."""

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"


@dataclass(frozen=True)
class Registration:
    """A device key registered with a running server (node authentication)."""

    public_key: Path
    node_id: int
    address: str
