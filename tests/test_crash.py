"""Crashes lose nothing.

In process (fast): the server names every device that was sent a train message and gave no reply or
an error; a server killed between writing a round's metrics and committing it in state.json resumes
without duplicating or losing a round.

On loopback (slow, real processes: `fedsd server start` + supervised `fedsd client run` devices):
- a device SIGKILLed (its whole process tree) while it trains: the round completes with the others,
  the run finishes, and the server log and metrics.jsonl name the missing device;
- the server SIGKILLed (its whole process tree) mid-run: `fedsd server start --resume` on the same
  port continues after the last completed round, the devices' supervisors start fresh SuperNodes that
  join the resumed run, and no completed round's heads or metrics line is lost or duplicated.

Every process is started in its own session and stopped (with all its descendants) in ``finally``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from flwr.app import Error, Message

from fedsd.clients.app import make_client_app
from fedsd.clients.device import simulated_device_config
from fedsd.config import load_config
from fedsd.launch import ManagedProcess, descendants, free_port, port_open
from fedsd.server import federation as federation_module
from fedsd.server.federation import FederationSpec, run_federation
from fedsd.server.inprocess import InProcessGrid
from fedsd.server.prepare import prepare_run

LABELS = "[neutral, happy, angry, sad]"


def _records(run_dir: Path) -> list[dict]:
    text = (run_dir / "metrics.jsonl").read_text(encoding="utf-8")
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ============================================================================ in process
INPROC_CONFIG = """
name: crashtest
data: {{corpus: synth, root: {root}, labels: {labels}, crop: {{max_seconds: 2.0, mode: tile}}}}
model: {{backbone: tiny, pretrained: false, exits: [1, 2, 3, 4]}}
federated: {{num_clients: 3, test_speakers: 1, server_speakers: 0, rounds: 2, local_epochs: 1,
            batch_size: 8, lr: 0.01, exits_mix: [1, 2, 4], label_fraction: 0.5, min_clients: 1}}
"""


@pytest.fixture()
def inproc(tmp_path: Path, small_corpus: Path, tiny_model_dir: Path):
    cfg_path = tmp_path / "fed.yaml"
    cfg_path.write_text(INPROC_CONFIG.format(root=small_corpus, labels=LABELS))
    cfg = load_config(cfg_path)
    run_dir = tmp_path / "run"
    prepared = prepare_run(cfg, run_dir, base_model=tiny_model_dir, log=lambda _: None)
    rc = simulated_device_config(cfg, prepared.partition, prepared.base_model, run_dir)
    spec = FederationSpec(
        config=str(cfg_path), run_dir=str(run_dir), base_model=str(prepared.base_model),
        partition=str(prepared.partition),
    )  # fmt: skip
    return rc, spec


class FlakyGrid(InProcessGrid):
    """Every node stays listed; ``silent`` nodes never answer a train message (a device that died
    after the handshake), ``broken`` ones answer it with an error."""

    def __init__(
        self, *args, silent: set[int] = frozenset(), broken: set[int] = frozenset(), kind="train", **kw
    ):
        super().__init__(*args, **kw)
        self.silent, self.broken, self.kind = set(silent), set(broken), kind

    def push_messages(self, messages):
        ids = []
        for m in messages:
            node, train = m.metadata.dst_node_id, m.metadata.message_type == self.kind
            if train and node in self.silent:
                continue
            if train and node in self.broken:
                key = f"err-{node}-{next(self._ids)}"
                self._replies[key] = Message(Error(2, "RuntimeError: out of memory"), reply_to=m)
                ids.append(key)
                continue
            ids.extend(super().push_messages([m]))
        return ids


def test_server_names_devices_that_gave_no_reply(inproc) -> None:
    rc, spec = inproc
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    grid = FlakyGrid(make_client_app(rc), nodes, silent={1001}, broken={1002})
    logs: list[str] = []
    run_federation(grid, spec, log=logs.append)
    recs = _records(Path(spec.run_dir))
    assert [r["round"] for r in recs] == [0, 1, 2]
    exits = recs[0]["devices"]
    for r in recs[1:]:
        assert r["missing"] == [1001, 1002]
        assert r["train"]["num_clients"] == 1  # the round completed with the device that answered
        detail = r["missing_detail"]
        assert detail["1001"] == {"exit": exits["1001"]["exit"], "reason": "no reply"}
        assert detail["1002"]["reason"].startswith("error 2:") and "out of memory" in detail["1002"]["reason"]
        rnd = r["round"]
        assert f"round {rnd}: no reply from device 1001 (exit {exits['1001']['exit']})" in "\n".join(logs)
        assert any(
            line.startswith(f"round {rnd}: device 1002 (exit {exits['1002']['exit']}) replied with an error")
            for line in logs
        ), logs


def test_handshake_names_devices_that_gave_no_reply(inproc) -> None:
    rc, spec = inproc
    spec.rounds = 1
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    grid = FlakyGrid(make_client_app(rc), nodes, silent={1001}, broken={1002}, kind="query.info")
    logs: list[str] = []
    run_federation(grid, spec, log=logs.append)
    assert "device 1001: cannot take part: no reply within 600 s" in logs, logs
    assert any(line.startswith("device 1002: cannot take part: error 2:") for line in logs), logs
    assert list(_records(Path(spec.run_dir))[0]["devices"]) == ["1000"]


def test_all_devices_replying_means_nothing_missing(inproc) -> None:
    rc, spec = inproc
    spec.rounds = 1
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    logs: list[str] = []
    run_federation(InProcessGrid(make_client_app(rc), nodes), spec, log=logs.append)
    recs = _records(Path(spec.run_dir))
    assert recs[1]["missing"] == [] and "missing_detail" not in recs[1]
    assert not any("no reply" in line for line in logs)


def test_killed_between_metrics_and_state_resumes_without_duplicates(inproc, monkeypatch) -> None:
    """The commit point of a round is state.json: a round whose metrics line and heads were written
    but whose state.json write never happened (SIGKILL in between) is redone once, not twice."""
    rc, spec = inproc
    spec.rounds = 3
    run_dir = Path(spec.run_dir)
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    real = federation_module.atomic_write_json

    def dies_at_round_2(path, obj):
        if Path(path).name == "state.json" and obj.get("completed_round") == 2:
            raise KeyboardInterrupt("killed")  # nothing after this line of _save_round happens
        return real(path, obj)

    monkeypatch.setattr(federation_module, "atomic_write_json", dies_at_round_2)
    with pytest.raises(KeyboardInterrupt):
        run_federation(InProcessGrid(make_client_app(rc), nodes), spec, log=lambda _: None)
    monkeypatch.undo()
    assert json.loads((run_dir / "state.json").read_text())["completed_round"] == 1
    assert [r["round"] for r in _records(run_dir)] == [0, 1, 2]  # round 2 written, not committed
    kept = {r: _sha(run_dir / "rounds" / f"round_{r:03d}.safetensors") for r in (0, 1)}
    lines_before = (run_dir / "metrics.jsonl").read_text().splitlines()[:2]

    spec.resume = True
    logs: list[str] = []
    run_federation(InProcessGrid(make_client_app(rc), nodes), spec, log=logs.append)
    assert any("resuming after round 1" in line for line in logs), logs
    recs = _records(run_dir)
    assert [r["round"] for r in recs] == [0, 1, 2, 3]
    assert (run_dir / "metrics.jsonl").read_text().splitlines()[:2] == lines_before
    assert {r: _sha(run_dir / "rounds" / f"round_{r:03d}.safetensors") for r in (0, 1)} == kept
    assert sorted(p.name for p in (run_dir / "rounds").iterdir()) == [
        f"round_{r:03d}.safetensors" for r in range(4)
    ]
    assert json.loads((run_dir / "state.json").read_text())["completed_round"] == 3


# ============================================================================ loopback processes
FEDSD = [sys.executable, "-m", "fedsd.cli"]
START_TIMEOUT = 600.0  # failure bounds, not performance checks (each Flower message step ~6-20 s)
RUN_TIMEOUT = 900.0

LOOP_CONFIG = """name: crash-loopback
data: {{corpus: synth, root: {root}, labels: {labels}, crop: {{max_seconds: 2.0, mode: tile}}}}
model: {{backbone: tiny, pretrained: false, exits: [1, 2, 3, 4]}}
federated: {{num_clients: 3, test_speakers: 1, server_speakers: 0, rounds: 2, local_epochs: 1,
            batch_size: 8, min_clients: 2, exits_mix: [1, 2, 4], label_fraction: 0.5,
            round_timeout: 90}}
"""
# round_timeout 90 s > the SuperLink's heartbeat patience (2 x 30 s): a killed device's message is
# answered by the SuperLink with NODE_UNAVAILABLE within ~60 s instead of running into the timeout.


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


def _tail(p: ManagedProcess, n: int = 80) -> str:
    return f"--- {p.name} ({p.log_path}) ---\n{p.tail(n)}"


def _start(name: str, args: list[str], log: Path, cwd: Path) -> ManagedProcess:
    return ManagedProcess(name, [*FEDSD, *args], env=_env(), log_path=log, cwd=cwd)


def _kill_tree(p: ManagedProcess) -> list[int]:
    """SIGKILL a process, its group and every descendant (a power cut): no handler, no cleanup."""
    killed: list[int] = []
    for _ in range(3):  # a child may be spawning another while we kill
        family = [p.pid, *descendants(p.pid)] if p.alive() else []
        for pid in family:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        time.sleep(0.2)
    p.proc.wait(timeout=30)
    return killed


def _wait(what: str, cond, procs: list[ManagedProcess], timeout: float, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n" + "\n".join(_tail(p) for p in procs))
        time.sleep(poll)


@pytest.fixture(scope="module")
def loop(tmp_path_factory, small_corpus: Path, tiny_model_dir: Path) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("crash")
    cfg = tmp / "crash.yaml"
    cfg.write_text(LOOP_CONFIG.format(root=small_corpus, labels=LABELS), encoding="utf-8")
    return {"tmp": tmp, "corpus": small_corpus, "config": cfg, "base": tiny_model_dir}


def _server(loop: dict[str, Path], run: Path, port: int, log: Path, *extra: str) -> ManagedProcess:
    return _start(
        log.stem,
        ["server", "start", "--config", str(loop["config"]), "--insecure", "--out", str(run),
         "--port", str(port), "--device-wait", "300",
         *([] if "--resume" in extra else ["--base-model", str(loop["base"])]), *extra],
        log,
        loop["tmp"],
    )  # fmt: skip


def _device(loop: dict[str, Path], port: int, manifest: Path, exit_k: int, name: str) -> ManagedProcess:
    tmp = loop["tmp"]
    return _start(
        name,
        ["client", "run", "--server", f"127.0.0.1:{port}", "--insecure", "--root", str(loop["corpus"]),
         "--exit", str(exit_k), "--data", str(manifest), "--model", str(loop["base"]),
         "--cache", str(tmp / f"cache-{name}"), "--server-timeout", "240"],
        tmp / f"{name}.log",
        tmp,
    )  # fmt: skip


def _session_file(loop: dict[str, Path], name: str, filename: str) -> Path | None:
    found = sorted((loop["tmp"] / f"cache-{name}" / "sessions").glob(f"*/{filename}"))
    return found[-1] if found else None


def _events(loop: dict[str, Path], name: str) -> list[dict]:
    path = _session_file(loop, name, "events.jsonl")
    if path is None:
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _node_ids(loop: dict[str, Path], name: str) -> list[int]:
    path = _session_file(loop, name, "supernode.log")
    text = path.read_text(errors="replace") if path else ""
    return [int(m) for m in re.findall(r"SuperNode ID: (\d+)", text)]


def _wait_listening(server: ManagedProcess, port: int, procs: list[ManagedProcess]) -> None:
    def up() -> bool:
        assert server.alive(), f"server exited early ({server.returncode})\n{_tail(server)}"
        return port_open("127.0.0.1", port, timeout=0.5)

    _wait("the SuperLink", up, procs, START_TIMEOUT, poll=0.5)


def _wait_all_exit(procs: list[ManagedProcess]) -> None:
    _wait("every process to exit", lambda: not any(p.alive() for p in procs), procs, RUN_TIMEOUT, 1.0)


@pytest.mark.slow
def test_device_killed_mid_round(loop) -> None:
    """Three devices, min-clients 2: device 1 is SIGKILLed while it trains round 1."""
    tmp = loop["tmp"]
    run, port = tmp / "run-device-kill", free_port()
    procs: list[ManagedProcess] = []
    t0 = time.monotonic()
    try:
        server = _server(loop, run, port, tmp / "server-dk.log", "--rounds", "2", "--min-clients", "2")
        procs.append(server)
        _wait_listening(server, port, procs)
        manifests = sorted((run / "devices").glob("*.csv"))
        assert len(manifests) == 3, manifests
        devices = [
            _device(loop, port, m, k, f"dk{i}")
            for i, (m, k) in enumerate(zip(manifests, [1, 2, 4], strict=True))
        ]
        procs += devices
        victim = devices[1]

        def training() -> bool:  # its SuperNode pulled the train message and a ClientApp is running
            assert victim.alive(), _tail(victim)
            log = _session_file(loop, "dk1", "supernode.log")
            if log is None or "Receiving: train message" not in log.read_text(errors="replace"):
                return False
            return any("flwr-clientapp" in _cmdline(p) for p in descendants(victim.pid))

        _wait("device dk1 to train round 1", training, procs, START_TIMEOUT)
        victim_nodes = _node_ids(loop, "dk1")
        _kill_tree(victim)
        t_kill = time.monotonic() - t0
        _wait_all_exit(procs)
        codes = [p.returncode for p in procs]
        logs = "\n".join(_tail(p) for p in procs)
        assert codes == [0, 0, -signal.SIGKILL, 0], logs
    finally:
        for p in procs:
            p.stop(timeout=20.0)
    elapsed = time.monotonic() - t0

    # --- the victim died mid-round: it pulled the train message but never finished it
    assert [e["kind"] for e in _events(loop, "dk1")] == ["info"]
    assert len(victim_nodes) == 1
    victim_node = victim_nodes[0]
    # --- the run completed with the other two
    recs = _records(run)
    assert [r["round"] for r in recs] == [0, 1, 2]
    assert str(victim_node) in recs[0]["devices"]
    assert recs[1]["missing"] == [victim_node], recs[1].get("missing_detail")
    assert recs[1]["missing_detail"][str(victim_node)]["exit"] == 2
    assert sorted(c["metrics"]["exit"] for c in recs[1]["train"]["clients"]) == [1, 4]
    assert set(recs[2]["missing"]) <= {victim_node}
    assert sorted(c["metrics"]["exit"] for c in recs[2]["train"]["clients"]) == [1, 4]
    assert json.loads((run / "state.json").read_text())["completed_round"] == 2
    from fedsd.model.multiexit import MultiExitSER

    assert MultiExitSER.from_pretrained(run / "final").exits == [1, 2, 3, 4]
    server_out = _flat(server.tail(600))
    assert "finished: completed" in server_out, server_out[-3000:]
    assert f"round 1: no reply from device {victim_node} (exit 2)" in server_out, server_out[-4000:]
    for name in ("dk0", "dk2"):
        assert [e.get("round") for e in _events(loop, name) if e["kind"] == "train"] == [1, 2]
    print(f"device-kill test: {elapsed:.0f} s (victim killed at {t_kill:.0f} s)")
    assert not _flower_processes(f"127.0.0.1:{port}")


@pytest.mark.slow
def test_server_killed_mid_run_resumes(loop) -> None:
    """Two devices, 3 rounds: the server's whole process tree is SIGKILLed while the devices train
    round 2 (round 1 complete); `fedsd server start --resume` continues with the same devices (their
    supervisors restart their SuperNodes) and nothing completed is lost or redone."""
    tmp = loop["tmp"]
    run, port = tmp / "run-server-kill", free_port()
    procs: list[ManagedProcess] = []
    t0 = time.monotonic()
    try:
        server1 = _server(loop, run, port, tmp / "server-sk1.log", "--rounds", "3", "--min-clients", "2")
        procs.append(server1)
        _wait_listening(server1, port, procs)
        manifests = sorted((run / "devices").glob("*.csv"))
        devices = [_device(loop, port, manifests[i], k, f"sk{i}") for i, k in enumerate([1, 2])]
        procs += devices

        def round_2_under_way() -> bool:  # round 1 is complete and device 0 trains round 2
            assert server1.alive(), _tail(server1)
            state = run / "state.json"
            if not (state.is_file() and json.loads(state.read_text())["completed_round"] >= 1):
                return False
            log = _session_file(loop, "sk0", "supernode.log")
            parts = log.read_text(errors="replace").split("Receiving: train message") if log else []
            if len(parts) < 3 or "Received successfully" not in parts[-1]:
                return False
            return any("flwr-clientapp" in _cmdline(p) for p in descendants(devices[0].pid))

        _wait("round 2 to start", round_2_under_way, procs, RUN_TIMEOUT)
        _kill_tree(server1)
        t_kill = time.monotonic() - t0
        done = json.loads((run / "state.json").read_text())["completed_round"]
        assert done == 1, "killed too late to be mid-run"
        kept_heads = {r: _sha(run / "rounds" / f"round_{r:03d}.safetensors") for r in range(done + 1)}
        kept_lines = (run / "metrics.jsonl").read_text().splitlines()[: done + 1]
        assert not port_open("127.0.0.1", port, timeout=0.5)
        assert all(d.alive() for d in devices), "\n".join(_tail(d) for d in devices)
        time.sleep(5.0)  # the devices notice the server is gone

        server2 = _server(loop, run, port, tmp / "server-sk2.log", "--resume")
        procs.append(server2)
        _wait_all_exit(procs)
        codes = [p.returncode for p in procs]
        logs = "\n".join(_tail(p) for p in procs)
        assert codes == [-signal.SIGKILL, 0, 0, 0], logs
    finally:
        for p in procs:
            p.stop(timeout=20.0)
    elapsed = time.monotonic() - t0

    # --- nothing completed was lost or redone; rounds continue after the last completed one
    recs = _records(run)
    assert [r["round"] for r in recs] == [0, 1, 2, 3]
    assert (run / "metrics.jsonl").read_text().splitlines()[: done + 1] == kept_lines
    assert {r: _sha(run / "rounds" / f"round_{r:03d}.safetensors") for r in kept_heads} == kept_heads
    assert sorted(p.name for p in (run / "rounds").iterdir()) == [
        f"round_{r:03d}.safetensors" for r in range(4)
    ]
    for r in recs[1:]:
        assert r["train"]["round"] == r["round"]
        assert sorted(c["metrics"]["exit"] for c in r["train"]["clients"]) == [1, 2]
        assert r["missing"] == []
    state = json.loads((run / "state.json").read_text())
    assert state["completed_round"] == 3
    from fedsd.model.multiexit import MultiExitSER

    assert MultiExitSER.from_pretrained(run / "final").exits == [1, 2, 3, 4]
    out2 = _flat(server2.tail(600))
    assert "finished: completed" in out2 and "resuming after round 1" in out2, out2[-4000:]
    # --- each device: its SuperNode was refused by the new SuperLink and restarted by the supervisor
    for i, dev in enumerate(devices):
        out = _flat(dev.tail(300))
        assert "is not reachable" in out and "starting a new SuperNode (1/5)" in out, out[-3000:]
        assert "the server says the run is over" in out, out[-3000:]
        nodes = _node_ids(loop, f"sk{i}")
        assert len(nodes) == 2, nodes  # the first SuperNode, then the one the supervisor started
        for r in recs[2:]:
            assert nodes[1] in [c["node_id"] for c in r["train"]["clients"]]
        assert nodes[0] in [c["node_id"] for c in recs[1]["train"]["clients"]]
        trained = {
            e.get("round") for e in _events(loop, f"sk{i}") if e["kind"] == "train" and "error" not in e
        }
        assert {1, 2, 3} <= trained, trained
    print(f"server-kill test: {elapsed:.0f} s (server killed at {t_kill:.0f} s)")
    assert not _flower_processes(f"127.0.0.1:{port}")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _flower_processes(marker: str) -> list[str]:
    """Command lines of live Flower processes that mention ``marker`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if entry.name.isdigit():
            cmd = _cmdline(int(entry.name))
            if marker in cmd and ("flower-" in cmd or "flwr" in cmd):
                found.append(f"{entry.name}: {cmd[:200]}")
    return found
