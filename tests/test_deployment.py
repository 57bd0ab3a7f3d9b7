"""A real deployment on loopback: `fedsd server start` (SuperLink + run) and two `fedsd client run`
devices (supervised SuperNodes) at different exits, one receiving the base model from the server.

Processes run under the `procs` fixture (tests/harness.py): waits are on log lines with their own
deadlines, and the teardown stops everything by pid and fails the test if any process is left.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from harness import Procs, env, flat, uar_from_confusion, write_config
from typer.testing import CliRunner

from fedsd.cli import app
from fedsd.launch import free_port, port_open

runner = CliRunner()

START_TIMEOUT = 600.0  # the server trains a tiny base model first
RUN_TIMEOUT = 900.0  # handshake + model delivery + 2 rounds + done, ~6-20 s per message step


@pytest.fixture(scope="module")
def config(tmp_path_factory, small_corpus: Path) -> Path:
    return write_config(
        tmp_path_factory.mktemp("deploy") / "deploy.yaml", small_corpus, name="deploy-test",
        train={"epochs": 1, "batch_size": 16, "lr": 1.0e-3}, server_speakers=1, local_epochs=1,
        batch_size=None, lr=None, min_clients=2, round_timeout=120,
    )  # fmt: skip


@pytest.mark.slow
def test_server_and_two_devices_run_to_completion(procs: Procs, config: Path, small_corpus: Path) -> None:
    tmp, corpus = procs.root, small_corpus
    run = tmp / "run"
    port = procs.port()
    t0 = time.monotonic()
    server = procs.fedsd(
        "server", "server", "start", "--config", config, "--insecure", "--rounds", "2", "--min-clients", "2",
        "--out", run, "--port", port, "--device-wait", "180",
        # device DP from the server's config; device 1 overrides the noise with its own flag
        "--set", "federated.dp.noise_multiplier=1.0", "--set", "federated.dp.delta=0.001",
    )  # fmt: skip
    server.wait_for("SuperLink listening on", START_TIMEOUT)
    manifests = sorted((run / "devices").glob("*.csv"))
    assert len(manifests) == 2, manifests
    base = run / "central" / "best"
    common = ["client", "run", "--server", f"127.0.0.1:{port}", "--insecure", "--root", corpus,
              "--server-timeout", "60"]  # fmt: skip
    dev0 = procs.fedsd("device-0", *common, "--exit", "1", "--data", manifests[0], "--model", base,
                       "--cache", tmp / "cache0")  # fmt: skip
    dev1 = procs.fedsd(  # no --model: the server delivers it
        "device-1", *common, "--exit", "2", "--data", manifests[1], "--cache", tmp / "cache1",
        "--dp-noise-multiplier", "1.5",
    )  # fmt: skip
    codes = procs.wait_all_exit(RUN_TIMEOUT)
    assert codes == {"server": 0, "device-0": 0, "device-1": 0}, procs.report()
    elapsed = time.monotonic() - t0

    # --- the run directory
    state = json.loads((run / "state.json").read_text())
    assert state["completed_round"] == 2
    for r in range(3):
        assert (run / "rounds" / f"round_{r:03d}.safetensors").is_file()
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["round"] for r in recs] == [0, 1, 2]
    # every round's UAR is its confusion matrix's, over every held-out utterance; exits 3 and 4 were
    # trained by no device, so their heads and UAR are round 0's
    from fedsd.data.partition import Partition

    n_test = len(Partition.load(run / "partition.json").test_utt_ids)
    for r in recs:
        for k in (1, 2, 3, 4):
            confusion = r["eval"][str(k)]["confusion"]
            assert sum(map(sum, confusion)) == n_test > 0
            assert r[f"exit{k}/uar"] == pytest.approx(uar_from_confusion(confusion), abs=1e-9)
    for k in (3, 4):
        assert recs[2][f"exit{k}/uar"] == recs[0][f"exit{k}/uar"]
        assert recs[2]["eval"][str(k)]["confusion"] == recs[0]["eval"][str(k)]["confusion"]
    for r in recs[1:]:  # both devices took part in every round, each at its own exit
        assert sorted(c["metrics"]["exit"] for c in r["train"]["clients"]) == [1, 2]
    # Device DP: the ledger lived in each SuperNode's context.state between rounds (fresh processes),
    # so round 2's ε is cumulative; device 1's own --dp-noise-multiplier won over the server's.
    from fedsd.privacy import epsilon

    for rnd in (1, 2):
        for c in recs[rnd]["train"]["clients"]:
            m = c["metrics"]
            assert m["dp-rounds"] == rnd and m["dp-ledger-from-state"] == (rnd == 2)
            assert m["dp-noise-multiplier"] == (1.5 if m["exit"] == 2 else 1.0)
            history = [(m["dp-noise-multiplier"], m["dp-sample-rate"], m["dp-steps"])]
            assert m["dp-epsilon"] == pytest.approx(epsilon(history, 1e-3), rel=1e-9)
        assert recs[rnd]["privacy"]["max_epsilon"] == max(
            c["metrics"]["dp-epsilon"] for c in recs[rnd]["train"]["clients"]
        )
    from fedsd.model.multiexit import MultiExitSER

    final = MultiExitSER.from_pretrained(run / "final")
    assert final.exits == [1, 2, 3, 4]
    assert (run / "report.md").is_file()
    assert json.loads((run / "spec.json").read_text())["rounds"] == 2

    # --- what each process said
    server_out = server.out()
    assert "finished: completed" in server_out, server_out[-3000:]
    for dev in (dev0, dev1):
        out = dev.out()
        assert "round 1: trained exit(s)" in out and "round 2: trained exit(s)" in out, out
        assert "DP ε = " in out, out
        assert "the server says the run is over" in out, out
    out1 = dev1.out()
    assert "trained exit(s) 1, 2" in out1 and "received the base model" in out1, out1
    assert "received the base model" not in dev0.out()

    # --- device 1 stored the delivered model in its cache, under the backbone fingerprint
    delivered = list((tmp / "cache1" / "models").glob("*/fedsd.json"))
    assert len(delivered) == 1, delivered
    assert MultiExitSER.from_pretrained(delivered[0].parent).backbone_fingerprint() == state["fingerprint"]
    assert not (tmp / "cache0" / "models").exists()
    # --- the event log of a device: one line per handled message, ending with `done`
    events = [
        json.loads(x)
        for x in next((tmp / "cache1" / "sessions").glob("*/events.jsonl")).read_text().splitlines()
    ]
    assert [e["kind"] for e in events] == ["info", "model", "train", "train", "done"]
    assert [e.get("round") for e in events if e["kind"] == "train"] == [1, 2]
    assert events[2]["trained_exits"] == [1, 2] and "uar_after" in events[2]
    print(f"deployment test: {elapsed:.0f} s")

    # --- nothing is left listening (the procs fixture checks that no process is left running)
    assert not port_open("127.0.0.1", port, timeout=0.5)


def test_server_start_without_insecure_explains_and_starts_nothing(config, tmp_path) -> None:
    out = tmp_path / "run"
    port = free_port()
    result = runner.invoke(
        app,
        ["server", "start", "--config", str(config), "--out", str(out), "--port", str(port)],
        env=env(),
    )
    assert result.exit_code == 2, result.output
    text = flat(result.output)
    assert "--tls-dir" in text and "fedsd certs create" in text and "--insecure" in text, text
    assert not out.exists()
    assert not port_open("127.0.0.1", port, timeout=0.5)


def test_client_run_with_missing_manifest_names_the_file(config, tmp_path, small_corpus) -> None:
    missing = tmp_path / "nowhere" / "client-007.csv"
    result = runner.invoke(
        app,
        ["client", "run", "--server", "127.0.0.1:9", "--insecure", "--exit", "1", "--data", str(missing),
         "--root", str(small_corpus), "--cache", str(tmp_path / "cache")],
        env=env(),
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    text = flat(result.output)
    assert str(missing) in text and "not found" in text, text
    assert not (tmp_path / "cache").exists()  # no session, no SuperNode


def test_client_run_without_insecure_refuses(config, tmp_path, small_corpus) -> None:
    result = runner.invoke(
        app,
        ["client", "run", "--server", "127.0.0.1:9", "--data", str(small_corpus / "manifest.csv"),
         "--root", str(small_corpus)],
        env=env(),
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    text = flat(result.output)
    assert "--root-cert" in text and "--insecure" in text, text


def test_a_slow_flwr_ls_is_a_deploy_error_and_the_outcome_poll_retries_it(monkeypatch, tmp_path) -> None:
    """`flwr ls` that does not answer in time (a starved machine) is a DeployError, never a traceback
    from subprocess; wait_finished polls again until its deadline and returns the real outcome."""
    import subprocess

    from fedsd import launch
    from fedsd.server import deploy

    calls: list[list[str]] = []
    answers = ["timeout", '{"success": true, "runs": [{"status": "running"}]}',
               '{"success": true, "runs": [{"status": "finished:completed"}]}']  # fmt: skip

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        answer = answers.pop(0) if answers else "timeout"
        if answer == "timeout":
            raise subprocess.TimeoutExpired(cmd, kwargs.get("timeout"))
        return subprocess.CompletedProcess(cmd, 0, stdout=answer, stderr="")

    monkeypatch.setattr(deploy.subprocess, "run", fake_run)
    monkeypatch.setattr(deploy.time, "sleep", lambda _: None)
    with pytest.raises(launch.DeployError, match="did not answer within 30 s"):
        deploy.run_status(tmp_path, 7)
    answers.insert(0, "timeout")
    assert deploy.wait_finished(tmp_path, 7, timeout=60.0)["status"] == "finished:completed"
    assert len(calls) == 4 and all("ls" in c and "7" in c for c in calls)
    # past the deadline the last error is raised, still a DeployError
    with pytest.raises(launch.DeployError, match="did not answer"):
        deploy.wait_finished(tmp_path, 7, timeout=-1.0)


@pytest.mark.slow
def test_client_stops_when_server_unreachable_or_interrupted(procs: Procs, small_corpus: Path) -> None:
    """No server: the device gives up after --server-timeout (exit 3); SIGINT stops it at once (130).
    Either way its SuperNode is gone afterwards (the procs fixture checks)."""
    corpus, tmp = small_corpus, procs.root
    port = procs.port()  # nobody listens here
    args = ["client", "run", "--server", f"127.0.0.1:{port}", "--insecure", "--exit", "1",
            "--data", corpus / "manifest.csv", "--root", corpus]  # fmt: skip
    gone = procs.fedsd("gone", *args, "--cache", tmp / "c1", "--server-timeout", "3")
    interrupted = procs.fedsd("interrupted", *args, "--cache", tmp / "c2")
    interrupted.wait_for("SuperNode started", 120)
    interrupted.send(signal.SIGINT)
    assert interrupted.wait_exit(60) == 130, procs.report()
    assert gone.wait_exit(120) == 3, procs.report()
    assert "unreachable" in gone.out(), procs.report()
