"""Choices and options that several commands share: engines, training modes, partition schemes, devices.

Why enums: a typo in ``--mode`` or ``--by`` is a usage error (exit 2) that lists the valid values before
anything starts, and ``--help`` shows them, instead of a config error after data preparation.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any

import typer


class Engine(StrEnum):
    """How simulated devices run: Flower's Ray simulation engine, or in this process (no workers)."""

    ray = "ray"
    inprocess = "inprocess"


class TrainMode(StrEnum):
    """Central training loss: self-distillation, or cross-entropy at every exit (the baseline)."""

    sd = "sd"
    ce = "ce"


class FederatedMode(StrEnum):
    """Devices' loss: self-distillation, labels only, or labels + the teacher's confident pseudo-labels."""

    sd = "sd"
    ce = "ce"
    pl = "pl"


class PartitionBy(StrEnum):
    """How a corpus is dealt into clients."""

    speaker = "speaker"
    dirichlet = "dirichlet"
    iid = "iid"


_DEVICE = re.compile(r"cpu|mps|(cuda|xpu)(:\d+)?")
DEVICE_HELP = "torch device: cpu, cuda, cuda:N (the N-th GPU), mps or xpu[:N]."


def check_device(value: str | None) -> str | None:
    """The ``--device`` callback: a torch device name, else a usage error (exit 2) naming the valid ones."""
    if value is not None and not _DEVICE.fullmatch(value):
        raise typer.BadParameter(f"{value!r} is not a torch device; use cpu, cuda, cuda:N, mps or xpu[:N]")
    return value


def device_option(default: str | None, help: str = DEVICE_HELP) -> Any:
    """``--device`` with its check (the same on train, evaluate, predict and client run)."""
    return typer.Option(default, "--device", help=help, metavar="DEVICE", callback=check_device)
