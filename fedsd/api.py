"""fedsd's Python API: what a notebook, a benchmark or a test scripts. Every command is a thin layer
over it (flags → one call here → printing).

    from fedsd import api

    cfg = api.load_config("configs/demo.yaml", overrides={"train.epochs": 2})
    result = api.train(cfg, "runs/demo/central")               # TrainResult (best/ and last/ models)
    report = api.evaluate(result.best_dir, cfg.data.manifest_path, root=cfg.data.root)
    preds = api.predict(result.best_dir, ["a.wav", "b.wav"], exit=2)
    fed = api.simulate(cfg, out="runs/demo-sim", engine="inprocess")   # FederationResult

    with api.Server(cfg, out="runs/srv", port=9092, insecure=True) as server:   # a real SuperLink
        server.submit()
        summary = server.wait()
    api.Device(superlink="127.0.0.1:9092", exit=2, data="dev.csv", root="data", insecure=True).run()

Names are resolved lazily: ``from fedsd import api`` imports neither torch nor Flower, and a device
install that never touches ``api.Server`` never imports the server's modules.
"""

from __future__ import annotations

import importlib
from typing import Any

_TARGETS: dict[str, str] = {
    # configuration
    "load_config": "fedsd.config:load_config",
    "ExperimentConfig": "fedsd.config:ExperimentConfig",
    "ConfigError": "fedsd.config:ConfigError",
    # central training, evaluation, inference, export
    "train": "fedsd.train:train_experiment",
    "TrainResult": "fedsd.train:TrainResult",
    "evaluate": "fedsd.inference:evaluate",
    "predict": "fedsd.inference:predict",
    "Prediction": "fedsd.inference:Prediction",
    "EvaluationResult": "fedsd.inference:EvaluationResult",
    "export": "fedsd.export:export",
    "ExportResult": "fedsd.export:ExportResult",
    # federation
    "simulate": "fedsd.server.simulation:simulate",
    "FederationResult": "fedsd.server.simulation:FederationResult",
    "Server": "fedsd.server.service:Server",
    "ServerError": "fedsd.server.service:ServerError",
    "ServerSummary": "fedsd.server.service:ServerSummary",
    "Device": "fedsd.clients.service:Device",
}

__all__ = sorted(_TARGETS)


def __getattr__(name: str) -> Any:
    target = _TARGETS.get(name)
    if target is None:
        raise AttributeError(f"module 'fedsd.api' has no attribute {name!r}; the API is: {', '.join(__all__)}")
    module, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return __all__
