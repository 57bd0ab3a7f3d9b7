"""Decode, downmix, resample and crop speech clips.

Why one module: every consumer (training, the feature cache, `fedsd data check`) must see exactly the same
waveform for a file, and every failure must name the file and the reason, so a bad clip in a corpus of
thousands is found in one pass instead of crashing a training run hours later.

torch/torchaudio are imported only when a resample is needed, so `fedsd data ...` stays quick.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf

CropMode = Literal["random", "center", "tile", "none"]
CROP_MODES: tuple[str, ...] = ("random", "center", "tile", "none")


class AudioError(ValueError):
    """A clip that cannot be used. ``str(e) == f"{path}: {reason}"``."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep picklable for DataLoader workers
        return (type(self), (self.path, self.reason))


def read_audio(path: str | os.PathLike[str], *, min_seconds: float = 0.0) -> tuple[np.ndarray, int]:
    """Decode ``path`` to a mono float32 waveform at its native rate; returns ``(wav, sample_rate)``.

    Raises AudioError for a missing file, undecodable bytes, zero-length audio, NaN/inf samples, or a
    clip shorter than ``min_seconds``. The file is only read, never modified.
    """
    p = Path(path)
    if not p.exists():
        raise AudioError(p, "file not found")
    if not p.is_file():
        raise AudioError(p, "not a regular file")
    try:
        data, sr = sf.read(str(p), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise AudioError(p, f"cannot decode audio ({detail})") from None
    if data.size == 0 or data.shape[0] == 0:
        raise AudioError(p, "empty audio (0 samples)")
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise AudioError(p, f"{bad} non-finite sample(s) (NaN or inf)")
    wav = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    seconds = wav.shape[0] / sr
    if seconds < min_seconds:
        raise AudioError(p, f"clip is {seconds:.3f} s, shorter than the minimum {min_seconds:g} s")
    return np.ascontiguousarray(wav, dtype=np.float32), int(sr)


def resample(wav: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling with torchaudio (the same kernel the HF recipes use)."""
    if orig_rate == new_rate:
        return wav
    import torch
    import torchaudio.functional as AF

    out = AF.resample(torch.from_numpy(np.ascontiguousarray(wav)), orig_rate, new_rate)
    return out.numpy().astype(np.float32, copy=False)


def load_audio(
    path: str | os.PathLike[str], sample_rate: int = 16000, *, min_seconds: float = 0.0
) -> np.ndarray:
    """Decode ``path`` to mono float32 at ``sample_rate`` (resampled when the file's rate differs)."""
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    wav, sr = read_audio(path, min_seconds=min_seconds)
    return resample(wav, sr, sample_rate)


def normalize_waveform(wav: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per utterance, exactly as the wav2vec 2.0 feature extractor does."""
    wav = np.asarray(wav, dtype=np.float32)
    return ((wav - wav.mean()) / np.sqrt(wav.var() + 1e-7)).astype(np.float32, copy=False)


@dataclass(frozen=True)
class CropPolicy:
    """How a clip is cut to a fixed length.

    ``tile`` (the paper's recipe) repeats short clips up to ``max_seconds`` and keeps the first
    ``max_seconds`` of long ones, so every example has the same length. ``center``/``random`` only shorten
    long clips; short clips stay short and the collate pads them with an attention mask. ``none`` (or
    ``max_seconds=None``) keeps the full clip.
    """

    max_seconds: float | None = 6.0
    mode: CropMode = "tile"
    sample_rate: int = 16000

    def __post_init__(self) -> None:
        if self.mode not in CROP_MODES:
            raise ValueError(f"crop mode {self.mode!r} is not one of {', '.join(CROP_MODES)}")
        if self.max_seconds is not None and not (self.max_seconds > 0 and math.isfinite(self.max_seconds)):
            raise ValueError(f"max_seconds must be positive or None, got {self.max_seconds!r}")
        if self.sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {self.sample_rate}")

    @property
    def num_samples(self) -> int | None:
        """Target length in samples, or None when clips keep their full length."""
        if self.max_seconds is None or self.mode == "none":
            return None
        return max(1, int(round(self.max_seconds * self.sample_rate)))

    def key(self) -> str:
        """Stable string for cache keys, e.g. ``tile-96000@16000`` or ``full@16000``."""
        n = self.num_samples
        if n is None:
            return f"full@{self.sample_rate}"
        return f"{self.mode}-{n}@{self.sample_rate}"

    @classmethod
    def for_evaluation(cls, crop: dict | None, sample_rate: int = 16000) -> CropPolicy:
        """The deterministic twin of a training crop (``{max_seconds, mode}``): random becomes center.

        Evaluation, prediction and cached device features must not depend on a random draw.
        """
        crop = dict(crop or {})
        mode = crop.get("mode", "none")
        return cls(
            max_seconds=crop.get("max_seconds"),
            mode="center" if mode == "random" else mode,
            sample_rate=sample_rate,
        )


def apply_crop(wav: np.ndarray, policy: CropPolicy, rng: np.random.Generator | None = None) -> np.ndarray:
    """Cut ``wav`` (1-D) according to ``policy``.

    ``random`` draws the offset from ``rng``; with ``rng=None`` it falls back to a deterministic center crop
    (the evaluation behaviour), so results never depend on hidden global state.
    """
    if wav.ndim != 1:
        raise ValueError(f"apply_crop expects a 1-D waveform, got shape {tuple(wav.shape)}")
    n = policy.num_samples
    length = wav.shape[0]
    if n is None or length == 0:
        return wav
    if policy.mode == "tile":
        if length < n:
            reps = -(-n // length)
            return np.tile(wav, reps)[:n]
        return wav[:n]
    if length <= n:
        return wav
    if policy.mode == "random" and rng is not None:
        start = int(rng.integers(0, length - n + 1))
    else:
        start = (length - n) // 2
    return wav[start : start + n]
