"""`api.simulate` end to end with the in-process engine, and the CLI's refusal of bad engine/resource flags."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsd import api
from fedsd.cli.main import app
from fedsd.config import load_config
from fedsd.server.simulation import check_simulation_args

CONFIG = """
name: simapi
data: {{corpus: synth, root: {root}, labels: [neutral, happy, angry, sad], crop: {{max_seconds: 2.0, mode: tile}}}}
model: {{backbone: tiny, pretrained: false, exits: [1, 2, 3, 4]}}
federated: {{num_clients: {clients}, test_speakers: 1, server_speakers: 0, rounds: {rounds}, local_epochs: 1,
            batch_size: 8, lr: 0.01, exits_mix: [1, 2], label_fraction: 0.5, min_clients: 2,
            personalize_epochs: 1}}
"""


def write_config(tmp_path: Path, corpus: Path, clients: int = 2, rounds: int = 2) -> Path:
    path = tmp_path / "sim.yaml"
    path.write_text(CONFIG.format(root=corpus, clients=clients, rounds=rounds), encoding="utf-8")
    return path


def test_simulate_inprocess_returns_metrics_per_exit_and_round(
    tmp_path: Path, small_corpus: Path, tiny_model_dir: Path
) -> None:
    cfg = load_config(write_config(tmp_path, small_corpus))  # an in-memory config works as well as a path
    logs: list[str] = []
    result = api.simulate(
        cfg, out=tmp_path / "run", engine="inprocess", base_model=tiny_model_dir, log=logs.append,
        cpus_per_client=0.5, overrides={"federated.rounds": 1},
    )  # fmt: skip
    assert isinstance(result, api.FederationResult)
    assert result.rounds_done == 1 and result.run_dir == (tmp_path / "run").resolve()
    assert sorted(result.global_metrics) == [1, 2, 3, 4]
    for rows in result.global_metrics.values():
        assert [r["round"] for r in rows] == [0, 1]
        assert all(0.0 <= r[m] <= 1.0 for r in rows for m in ("uar", "wa", "f1"))
    assert result.report is not None and result.report.read_text().startswith("# Federated")
    assert result.final_dir is not None and (result.final_dir / "fedsd.json").exists()
    # personal test metrics of the devices' global and personalised heads, per device exit
    assert {"1", "2"} <= set(result.personal["global"]) and result.personal["personal"]["1"]["uar"]["n"] == 2
    settings = json.loads((result.run_dir / "simulation.json").read_text())
    assert settings == result.settings
    assert settings["client_resources"] == {"num_cpus": 0.5, "num_gpus": 0.0} and settings["num_clients"] == 2
    assert (result.run_dir / "config.yaml").exists()  # the server side reloads an in-memory config by path
    assert any("simulating 1 rounds with the inprocess engine" in line for line in logs)
    # the demo's results file: provenance beside the numbers README quotes (issue 22)
    from fedsd.demo import write_demo_results

    cfg_path = write_config(tmp_path, small_corpus)
    data = json.loads(write_demo_results(tmp_path / "demo-results.json", result, cfg_path, 12.5).read_text())
    prov = data["provenance"]
    assert prov["config_sha256"] == hashlib.sha256(cfg_path.read_bytes()).hexdigest() and prov["seconds"] == 12.5
    final_meta = json.loads((result.final_dir / "fedsd.json").read_text())
    assert prov["backbone_fingerprint"] == final_meta["fingerprint"]
    assert prov["commit"] is None or len(prov["commit"]) == 40
    assert data["unseen_speakers"]["final_global_heads"]["2"] == result.global_metrics[2][-1]
    assert data["unseen_speakers"]["base_model"]["2"]["round"] == 0 and data["personal_test"] == result.personal


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ({"cpus_per_client": 0}, "--cpus-per-client 0"),
        ({"cpus_per_client": -0.5}, "must be > 0"),
        ({"cpus_per_client": float("nan")}, "must be > 0"),
        ({"gpus_per_client": -1}, "--gpus-per-client -1"),
        ({"engine": "dask"}, "--engine 'dask'"),
        ({"ray_address": "  "}, "--ray-address"),
        ({"engine": "inprocess", "ray_address": "127.0.0.1:6379"}, "needs --engine ray"),
    ],
)
def test_bad_simulation_args_are_refused(args: dict, needle: str) -> None:
    with pytest.raises(ValueError) as err:
        check_simulation_args(**args)
    assert needle in str(err.value)


def test_fractional_resources_are_accepted() -> None:
    check_simulation_args("ray", "127.0.0.1:6379", 0.25, 0.5)
    check_simulation_args("ray", None, 2, 0)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--cpus-per-client", "0"], "CPU cores per virtual device must be > 0"),
        (["--gpus-per-client", "-0.5"], "GPUs per virtual device must be >= 0"),
        (["--engine", "inprocess", "--ray-address", "127.0.0.1:6379"], "needs --engine ray"),
    ],
)
def test_cli_refuses_bad_flags_before_any_work(tmp_path: Path, flags: list[str], needle: str) -> None:
    cfg = write_config(tmp_path, tmp_path / "no-corpus-needed")
    result = CliRunner().invoke(app, ["simulate", "-c", str(cfg), "--out", str(tmp_path / "run"), *flags])
    assert result.exit_code == 2, result.output
    assert needle in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()


def test_config_fields_validate_resources(tmp_path: Path, small_corpus: Path) -> None:
    path = write_config(tmp_path, small_corpus)
    cfg = load_config(path, {"federated.cpus_per_client": 0.5, "federated.ray_address": "10.0.0.1:6379"})
    assert cfg.federated.cpus_per_client == 0.5 and cfg.federated.gpus_per_client == 0.0
    with pytest.raises(ValueError, match="federated.gpus_per_client"):
        load_config(path, {"federated.gpus_per_client": -1})
