"""fedsd's Python API: what a notebook, a benchmark or a test scripts. Every command is a thin layer
over it (flags → one call here → printing).

    from fedsd import api

    cfg = api.load_config("demo", overrides={"train.epochs": 2})   # a shipped config name or a YAML path
    result = api.train(cfg, "runs/demo/central")               # TrainResult (best/ and last/ models)
    report = api.evaluate(result.best_dir, cfg.data.manifest_path, root=cfg.data.root)
    preds = api.predict(result.best_dir, ["a.wav", "b.wav"], exit=2)
    fed = api.simulate(cfg, out="runs/demo-sim", engine="inprocess")   # FederationResult

    with api.Server(cfg, out="runs/srv", port=9092, insecure=True) as server:   # a real SuperLink
        server.submit()
        summary = server.wait()
    api.Device(superlink="127.0.0.1:9092", exit=2, data="dev.csv", root="data", insecure=True).run()

Data and pretraining:

    rows = api.scan_corpus("ravdess", "/corpora/RAVDESS")          # ScanResult: list of ManifestRow
    api.write_manifest(rows, "data/ravdess.csv")
    checked = api.check_manifest("data/ravdess.csv", "/corpora/RAVDESS")   # CheckResult: .bad, .usable
    part, _ = api.partition_manifest("data/ravdess.csv", "part.json", num_clients=8, label_fraction=0.2)
    api.pretrain(api.read_manifest("unlabelled.csv"), "data", "runs/ssl", api.PretrainSettings(epochs=5))

Names are resolved lazily: ``from fedsd import api`` imports neither torch nor Flower, and a device
install that never touches ``api.Server`` never imports the server's modules. The ``TYPE_CHECKING``
imports below are the same names, for type checkers and IDEs only (never executed); a test keeps the two
lists equal.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedsd.clients.service import Device
    from fedsd.config import ConfigError, ExperimentConfig, load_config, shipped_configs
    from fedsd.data.check import BadFile, CheckResult, check_manifest
    from fedsd.data.corpora import CorpusError, ScanResult, import_csv, scan_corpus
    from fedsd.data.manifest import ManifestError, ManifestRow, read_manifest, write_manifest
    from fedsd.data.partition import Partition, PartitionError, partition_manifest
    from fedsd.data.synthetic import SynthResult, generate_corpus
    from fedsd.runtime.export import ExportResult, export
    from fedsd.runtime.inference import EvaluationResult, Prediction, evaluate, predict
    from fedsd.server.service import Server, ServerError, ServerSummary
    from fedsd.server.simulation import FederationResult, simulate
    from fedsd.training.central import TrainResult
    from fedsd.training.central import train_experiment as train
    from fedsd.training.pretrain import PretrainResult, PretrainSettings, pretrain

_TARGETS: dict[str, str] = {
    # configuration
    "load_config": "fedsd.config:load_config",
    "shipped_configs": "fedsd.config:shipped_configs",
    "ExperimentConfig": "fedsd.config:ExperimentConfig",
    "ConfigError": "fedsd.config:ConfigError",
    # data: manifests, corpora, checks, partitions, synthetic speech
    "ManifestRow": "fedsd.data.manifest:ManifestRow",
    "ManifestError": "fedsd.data.manifest:ManifestError",
    "read_manifest": "fedsd.data.manifest:read_manifest",
    "write_manifest": "fedsd.data.manifest:write_manifest",
    "scan_corpus": "fedsd.data.corpora:scan_corpus",
    "import_csv": "fedsd.data.corpora:import_csv",
    "ScanResult": "fedsd.data.corpora:ScanResult",
    "CorpusError": "fedsd.data.corpora:CorpusError",
    "check_manifest": "fedsd.data.check:check_manifest",
    "CheckResult": "fedsd.data.check:CheckResult",
    "BadFile": "fedsd.data.check:BadFile",
    "partition_manifest": "fedsd.data.partition:partition_manifest",
    "Partition": "fedsd.data.partition:Partition",
    "PartitionError": "fedsd.data.partition:PartitionError",
    "generate_corpus": "fedsd.data.synthetic:generate_corpus",
    "SynthResult": "fedsd.data.synthetic:SynthResult",
    # self-supervised pretraining
    "pretrain": "fedsd.training.pretrain:pretrain",
    "PretrainSettings": "fedsd.training.pretrain:PretrainSettings",
    "PretrainResult": "fedsd.training.pretrain:PretrainResult",
    # central training, evaluation, inference, export
    "train": "fedsd.training.central:train_experiment",
    "TrainResult": "fedsd.training.central:TrainResult",
    "evaluate": "fedsd.runtime.inference:evaluate",
    "predict": "fedsd.runtime.inference:predict",
    "Prediction": "fedsd.runtime.inference:Prediction",
    "EvaluationResult": "fedsd.runtime.inference:EvaluationResult",
    "export": "fedsd.runtime.export:export",
    "ExportResult": "fedsd.runtime.export:ExportResult",
    # federation
    "simulate": "fedsd.server.simulation:simulate",
    "FederationResult": "fedsd.server.simulation:FederationResult",
    "Server": "fedsd.server.service:Server",
    "ServerError": "fedsd.server.service:ServerError",
    "ServerSummary": "fedsd.server.service:ServerSummary",
    "Device": "fedsd.clients.service:Device",
}

# A literal list, so that tools read it without running this module (a test keeps it == sorted(_TARGETS)).
__all__ = [
    "BadFile",
    "CheckResult",
    "ConfigError",
    "CorpusError",
    "Device",
    "EvaluationResult",
    "ExperimentConfig",
    "ExportResult",
    "FederationResult",
    "ManifestError",
    "ManifestRow",
    "Partition",
    "PartitionError",
    "Prediction",
    "PretrainResult",
    "PretrainSettings",
    "ScanResult",
    "Server",
    "ServerError",
    "ServerSummary",
    "SynthResult",
    "TrainResult",
    "check_manifest",
    "evaluate",
    "export",
    "generate_corpus",
    "import_csv",
    "load_config",
    "partition_manifest",
    "predict",
    "pretrain",
    "read_manifest",
    "scan_corpus",
    "shipped_configs",
    "simulate",
    "train",
    "write_manifest",
]


def __getattr__(name: str) -> Any:
    target = _TARGETS.get(name)
    if target is None:
        raise AttributeError(
            f"module 'fedsd.api' has no attribute {name!r}; the API is: {', '.join(__all__)}"
        )
    module, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return __all__
