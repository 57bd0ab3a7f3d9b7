"""Torch dataset over manifest rows and the padding collate.

Why the details matter: the per-utterance normalisation matches the wav2vec 2.0 feature extractor, so a
model fine-tuned here sees the same input distribution as in pre-training; random crops are seeded by
(seed, epoch, index), so a run is reproducible even with several DataLoader workers; and clips of different
lengths are zero-padded with an attention mask instead of being stretched.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fedsd.data.audio import CropPolicy, apply_crop, load_audio, normalize_waveform
from fedsd.data.manifest import ManifestError, ManifestRow

UNLABELLED = -1


class SpeechDataset(Dataset):
    """Utterances of ``rows`` decoded from ``root``, cropped by ``crop`` and (by default) normalised.

    ``labelled`` (e.g. a client's mask from the partition) hides labels: hidden or empty labels become -1.
    ``train=True`` enables random crops (when the policy's mode is ``random``); otherwise every call returns
    the same tensor for the same index.
    """

    def __init__(
        self,
        rows: Sequence[ManifestRow],
        root: str | os.PathLike[str],
        label_names: Sequence[str],
        crop: CropPolicy,
        *,
        labelled: Sequence[bool] | None = None,
        train: bool = False,
        seed: int = 0,
        normalize: bool = True,
    ) -> None:
        self.rows = list(rows)
        self.root = Path(root)
        self.label_names = list(label_names)
        self.crop = crop
        self.train = train
        self.seed = int(seed)
        self.normalize = normalize
        self.epoch = 0
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if labelled is not None and len(labelled) != len(self.rows):
            raise ValueError(f"labelled mask has {len(labelled)} entries for {len(self.rows)} rows")
        index = {name: i for i, name in enumerate(self.label_names)}
        #: the true class index of every row (-1 when the manifest has no label), for evaluation
        self.targets: list[int] = []
        for r in self.rows:
            if r.label and r.label not in index:
                known = ", ".join(self.label_names)
                raise ValueError(f"utterance {r.utt_id}: label {r.label!r} is not in the label set [{known}]")
            self.targets.append(index[r.label] if r.label else UNLABELLED)
        mask = [True] * len(self.rows) if labelled is None else [bool(x) for x in labelled]
        #: the class index a model may train on (-1 where the label is hidden or absent)
        self.labels: list[int] = [t if m else UNLABELLED for t, m in zip(self.targets, mask, strict=True)]

    def set_epoch(self, epoch: int) -> None:
        """Change the random crops for a new epoch (call before iterating)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def path(self, i: int) -> Path:
        return self.root / self.rows[i].path

    def waveform(self, i: int) -> np.ndarray:
        """The model input for row ``i`` as float32 numpy (decoded, cropped, normalised)."""
        wav = load_audio(self.path(i), self.crop.sample_rate)
        rng = None
        if self.train and self.crop.mode == "random":
            rng = np.random.default_rng([self.seed, self.epoch, i])
        wav = apply_crop(wav, self.crop, rng)
        if self.normalize:
            wav = normalize_waveform(wav)
        return np.ascontiguousarray(wav, dtype=np.float32)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} utterances")
        i = i % len(self)
        return {
            "input_values": torch.from_numpy(self.waveform(i)),
            "label": self.labels[i],
            "utt_id": self.rows[i].utt_id,
            "index": i,
        }


def collate_batch(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Zero-pad to the longest clip; ``attention_mask`` is 1 on real samples, 0 on padding."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    lengths = [int(it["input_values"].shape[0]) for it in items]
    batch = torch.zeros(len(items), max(lengths), dtype=torch.float32)
    mask = torch.zeros(len(items), max(lengths), dtype=torch.long)
    for k, (it, n) in enumerate(zip(items, lengths, strict=True)):
        batch[k, :n] = it["input_values"]
        mask[k, :n] = 1
    return {
        "input_values": batch,
        "attention_mask": mask,
        "labels": torch.tensor([int(it["label"]) for it in items], dtype=torch.long),
        "utt_ids": [it["utt_id"] for it in items],
        "indices": torch.tensor([int(it["index"]) for it in items], dtype=torch.long),
    }


def rows_by_ids(rows: Sequence[ManifestRow], utt_ids: Sequence[str]) -> list[ManifestRow]:
    """Rows in the order of ``utt_ids`` (e.g. a client's list from the partition)."""
    index = {r.utt_id: r for r in rows}
    missing = [u for u in utt_ids if u not in index]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ManifestError(f"{len(missing)} utterance id(s) not in the manifest: {shown}")
    return [index[u] for u in utt_ids]
