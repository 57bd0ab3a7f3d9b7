"""Run an exported ONNX exit graph with ONNX Runtime, soundfile and numpy only — never torch.

Why a separate module: a device that runs ``fedsd predict --model exit2.onnx`` should not need (or load)
torch, transformers or Flower. Everything the graph needs beyond the waveform — label names, sample rate,
crop policy, normalisation, which output is which exit — is in the graph's ``metadata_props`` (and the
JSON beside it, for tools that cannot read ONNX). ``tests/test_onnx.py`` checks that importing and using
this module leaves ``torch`` out of ``sys.modules``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "fedsd-onnx/1"
META_KEY = "fedsd"
INPUT_WAVE = "input_values"
INPUT_MASK = "attention_mask"
AUTO_MIN_AGREEMENT = 0.98
"""int8 ``quant_mode="auto"`` keeps a mode only if it agrees with fp32 on this share of held-out clips."""


def output_names(exits: Sequence[int]) -> dict[int, tuple[str, str]]:
    """Graph output names per exit: ``logits``/``probs`` for one exit, ``logits_K``/``probs_K`` for several."""
    exits = sorted(int(k) for k in exits)
    if len(exits) == 1:
        return {exits[0]: ("logits", "probs")}
    return {k: (f"logits_{k}", f"probs_{k}") for k in exits}


def sidecar_path(model: str | os.PathLike[str]) -> Path:
    """``exit2.onnx`` -> ``exit2.json`` (the metadata, readable without ONNX tooling)."""
    return Path(model).with_suffix(".json")


def is_onnx(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() == ".onnx"


# ------------------------------------------------------------------------------------------- audio
@lru_cache(maxsize=8)
def _sinc_kernel(orig: int, new: int, width_zeros: int = 6, rolloff: float = 0.99) -> tuple[np.ndarray, int]:
    """torchaudio's ``sinc_interp_hann`` kernel (``[new, 2*width + orig]``), for the reduced rates."""
    base = min(orig, new) * rolloff
    width = math.ceil(width_zeros * orig / base)
    idx = np.arange(-width, width + orig, dtype=np.float64)[None] / orig
    t = (np.arange(0, -new, -1, dtype=np.float64)[:, None] / new + idx) * base
    t = np.clip(t, -width_zeros, width_zeros)
    window = np.cos(t * math.pi / width_zeros / 2) ** 2
    t = t * math.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        kernel = np.where(t == 0, 1.0, np.sin(t) / np.where(t == 0, 1.0, t))
    kernel = kernel * window * (base / orig)
    return kernel.astype(np.float32), width


def resample(wav: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling, the same kernel as ``fedsd.data.audio.resample`` (torchaudio), in numpy."""
    if orig_rate == new_rate:
        return wav
    g = math.gcd(int(orig_rate), int(new_rate))
    orig, new = int(orig_rate) // g, int(new_rate) // g
    kernel, width = _sinc_kernel(orig, new)
    x = np.pad(np.asarray(wav, dtype=np.float32), (width, width + orig))
    frames = np.lib.stride_tricks.sliding_window_view(x, kernel.shape[1])[::orig]
    out = (frames @ kernel.T).reshape(-1)
    target = math.ceil(new * wav.shape[0] / orig)
    return np.ascontiguousarray(out[:target], dtype=np.float32)


def load_clip(path: str | os.PathLike[str], preprocessing: Mapping[str, Any]) -> np.ndarray:
    """Decode, resample, crop and normalise ``path`` as the graph's metadata says (``AudioError`` if bad)."""
    from fedsd.data.audio import CropPolicy, apply_crop, normalize_waveform, read_audio

    rate = int(preprocessing.get("sample_rate", 16000))
    crop = preprocessing.get("crop") or {}
    policy = CropPolicy(max_seconds=crop.get("max_seconds"), mode=crop.get("mode", "none"), sample_rate=rate)
    wav, sr = read_audio(path)
    wav = apply_crop(resample(wav, sr, rate), policy)
    norm = preprocessing.get("normalize", "utterance")
    if norm == "utterance":
        wav = normalize_waveform(wav)
    elif norm not in (None, "none"):
        raise ValueError(f"unknown normalisation {norm!r} in the model's metadata")
    return wav


def pad_batch(wavs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad clips to the longest: ``(input_values float32, attention_mask int64)``."""
    longest = max(int(w.shape[0]) for w in wavs)
    x = np.zeros((len(wavs), longest), dtype=np.float32)
    mask = np.zeros((len(wavs), longest), dtype=np.int64)
    for i, w in enumerate(wavs):
        x[i, : w.shape[0]] = w
        mask[i, : w.shape[0]] = 1
    return x, mask


# ------------------------------------------------------------------------------------------- model
def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The fedsd metadata of an exported graph (from the ``.onnx`` itself, else its JSON sidecar)."""
    import onnx

    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - onnx raises several types for bad files
        raise ValueError(f"{path}: not a readable ONNX model ({type(err).__name__}: {err})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if META_KEY in props:
        return json.loads(props[META_KEY])
    side = sidecar_path(path)
    if side.is_file():
        return json.loads(side.read_text(encoding="utf-8"))
    raise ValueError(f"{path}: no fedsd metadata (export it with `fedsd export --format onnx`)")


def make_session(path: str | os.PathLike[str], threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session; ``threads`` pins intra- and inter-op threads (None: ORT's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


@dataclass
class OnnxExitModel:
    """An exported graph and its metadata: ``probs``/``logits`` per exit for a batch of clips."""

    path: Path
    session: Any
    info: dict[str, Any]

    @classmethod
    def load(cls, path: str | os.PathLike[str], threads: int | None = None) -> OnnxExitModel:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such ONNX model")
        info = read_metadata(path)
        if info.get("format") != FORMAT:
            raise ValueError(f"{path}: metadata format {info.get('format')!r} is not {FORMAT!r}")
        return cls(path, make_session(path, threads), info)

    @property
    def exits(self) -> list[int]:
        return [int(k) for k in self.info["exits"]]

    @property
    def label_names(self) -> list[str]:
        return list(self.info["label_names"])

    @property
    def preprocessing(self) -> dict[str, Any]:
        return dict(self.info["preprocessing"])

    def load_clip(self, path: str | os.PathLike[str]) -> np.ndarray:
        return load_clip(path, self.preprocessing)

    def run(self, wavs: Sequence[np.ndarray], exits: Sequence[int] | None = None) -> dict[int, np.ndarray]:
        """Logits ``[batch, classes]`` per exit for normalised clips of any lengths (padded here)."""
        x, mask = pad_batch(wavs)
        return self.run_padded(x, mask, exits)

    def run_padded(
        self, x: np.ndarray, mask: np.ndarray, exits: Sequence[int] | None = None
    ) -> dict[int, np.ndarray]:
        wanted = self.exits if exits is None else [int(k) for k in exits]
        names = {int(k): v["logits"] for k, v in self.info["outputs"].items()}
        missing = [k for k in wanted if k not in names]
        if missing:
            raise ValueError(f"exits {missing} are not in {self.path} (it has {self.exits})")
        outs = self.session.run(
            [names[k] for k in wanted],
            {INPUT_WAVE: np.ascontiguousarray(x, np.float32), INPUT_MASK: np.ascontiguousarray(mask, np.int64)},
        )
        return dict(zip(wanted, outs, strict=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def predict_one(
    model: OnnxExitModel, wav: np.ndarray, exit_: str | int, threshold: float = 0.9
) -> tuple[int, np.ndarray]:
    """(exit used, probabilities) for one clip: a fixed exit, or the first confident one ('auto').

    A graph with several exits computes them all in one run, so 'auto' picks the answer of the first
    exit whose top probability reaches ``threshold`` (else the deepest); it saves no compute.
    """
    if exit_ == "auto":
        logits = model.run([wav])
        for k in model.exits:
            probs = softmax(logits[k][0].astype(np.float64))
            if probs.max() >= threshold:
                return k, probs
        return k, probs
    k = int(exit_)
    return k, softmax(model.run([wav], [k])[k][0].astype(np.float64))


def evaluate_clips(
    model: OnnxExitModel, wavs: Sequence[np.ndarray], batch_size: int = 8
) -> dict[int, np.ndarray]:
    """Predicted class per clip and exit (clips batched ``batch_size`` at a time, padded)."""
    preds: dict[int, list[int]] = {k: [] for k in model.exits}
    for i in range(0, len(wavs), batch_size):
        for k, logits in model.run(wavs[i : i + batch_size]).items():
            preds[k] += logits.argmax(-1).tolist()
    return {k: np.asarray(v, dtype=np.int64) for k, v in preds.items()}


def measure_latency(model: OnnxExitModel, wavs: Sequence[np.ndarray]) -> dict[int, float]:
    """Median seconds per clip (batch 1) of the whole graph, reported for each of its exits."""
    if not wavs:
        return {k: math.nan for k in model.exits}
    model.run([wavs[0]])  # warm-up
    times = []
    for w in wavs:
        t0 = time.perf_counter()
        model.run([w])
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    return {k: med for k in model.exits}
