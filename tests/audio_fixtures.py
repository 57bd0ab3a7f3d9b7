"""Tiny generated audio files for tests (tones and noise written with soundfile).

Why: scanners, the checker and the dataset must be tested on real encoded files (WAV/FLAC/OGG, several
rates and channel counts), but tests must stay fast and self-contained, so clips are a few tenths of a
second long and generated on the fly.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

HAS_ESPEAK = shutil.which("espeak-ng") is not None
# `make test` installs espeak-ng and sets this: there a missing espeak-ng is an error, never other audio.
REQUIRE_ESPEAK = os.environ.get("FEDSD_REQUIRE_ESPEAK") == "1"


def corpus_backend() -> str:
    """The voice of generated test corpora: espeak-ng where it is installed or required (a missing one
    then fails generation), the numpy voice elsewhere; never a silent switch under `make test`."""
    return "espeak" if HAS_ESPEAK or REQUIRE_ESPEAK else "numpy"


def espeak_backend() -> str:
    """``"espeak"`` for tests whose numbers (learning thresholds, clip bounds) were calibrated on
    espeak-ng speech. Without espeak-ng such a test is skipped with a reason, and under `make test`
    (FEDSD_REQUIRE_ESPEAK=1) it fails: it never measures other audio against those numbers."""
    if not (HAS_ESPEAK or REQUIRE_ESPEAK):
        pytest.skip("calibrated on espeak-ng speech: install espeak-ng (`make test` does)")
    return "espeak"

_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS")}


def tone(
    seconds: float = 0.2,
    sample_rate: int = 16000,
    freq: float = 220.0,
    channels: int = 1,
    amplitude: float = 0.3,
) -> np.ndarray:
    """A sine tone, shape (T,) for mono or (T, C) with a different phase per channel."""
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    if channels == 1:
        return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    cols = [amplitude * np.sin(2 * np.pi * freq * t + c) for c in range(channels)]
    return np.stack(cols, axis=1).astype(np.float32)


def noise(
    seconds: float = 0.2, sample_rate: int = 16000, seed: int = 0, amplitude: float = 0.1
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (amplitude * rng.standard_normal(int(round(seconds * sample_rate)))).astype(np.float32)


def write_audio(
    path: str | Path, data: np.ndarray, sample_rate: int = 16000, subtype: str | None = None
) -> Path:
    """Write ``data`` with the container chosen by the suffix (.wav, .flac, .ogg); makes parent dirs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt, default_subtype = _FORMATS[path.suffix.lower()]
    sf.write(str(path), data, sample_rate, format=fmt, subtype=subtype or default_subtype)
    return path


def write_tone(
    path: str | Path, seconds: float = 0.2, sample_rate: int = 16000, freq: float = 220.0, channels: int = 1
) -> Path:
    return write_audio(path, tone(seconds, sample_rate, freq, channels), sample_rate)


def write_noise(path: str | Path, seconds: float = 0.2, sample_rate: int = 16000, seed: int = 0) -> Path:
    return write_audio(path, noise(seconds, sample_rate, seed), sample_rate)


def write_garbage(path: str | Path, size: int = 256) -> Path:
    """Bytes that no decoder accepts, under an audio file name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not audio at all " * (size // 25 + 1))
    return path


def write_empty_wav(path: str | Path, sample_rate: int = 16000) -> Path:
    """A valid WAV header with zero frames."""
    return write_audio(path, np.zeros(0, dtype=np.float32), sample_rate)


def write_nonfinite_wav(path: str | Path, sample_rate: int = 16000, value: float = float("nan")) -> Path:
    """A float WAV that decodes but contains NaN (or inf) samples."""
    data = tone(0.1, sample_rate)
    data[10] = value
    return write_audio(path, data, sample_rate, subtype="FLOAT")
