"""`api.Server`, the library object behind `fedsd server start`, driven from Python.

- options are checked before anything starts (ServerError with the command's exit code);
- prepare() writes the run spec (an ExperimentConfig object is written to OUT/config.yaml) and lists
  the devices with ready-to-paste commands; resume reuses it, a fresh start sets an earlier run aside;
- for real on loopback: start → a real device (`fedsd client run`) → submit → wait → a completed
  ServerSummary and a run directory with metrics and report; leaving the ``with`` block stops every
  process the server started (by pid) and frees its ports; stop() again is a no-op.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from fedsd import api
from fedsd.launch import ManagedProcess, free_port, port_free, port_open
from fedsd.processes import alive
from fedsd.server.service import EXIT_USAGE, Server, ServerError

FEDSD = [sys.executable, "-m", "fedsd.cli"]
CONFIG = """name: serverapi
data: {{corpus: synth, root: {root}, labels: [neutral, happy, angry, sad], crop: {{max_seconds: 2.0, mode: tile}}}}
model: {{backbone: tiny, pretrained: false, exits: [1, 2, 3, 4]}}
federated: {{num_clients: 2, test_speakers: 1, server_speakers: 0, rounds: 1, local_epochs: 1,
            batch_size: 8, min_clients: 1, exits_mix: [1], label_fraction: 0.5}}
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", COLUMNS="200", PYTHONUNBUFFERED="1")  # fmt: skip
    return env


@pytest.fixture()
def config(tmp_path: Path, small_corpus: Path) -> Path:
    path = tmp_path / "serverapi.yaml"
    path.write_text(CONFIG.format(root=small_corpus), encoding="utf-8")
    return path


class _Log(list):
    def __call__(self, message: str, level: str) -> None:
        self.append((level, message))

    def text(self) -> str:
        return "\n".join(m for _, m in self)


def test_api_server_is_the_service_class() -> None:
    assert api.Server is Server


def test_options_are_checked_before_anything_starts(tmp_path, config) -> None:
    out, port = tmp_path / "run", free_port()
    with pytest.raises(ServerError, match="--tls-dir") as err:
        Server(config, out=out, port=port)  # neither TLS nor --insecure
    assert err.value.code == EXIT_USAGE
    with pytest.raises(ServerError, match="needs TLS") as err:
        Server(config, out=out, port=port, insecure=True, auth=True)
    assert err.value.code == EXIT_USAGE
    with pytest.raises(ServerError, match="not found") as err:
        Server(tmp_path / "missing.yaml", out=out, port=port, insecure=True)
    assert err.value.code == 1
    server = Server(config, out=out, port=port, insecure=True)
    with pytest.raises(ServerError, match="without node authentication"):
        server.register_node(tmp_path / "k.pub")
    server.stop()  # nothing started: a no-op, as often as called
    server.stop()
    assert not out.exists() and port_free("127.0.0.1", port)


def test_prepare_writes_the_spec_and_resume_reuses_it(tmp_path, config, tiny_model_dir) -> None:
    cfg = api.load_config(config, overrides={"federated.rounds": 2})
    run, log = tmp_path / "run", _Log()
    server = Server(cfg, out=run, port=free_port(), insecure=True, base_model=tiny_model_dir, log=log)
    devices = server.prepare()
    assert [d.name for d in devices] == [m.stem for m in sorted((run / "devices").glob("*.csv"))]
    for d in devices:
        assert d.exit == 1 and d.utterances > 0 and 0 < d.labelled <= d.utterances
        assert d.command.startswith("fedsd client run --server 127.0.0.1:") and "--insecure" in d.command
        assert str(d.manifest) in d.command
    spec = json.loads((run / "spec.json").read_text())
    assert spec["config"] == str(run / "config.yaml") and spec["overrides"] == {}
    assert api.load_config(spec["config"]).federated.rounds == 2  # the object, written whole
    assert ("warn", next(m for _, m in log if m.startswith("warning: --insecure"))) in log

    log2 = _Log()
    Server(cfg, out=run, port=free_port(), insecure=True, resume=True, log=log2).prepare()
    assert "resume: reusing" in log2.text() and "no round done yet" in log2.text()
    assert json.loads((run / "spec.json").read_text())["resume"] is True
    assert not (run / "previous").exists()

    (run / "state.json").write_text('{"completed_round": 1}')
    log3 = _Log()
    Server(cfg, out=run, port=free_port(), insecure=True, base_model=tiny_model_dir, log=log3).prepare()
    moved = sorted((run / "previous").iterdir())
    assert len(moved) == 1 and (moved[0] / "state.json").read_text() == '{"completed_round": 1}'
    assert ("warn", f"{run} holds an earlier run: starting over (pass --resume to continue it)") in log3


@pytest.mark.slow
def test_start_a_device_submit_wait_and_stop(tmp_path, config, small_corpus, tiny_model_dir) -> None:
    run, port, log, lines = tmp_path / "run", free_port(), _Log(), []
    t0 = time.monotonic()
    device = None
    family: set[int] = set()
    with Server(config, out=run, port=port, insecure=True, base_model=tiny_model_dir, device_wait=120,
                log=log, on_output=lines.append) as server:  # fmt: skip
        try:
            devices = server.prepare()
            server.start()
            assert server.running and port_open("127.0.0.1", port, 0.5)
            internal = server.internal_port
            assert internal is not None and internal != port
            family.update(server.pids())
            device = ManagedProcess(
                "device",
                [*FEDSD, "client", "run", "--server", server.address, "--insecure", "--exit", "1",
                 "--data", str(devices[0].manifest), "--root", str(small_corpus), "--model", str(tiny_model_dir),
                 "--cache", str(tmp_path / "cache"), "--server-timeout", "120"],
                env=_env(), log_path=tmp_path / "device.log", cwd=tmp_path,
            )  # fmt: skip
            run_id = server.submit()
            assert server.submit() == run_id  # submitted once
            family.update(server.pids())
            summary = server.wait(timeout=300)
            deadline = time.monotonic() + 60  # the device ends by itself once the run is over
            while device.alive() and time.monotonic() < deadline:
                time.sleep(0.5)
            assert device.returncode == 0, device.tail(60)
        finally:
            if device is not None:
                device.stop(timeout=10)
    assert summary.completed and summary.exit_code == 0 and summary.run_id == run_id, (summary, log.text())
    assert "finished: completed" in summary.message and summary.hint is None
    assert server.wait() is summary
    assert [r["round"] for r in summary.metrics] == [0, 1]
    assert (run / "report.md").is_file() and (run / "final" / "fedsd.json").is_file()
    assert json.loads((run / "state.json").read_text())["completed_round"] == 1
    assert any("Successfully started run" in x for x in lines)  # the stream reached on_output
    # leaving the block stopped everything, by pid; the ports are free again
    assert not server.running and server.pids() == []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(alive(p) for p in family):
        time.sleep(0.2)
    assert len(family) >= 3 and not [p for p in family if alive(p)]
    assert port_free("127.0.0.1", port) and port_free("127.0.0.1", internal)
    server.stop()  # idempotent
    assert [m for _, m in log].count("SuperLink stopped") == 1
    print(f"server api test: {time.monotonic() - t0:.0f} s")
