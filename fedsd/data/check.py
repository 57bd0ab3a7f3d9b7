"""Decode every file of a manifest and say which are unusable, and why (`fedsd data check`, `api.check_manifest`).

Why a library function: a notebook or a pipeline should drop broken clips before training with the same
rules as the command line, without parsing its table.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedsd.data.audio import AudioError, read_audio
from fedsd.data.manifest import ManifestRow, read_manifest


@dataclass(frozen=True)
class BadFile:
    """One unusable row of a manifest and the reason (``file not found``, ``not decodable: ...``, ...)."""

    row: ManifestRow
    reason: str


@dataclass
class CheckResult:
    """What :func:`check_manifest` found: every row, and the unusable ones with their reasons."""

    manifest: Path
    rows: list[ManifestRow]
    bad: list[BadFile] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every file decodes."""
        return not self.bad

    @property
    def usable(self) -> list[ManifestRow]:
        """The rows whose audio decodes, in manifest order (what ``--drop-bad`` writes)."""
        bad_ids = {b.row.utt_id for b in self.bad}
        return [r for r in self.rows if r.utt_id not in bad_ids]


def check_manifest(
    manifest: str | os.PathLike[str],
    root: str | os.PathLike[str],
    *,
    min_seconds: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
) -> CheckResult:
    """Decode every file of ``manifest`` (paths relative to ``root``); never modifies anything.

    A clip shorter than ``min_seconds`` counts as unusable. ``progress(done, total)`` is called after each
    file. Raises ``ManifestError`` for an unreadable manifest; unusable audio is reported, not raised.
    """
    rows = read_manifest(manifest)
    result = CheckResult(Path(manifest), rows)
    for i, row in enumerate(rows, start=1):
        try:
            read_audio(Path(root) / row.path, min_seconds=min_seconds)
        except AudioError as exc:
            result.bad.append(BadFile(row, exc.reason))
        if progress is not None:
            progress(i, len(rows))
    return result
