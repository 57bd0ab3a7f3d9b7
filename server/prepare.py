"""Get a federated run ready: data, partition, the central base model, per-device manifests.

Why one place: `fedsd simulate`, `fedsd server start` and `fedsd demo` all start from a config that
may name no trained model. Then the server trains one centrally (self-distillation) on a pool of
server speakers, holds out unseen test speakers, and writes one manifest per device (labels of the
unlabelled utterances blanked) so real devices can be started on the same split.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    )
    part.config["manifest"] = str(cfg.data.manifest_path)
    part.save(out)
    log(
        f"partition: {len(part.test_speakers)} test speakers, {len(part.server_speakers)} server speakers, "
        f"{len(part.clients)} devices ({fc.label_fraction:.0%} labelled) → {out}"
    )
    return part


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
        if (central / "best" / "fedsd.json").exists():
            log(f"using the central model trained earlier: {central / 'best'}")
        else:
            from fedsd.train import train

            log(
                f"no base_model in the config: training one centrally with self-distillation on the "
                f"{len(part.server_speakers)} server speakers → {central}"
            )
            splits = server_pool_splits(part, rows, cfg.train.seed, cfg.federated.server_valid_speakers)
            train(cfg, central, splits=splits, progress=progress, log=log)
            trained = True
        base = central / "best"
    elif not (Path(base) / "fedsd.json").exists():
        raise ConfigError(
            f"base_model {base}: not a fedsd checkpoint (no fedsd.json); train one with `fedsd train`"
        )
    return Prepared(part_path, Path(base).resolve(), manifests, trained)
