"""Exit heads on cached features: batching, outputs and per-exit evaluation.

Shared by devices (local training, personal tests) and the server (evaluation on unseen speakers):
both run only the small heads over ``fedsd.training.features`` caches, so neither side needs the other's code.
Cached inputs are CPU tensors while each head may sit elsewhere (``--device``): every batch goes to
its head's device, results come back to the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from fedsd.data.audio import CropPolicy
from fedsd.metrics import ClassificationReport, classification_report
from fedsd.model.heads import HeadOutput
from fedsd.model.multiexit import MultiExitSER
from fedsd.training.features import CachedFeatures


def model_crop(model: MultiExitSER) -> CropPolicy:
    """Devices cache deterministic features: the model's crop, with random crops made central."""
    return CropPolicy.for_evaluation(model.meta.get("crop"), int(model.meta.get("sample_rate", 16000)))


def head_device(model: MultiExitSER, k: int) -> torch.device:
    """Where exit ``k``'s head lives (its inputs must go there)."""
    return next(model.heads[str(k)].parameters()).device


def batch_input(
    model: MultiExitSER, feats: CachedFeatures, k: int, idx: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cached inputs of exit ``k`` for items ``idx``, batched on the device of that exit's head."""
    device = head_device(model, k)
    items = [feats.inputs[k][i] for i in idx]
    if items[0].dim() == 1:
        return torch.stack(items).to(device), None
    x = pad_sequence(items, batch_first=True)
    lengths = torch.tensor([t.shape[0] for t in items])
    mask = torch.arange(x.shape[1])[None] < lengths[:, None]
    return x.to(device), mask.to(device)


def head_outputs(
    model: MultiExitSER, feats: CachedFeatures, exits: Sequence[int], idx: Sequence[int]
) -> dict[int, HeadOutput]:
    out = {}
    for k in exits:
        x, mask = batch_input(model, feats, k, idx)
        out[k] = model.heads[str(k)].forward_precomputed(x, mask)
    return out


@torch.no_grad()
def evaluate_cached(
    model: MultiExitSER, feats: CachedFeatures, exits: Sequence[int], batch_size: int = 64
) -> dict[int, ClassificationReport]:
    """Per-exit metrics over the labelled cached utterances."""
    model.eval()
    keep = [i for i in range(len(feats.utt_ids)) if feats.labels[i] >= 0]
    preds: dict[int, list[np.ndarray]] = {k: [] for k in exits}
    for s in range(0, len(keep), batch_size):
        idx = keep[s : s + batch_size]
        out = head_outputs(model, feats, exits, idx)
        for k in exits:
            preds[k].append(out[k].logits.argmax(-1).cpu().numpy())
    y = feats.labels[keep].numpy()
    return {
        k: classification_report(y, np.concatenate(v) if v else np.zeros(0, int), model.label_names)
        for k, v in preds.items()
    }
