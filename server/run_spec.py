"""What a federated run is: its spec, its result, the config devices train with, the speech the server holds.

The spec is flat and JSON-able (it travels in a Flower run config or ``spec.json``); the server-held
speech is the partition's unseen test speakers, and the server pool's validation speakers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord

from fedsd.config import ExperimentConfig
from fedsd.data.dataset import rows_by_ids
from fedsd.data.manifest import ManifestRow, read_manifest
from fedsd.security.privacy import DPSettings


class FederationError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


@dataclass
class FederationSpec:
    """Everything the server needs; flat and JSON-able so it travels in a Flower run config."""

    config: str
    run_dir: str
    base_model: str
    rounds: int | None = None
    min_clients: int | None = None
    partition: str | None = None
    eval_manifest: str | None = None
    eval_root: str | None = None
    resume: bool = False
    deliver_model: bool = True
    node_wait_s: float = 300.0
    cache_dir: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> FederationSpec:
        return cls(**json.loads(text))


@dataclass
class FederationResult:
    run_dir: Path
    rounds_done: int
    history: list[dict[str, Any]]
    final_dir: Path | None


def train_config_record(
    cfg: ExperimentConfig,
    fingerprint: str,
    round_offset: int,
    *,
    num_rounds: int | None = None,
    federation_id: str = "",
) -> ConfigRecord:
    """The hyper-parameters every device trains with this run (the server is their single source).

    With ``federated.dp`` set, the ``dp-*`` keys ask every device for sample-level DP; a device's own
    ``--dp-*`` flags override them. ``federation-id`` names the run across server restarts, so a
    device's privacy ledger continues after a ``--resume``.
    """
    fc = cfg.federated
    dp = DPSettings.from_config(fc.dp, num_rounds or fc.rounds).to_record() if fc.dp else {}
    return ConfigRecord(
        dp
        | {
            "fingerprint": fingerprint,
            "federation-id": federation_id,
            "num-rounds": num_rounds or fc.rounds,
            "round-offset": round_offset,
            "local-epochs": fc.local_epochs,
            "batch-size": fc.batch_size,
            "lr": fc.lr,
            "proximal-mu": fc.proximal_mu,
            "mode": fc.mode,
            "train-exits": fc.train_exits,
            "teacher": fc.teacher,
            "w-ce": fc.distill.w_ce,
            "w-kd": fc.distill.w_kd,
            "w-feat": fc.distill.w_feat,
            "temperature": fc.distill.temperature,
            "pl-threshold": fc.distill.pl_threshold,
            "seed": fc.seed,
        }
    )


def _server_data(spec: FederationSpec, cfg: ExperimentConfig) -> tuple[Path, Path]:
    """The manifest and audio root of the speech the server holds (the spec's, else the config's)."""
    manifest = Path(spec.eval_manifest) if spec.eval_manifest else cfg.data.manifest_path
    return manifest, Path(spec.eval_root) if spec.eval_root else cfg.data.root


def eval_rows(spec: FederationSpec, cfg: ExperimentConfig) -> tuple[list[ManifestRow], Path]:
    """Server-held utterances of unseen speakers: the partition's test set, else split=test rows."""
    manifest, root = _server_data(spec, cfg)
    if not manifest.exists():
        return [], root
    rows = read_manifest(manifest)
    if spec.partition:
        from fedsd.data.partition import Partition

        ids = Partition.load(spec.partition).test_utt_ids
        return rows_by_ids(rows, ids), root
    return [r for r in rows if r.split == "test" and r.label], root


def valid_rows(spec: FederationSpec, cfg: ExperimentConfig) -> tuple[list[ManifestRow], Path]:
    """The server pool's validation speakers (the ones that picked the base model's epoch, never trained
    on): where federated settings may be chosen, unlike the unseen test speakers. Empty without a
    partition or a server pool."""
    manifest, root = _server_data(spec, cfg)
    if not spec.partition or not manifest.exists():
        return [], root
    from fedsd.data.partition import Partition
    from fedsd.server.prepare import server_pool_splits

    part = Partition.load(spec.partition)
    if not part.server_utt_ids:
        return [], root
    rows = read_manifest(manifest)
    n_valid = cfg.federated.server_valid_speakers
    return server_pool_splits(part, rows, cfg.train.seed, n_valid)["valid"], root
