"""A bounded wait for devices: Flower's own ``sample_nodes`` waits forever for ``min_available_nodes``."""

from __future__ import annotations

import time
from logging import INFO

from flwr.common.logger import log
from flwr.serverapp import Grid


class NotEnoughDevices(RuntimeError):
    """Fewer devices than needed stayed connected for the whole bounded wait (``node_wait_s``)."""


def wait_for_nodes(grid: Grid, needed: int, timeout_s: float | None, what: str = "the run") -> list[int]:
    """The connected node ids once at least ``needed`` are connected; :class:`NotEnoughDevices`
    after ``timeout_s`` seconds (None: wait forever, Flower's own behaviour)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    logged = -1
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= needed:
            return nodes
        if deadline is not None and time.monotonic() >= deadline:
            raise NotEnoughDevices(
                f"only {len(nodes)} device(s) connected after waiting {timeout_s:.0f} s for {what}; "
                f"{needed} are needed (min_clients). Start more devices (`fedsd client run ...`), lower "
                "--min-clients, or wait longer with --device-wait SECONDS"
            )
        if len(nodes) != logged:
            logged = len(nodes)
            log(INFO, "waiting for devices: %d connected, %d needed", len(nodes), needed)
        time.sleep(min(1.0, max(0.05, (timeout_s or 1.0) / 20)))
