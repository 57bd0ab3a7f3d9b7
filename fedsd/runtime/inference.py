"""Predict and evaluate with a trained model: a PyTorch checkpoint directory or an exported ``.onnx`` graph.

Why one module for both: ``fedsd predict``/``fedsd evaluate`` and a script calling ``api.predict`` must
give the same records and reports whichever form the model has. The path decides the backend
(``X.onnx``: ONNX Runtime, anything else: a ``fedsd`` checkpoint). Importing this module, and the whole
ONNX path, never imports torch (``tests/test_onnx.py`` checks ``sys.modules``): torch is imported only
when a PyTorch checkpoint is loaded.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from rich.table import Table

    from fedsd.data.manifest import ManifestRow
    from fedsd.metrics import ClassificationReport

ExitChoice = str | int  # an exit number, or "auto": the first exit confident enough


class InferenceError(ValueError):
    """An unusable model, exit or manifest; ``code`` is the exit status the commands use (2: bad usage)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Prediction:
    """One file's answer, or why it could not be read (``error``; the other fields are then None)."""

    file: str
    label: str | None = None
    confidence: float | None = None
    exit: int | None = None
    latency_ms: float | None = None
    probs: dict[str, float] | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record ``fedsd predict --json`` prints (``{"file", "error"}`` for an unreadable file)."""
        if self.error is not None:
            return {"file": self.file, "error": self.error}
        return {
            "file": self.file,
            "label": self.label,
            "confidence": self.confidence,
            "exit": self.exit,
            "latency_ms": self.latency_ms,
            "probs": self.probs,
        }


@dataclass
class EvaluationResult:
    """Per-exit reports and batch-1 latency (seconds) of one model on one manifest's labelled rows."""

    model: Path
    manifest: Path
    split: str | None
    label_names: list[str]
    reports: dict[int, ClassificationReport]
    latency: dict[int, float]
    n: int
    runtime: str = "pytorch"
    quantization: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON that ``fedsd evaluate --json`` prints and ``--out FILE`` writes (ONNX adds runtime and quantization)."""
        out: dict[str, Any] = {
            "model": str(self.model),
            "manifest": str(self.manifest),
            "split": self.split,
            "label_names": self.label_names,
        }
        if self.runtime == "onnxruntime":
            out |= {"runtime": self.runtime, "quantization": self.quantization}
        out["exits"] = {str(k): r.to_dict() | {"latency_s": self.latency[k]} for k, r in self.reports.items()}
        return out

    def table(self) -> Table:
        """The per-exit rich table both backends print."""
        from fedsd.report import exit_table

        suffix = ", ONNX" if self.runtime == "onnxruntime" else ""
        title = f"{self.model} on {self.manifest} ({self.n} utterances{suffix})"
        return exit_table(self.reports, self.latency, title=title)

    def save_json(self, path: str | os.PathLike[str]) -> Path:
        from fedsd.checkpoint import atomic_write_json

        return atomic_write_json(path, self.to_dict())

    def save_plot(self, path: str | os.PathLike[str]) -> Path:
        """UAR against latency, one point per exit (PNG, written atomically)."""
        from fedsd.report import plot_uar_vs_latency

        points = {k: (self.reports[k].uar, self.latency[k]) for k in self.reports}
        return plot_uar_vs_latency({"model": points}, path)


# ------------------------------------------------------------------------------------------ backends
class InferenceModel:
    """A loaded model, either backend: clips in, (exit used, probabilities) out."""

    path: Path
    runtime: str
    noun: str  # how error messages name it: "model" or "graph"

    @property
    def exits(self) -> list[int]:
        raise NotImplementedError

    @property
    def label_names(self) -> list[str]:
        raise NotImplementedError

    def resolve_exit(self, exit: ExitChoice) -> ExitChoice:
        """``"auto"`` or a valid exit number; a bad choice raises ``InferenceError`` (code 2)."""
        if exit == "auto":
            return "auto"
        try:
            k = int(exit)
        except ValueError:
            raise InferenceError(f"--exit {exit!r}: give an exit layer number ({self.exits}) or 'auto'", 2) from None
        if k not in self.exits:
            raise InferenceError(f"--exit {k}: this {self.noun} has exits {self.exits}", 2)
        return k

    def load_clip(self, path: str | os.PathLike[str]) -> np.ndarray:
        """Decode, resample, crop and normalise as the model was trained (``AudioError`` if unusable)."""
        raise NotImplementedError

    def classify(self, wav: np.ndarray, exit: ExitChoice, threshold: float) -> tuple[int, np.ndarray]:
        raise NotImplementedError

    def evaluate_rows(
        self, rows: Sequence[ManifestRow], root: Path, batch_size: int, latency_utts: int
    ) -> tuple[dict[int, ClassificationReport], dict[int, float]]:
        raise NotImplementedError


class TorchModel(InferenceModel):
    """A ``fedsd`` checkpoint directory run with PyTorch."""

    runtime = "pytorch"
    noun = "model"

    def __init__(self, path: str | os.PathLike[str], device: str = "cpu") -> None:
        from fedsd.data.audio import CropPolicy
        from fedsd.model.multiexit import MultiExitSER

        self.path, self.device = Path(path), device
        self.net = MultiExitSER.from_pretrained(self.path).to(device).eval()
        meta = self.net.meta
        self.crop = CropPolicy.for_evaluation(meta.get("crop"), int(meta.get("sample_rate", 16000)))

    @property
    def exits(self) -> list[int]:
        return list(self.net.exits)

    @property
    def label_names(self) -> list[str]:
        return list(self.net.label_names)

    def load_clip(self, path: str | os.PathLike[str]) -> np.ndarray:
        from fedsd.data.audio import apply_crop, load_audio, normalize_waveform

        return normalize_waveform(apply_crop(load_audio(path, self.crop.sample_rate), self.crop))

    def classify(self, wav: np.ndarray, exit: ExitChoice, threshold: float) -> tuple[int, np.ndarray]:
        import torch

        x = torch.from_numpy(wav)[None].to(self.device)
        with torch.no_grad():
            if exit == "auto":
                used, probs = self.net.predict_early_exit(x, threshold=threshold)
            else:
                used = int(exit)
                probs = torch.softmax(self.net(x, exits=[used])[used].logits[0], -1)
        return int(used), probs.float().cpu().numpy()

    def evaluate_rows(
        self, rows: Sequence[ManifestRow], root: Path, batch_size: int, latency_utts: int
    ) -> tuple[dict[int, ClassificationReport], dict[int, float]]:
        from fedsd.training.central import evaluate_loader, make_loader, measure_exit_latency

        loader = make_loader(rows, root, self.net.label_names, self.crop, batch_size=batch_size)
        reports = evaluate_loader(self.net, loader, self.device)
        timed = [loader.dataset[i]["input_values"] for i in range(min(latency_utts, len(rows)))]
        return reports, measure_exit_latency(self.net, timed, self.device)


class OnnxModel(InferenceModel):
    """An exported graph run with ONNX Runtime, soundfile and numpy (``fedsd.runtime.onnx_runtime``)."""

    runtime = "onnxruntime"
    noun = "graph"

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        from fedsd.runtime.onnx_runtime import OnnxExitModel

        self.path = Path(path)
        self.net = OnnxExitModel.load(self.path, threads)

    @property
    def exits(self) -> list[int]:
        return self.net.exits

    @property
    def label_names(self) -> list[str]:
        return self.net.label_names

    @property
    def quantization(self) -> str | None:
        return self.net.info.get("quantization")

    def resolve_exit(self, exit: ExitChoice) -> ExitChoice:
        if exit == "auto" and len(self.exits) == 1:
            return self.exits[0]  # a single-exit graph: its exit is the only answer
        return super().resolve_exit(exit)

    def load_clip(self, path: str | os.PathLike[str]) -> np.ndarray:
        return self.net.load_clip(path)

    def classify(self, wav: np.ndarray, exit: ExitChoice, threshold: float) -> tuple[int, np.ndarray]:
        from fedsd.runtime.onnx_runtime import predict_one

        return predict_one(self.net, wav, exit, threshold)

    def evaluate_rows(
        self, rows: Sequence[ManifestRow], root: Path, batch_size: int, latency_utts: int
    ) -> tuple[dict[int, ClassificationReport], dict[int, float]]:
        from fedsd.metrics import classification_report
        from fedsd.runtime.onnx_runtime import evaluate_clips, measure_latency

        wavs = [self.net.load_clip(root / r.path) for r in rows]
        y = [self.label_names.index(r.label) for r in rows]
        preds = evaluate_clips(self.net, wavs, batch_size)
        reports = {k: classification_report(y, p, self.label_names) for k, p in preds.items()}
        return reports, measure_latency(self.net, wavs[:latency_utts])


def load_model(model: str | os.PathLike[str] | InferenceModel, *, device: str = "cpu") -> InferenceModel:
    """The backend the path asks for (``.onnx``: ONNX Runtime on CPU; else a checkpoint on ``device``)."""
    from fedsd.runtime.onnx_runtime import is_onnx

    if isinstance(model, InferenceModel):
        return model
    try:
        return OnnxModel(model) if is_onnx(model) else TorchModel(model, device)
    except InferenceError:
        raise
    except (ValueError, FileNotFoundError) as e:
        raise InferenceError(str(e), 1) from e


# ------------------------------------------------------------------------------------------ the API
def predict(
    model: str | os.PathLike[str] | InferenceModel,
    files: Sequence[str | os.PathLike[str]],
    *,
    exit: ExitChoice = "auto",
    threshold: float = 0.9,
    device: str = "cpu",
) -> list[Prediction]:
    """Classify each file at ``exit`` (a number), or at the first exit at least ``threshold`` confident.

    An unreadable file gives a ``Prediction`` with ``error`` set; the others are still classified.
    A bad model or exit raises ``InferenceError``.
    """
    from fedsd.data.audio import AudioError

    net = load_model(model, device=device)
    chosen = net.resolve_exit(exit)
    names = net.label_names
    out: list[Prediction] = []
    for f in files:
        try:
            wav = net.load_clip(f)
        except AudioError as e:
            out.append(Prediction(file=str(f), error=e.reason))
            continue
        t0 = time.perf_counter()
        used, probs = net.classify(wav, chosen, threshold)
        dt = time.perf_counter() - t0
        top = int(np.argmax(probs))
        out.append(
            Prediction(
                file=str(f),
                label=names[top],
                confidence=float(probs[top]),
                exit=int(used),
                latency_ms=dt * 1000,
                probs={n: float(p) for n, p in zip(names, probs.tolist(), strict=True)},
            )
        )
    return out


def select_rows(
    manifest: str | os.PathLike[str], split: str | None, label_names: Sequence[str], model: Any = None
) -> list[ManifestRow]:
    """The manifest's labelled rows of ``split`` (None or "all": every split), checked against the labels."""
    from fedsd.data.manifest import read_manifest

    rows = read_manifest(manifest)
    if split and split != "all":
        rows = [r for r in rows if r.split == split]
        if not rows:
            raise InferenceError(f"{manifest}: no rows with split={split!r} (use --split all)")
    rows = [r for r in rows if r.label]
    unknown = sorted({r.label for r in rows} - set(label_names))
    if unknown:
        raise InferenceError(
            f"{manifest}: labels {unknown} are not in the model's label set {list(label_names)} ({model})"
        )
    return rows


def evaluate(
    model: str | os.PathLike[str] | InferenceModel,
    manifest: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str],
    split: str | None = "test",
    batch_size: int = 8,
    latency_utts: int = 10,
    device: str = "cpu",
) -> EvaluationResult:
    """UAR, WA, macro-F1, per-class recall and confusion at every exit, plus batch-1 latency.

    ``split``: the manifest rows evaluated ("test" by default; None or "all" for every labelled row).
    Latency is the median over the first ``latency_utts`` clips. Problems raise ``InferenceError``
    (or ``ValueError``/``FileNotFoundError`` naming the file).
    """
    net = load_model(model, device=device)
    rows = select_rows(manifest, split, net.label_names, net.path)
    reports, latency = net.evaluate_rows(rows, Path(root), batch_size, latency_utts)
    return EvaluationResult(
        model=net.path,
        manifest=Path(manifest),
        split=split,
        label_names=net.label_names,
        reports=reports,
        latency={k: float(v) for k, v in latency.items()},
        n=len(rows),
        runtime=net.runtime,
        quantization=getattr(net, "quantization", None),
    )


# ------------------------------------------------------------------------------------------ output
def predictions_jsonl(preds: Sequence[Prediction]) -> str:
    """One JSON object a line, as ``fedsd predict --json`` prints."""
    return "".join(json.dumps(p.to_dict()) + "\n" for p in preds)


def predictions_table(preds: Sequence[Prediction], *, model: Any, exit: ExitChoice, runtime: str) -> Table:
    """The table ``fedsd predict`` prints, the same for both backends (ONNX says so in the title)."""
    from rich.table import Table

    suffix = ", ONNX Runtime" if runtime == "onnxruntime" else ""
    t = Table(title=f"predictions ({model}, exit {exit}{suffix})")
    for col in ("file", "label", "confidence", "exit", "latency ms"):
        t.add_column(col)
    for p in preds:
        if p.error is not None:
            t.add_row(p.file, f"[red]error: {p.error}[/]", "", "", "")
        else:
            t.add_row(p.file, p.label, f"{p.confidence:.3f}", str(p.exit), f"{p.latency_ms:.1f}")
    return t

