"""A real deployment on loopback: `fedsd server start` (SuperLink + run) and two `fedsd client run`
devices (supervised SuperNodes) at different exits, one receiving the base model from the server.

Every process is started in its own session and stopped (with all its descendants) even when the test
fails; the last test checks that no Flower process of this module is left.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsd.cli import app
from fedsd.launch import ManagedProcess, free_port, port_open

runner = CliRunner()

FEDSD = [sys.executable, "-m", "fedsd.cli"]
START_TIMEOUT = 600.0  # corpus is made by the fixture; the server trains a tiny base model first
RUN_TIMEOUT = 900.0  # handshake + model delivery + 2 rounds + done, ~6-20 s per message step


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        COLUMNS="200",
        PYTHONUNBUFFERED="1",
    )
    return env


def _flat(text: str) -> str:
    return " ".join(text.split())


def _config(tmp: Path, corpus: Path) -> Path:
    cfg = tmp / "deploy.yaml"
    cfg.write_text(
        f"""name: deploy-test
data: {{corpus: synth, root: {corpus}}}
model: {{backbone: tiny, pretrained: false, exits: [1, 2, 3, 4]}}
train: {{epochs: 1, batch_size: 16, lr: 1.0e-3}}
federated: {{num_clients: 2, test_speakers: 1, server_speakers: 1, rounds: 2, local_epochs: 1,
            min_clients: 2, exits_mix: [1, 2], label_fraction: 0.5, round_timeout: 120}}
""",
        encoding="utf-8",
    )
    return cfg


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    from fedsd.data.synthetic import generate_corpus

    tmp = tmp_path_factory.mktemp("deploy")
    corpus = tmp / "corpus"
    generate_corpus(corpus, speakers=6, sentences=3, seed=0, progress=False)
    return {"tmp": tmp, "corpus": corpus, "config": _config(tmp, corpus)}


def _tail(p: ManagedProcess, n: int = 60) -> str:
    return f"--- {p.name} ({p.log_path}) ---\n{p.tail(n)}"


def _start(name: str, args: list[str], log: Path, cwd: Path) -> ManagedProcess:
    return ManagedProcess(name, [*FEDSD, *args], env=_env(), log_path=log, cwd=cwd)


@pytest.mark.slow
def test_server_and_two_devices_run_to_completion(setup) -> None:
    tmp, corpus, config = setup["tmp"], setup["corpus"], setup["config"]
    run = tmp / "run"
    port = free_port()
    t0 = time.monotonic()
    procs: list[ManagedProcess] = []
    try:
        server = _start(
            "server",
            ["server", "start", "--config", str(config), "--insecure", "--rounds", "2",
             "--min-clients", "2", "--out", str(run), "--port", str(port), "--device-wait", "180",
             # device DP from the server's config; device 1 overrides the noise with its own flag
             "--set", "federated.dp.noise_multiplier=1.0", "--set", "federated.dp.delta=0.001"],
            tmp / "server.log",
            tmp,
        )  # fmt: skip
        procs.append(server)
        while not port_open("127.0.0.1", port, timeout=0.5):
            assert server.alive(), f"server exited early ({server.returncode})\n{_tail(server)}"
            assert time.monotonic() - t0 < START_TIMEOUT, f"SuperLink never came up\n{_tail(server)}"
            time.sleep(0.5)
        manifests = sorted((run / "devices").glob("*.csv"))
        assert len(manifests) == 2, manifests
        base = run / "central" / "best"
        common = ["client", "run", "--server", f"127.0.0.1:{port}", "--insecure", "--root", str(corpus),
                  "--server-timeout", "60"]  # fmt: skip
        dev0 = _start(
            "device-0",
            [*common, "--exit", "1", "--data", str(manifests[0]), "--model", str(base),
             "--cache", str(tmp / "cache0")],
            tmp / "device0.log",
            tmp,
        )  # fmt: skip
        procs.append(dev0)
        dev1 = _start(  # no --model: the server delivers it
            "device-1",
            [
                *common,
                "--exit",
                "2",
                "--data",
                str(manifests[1]),
                "--cache",
                str(tmp / "cache1"),
                "--dp-noise-multiplier",
                "1.5",
            ],
            tmp / "device1.log",
            tmp,
        )
        procs.append(dev1)

        deadline = time.monotonic() + RUN_TIMEOUT
        while any(p.alive() for p in procs) and time.monotonic() < deadline:
            time.sleep(1.0)
        logs = "\n".join(_tail(p) for p in procs)
        assert not any(p.alive() for p in procs), f"still running after {RUN_TIMEOUT:.0f} s\n{logs}"
        assert [p.returncode for p in procs] == [0, 0, 0], logs
    finally:
        for p in procs:
            p.stop(timeout=20.0)
    elapsed = time.monotonic() - t0

    # --- the run directory
    state = json.loads((run / "state.json").read_text())
    assert state["completed_round"] == 2
    for r in range(3):
        assert (run / "rounds" / f"round_{r:03d}.safetensors").is_file()
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["round"] for r in recs] == [0, 1, 2]
    for r in recs:
        for k in (1, 2, 3, 4):
            assert 0.0 <= r[f"exit{k}/uar"] <= 1.0
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
    server_out = _flat(server.tail(400))
    assert "finished: completed" in server_out, server_out[-3000:]
    for dev in (dev0, dev1):
        out = _flat(dev.tail(200))
        assert "round 1: trained exit(s)" in out and "round 2: trained exit(s)" in out, out
        assert "DP ε = " in out, out
        assert "the server says the run is over" in out, out
    out1 = _flat(dev1.tail(200))
    assert "trained exit(s) 1, 2" in out1 and "received the base model" in out1, out1
    assert "received the base model" not in _flat(dev0.tail(200))

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

    # --- nothing is left listening or running
    assert not port_open("127.0.0.1", port, timeout=0.5)
    leftovers = _flower_processes(str(port))
    assert not leftovers, leftovers


def _flower_processes(marker: str) -> list[str]:
    """Command lines of live Flower processes that mention ``marker`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd and ("flower-" in cmd or "flwr" in cmd):
            found.append(f"{entry.name}: {cmd[:200]}")
    return found


def test_server_start_without_insecure_explains_and_starts_nothing(setup, tmp_path) -> None:
    out = tmp_path / "run"
    port = free_port()
    result = runner.invoke(
        app,
        ["server", "start", "--config", str(setup["config"]), "--out", str(out), "--port", str(port)],
        env=_env(),
    )
    assert result.exit_code == 2, result.output
    text = _flat(result.output)
    assert "--tls-dir" in text and "fedsd certs create" in text and "--insecure" in text, text
    assert not out.exists()
    assert not port_open("127.0.0.1", port, timeout=0.5)


def test_client_run_with_missing_manifest_names_the_file(setup, tmp_path) -> None:
    missing = tmp_path / "nowhere" / "client-007.csv"
    result = runner.invoke(
        app,
        ["client", "run", "--server", "127.0.0.1:9", "--insecure", "--exit", "1", "--data", str(missing),
         "--root", str(setup["corpus"]), "--cache", str(tmp_path / "cache")],
        env=_env(),
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    text = _flat(result.output)
    assert str(missing) in text and "not found" in text, text
    assert not (tmp_path / "cache").exists()  # no session, no SuperNode


def test_client_run_without_insecure_refuses(setup, tmp_path) -> None:
    result = runner.invoke(
        app,
        ["client", "run", "--server", "127.0.0.1:9", "--data", str(setup["corpus"] / "manifest.csv"),
         "--root", str(setup["corpus"])],
        env=_env(),
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    text = _flat(result.output)
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
def test_client_stops_when_server_unreachable_or_interrupted(setup, tmp_path) -> None:
    """No server: the device gives up after --server-timeout (exit 3); SIGINT stops it at once (130).
    Either way its SuperNode is gone afterwards."""
    import signal

    corpus = setup["corpus"]
    port = free_port()  # nobody listens here
    args = ["client", "run", "--server", f"127.0.0.1:{port}", "--insecure", "--exit", "1",
            "--data", str(corpus / "manifest.csv"), "--root", str(corpus)]  # fmt: skip
    gone = _start("gone", [*args, "--cache", str(tmp_path / "c1"), "--server-timeout", "3"],
                  tmp_path / "gone.log", tmp_path)  # fmt: skip
    interrupted = _start("interrupted", [*args, "--cache", str(tmp_path / "c2")],
                         tmp_path / "int.log", tmp_path)  # fmt: skip
    procs = [gone, interrupted]
    try:
        deadline = time.monotonic() + 120
        while "SuperNode started" not in interrupted.tail(50) and time.monotonic() < deadline:
            assert interrupted.alive(), _tail(interrupted)
            time.sleep(0.5)
        os.kill(interrupted.pid, signal.SIGINT)
        while any(p.alive() for p in procs) and time.monotonic() < deadline:
            time.sleep(0.5)
        logs = "\n".join(_tail(p) for p in procs)
        assert gone.returncode == 3, logs
        assert "unreachable" in _flat(gone.tail(50)), logs
        assert interrupted.returncode == 130, logs
    finally:
        for p in procs:
            p.stop(timeout=10.0)
    assert not _flower_processes(f"127.0.0.1:{port}")
