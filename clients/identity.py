"""A device's own, stable identity (issue 11): what its privacy accounting is keyed by.

Flower's node id changes whenever a SuperNode restarts, and the ``federation-id`` is the server's
choice; neither can key what a device has spent. A real device keeps a random id in its cache
(``<cache>/device-id``, made once, never sent anywhere but the handshake) and a device-wide DP ledger
beside it (``fedsd.clients.dp_training``); a simulated device is named by its partition.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path
from typing import Any

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
FILE_NAME = "device-id"


def device_id(settings: Any) -> str:
    """This device's identity: ``sim-<partition id>`` for a simulated device, else the random id kept
    in ``<cache>/device-id`` (created on first use; a damaged file is replaced)."""
    if getattr(settings, "partition", None) is not None:
        return f"sim-{int(settings.partition_id or 0)}"
    return stored_identity(Path(settings.cache_dir))


def stored_identity(cache_dir: Path) -> str:
    path = cache_dir / FILE_NAME
    with contextlib.suppress(OSError):
        text = path.read_text(encoding="ascii").strip()
        if ID_PATTERN.fullmatch(text):
            return text
    ident = secrets.token_hex(16)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{FILE_NAME}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(ident + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    if path.exists():  # damaged: replace it
        os.replace(tmp, path)
        return ident
    try:
        os.link(tmp, path)  # first writer wins: two processes racing agree on one id
    except FileExistsError:
        os.unlink(tmp)
        return path.read_text(encoding="ascii").strip()
    os.unlink(tmp)
    return ident
