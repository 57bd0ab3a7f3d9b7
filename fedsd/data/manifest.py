"""The manifest: one CSV row per utterance, the single currency between corpora, partitions and models.

Columns (docs/architecture.md §3): ``utt_id, path, label, orig_label, speaker, dataset, duration, sample_rate, split``
plus optional ``session, gender, lang, text_id``. ``path`` is relative to the corpus root. An empty
``label`` means the utterance is unlabelled (still useful for distillation).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fedsd.checkpoint import atomic_write_text

REQUIRED_COLUMNS: tuple[str, ...] = (
    "utt_id",
    "path",
    "label",
    "orig_label",
    "speaker",
    "dataset",
    "duration",
    "sample_rate",
    "split",
)
OPTIONAL_COLUMNS: tuple[str, ...] = ("session", "gender", "lang", "text_id")
COLUMNS: tuple[str, ...] = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
SPLITS: frozenset[str] = frozenset({"train", "valid", "test", "personal_test", ""})
"""``personal_test``: a device's own held-out rows (fedsd.data.partition.PERSONAL_TEST), never trained on."""


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file, row and column."""


@dataclass
class ManifestRow:
    utt_id: str
    path: str
    label: str
    orig_label: str
    speaker: str
    dataset: str
    duration: float
    sample_rate: int
    split: str = ""
    session: str = ""
    gender: str = ""
    lang: str = ""
    text_id: str = ""

    @property
    def labelled(self) -> bool:
        return self.label != ""

    def to_csv_dict(self) -> dict[str, str]:
        d = asdict(self)
        d["duration"] = f"{self.duration:.4f}"
        d["sample_rate"] = str(self.sample_rate)
        return {k: str(v) for k, v in d.items()}


def write_manifest(rows: Iterable[ManifestRow], path: str | os.PathLike[str]) -> Path:
    """Write rows atomically; optional columns are kept only if some row uses them."""
    rows = list(rows)
    used_optional = [c for c in OPTIONAL_COLUMNS if any(getattr(r, c) for r in rows)]
    columns = list(REQUIRED_COLUMNS) + used_optional
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(r.to_csv_dict())
    return atomic_write_text(path, buf.getvalue())


def read_manifest(path: str | os.PathLike[str], *, require_labels: bool = False) -> list[ManifestRow]:
    """Read and validate a manifest. Errors name the file, the 1-based line number and the column."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ManifestError(
                f"{path}: missing column(s) {', '.join(missing)}; a manifest needs {', '.join(REQUIRED_COLUMNS)}"
            )
        rows: list[ManifestRow] = []
        seen: dict[str, int] = {}
        names = {f.name for f in fields(ManifestRow)}
        for lineno, raw in enumerate(reader, start=2):
            if None in raw:
                raise ManifestError(f"{path}:{lineno}: more fields than columns in the header")
            rec = {k: (v or "").strip() for k, v in raw.items() if k in names}
            for col in ("utt_id", "path", "speaker"):
                if not rec.get(col):
                    raise ManifestError(f"{path}:{lineno}: column '{col}' is empty")
            if require_labels and not rec.get("label"):
                raise ManifestError(f"{path}:{lineno}: column 'label' is empty (utterance {rec['utt_id']})")
            try:
                duration = float(rec.get("duration") or "nan")
            except ValueError:
                raise ManifestError(
                    f"{path}:{lineno}: column 'duration' is not a number: {rec.get('duration')!r}"
                ) from None
            if not math.isnan(duration) and duration < 0:
                raise ManifestError(f"{path}:{lineno}: column 'duration' is negative")
            try:
                sample_rate = int(float(rec.get("sample_rate") or 0))
            except ValueError:
                raise ManifestError(
                    f"{path}:{lineno}: column 'sample_rate' is not an integer: {rec.get('sample_rate')!r}"
                ) from None
            if rec.get("split", "") not in SPLITS:
                raise ManifestError(
                    f"{path}:{lineno}: column 'split' is {rec['split']!r}; expected one of train, valid, test, personal_test or empty"
                )
            if rec["utt_id"] in seen:
                raise ManifestError(
                    f"{path}:{lineno}: column 'utt_id' repeats {rec['utt_id']!r} (first on line {seen[rec['utt_id']]})"
                )
            seen[rec["utt_id"]] = lineno
            rec["duration"] = duration
            rec["sample_rate"] = sample_rate
            rows.append(ManifestRow(**rec))
    if not rows:
        raise ManifestError(f"{path}: manifest has a header but no rows")
    return rows


def label_names(rows: Sequence[ManifestRow]) -> list[str]:
    """Sorted label set of the labelled rows (the canonical class order when none is configured)."""
    return sorted({r.label for r in rows if r.label})
