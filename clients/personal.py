"""What a device keeps for itself: its personal test metrics, its personal heads, its deployable model.

- **Personal test speech**: a labelled part of the device's own utterances it never trains on (the
  partition's ``personal_test_utt_ids``, or manifest rows with ``split=personal_test``). Metrics on it
  measure what on-device adaptation is for: the model on *this* device's speaker(s), on unseen speech.
- **Personal heads**: at the end of the run (the server's ``query.done``, which carries the final global
  heads) the device fine-tunes a private copy of its heads on its own training speech with the same loss
  as every round (CE on its labels, distillation from the frozen teacher on all its utterances), for
  ``personalize-epochs``. They never leave the device; only their personal-test metrics do.

  Why after the last round and not every round from the fresh global heads: a round's local training
  *is* that per-round variant (the same loss and data from the fresh global heads; its personal-test
  UAR is the ``after`` metric), and it measured the same as personalising once at the end — demo config,
  central base model, 8 devices, 5 rounds, 20 personal test utterances per device, UAR mean ± std over
  devices at exits 1/2/3: each round (5 epochs from round 4's heads) 0.750 ± 0.120 / 0.800 ± 0.112 /
  0.925 ± 0.106; after the last round, 5 epochs 0.731 ± 0.175 / 0.800 ± 0.154 / 0.925 ± 0.106 (20 epochs
  0.756 / 0.790 / 0.925); final global heads 0.688 / 0.720 / 0.875. Once at the end costs N epochs once
  instead of every round, starts from the final global heads (which the device needs anyway for its
  deployable model) and keeps rounds as short as before. The default (``personalize_epochs`` 0, demo 5 =
  local_epochs) was not chosen on personal-test speech.
- **Deployable model** (``--out DIR``): the exported slice for the device's exit (front end, layers
  1..K, heads <= K; ``fedsd.model.export.export_exit``) holding the global heads, rewritten atomically
  at every train message (the global heads of the last completed round) and at the end (the final global
  heads); ``DIR/personal`` holds the personal heads when personalisation is on. Both load with
  ``fedsd predict --model`` and ``fedsd evaluate``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedsd.clients.device import DeviceSettings
from fedsd.clients.training import ExitPlan, LocalTrainConfig, mix_seed, train_heads
from fedsd.metrics import ClassificationReport
from fedsd.model.multiexit import MultiExitSER
from fedsd.training.cached import evaluate_cached
from fedsd.training.features import CachedFeatures, FeatureCache

PERSONAL_DIR = "personal"
"""Sub-directory of ``--out`` holding the model with the device's personal heads."""


def personal_exits(plan: ExitPlan, device_exit: int) -> list[int]:
    """Exits measured on the personal test speech: those the device runs up to its own exit."""
    return [k for k in plan.needed if k <= device_exit]


def personal_features(
    settings: DeviceSettings, model: MultiExitSER, exits: Sequence[int], crop: Any
) -> CachedFeatures | None:
    """Cached head inputs of the device's personal test utterances; None when it has none."""
    rows = settings.personal_test_data()
    if not rows:
        return None
    cache = FeatureCache(settings.cache_dir, model, crop)
    return cache.get(
        rows, settings.root, exits, label_names=model.label_names, labelled=[True] * len(rows),
        device=settings.device,
    )  # fmt: skip


def personal_metrics(tag: str, reports: dict[int, ClassificationReport]) -> dict[str, float]:
    """``exit<k>/personal-{uar,wa,f1}-<tag>`` for every exit evaluated on at least one utterance."""
    out: dict[str, float] = {}
    for k, r in reports.items():
        if r.n > 0:
            out |= {
                f"exit{k}/personal-uar-{tag}": float(r.uar),
                f"exit{k}/personal-wa-{tag}": float(r.wa),
                f"exit{k}/personal-f1-{tag}": float(r.macro_f1),
            }
    return out


def evaluate_personal(
    model: MultiExitSER, feats: CachedFeatures | None, exits: Sequence[int]
) -> dict[int, ClassificationReport]:
    return evaluate_cached(model, feats, exits) if feats is not None else {}


def write_device_model(
    model: MultiExitSER, exit_k: int, out: Path, info: dict[str, Any]
) -> Path:
    """Export the slice for ``exit_k`` with the model's current heads to ``out`` (one atomic directory).

    ``info`` (round, heads = global/personal, device name) is recorded in ``meta["device_model"]``.
    A ``DIR/personal`` from before is dropped with the old directory (it belonged to the old heads).
    """
    from fedsd.model.export import export_exit

    sliced = export_exit(model, exit_k)
    sliced.meta = {**sliced.meta, "device_model": dict(info)}
    return sliced.save_pretrained(out)


def model_info(settings: DeviceSettings, cfg: dict[str, Any], rnd: int, heads: str) -> dict[str, Any]:
    """What a deployable model records of its origin (``meta["device_model"]``): round, which heads
    (global or personal), the device's name and the server's ``federation-id`` (a checked config)."""
    return {
        "round": rnd, "heads": heads, "device": settings.name,
        "federation_id": str(cfg.get("federation-id", "")), "time": time.time(),
    }  # fmt: skip


def personalize(
    model: MultiExitSER,
    feats: CachedFeatures,
    plan: ExitPlan,
    lcfg: LocalTrainConfig,
    epochs: int,
    device: str,
) -> dict[str, float]:
    """Fine-tune the model's trained heads in place on the device's training features (same loss as a
    round) for ``epochs``; the caller keeps the global heads if it needs them. Returns the losses."""
    seed = mix_seed(lcfg.seed, "personalize", device)
    return train_heads(model, feats, plan, replace(lcfg, epochs=epochs, seed=seed))
