"""What the fleet proxy (``fedsd.security.proxy``) lets through and how much a peer may make it hold.

Why apart from the connection handler: the policy (which requests reach the SuperLink) and the limits
(sizes, deadlines, read budget) are what an operator tunes and a reviewer checks; the handler only
enforces them.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from dataclasses import dataclass

FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z0-9-]{0,63}")
"""The Fleet API methods (``flwr/superlink/routers/fleet/router.py``: register-node, pull-messages, ...)."""

HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "trailers", "transfer-encoding", "upgrade", "host", "content-length",
    }
)  # fmt: skip

MAX_BODY = 512 * 1024 * 1024
"""Largest request forwarded (a model delivery travels as objects of a few MB each)."""

READ_BUDGET = 128 * 1024
"""Bytes all connections together read per round of socket reads: each connection reads
``READ_BUDGET / open connections`` at a time (between ``READ_MIN`` and ``READ_MAX``) and stops reading
once it holds two such reads not yet forwarded. One device gets 64 KiB reads (throughput); 32 at once
get 4 KiB each, so a flood of bodies costs a fixed ~60 KiB per connection, whatever their sizes."""

READ_MIN, READ_MAX = 4 * 1024, 64 * 1024

_BUSY = b"fedsd: too many connections; retry later\n"
TOO_MANY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\nconnection: close\r\nretry-after: 5\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_BUSY), _BUSY)
)
"""What a connection over ``--max-connections`` gets (plain HTTP), written without parsing anything."""

@dataclass(frozen=True)
class Limits:
    """What one peer may make the proxy hold, and for how long (all before any authentication)."""

    max_body: int = MAX_BODY
    """Largest request body; more is refused with 413 (``--max-body``)."""
    max_connections: int = 256
    """Open device connections; the next one gets 503 and is closed (``--max-connections``)."""
    max_header_bytes: int = 16 * 1024
    """Request line + headers; more is refused with 431 (``--max-header-bytes``)."""
    header_timeout_s: float = 10.0
    """A request head must arrive within this many seconds of its first byte (or of the connection)."""
    body_timeout_s: float = 30.0
    """A body may pause this long; beyond that it must average ``min_body_rate`` bytes/s."""
    min_body_rate: int = 16 * 1024
    """Bytes per second a body (or a response read by the peer) must keep after ``body_timeout_s``."""
    keep_alive_s: float = 30.0
    """An idle connection waits this long for its next request."""
    upstream_timeout_s: float = 600.0
    """How long the SuperLink may take to answer."""

    def __post_init__(self) -> None:
        for name in ("max_body", "max_connections", "max_header_bytes", "min_body_rate"):
            if getattr(self, name) < 1:
                raise ValueError(f"proxy limit {name}={getattr(self, name)}: must be at least 1")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s", "upstream_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"proxy limit {name}={getattr(self, name)}: must be positive")


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def allowed(method: str, path: str, raw_path: bytes, peer: str | None) -> bool:
    """May this request reach the SuperLink? Fleet calls from anyone; the rest from this machine only."""
    if is_loopback(peer):
        return True
    if method != "POST" or b"%" in raw_path or b"//" in raw_path:
        return False
    return FLEET_PATH.fullmatch(path) is not None and raw_path.decode("latin-1") == path


def _size(text: str) -> int:
    """``512M``, ``16K``, ``1048576`` → bytes (argparse type)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KkMmGg]?)i?[Bb]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: give a size in bytes, e.g. 1048576, 64K or 512M")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]
