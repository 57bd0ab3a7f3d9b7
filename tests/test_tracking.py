"""Experiment tracking: TensorBoard event files and MLflow stores (file: and sqlite:) read back after
real runs (central training, a federation, pretraining) hold exactly the numbers of metrics.jsonl."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedsd import api
from fedsd.cli.main import app
from fedsd.config import ExperimentConfig, load_config
from fedsd.tracking import FanOut, Tracker, flatten
from fedsd.training.central import train

pytest.importorskip("tensorboard", reason="fedsd[tracking] is not installed")
pytest.importorskip("mlflow", reason="fedsd[tracking] is not installed")

from mlflow import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

LABELS = ["neutral", "happy", "angry", "sad"]
SIM = """
name: trk
data: {{corpus: synth, root: {root}, labels: [neutral, happy, angry, sad], crop: {{max_seconds: 2.0, mode: tile}}}}
model: {{backbone: tiny, pretrained: false, exits: [1, 2, 3, 4]}}
federated: {{num_clients: 2, test_speakers: 1, server_speakers: 0, rounds: 2, local_epochs: 1, batch_size: 8,
            lr: 0.01, exits_mix: [1, 2], label_fraction: 0.5, min_clients: 2}}
"""


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _tensorboard(log_dir: Path) -> dict[tuple[str, int], float]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def _mlflow_run(uri: str, experiment: str) -> tuple[MlflowClient, Any]:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} in {uri}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def _mlflow_metrics(client: MlflowClient, run: Any) -> dict[tuple[str, int], float]:
    return {
        (k, m.step): m.value for k in run.data.metrics for m in client.get_metric_history(run.info.run_id, k)
    }


def _same(got: dict[tuple[str, int], float], expected: dict[tuple[str, int], float], rel: float) -> None:
    assert set(got) == set(expected), (sorted(set(got) ^ set(expected)))[:10]
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=rel, abs=1e-7), key


def test_central_training_logs_every_epoch_to_tensorboard_and_a_file_store(
    tmp_path: Path, small_corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # a file: URI is enough of a request
    uri = (tmp_path / "mlruns").as_uri()
    cfg = ExperimentConfig.model_validate(
        {
            "name": "trk-central",
            "data": {
                "root": str(small_corpus),
                "labels": LABELS,
                "crop": {"max_seconds": 1.0, "mode": "random"},
            },
            "model": {"backbone": "tiny", "pretrained": False, "exits": [1, 2, 3, 4]},
            "train": {"lr": 2e-3, "batch_size": 8, "epochs": 2, "seed": 0},
            "log": {"tensorboard": str(tmp_path / "tb"), "mlflow_uri": uri},
        }
    )
    run_dir = tmp_path / "run"
    train(cfg, run_dir, log=lambda _: None)
    lines = _lines(run_dir / "metrics.jsonl")
    expected = {(k, r["epoch"]): float(v) for r in lines for k, v in r.items() if k != "epoch" and _finite(v)}
    names = {k for k, _ in expected}
    assert {"lr", "train/total"} <= names
    assert {f"train/loss/{k}" for k in (1, 2, 3, 4)} <= names  # per-exit losses
    assert {f"valid/exit{k}/uar" for k in (1, 2, 3, 4)} <= names  # per-exit UAR
    assert {s for _, s in expected} == {1, 2}

    _same(_tensorboard(tmp_path / "tb" / "central"), expected, rel=1e-6)  # event files hold float32

    client, run = _mlflow_run(uri, "trk-central")
    assert run.info.status == "FINISHED" and run.data.tags["fedsd.phase"] == "central"
    _same(_mlflow_metrics(client, run), expected, rel=1e-12)
    params = run.data.params
    assert set(params) == set(flatten(cfg.model_dump(mode="json")))
    assert params["train.epochs"] == "2" and json.loads(params["data.labels"]) == LABELS
    assert params["log.mlflow_uri"] == uri
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"metrics.jsonl", "config.yaml", "results.json", "learning_curves.png"} <= files
    copy = client.download_artifacts(run.info.run_id, "metrics.jsonl", str(tmp_path))
    assert Path(copy).read_text() == (run_dir / "metrics.jsonl").read_text()


def _round_expected(lines: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """What a federation's trackers must hold, read from metrics.jsonl by hand."""
    out: dict[tuple[str, int], float] = {}
    for r in lines:
        rnd = r["round"]
        out |= {(k, rnd): float(v) for k, v in r.items() if k not in ("round", "time") and _finite(v)}
        if "train" in r:
            out[("train/rejected", rnd)] = float(len(r["train"]["rejections"]))
            out[("train/clients", rnd)] = float(len(r["train"]["clients"]))
            out[("train/missing", rnd)] = float(len(r["missing"]))
            by_exit: dict[int, list[float]] = {}
            for c in r["train"]["clients"]:
                by_exit.setdefault(c["metrics"]["exit"], []).append(c["metrics"]["loss"])
            out |= {(f"train/exit{k}/loss", rnd): sum(v) / len(v) for k, v in by_exit.items()}
        if "central" in r.get("privacy", {}):
            out[("privacy/central_epsilon", rnd)] = r["privacy"]["central"]["epsilon"]
    return out


def test_simulation_logs_rounds_losses_and_central_dp_epsilon_to_a_sqlite_store(
    tmp_path: Path, small_corpus: Path, tiny_model_dir: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "sim.yaml").write_text(SIM.format(root=small_corpus), encoding="utf-8")
    cfg = load_config(
        tmp_path / "sim.yaml",
        {"federated.central_dp": {"clip_norm": 1.0, "noise_multiplier": 1.0, "seed": 0},
         "log.tensorboard": str(tmp_path / "tb"), "log.mlflow_uri": uri, "log.mlflow_experiment": "fed"},
    )  # fmt: skip
    result = api.simulate(
        cfg, out=tmp_path / "run", engine="inprocess", base_model=tiny_model_dir, log=lambda _: None
    )
    lines = _lines(result.run_dir / "metrics.jsonl")
    assert [r["round"] for r in lines] == [0, 1, 2]
    expected = _round_expected(lines)
    names = {k for k, _ in expected}
    assert {f"exit{k}/uar" for k in (1, 2, 3, 4)} <= names
    assert {"train/exit1/loss", "train/exit2/loss", "train/rejected", "privacy/central_epsilon"} <= names
    eps = [
        v for (k, _), v in sorted(expected.items(), key=lambda kv: kv[0][1]) if k == "privacy/central_epsilon"
    ]
    assert len(eps) == 2 and 0 < eps[0] < eps[1]  # ε grows round by round

    _same(_tensorboard(tmp_path / "tb" / "federation"), expected, rel=1e-6)
    assert not (tmp_path / "tb" / "central").exists()  # the base model was given: no central phase

    client, run = _mlflow_run(uri, "fed")
    assert run.info.status == "FINISHED" and run.data.tags["fedsd.phase"] == "federation"
    _same(_mlflow_metrics(client, run), expected, rel=1e-12)
    assert run.data.params["federated.central_dp.noise_multiplier"] == "1.0"
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"metrics.jsonl", "report.md", "config.yaml"} <= files and any(f.endswith(".png") for f in files)
    assert (tmp_path / "mlartifacts").is_dir()  # beside the database, not in the current directory


def test_simulate_cli_flags_log_rejected_updates(
    tmp_path: Path, small_corpus: Path, tiny_model_dir: Path
) -> None:
    (tmp_path / "sim.yaml").write_text(SIM.format(root=small_corpus), encoding="utf-8")
    db = tmp_path / "store.db"
    res = CliRunner().invoke(
        app,
        ["simulate", "-c", str(tmp_path / "sim.yaml"), "--engine", "inprocess", "--rounds", "1",
         "--base-model", str(tiny_model_dir), "--out", str(tmp_path / "run"),
         "--set", "federated.max_update_norm=1e-9",  # every update is too large: all rejected
         "--tensorboard", str(tmp_path / "tb"), "--mlflow-uri", f"sqlite:///{db}"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = _lines(tmp_path / "run" / "metrics.jsonl")
    assert lines[1]["train"]["num_rejected"] == 2
    expected = _round_expected(lines)
    assert expected[("train/rejected", 1)] == 2.0
    _same(_tensorboard(tmp_path / "tb" / "federation"), expected, rel=1e-6)
    client, run = _mlflow_run(f"sqlite:///{db}", "trk")  # the experiment is the config's name
    _same(_mlflow_metrics(client, run), expected, rel=1e-12)
    assert run.data.params["log.tensorboard"] == str((tmp_path / "tb").resolve())


def test_server_start_flags_travel_to_the_serverapps_federation(
    tmp_path: Path, small_corpus: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fedsd server start --tensorboard/--mlflow-uri` → the run spec the ServerApp process loads: its
    Federation opens the trackers (a deployed run with a device takes ~30 s: not repeated here)."""
    from fedsd.process.launch import free_port
    from fedsd.server.cli import _tracking
    from fedsd.server.federation import Federation, FederationSpec
    from fedsd.server.service import Server

    (tmp_path / "sim.yaml").write_text(SIM.format(root=small_corpus), encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # relative paths become absolute: the ServerApp runs in another process
    overrides = _tracking(Path("tb"), "mlruns")
    assert overrides == {
        "log.tensorboard": str(tmp_path / "tb"),
        "log.mlflow_uri": (tmp_path / "mlruns").as_uri(),
    }
    server = Server(
        tmp_path / "sim.yaml", out=tmp_path / "run", port=free_port(), insecure=True, base_model=tiny_model_dir,
        overrides=overrides, log=lambda *_: None,
    )  # fmt: skip
    server.prepare()
    spec = FederationSpec.from_json((tmp_path / "run" / "spec.json").read_text())
    log = Federation(spec, log=lambda _: None).cfg.log
    assert log.tensorboard == tmp_path / "tb" and log.mlflow_uri == (tmp_path / "mlruns").as_uri()


def test_pretrain_cli_logs_each_epoch(tmp_path: Path, small_corpus: Path) -> None:
    uri = (tmp_path / "mlruns").as_uri()
    res = CliRunner().invoke(
        app,
        ["pretrain", "--manifest", str(small_corpus / "manifest.csv"), "--out", str(tmp_path / "enc"),
         "--epochs", "2", "--clusters", "4", "--batch-size", "8", "--crop-seconds", "1.0", "--threads", "1",
         "--tensorboard", str(tmp_path / "tb"), "--mlflow-uri", uri],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    history = json.loads((tmp_path / "enc" / "pretrain.json").read_text())["history"]
    expected = {(k, r["epoch"]): float(v) for r in history for k, v in r.items() if k != "epoch"}
    assert {k for k, _ in expected} >= {"loss", "acc", "lr", "valid_loss", "valid_acc"}
    _same(_tensorboard(tmp_path / "tb" / "pretrain"), expected, rel=1e-6)
    client, run = _mlflow_run(uri, "pretrain")
    _same(_mlflow_metrics(client, run), expected, rel=1e-12)
    assert run.data.params["clusters"] == "4"
    assert "pretrain.json" in {f.path for f in client.list_artifacts(run.info.run_id)}


@pytest.mark.parametrize(
    ("flag", "value", "module"),
    [("--mlflow-uri", "file:x", "mlflow"), ("--tensorboard", "tb", "tensorboard")],
)
def test_a_missing_package_names_the_extra_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str, value: str, module: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if the package were not installed
    config = tmp_path / "c.yaml"
    config.write_text("name: x\n", encoding="utf-8")
    res = CliRunner().invoke(app, ["train", "-c", str(config), "--out", str(tmp_path / "run"), flag, value])
    assert res.exit_code != 0
    text = " ".join(res.output.split())  # the console wraps long lines
    assert "pip install 'fedsd[tracking]'" in text and flag in text
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_tracker_that_fails_mid_run_is_dropped_and_the_others_go_on() -> None:
    class Broken(Tracker):
        def log_metrics(self, metrics: Any, step: int) -> None:
            raise ConnectionError("server went away")

    class Keep(Tracker):
        def __init__(self) -> None:
            self.seen: list[tuple[int, dict[str, float]]] = []
            self.closed = ""

        def log_metrics(self, metrics: Any, step: int) -> None:
            self.seen.append((step, dict(metrics)))

        def close(self, status: str = "FINISHED") -> None:
            self.closed = status

    keep, logs = Keep(), []
    fan = FanOut([Broken(), keep], logs.append)
    fan.log_metrics({"a": 1.0}, 1)
    fan.log_metrics({"a": 2.0}, 2)
    fan.close()
    fan.close()  # idempotent
    assert keep.seen == [(1, {"a": 1.0}), (2, {"a": 2.0})] and keep.closed == "FINISHED"
    assert len(logs) == 1 and "Broken failed in log_metrics (server went away)" in logs[0]
