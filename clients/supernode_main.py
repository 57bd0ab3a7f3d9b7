"""`flower-supernode` with a chosen heartbeat interval (``python -m fedsd.clients.supernode_main``).

Why: Flower 1.42's SuperNode always announces a 30 s heartbeat interval, and the SuperLink answers for
a dead node only after twice that (its patience), so a device that crashes mid-round holds the round
for about a minute. The SuperLink accepts any interval in [10, 1800] s. This entry point sets the
interval the SuperNode announces and beats at — the two module globals that read it in the SuperNode's
own process — then runs Flower's `flower-supernode` CLI unchanged. The ClientApp processes the
SuperNode starts, and their task heartbeats, are not touched.
"""

from __future__ import annotations

import sys

DEFAULT_S = 30.0
"""Flower's own interval (``flwr.common.constant.HEARTBEAT_DEFAULT_INTERVAL``)."""
MIN_S, MAX_S = 10.0, 1800.0
"""What the SuperLink accepts (``HEARTBEAT_MIN_INTERVAL`` / ``HEARTBEAT_MAX_INTERVAL``)."""


def check_interval(seconds: float) -> float:
    if not MIN_S <= float(seconds) <= MAX_S:
        raise ValueError(f"--heartbeat {seconds:g}: the SuperLink accepts {MIN_S:g} to {MAX_S:g} seconds")
    return float(seconds)


def command(heartbeat_s: float, args: list[str]) -> list[str]:
    """The command line of a SuperNode beating every ``heartbeat_s`` seconds with ``args``."""
    return [sys.executable, "-m", "fedsd.clients.supernode_main", "--heartbeat", f"{heartbeat_s:g}", *args]


def set_interval(seconds: float) -> None:
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    for module in (heartbeat, fleet_http_connection):
        if not hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"):
            raise RuntimeError(f"{module.__name__} no longer reads HEARTBEAT_DEFAULT_INTERVAL (Flower changed)")
        module.HEARTBEAT_DEFAULT_INTERVAL = seconds  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != "--heartbeat":
        print("usage: python -m fedsd.clients.supernode_main --heartbeat SECONDS [flower-supernode args]",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        set_interval(check_interval(float(args[1])))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *args[2:]]
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
