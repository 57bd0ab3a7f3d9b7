"""Self-supervised pretraining of a small encoder on unlabelled speech (HuBERT's first iteration).

Why: the method distils shallow exits from a deep one, and fine-tuning *pretrained* encoders is what
gives speech models their depth structure (shallow layers acoustic, deeper ones contextual). Offline we
cannot download wav2vec 2.0 / HuBERT / WavLM, so this module makes a pretrained encoder the same way
HuBERT's first iteration does, on whatever unlabelled speech the user has: k-means clusters of MFCC
frames are the targets, spans of frames are masked after the feature projection, and the encoder
learns to predict the masked frames' clusters from their context (Hsu et al., 2021). The result is a
plain Hugging Face checkpoint (``save_pretrained``) that ``model.backbone: DIR`` with
``model.pretrained: true`` loads like any hub model.

Frames line up with the CNN front end (25 ms windows every 20 ms, no centring), so target ``i`` is the
MFCC of exactly the samples frame ``i`` of the encoder sees.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedsd.checkpoint import atomic_directory, atomic_write_json
from fedsd.data.audio import load_audio, normalize_waveform
from fedsd.data.manifest import ManifestRow
from fedsd.tracking import Tracker, epoch_scalars

SAMPLE_RATE = 16000
WINDOW, HOP = 400, 320  # the wav2vec 2.0 front end's receptive field and stride, in samples


@dataclass
class PretrainSettings:
    """What a pretraining run is; written to ``pretrain.json`` beside the checkpoint."""

    backbone: str = "tiny"
    family: str = "wav2vec2"
    clusters: int = 64
    mask_prob: float = 0.08  # a span starts at this fraction of frames (HuBERT: 0.08)
    mask_length: int = 10  # frames per span (HuBERT: 10)
    crop_seconds: float = 2.0
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    warmup: float = 0.1
    weight_decay: float = 0.01
    valid_fraction: float = 0.1  # of the speakers, to watch masked-prediction accuracy on unseen voices
    kmeans_frames: int = 200_000
    seed: int = 0
    threads: int | None = None


@dataclass
class PretrainResult:
    out_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def mfcc_frames(wav: np.ndarray) -> np.ndarray:
    """13 MFCCs + deltas + delta-deltas per front-end frame: ``[frames, 39]``."""
    import torchaudio.functional as AF
    from torchaudio.transforms import MFCC

    mfcc = MFCC(
        sample_rate=SAMPLE_RATE,
        n_mfcc=13,
        melkwargs={"n_fft": WINDOW, "win_length": WINDOW, "hop_length": HOP, "n_mels": 40, "center": False},
    )(torch.from_numpy(wav))  # [13, frames]
    d1 = AF.compute_deltas(mfcc)
    d2 = AF.compute_deltas(d1)
    return torch.cat([mfcc, d1, d2]).T.numpy().astype(np.float32)


def frames_of(num_samples: int) -> int:
    return (num_samples - WINDOW) // HOP + 1


def _clusters(feats: list[np.ndarray], settings: PretrainSettings, log: Callable[[str], None]) -> Any:
    from sklearn.cluster import MiniBatchKMeans

    allf = np.concatenate(feats)
    rng = np.random.default_rng(settings.seed)
    if len(allf) > settings.kmeans_frames:
        allf = allf[rng.choice(len(allf), settings.kmeans_frames, replace=False)]
    mean, std = allf.mean(0), allf.std(0) + 1e-5
    km = MiniBatchKMeans(
        settings.clusters, batch_size=4096, n_init=3, random_state=settings.seed, max_iter=100
    ).fit((allf - mean) / std)
    log(f"k-means: {settings.clusters} clusters on {len(allf):,} MFCC frames (inertia {km.inertia_:.3g})")
    return lambda f: km.predict((f - mean) / std).astype(np.int64)


class _Clips:
    """Waveforms and their frame targets in memory; random ``crop_seconds`` windows on frame boundaries."""

    def __init__(self, wavs: list[np.ndarray], targets: list[np.ndarray], crop: int) -> None:
        self.wavs, self.targets, self.crop = wavs, targets, crop
        self.frames = frames_of(crop)

    def batch(self, idx: Sequence[int], rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        x = np.zeros((len(idx), self.crop), np.float32)
        y = np.full((len(idx), self.frames), -100, np.int64)
        for j, i in enumerate(idx):
            wav, tgt = self.wavs[i], self.targets[i]
            start = int(rng.integers(0, max(1, len(tgt) - self.frames + 1)))
            seg = wav[start * HOP : start * HOP + self.crop]
            x[j, : len(seg)] = normalize_waveform(seg)
            t = tgt[start : start + self.frames]
            y[j, : len(t)] = t
        return torch.from_numpy(x), torch.from_numpy(y)


def _split_speakers(rows: Sequence[ManifestRow], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    speakers = sorted({r.speaker for r in rows})
    rng = np.random.default_rng(seed)
    n_valid = max(1, round(fraction * len(speakers))) if fraction > 0 and len(speakers) > 1 else 0
    valid = set(rng.permutation(speakers)[:n_valid].tolist())
    tr = [i for i, r in enumerate(rows) if r.speaker not in valid]
    va = [i for i, r in enumerate(rows) if r.speaker in valid]
    return tr, va


def _encoder(settings: PretrainSettings) -> nn.Module:
    from fedsd.model.backbone import build_backbone, builtin_config, load_backbone

    if settings.backbone in ("tiny", "tiny-preln", "base"):
        config = builtin_config(settings.backbone, settings.family)
        model = None
    else:
        model = load_backbone(settings.backbone, family=None, pretrained=False)
        config = model.config
    config.mask_time_prob = settings.mask_prob  # creates masked_spec_embed: the [MASK] frame vector
    config.mask_time_length = settings.mask_length
    config.apply_spec_augment = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return build_backbone(config, seed=settings.seed) if model is None else type(model)(config)


def _load_clips(
    rows: Sequence[ManifestRow], root: Path, log: Callable[[str], None]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every clip's waveform (16 kHz) and its MFCC frames."""
    wavs, feats = [], []
    for r in rows:
        p = Path(r.path)
        wav = load_audio(p if p.is_absolute() else root / p, SAMPLE_RATE, min_seconds=WINDOW / SAMPLE_RATE)
        wavs.append(wav)
        feats.append(mfcc_frames(wav))
    log(f"{len(wavs)} clips, {sum(len(w) for w in wavs) / SAMPLE_RATE / 3600:.2f} h of speech")
    return wavs, feats


class _MaskedPrediction:
    """The encoder, its cluster classifier, optimiser and schedule; one batch at a time."""

    def __init__(self, s: PretrainSettings, clips: _Clips, steps_per_epoch: int) -> None:
        self.s, self.clips = s, clips
        self.encoder = _encoder(s)
        self.proj = nn.Linear(self.encoder.config.hidden_size, s.clusters)
        self.params = list(self.encoder.parameters()) + list(self.proj.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=s.lr, weight_decay=s.weight_decay)
        total = steps_per_epoch * s.epochs
        warm = max(1, int(s.warmup * total))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt,
            lambda i: min((i + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warm) / max(1, total - warm))))),
        )

    def mode(self, train: bool) -> None:
        self.encoder.train(train)
        self.proj.train(train)

    def step(self, x: Tensor, y: Tensor, train: bool) -> tuple[float, int, int] | None:
        """One batch; None when no masked frame has a target (no loss signal: no step, no count)."""
        from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

        s = self.s
        mask = _compute_mask_indices((x.shape[0], self.clips.frames), s.mask_prob, s.mask_length, min_masks=2)
        mask_t = torch.from_numpy(mask) & (y >= 0)
        if not bool(mask_t.any()):
            return None
        out = self.encoder(x, mask_time_indices=mask_t).last_hidden_state
        logits = self.proj(out[mask_t])
        target = y[mask_t]
        loss = nn.functional.cross_entropy(logits, target)
        if train:
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 5.0)
            self.opt.step()
            self.sched.step()
        return loss.item(), int((logits.argmax(-1) == target).sum()), int(target.numel())

    def run(self, batches: Any, train: bool) -> tuple[float, float]:
        """Mean loss and masked-frame accuracy over ``batches`` of (x, y)."""
        losses, hits, n = [], 0, 0
        for x, y in batches:
            result = self.step(x, y, train)
            if result is not None:
                losses.append(result[0])
                hits, n = hits + result[1], n + result[2]
        return float(np.mean(losses)), hits / max(1, n)

    def validate(self, va: list[int]) -> dict[str, float]:
        """Loss and accuracy on the held-out speakers, with fixed masks and crops (global RNG restored)."""
        s = self.s
        self.mode(False)
        state = np.random.get_state()
        np.random.seed(10_000 + s.seed)
        vrng = np.random.default_rng(s.seed + 2)
        with torch.no_grad():
            batches = (self.clips.batch(va[b : b + s.batch_size], vrng) for b in range(0, len(va), s.batch_size))
            loss, acc = self.run(batches, False)
        np.random.set_state(state)
        return {"valid_loss": loss, "valid_acc": acc}


def _train_batches(
    task: _MaskedPrediction, order: np.ndarray, steps: int, rng: np.random.Generator, tick: Callable[[], None]
) -> Any:
    """The epoch's training batches, in ``order``; ``tick`` after each one."""
    size = task.s.batch_size
    for b in range(steps):
        yield task.clips.batch(order[b * size : (b + 1) * size], rng)
        tick()


def _save(
    encoder: nn.Module, out_dir: Path, s: PretrainSettings, provenance: dict[str, Any]
) -> None:
    """The encoder as a Hugging Face checkpoint, and ``pretrain.json`` beside it: one atomic directory."""
    encoder.config.apply_spec_augment = False  # inference and fine-tuning decide masking themselves
    with atomic_directory(out_dir) as tmp:
        encoder.save_pretrained(tmp, safe_serialization=True)
        atomic_write_json(
            tmp / "pretrain.json",
            {"method": "masked prediction of MFCC k-means clusters (HuBERT iteration 1)", "settings": asdict(s),
             **provenance},
        )  # fmt: skip


def pretrain(
    rows: Sequence[ManifestRow],
    root: str | Path,
    out_dir: str | Path,
    settings: PretrainSettings | None = None,
    log: Callable[[str], None] = print,
    progress: Callable[[int, int], None] | None = None,
    source: dict[str, Any] | None = None,
    tracker: Tracker | None = None,
) -> PretrainResult:
    """Masked prediction of MFCC clusters on ``rows`` (labels ignored); writes a checkpoint to ``out_dir``.

    ``source`` (e.g. the manifest's path and sha256) is recorded in ``pretrain.json`` as provenance.
    ``tracker`` (``fedsd.tracking``) receives each epoch's row of the history; its opener closes it.
    """
    s = settings or PretrainSettings()
    if s.threads:
        torch.set_num_threads(s.threads)
    t0 = time.monotonic()
    wavs, feats = _load_clips(rows, Path(root), log)
    tr, va = _split_speakers(rows, s.valid_fraction, s.seed)
    assign = _clusters([feats[i] for i in tr], s, log)
    clips = _Clips(wavs, [assign(f) for f in feats], int(s.crop_seconds * SAMPLE_RATE))
    steps_per_epoch = math.ceil(len(tr) / s.batch_size)
    task = _MaskedPrediction(s, clips, steps_per_epoch)
    rng = np.random.default_rng(s.seed)
    np.random.seed(s.seed)  # _compute_mask_indices draws from numpy's global generator
    history: list[dict[str, float]] = []
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], steps_per_epoch * s.epochs)

    for epoch in range(1, s.epochs + 1):
        task.mode(True)
        order = rng.permutation(tr)
        loss, acc = task.run(_train_batches(task, order, steps_per_epoch, rng, tick), True)
        row = {"epoch": epoch, "loss": loss, "acc": acc, "lr": task.sched.get_last_lr()[0]}
        if va:
            row |= task.validate(va)
        history.append(row)
        if tracker is not None:
            tracker.log_metrics(epoch_scalars(row), step=epoch)
        log(
            f"epoch {epoch}: masked-frame loss {row['loss']:.3f} acc {row['acc']:.3f}"
            + (f" | unseen speakers loss {row['valid_loss']:.3f} acc {row['valid_acc']:.3f}" if va else "")
        )
    out_dir = Path(out_dir)
    provenance = {"source": source or {}, "clips": len(rows), "speakers": len({r.speaker for r in rows}),
                  "history": history}  # fmt: skip
    _save(task.encoder, out_dir, s, provenance)
    seconds = time.monotonic() - t0
    log(f"wrote {out_dir} in {seconds:.0f} s")
    return PretrainResult(out_dir, history, seconds)


def main() -> None:  # pragma: no cover - a probe entry point until the CLI command lands
    import argparse

    from fedsd.data.manifest import read_manifest

    ap = argparse.ArgumentParser()
    ap.add_argument("manifest", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    rows = read_manifest(a.manifest)
    res = pretrain(rows, a.manifest.parent, a.out, PretrainSettings(epochs=a.epochs, threads=a.threads))
    print(json.dumps(res.history[-1]))


if __name__ == "__main__":  # pragma: no cover
    main()
