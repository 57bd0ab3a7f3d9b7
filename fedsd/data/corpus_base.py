"""What every corpus scanner shares: label presets, the scan result with its report, and the step that
turns parsed files into manifest rows (``fedsd.data.corpora`` is the public face; see its docstring).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf

from fedsd.data.manifest import ManifestRow

AUDIO_SUFFIXES: frozenset[str] = frozenset({".wav", ".flac", ".ogg"})
Progress = Callable[[int, int], None]


class CorpusError(ValueError):
    """A corpus, preset or table that cannot be scanned at all (unknown name, missing root, ...)."""


# ---------------------------------------------------------------------------------------------- presets
# Every label name any scanner emits, mapped to a canonical task label (None = never a class).
_CANON: dict[str, str | None] = {
    "neutral": "neutral",
    "calm": "calm",
    "happy": "happy",
    "happiness": "happy",
    "joy": "happy",
    "excited": "excited",
    "sad": "sad",
    "sadness": "sad",
    "angry": "angry",
    "anger": "angry",
    "fear": "fear",
    "fearful": "fear",
    "disgust": "disgust",
    "disgusted": "disgust",
    "surprise": "surprise",
    "surprised": "surprise",
    "boredom": "boredom",
    "guilt": "guilt",
    "contempt": "contempt",
    "frustrated": "frustrated",
    "other": "other",
    "xxx": None,  # IEMOCAP: annotators did not agree
    "no-agreement": None,  # MSP-Podcast X
}


def _preset(keep: set[str], extra: Mapping[str, str] | None = None) -> dict[str, str | None]:
    out = {orig: (canon if canon in keep else None) for orig, canon in _CANON.items()}
    out.update(extra or {})
    return out


PRESETS: dict[str, dict[str, str | None]] = {
    "iemocap4": _preset({"neutral", "happy", "angry", "sad"}, {"excited": "happy"}),
    "ekman6": _preset({"angry", "disgust", "fear", "happy", "sad", "surprise"}),
    "basic7": _preset({"angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"}),
    "ravdess8": _preset({"neutral", "calm", "happy", "sad", "angry", "fear", "disgust", "surprise"}),
    "demos7": _preset({"angry", "sad", "happy", "fear", "disgust", "guilt", "surprise"}),
    "cremad6": _preset({"angry", "disgust", "fear", "happy", "neutral", "sad"}),
    "emodb7": _preset({"angry", "boredom", "disgust", "fear", "happy", "sad", "neutral"}),
    "esd5": _preset({"angry", "happy", "neutral", "sad", "surprise"}),
    "msp8": _preset({"angry", "sad", "happy", "surprise", "fear", "disgust", "contempt", "neutral"}),
}
RAW_PRESET = "raw"  # label = orig_label (only the "no agreement" markers are dropped)

DEFAULT_PRESETS: dict[str, str] = {
    "ravdess": "ravdess8",
    "crema-d": "cremad6",
    "emodb": "emodb7",
    "iemocap": "iemocap4",
    "demos": "demos7",
    "esd": "esd5",
    "tess": "basic7",
    "savee": "basic7",
    "msp-podcast": "msp8",
}


def preset_names() -> list[str]:
    return sorted(PRESETS) + [RAW_PRESET]


def resolve_preset(preset: str | None, dataset: str | None = None) -> str:
    """Name of the preset to use: ``preset``, else the dataset's default, else ``raw``."""
    if preset is None or preset == "":
        return DEFAULT_PRESETS.get(dataset or "", RAW_PRESET)
    if preset != RAW_PRESET and preset not in PRESETS:
        raise CorpusError(f"unknown label preset {preset!r}; valid presets: {', '.join(preset_names())}")
    return preset


def map_label(orig: str, preset: str) -> str | None:
    """Task label of corpus label ``orig`` under ``preset`` (None = drop the utterance)."""
    if preset == RAW_PRESET:
        return None if _CANON.get(orig.lower(), orig) is None else orig
    return PRESETS[preset].get(orig.lower())


# ---------------------------------------------------------------------------------------------- results
class ScanResult(list):  # list[ManifestRow] with a report attached
    """The rows of a scan (a plain ``list[ManifestRow]``) plus what was left out and why."""

    def __init__(self, rows=(), *, dataset: str = "", preset: str = "") -> None:
        super().__init__(rows)
        self.dataset = dataset
        self.preset = preset
        self.skipped: list[tuple[str, str]] = []  # (path relative to root, reason)
        self.dropped: Counter[str] = Counter()  # orig_label -> rows removed by the preset

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def skip_reasons(self) -> Counter[str]:
        return Counter(reason for _, reason in self.skipped)


@dataclass
class _Parsed:
    """What a file name (or annotation) says about one utterance."""

    utt_id: str
    orig_label: str
    speaker: str  # corpus-local id; the manifest column becomes f"{dataset}:{speaker}"
    gender: str = ""
    lang: str = ""
    text_id: str = ""
    session: str = ""
    split: str = ""


def _check_root(root: str | os.PathLike[str]) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"{root}: corpus root is not a directory")
    return root


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _audio_files(root: Path) -> list[Path]:
    """All audio files under root, sorted by relative path (determinism across file systems)."""
    out = [p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()]
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _build(
    dataset: str,
    root: Path,
    preset: str | None,
    items: list[tuple[Path, _Parsed | str]],
    progress: Progress | None,
    result: ScanResult | None = None,
) -> ScanResult:
    """Turn parsed files into rows: apply the preset, read duration/rate, de-duplicate utterance ids."""
    name = resolve_preset(preset, dataset)
    res = result if result is not None else ScanResult(dataset=dataset, preset=name)
    res.dataset, res.preset = dataset, name
    seen: set[str] = set()
    total = len(items)
    for i, (path, parsed) in enumerate(items, start=1):
        rel = _relative(path, root)
        if progress is not None:
            progress(i, total)
        if isinstance(parsed, str):
            res.skipped.append((rel, parsed))
            continue
        # An empty orig_label is unlabelled speech (import_csv), not a class for the preset to drop.
        label = map_label(parsed.orig_label, name) if parsed.orig_label else ""
        if label is None:
            res.dropped[parsed.orig_label] += 1
            continue
        if parsed.utt_id in seen:
            res.skipped.append((rel, f"duplicate utterance id {parsed.utt_id!r}"))
            continue
        try:
            info = sf.info(str(path))
        except (RuntimeError, ValueError, OSError, TypeError) as exc:
            res.skipped.append((rel, f"unreadable audio header ({' '.join(str(exc).split())[:120]})"))
            continue
        seen.add(parsed.utt_id)
        res.append(
            ManifestRow(
                utt_id=parsed.utt_id,
                path=rel,
                label=label,
                orig_label=parsed.orig_label,
                speaker=f"{dataset}:{parsed.speaker}",
                dataset=dataset,
                duration=float(info.frames) / info.samplerate if info.samplerate else math.nan,
                sample_rate=int(info.samplerate),
                split=parsed.split,
                session=parsed.session,
                gender=parsed.gender,
                lang=parsed.lang,
                text_id=parsed.text_id,
            )
        )
    return res


def _scan_by_name(
    dataset: str,
    root: str | os.PathLike[str],
    preset: str | None,
    parse: Callable[[Path, Path], _Parsed | str],
    progress: Progress | None,
) -> ScanResult:
    root = _check_root(root)
    resolve_preset(preset, dataset)  # fail before walking a large tree
    items = [(p, parse(p, root)) for p in _audio_files(root)]
    return _build(dataset, root, preset, items, progress)


_NAMING = "file name does not follow the {} naming"
