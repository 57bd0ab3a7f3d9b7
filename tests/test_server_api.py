"""`api.Server`, the library object behind `fedsd server start`, driven from Python.

- options are checked before anything starts (ServerError with the command's exit code);
- prepare() writes the run spec (an ExperimentConfig object is written to OUT/config.yaml) and lists
  the devices with ready-to-paste commands; resume reuses it, a fresh start sets an earlier run aside;
- for real on loopback, with ``api.Device`` as the device: start → submit → wait → a completed
  ServerSummary and a run directory with metrics and report, the device's deployable model; leaving the
  ``with`` block stops every process the server started (by pid) and frees its ports; stop() again is a
  no-op. (The one loopback round of both API objects: tests/test_device_api.py keeps the device's checks.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fedsd import api
from fedsd.process.launch import free_port, port_free, port_open
from fedsd.process.lifetime import alive
from fedsd.server.service import EXIT_USAGE, Server, ServerError

CONFIG = """name: serverapi
data: {{corpus: synth, root: {root}, labels: [neutral, happy, angry, sad], crop: {{max_seconds: 2.0, mode: tile}}}}
model: {{backbone: tiny, pretrained: false, exits: [1, 2, 3, 4]}}
federated: {{num_clients: 2, test_speakers: 1, server_speakers: 0, rounds: 1, local_epochs: 1,
            batch_size: 8, min_clients: 1, exits_mix: [1], label_fraction: 0.5}}
"""


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
def test_a_server_and_a_device_from_python(tmp_path, config, small_corpus, tiny_model_dir) -> None:
    """Both API objects for real on loopback, in this process: ``api.Server`` (start → submit → wait →
    stop) and ``api.Device`` in a background thread with ``out``, personalisation (issue 10's deployable
    model) and the warm worker (every message answered by one long-lived process; the CLI tests cover
    the default fresh process per message): a completed summary, the device's events and exit code, its
    deployable slice and personal copy loadable, and no process or port left behind."""
    from fedsd.clients.service import DeviceEvent
    from fedsd.clients.supervisor import EXIT_DONE
    from fedsd.model.multiexit import MultiExitSER

    run, port, log, lines = tmp_path / "run", free_port(), _Log(), []
    events: list[DeviceEvent] = []
    t0 = time.monotonic()
    dev = None
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
            dev = api.Device(
                server.address, exit=1, data=devices[0].manifest, root=small_corpus, model=tiny_model_dir,
                cache=tmp_path / "cache", insecure=True, out=tmp_path / "mine", personalize_epochs=1,
                server_timeout=120, on_event=events.append, warm_worker=True,
            ).start()  # fmt: skip
            run_id = server.submit()
            assert server.submit() == run_id  # submitted once
            family.update(server.pids())
            summary = server.wait(timeout=300)
            code = dev.wait(120)  # the device ends by itself once the run is over
            texts = "\n".join(e.text for e in events)
            assert code == EXIT_DONE, texts
        finally:
            if dev is not None:
                dev.stop(timeout=20)
    assert summary.completed and summary.exit_code == 0 and summary.run_id == run_id, (summary, log.text())
    assert "finished: completed" in summary.message and summary.hint is None
    assert server.wait() is summary
    assert [r["round"] for r in summary.metrics] == [0, 1]
    assert (run / "report.md").is_file() and (run / "final" / "fedsd.json").is_file()
    assert json.loads((run / "state.json").read_text())["completed_round"] == 1
    assert any("Successfully started run" in x for x in lines)  # the stream reached on_output
    # the device: its events, one round trained, the deployable slice (heads <= 1) and its personal copy
    assert [e["kind"] for e in dev.events] == ["info", "train", "done"], dev.events
    assert dev.rounds_trained == 1
    assert events[-2].text == "done: 1 round(s) trained on this device" and events[-2].level == "success"
    assert events[-1].text.startswith(f"deployable model: {tmp_path / 'mine'}")
    assert dev.deployable_model == (tmp_path / "mine").resolve()
    assert MultiExitSER.from_pretrained(dev.deployable_model).exits == [1]
    assert MultiExitSER.from_pretrained(dev.deployable_model / "personal").exits == [1]
    # --warm-worker: the device's messages were answered by one long-lived worker, not by fresh processes
    (worker_log,) = (tmp_path / "cache" / "warm").glob("*.log")
    served = [line for line in worker_log.read_text().splitlines() if " answered in " in line]
    assert any(" train answered" in line for line in served), worker_log.read_text()
    assert len({line.split(":")[0] for line in served}) == 1  # one worker pid
    # leaving the block stopped everything, by pid; the ports are free again
    assert not server.running and server.pids() == []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(alive(p) for p in family):
        time.sleep(0.2)
    assert len(family) >= 3 and not [p for p in family if alive(p)]
    assert port_free("127.0.0.1", port) and port_free("127.0.0.1", internal)
    server.stop()  # idempotent
    assert [m for _, m in log].count("SuperLink stopped") == 1
    print(f"server + device API loopback round: {time.monotonic() - t0:.0f} s")
