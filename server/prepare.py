"""Get a federated run ready: data, partition, the central base model, per-device manifests.

Why one place: `fedsd simulate`, `fedsd server start` and `fedsd demo` all start from a config that
may name no trained model. Then the server trains one centrally (self-distillation) on a pool of
server speakers, holds out unseen test speakers, and writes one manifest per device (labels of the
unlabelled utterances blanked) so real devices can be started on the same split.

No speaker leaks into a base model: a central model already in ``<run>/central/best`` is reused only if
its recorded training and selection speakers (``fedsd.checkpoint.data_record``) meet none of this run's
test or device speakers. Otherwise (or when it records none, as checkpoints from before the record do)
it is **retrained** on this partition's server pool; the new model replaces it in one atomic swap and
the old one is kept beside it as ``central.replaced-<time>`` (the log names it), never deleted. Why
retrain rather than stop: rerunning with another ``federated.seed`` in the same run directory is the
common case, and the right fix is always the same retraining. A base model given explicitly
(``base_model`` / ``--base-model``) is never retrained: a known overlap stops the run with an error naming
the speakers; an unknown record is logged as such.

With ``data.split: manifest`` the manifest's ``split=test`` speakers are held out first: the federated
test speakers are drawn from them, and none of them is ever in the server pool
(``make_partition(test_first=...)``), so ``fedsd evaluate --split test`` on the central model scores
unseen speakers only.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsd.checkpoint import read_model_meta, replace_directory_keeping, speaker_overlap
from fedsd.config import ConfigError, ExperimentConfig
from fedsd.data.dataset import rows_by_ids
from fedsd.data.manifest import ManifestRow, read_manifest
from fedsd.data.partition import Partition, make_partition, write_device_manifests
from fedsd.data.prepare import ensure_corpus

Log = Callable[[str], None]


@dataclass
class Prepared:
    partition: Path
    base_model: Path
    client_manifests: list[Path]
    trained_here: bool


def make_run_partition(cfg: ExperimentConfig, out: Path, log: Log = print) -> Partition:
    """The federated split of the config's corpus: test speakers, server pool, device shards."""
    fc = cfg.federated
    rows = [r for r in read_manifest(cfg.data.manifest_path) if r.label]
    test_first = manifest_test_speakers(cfg, rows)
    part = make_partition(
        rows,
        num_clients=fc.num_clients,
        by=fc.by,
        alpha=fc.alpha,
        label_fraction=fc.label_fraction,
        test_speakers=fc.test_speakers,
        server_speakers=fc.server_speakers,
        seed=fc.seed,
        keep_speakers=fc.keep_speakers,
        personal_test_fraction=fc.personal_test_fraction,
        test_first=test_first,
    )
    part.config["manifest"] = str(cfg.data.manifest_path)
    part.save(out)
    log(
        f"partition: {len(part.test_speakers)} test speakers, {len(part.server_speakers)} server speakers, "
        f"{len(part.clients)} devices ({fc.label_fraction:.0%} labelled) → {out}"
    )
    return part


def manifest_test_speakers(cfg: ExperimentConfig, rows: list[ManifestRow]) -> list[str]:
    """The manifest's ``split=test`` speakers when the config follows the manifest's split (else none)."""
    if cfg.data.split != "manifest":
        return []
    return sorted({r.speaker for r in rows if r.split == "test"})


def run_speakers(part: Partition) -> set[str]:
    """Every speaker a base model must not have seen: the test speakers and each device's."""
    return set(part.test_speakers) | {s for c in part.clients for s in c.speakers}


def base_model_overlap(base: Path, part: Partition) -> dict[str, Any]:
    """:func:`fedsd.checkpoint.speaker_overlap` of a base model against this run's test and device speakers."""
    return speaker_overlap(read_model_meta(base), run_speakers(part))


def server_pool_splits(
    part: Partition, rows: list[ManifestRow], seed: int, valid_speakers: int = 2
) -> dict[str, list[ManifestRow]]:
    """Central training data: the server pool (minus validation speakers) and the held-out test set."""
    pool = rows_by_ids(rows, part.server_utt_ids)
    if not pool:
        raise ConfigError(
            "federated.server_speakers is 0: no pool to train the base model on; set base_model"
        )
    speakers = sorted({r.speaker for r in pool})
    random.Random(seed).shuffle(speakers)
    valid = set(speakers[:valid_speakers]) if len(speakers) > valid_speakers else set()
    return {
        "train": [r for r in pool if r.speaker not in valid],
        "valid": [r for r in pool if r.speaker in valid],
        "test": rows_by_ids(rows, part.test_utt_ids),
    }


def write_client_manifests(part: Partition, rows: list[ManifestRow], out_dir: Path) -> list[Path]:
    """One manifest per device; unlabelled utterances have an empty label (they never leave it), personal
    test rows are marked ``split=personal_test`` (see fedsd.data.partition.device_manifest_rows)."""
    return write_device_manifests(part, rows, out_dir)


def prepare_run(
    cfg: ExperimentConfig,
    run_dir: Path,
    *,
    log: Log = print,
    progress: Any | None = None,
    base_model: Path | None = None,
) -> Prepared:
    """Data → partition → base model (given, found, or trained here) → device manifests."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ensure_corpus(cfg.data, log=log)
    part_path = run_dir / "partition.json"
    part = make_run_partition(cfg, part_path, log)
    rows = read_manifest(cfg.data.manifest_path)
    manifests = write_client_manifests(part, rows, run_dir / "devices")
    base = base_model or cfg.base_model
    trained = False
    if base is None:
        central = run_dir / "central"
        trained = ensure_central_model(cfg, central, part, rows, log=log, progress=progress)
        base = central / "best"
    elif not (Path(base) / "fedsd.json").exists():
        raise ConfigError(
            f"base_model {base}: not a fedsd checkpoint (no fedsd.json); train one with `fedsd train`"
        )
    else:
        check_given_base(Path(base), part, log)
    return Prepared(part_path, Path(base).resolve(), manifests, trained)


def check_given_base(base: Path, part: Partition, log: Log = print) -> None:
    """A base model named by the config or the caller: stop if it was trained or selected on one of this
    run's test or device speakers (it cannot be retrained here); say so when it records nothing."""
    overlap = base_model_overlap(base, part)
    if overlap["status"] == "overlap":
        raise ConfigError(
            f"base_model {base} was trained or selected on speaker(s) {', '.join(overlap['speakers'])}, "
            "which this run uses as test or device speakers: its results would not be on unseen speakers. "
            "Use a base model trained without them, change federated.seed/test_speakers, or leave base_model "
            "unset to train one on this partition's server pool"
        )
    if overlap["status"] == "unknown":
        log(f"base_model {base}: records no training speakers; cannot check it against this run's speakers")


def ensure_central_model(
    cfg: ExperimentConfig,
    central: Path,
    part: Partition,
    rows: list[ManifestRow],
    *,
    log: Log = print,
    progress: Any | None = None,
) -> bool:
    """``central/best`` ready for this partition; True if it was (re)trained here (see module docstring)."""
    from fedsd.training.central import train

    splits = server_pool_splits(part, rows, cfg.train.seed, cfg.federated.server_valid_speakers)
    best = central / "best"
    if (best / "fedsd.json").exists():
        overlap = base_model_overlap(best, part)
        if overlap["status"] == "none":
            log(f"using the central model trained earlier: {best}")
            return False
        why = (
            f"it was trained or selected on speaker(s) {', '.join(overlap['speakers'])}, which this partition "
            "uses as test or device speakers"
            if overlap["status"] == "overlap"
            else "it records no training speakers (made before that record existed)"
        )
        log(f"not reusing the central model {best}: {why}; retraining it on this partition's server pool")
        # train beside it, then swap in one step: the old model stays whole until the new one is
        staging = central.with_name(f"{central.name}.training-{os.getpid()}")
        if staging.exists():
            shutil.rmtree(staging)
        try:
            train(cfg, staging, splits=splits, progress=progress, log=log)
        except BaseException:  # interrupted or failed: the old model is untouched, the half-made one goes
            shutil.rmtree(staging, ignore_errors=True)
            raise
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        kept = replace_directory_keeping(staging, central, f"{central.name}.replaced-{stamp}")
        log(f"retrained the central model → {central}; the previous one is kept at {kept}")
        return True
    log(
        f"no base_model in the config: training one centrally with self-distillation on the "
        f"{len(part.server_speakers)} server speakers → {central}"
    )
    train(cfg, central, splits=splits, progress=progress, log=log)
    return True
