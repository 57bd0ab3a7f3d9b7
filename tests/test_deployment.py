"""Deployment commands: refusals before anything starts, the outcome poll, and a device that stops when
its server is unreachable or it is interrupted. A full run with two devices at different exits (one
receiving the base model from the server) is asserted in tests/test_secure_deployment.py.

Processes run under the `procs` fixture (tests/harness.py): waits are on log lines with their own
deadlines, and the teardown stops everything by pid and fails the test if any process is left.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from harness import Procs, env, flat, write_config
from typer.testing import CliRunner

from fedsd.cli.main import app
from fedsd.process.launch import free_port, port_open

runner = CliRunner()



@pytest.fixture(scope="module")
def config(tmp_path_factory, small_corpus: Path) -> Path:
    return write_config(
        tmp_path_factory.mktemp("deploy") / "deploy.yaml", small_corpus, name="deploy-test",
        train={"epochs": 1, "batch_size": 16, "lr": 1.0e-3}, server_speakers=1, local_epochs=1,
        batch_size=None, lr=None, min_clients=2, round_timeout=120,
    )  # fmt: skip


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

    from fedsd.process import launch
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
