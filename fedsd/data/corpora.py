"""Corpus scanners: turn a corpus as distributed on disk into manifest rows, plus label presets.

Why one scanner per corpus: each corpus encodes emotion, speaker and text in its own file-naming (or
annotation-file) convention, and getting the speaker wrong silently leaks speakers between train and test
(IEMOCAP's speaker is the session plus the gender letter of the *utterance* suffix, not the dialog prefix).
Files that do not follow a corpus's naming are skipped and counted, never fatal, because real corpus
folders carry stray files (macOS ``._`` forks, README audio, duplicates).

``orig_label`` keeps the corpus's own class name (spelled out, lowercase); ``label`` is the class after a
*preset* maps it to a task. A preset maps every known label name to a task label or to None (drop); rows
whose class is dropped are removed entirely, not kept unlabelled.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedsd.data.corpus_base import (  # noqa: F401  (this module's public names)
    AUDIO_SUFFIXES,
    DEFAULT_PRESETS,
    PRESETS,
    RAW_PRESET,
    CorpusError,
    Progress,
    ScanResult,
    _build,
    _check_root,
    _Parsed,
    map_label,
    preset_names,
    resolve_preset,
)
from fedsd.data.manifest import ManifestError
from fedsd.data.scanners import (  # noqa: F401
    iemocap_speaker,
    read_iemocap_labels,
    scan_cremad,
    scan_demos,
    scan_emodb,
    scan_esd,
    scan_iemocap,
    scan_msp_podcast,
    scan_ravdess,
    scan_savee,
    scan_tess,
)

# ---------------------------------------------------------------------------------------------- registry
Scanner = Callable[..., ScanResult]
SCANNERS: dict[str, Scanner] = {
    "ravdess": scan_ravdess,
    "crema-d": scan_cremad,
    "emodb": scan_emodb,
    "iemocap": scan_iemocap,
    "demos": scan_demos,
    "esd": scan_esd,
    "tess": scan_tess,
    "savee": scan_savee,
    "msp-podcast": scan_msp_podcast,
}


def scan_corpus(
    name: str, root: str | os.PathLike[str], preset: str | None = None, *, progress: Progress | None = None
) -> ScanResult:
    """Scan corpus ``name`` at ``root``; ``preset`` None = the corpus's default preset."""
    key = name.lower()
    if key not in SCANNERS:
        raise CorpusError(f"unknown corpus {name!r}; valid corpora: {', '.join(SCANNERS)}")
    return SCANNERS[key](Path(root), preset, progress=progress)


# ---------------------------------------------------------------------------------------------- tables
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "dev": "valid",
    "valid": "valid",
    "val": "valid",
    "validation": "valid",
    "development": "valid",
    "test": "test",
    "eval": "test",
    "": "",
}


@dataclass(frozen=True)
class _Table:
    """How the rows of one imported table are read: its columns, paths and id rules."""

    table: Path
    root: Path
    dataset: str
    path_col: str
    label_col: str
    speaker_col: str
    utt_col: str | None
    split_col: str | None
    stems: Counter[str]

    def parse(self, lineno: int, rec: dict[str, str]) -> tuple[Path, _Parsed | str]:
        """One table row: its file and parsed fields, or its file and why it is skipped."""
        raw_path = (rec.get(self.path_col) or "").strip()
        if not raw_path:
            return Path(f"{self.table.name}:{lineno}"), "empty path"
        p = Path(raw_path)
        full = p if p.is_absolute() else self.root / p
        if not full.is_file():
            return full, "file not found"
        spk = (rec.get(self.speaker_col) or "").strip()
        if not spk:
            return full, f"empty speaker (line {lineno})"
        if self.utt_col:
            utt = (rec.get(self.utt_col) or "").strip()
        else:
            rel = full.relative_to(self.root) if full.is_relative_to(self.root) else p
            utt = p.stem if self.stems[p.stem] == 1 else rel.with_suffix("").as_posix().replace("/", "__")
        if not utt:
            return full, f"empty utterance id (line {lineno})"
        split = _SPLIT_ALIASES.get((rec.get(self.split_col) or "").strip().lower()) if self.split_col else ""
        if split is None:
            return full, f"unknown split {rec.get(self.split_col or '')!r} (line {lineno})"
        orig = (rec.get(self.label_col) or "").strip()
        local_spk = spk.split(":", 1)[1] if spk.startswith(f"{self.dataset}:") else spk
        return full, _Parsed(utt, orig, local_spk, split=split)


def _read_table(table: Path, wanted: Sequence[str]) -> list[dict[str, str]]:
    """The records of a CSV (TSV for .tsv/.tab) table that has every ``wanted`` column."""
    with open(table, newline="", encoding="utf-8-sig") as fh:
        text = fh.read()
    delimiter = "\t" if table.suffix.lower() in (".tsv", ".tab") else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    header = reader.fieldnames or []
    missing = [c for c in wanted if c not in header]
    if missing:
        raise ManifestError(
            f"{table}: missing column(s) {', '.join(missing)}; the table has {', '.join(header)}"
        )
    return list(reader)


def import_csv(
    table: str | os.PathLike[str],
    root: str | os.PathLike[str],
    path_col: str = "path",
    label_col: str = "label",
    speaker_col: str = "speaker",
    *,
    dataset: str = "custom",
    preset: str | None = None,
    utt_col: str | None = None,
    split_col: str | None = None,
    progress: Progress | None = None,
) -> ScanResult:
    """Rows from any CSV/TSV table with a path, label and speaker column (``preset`` None = raw labels).

    Paths are relative to ``root`` (absolute paths inside root are made relative). Missing or unreadable
    files are skipped and reported; a row with an empty label stays in the manifest as unlabelled speech.
    """
    table, root = Path(table), _check_root(root)
    if not table.is_file():
        raise CorpusError(f"{table}: table not found")
    name = resolve_preset(preset, None)
    recs = _read_table(table, [c for c in (path_col, label_col, speaker_col, utt_col, split_col) if c])
    # Utterance ids: the given column, else the file stem, else (on stem collisions) the relative path.
    stems = Counter(Path((r.get(path_col) or "").strip()).stem for r in recs)
    spec = _Table(table, root, dataset, path_col, label_col, speaker_col, utt_col, split_col, stems)
    items = [spec.parse(lineno, rec) for lineno, rec in enumerate(recs, start=2)]
    return _build(dataset, root, name, items, progress)
