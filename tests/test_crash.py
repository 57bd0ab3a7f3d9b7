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

import hashlib
import json
import re
import signal
import time
from pathlib import Path

import pytest
from flwr.app import Error, Message
from harness import Federation, Proc, Procs, events, federation, records, session_file, write_config

from fedsd.clients.client_app import make_client_app
from fedsd.process.launch import port_open
from fedsd.server import federation as federation_module
from fedsd.server.federation import run_federation
from fedsd.server.inprocess import InProcessGrid


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ============================================================================ in process
@pytest.fixture()
def inproc(tmp_path: Path, small_corpus: Path, tiny_model_dir: Path) -> Federation:
    return federation(
        tmp_path, small_corpus, tiny_model_dir, name="crashtest", num_clients=3, exits_mix=[1, 2, 4]
    )


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
    rc, spec = inproc.rc, inproc.spec
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    grid = FlakyGrid(make_client_app(rc), nodes, silent={1001}, broken={1002})
    logs: list[str] = []
    run_federation(grid, spec, log=logs.append)
    recs = records(Path(spec.run_dir))
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
    rc, spec = inproc.rc, inproc.spec
    spec.rounds = 1
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    grid = FlakyGrid(make_client_app(rc), nodes, silent={1001}, broken={1002}, kind="query.info")
    logs: list[str] = []
    run_federation(grid, spec, log=logs.append)
    assert "device 1001: cannot take part: no reply within 600 s" in logs, logs
    assert any(line.startswith("device 1002: cannot take part: error 2:") for line in logs), logs
    assert list(records(Path(spec.run_dir))[0]["devices"]) == ["1000"]


def test_all_devices_replying_means_nothing_missing(inproc) -> None:
    spec = inproc.spec
    spec.rounds = 1
    logs: list[str] = []
    run_federation(inproc.grid(3), spec, log=logs.append)
    recs = records(Path(spec.run_dir))
    assert recs[1]["missing"] == [] and "missing_detail" not in recs[1]
    assert not any("no reply" in line for line in logs)


def test_killed_between_metrics_and_state_resumes_without_duplicates(inproc, monkeypatch) -> None:
    """The commit point of a round is state.json: a round whose metrics line and heads were written
    but whose state.json write never happened (SIGKILL in between) is redone once, not twice."""
    spec = inproc.spec
    spec.rounds = 3
    run_dir = Path(spec.run_dir)
    real = federation_module.atomic_write_json

    def dies_at_round_2(path, obj):
        if Path(path).name == "state.json" and obj.get("completed_round") == 2:
            raise KeyboardInterrupt("killed")  # nothing after this line of _save_round happens
        return real(path, obj)

    monkeypatch.setattr(federation_module, "atomic_write_json", dies_at_round_2)
    with pytest.raises(KeyboardInterrupt):
        run_federation(inproc.grid(3), spec, log=lambda _: None)
    monkeypatch.undo()
    assert json.loads((run_dir / "state.json").read_text())["completed_round"] == 1
    assert [r["round"] for r in records(run_dir)] == [0, 1, 2]  # round 2 written, not committed
    kept = {r: _sha(run_dir / "rounds" / f"round_{r:03d}.safetensors") for r in (0, 1)}
    lines_before = (run_dir / "metrics.jsonl").read_text().splitlines()[:2]

    spec.resume = True
    logs: list[str] = []
    run_federation(inproc.grid(3), spec, log=logs.append)
    assert any("resuming after round 1" in line for line in logs), logs
    recs = records(run_dir)
    assert [r["round"] for r in recs] == [0, 1, 2, 3]
    assert (run_dir / "metrics.jsonl").read_text().splitlines()[:2] == lines_before
    assert {r: _sha(run_dir / "rounds" / f"round_{r:03d}.safetensors") for r in (0, 1)} == kept
    assert sorted(p.name for p in (run_dir / "rounds").iterdir()) == [
        f"round_{r:03d}.safetensors" for r in range(4)
    ]
    assert json.loads((run_dir / "state.json").read_text())["completed_round"] == 3


# ============================================================================ loopback processes
START_TIMEOUT = 600.0  # failure bounds, not performance checks (each Flower message step ~6-20 s)
RUN_TIMEOUT = 900.0
HEARTBEAT_S = 10  # the shortest interval the SuperLink accepts
ROUND_TIMEOUT = 50


@pytest.fixture(scope="module")
def loop_config(tmp_path_factory, small_corpus: Path) -> Path:
    # The devices beat every HEARTBEAT_S (`--heartbeat`), so the SuperLink answers a killed device's
    # message with NODE_UNAVAILABLE within ~2 x HEARTBEAT_S. round_timeout sits above that and below
    # Flower's default patience (2 x 30 s): the device-kill test fails if the shorter heartbeat is lost.
    return write_config(
        tmp_path_factory.mktemp("crash") / "crash.yaml", small_corpus, name="crash-loopback", num_clients=3,
        exits_mix=[1, 2, 4], min_clients=2, round_timeout=ROUND_TIMEOUT, lr=None,
    )  # fmt: skip


@pytest.fixture()
def loop(procs: Procs, loop_config: Path, small_corpus: Path, tiny_model_dir: Path) -> Loop:
    return Loop(procs, loop_config, small_corpus, tiny_model_dir)


class Loop:
    """A loopback federation of `fedsd server start` and `fedsd client run` processes."""

    def __init__(self, procs: Procs, config: Path, corpus: Path, base: Path) -> None:
        self.procs, self.config, self.corpus, self.base = procs, config, corpus, base
        self.tmp, self.run, self.port = procs.root, procs.root / "run", procs.port()

    def server(self, name: str, *extra: str) -> Proc:
        base = [] if "--resume" in extra else ["--base-model", self.base]
        return self.procs.fedsd(
            name, "server", "start", "--config", self.config, "--insecure", "--out", self.run,
            "--port", self.port, "--device-wait", "300", *base, *extra,
        )  # fmt: skip

    def device(self, manifest: Path, exit_k: int, name: str) -> Proc:
        return self.procs.fedsd(
            name, "client", "run", "--server", f"127.0.0.1:{self.port}", "--insecure", "--root", self.corpus,
            "--exit", exit_k, "--data", manifest, "--model", self.base, "--cache", self.tmp / f"cache-{name}",
            "--server-timeout", "240", "--heartbeat", HEARTBEAT_S, "--warm-worker",
        )  # fmt: skip

    def supernode_log(self, name: str) -> Path | None:
        return session_file(self.tmp / f"cache-{name}", "supernode.log")

    def events(self, name: str) -> list[dict]:
        return events(self.tmp / f"cache-{name}")

    def node_ids(self, name: str) -> list[int]:
        path = self.supernode_log(name)
        text = path.read_text(errors="replace") if path else ""
        return [int(m) for m in re.findall(r"SuperNode ID: (\d+)", text)]


def _client_app_running(device: Proc) -> bool:
    return any("flwr-clientapp" in cmd for cmd in device.family())


@pytest.mark.slow
def test_device_killed_mid_round(loop: Loop) -> None:
    """Three devices, min-clients 2: device 1 is SIGKILLed while it trains round 1."""
    run, procs = loop.run, loop.procs
    t0 = time.monotonic()
    server = loop.server("server", "--rounds", "2", "--min-clients", "2")
    server.wait_for("SuperLink listening on", START_TIMEOUT)
    manifests = sorted((run / "devices").glob("*.csv"))
    assert len(manifests) == 3, manifests
    devices = [loop.device(m, k, f"dk{i}") for i, (m, k) in enumerate(zip(manifests, [1, 2, 4], strict=True))]
    victim = devices[1]
    # its SuperNode pulled the train message and a ClientApp is running
    procs.wait_line(
        lambda: loop.supernode_log("dk1"), "Receiving: train message", START_TIMEOUT, watch=victim
    )
    procs.wait_until("device dk1's ClientApp", lambda: _client_app_running(victim), 120, watch=victim)
    victim_nodes = loop.node_ids("dk1")
    victim.kill_tree()
    t_kill = time.monotonic() - t0
    codes = procs.wait_all_exit(RUN_TIMEOUT)
    assert list(codes.values()) == [0, 0, -signal.SIGKILL, 0], procs.report()
    elapsed = time.monotonic() - t0

    # --- the victim died mid-round: it pulled the train message but never finished it
    assert [e["kind"] for e in loop.events("dk1")] == ["info"]
    assert len(victim_nodes) == 1
    victim_node = victim_nodes[0]
    # --- the run completed with the other two
    recs = records(run)
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
    server_out = server.out()
    assert "finished: completed" in server_out, server_out[-3000:]
    assert f"round 1: no reply from device {victim_node} (exit 2)" in server_out, server_out[-4000:]
    for name in ("dk0", "dk2"):
        assert [e.get("round") for e in loop.events(name) if e["kind"] == "train"] == [1, 2]
    print(f"device-kill test: {elapsed:.0f} s (victim killed at {t_kill:.0f} s)")


@pytest.mark.slow
def test_server_killed_mid_run_resumes(loop: Loop) -> None:
    """Two devices, 3 rounds: the server's whole process tree is SIGKILLed while the devices train
    round 2 (round 1 complete); `fedsd server start --resume` continues with the same devices (their
    supervisors restart their SuperNodes) and nothing completed is lost or redone."""
    run, procs = loop.run, loop.procs
    t0 = time.monotonic()
    server1 = loop.server("server-1", "--rounds", "3", "--min-clients", "2")
    server1.wait_for("SuperLink listening on", START_TIMEOUT)
    manifests = sorted((run / "devices").glob("*.csv"))
    devices = [loop.device(manifests[i], k, f"sk{i}") for i, k in enumerate([1, 2])]

    def round_2_under_way() -> bool:  # round 1 is complete and device 0 trains round 2
        state = run / "state.json"
        if not (state.is_file() and json.loads(state.read_text())["completed_round"] >= 1):
            return False
        log = loop.supernode_log("sk0")
        parts = log.read_text(errors="replace").split("Receiving: train message") if log else []
        return len(parts) >= 3 and "Received successfully" in parts[-1] and _client_app_running(devices[0])

    procs.wait_until("round 2 to start", round_2_under_way, RUN_TIMEOUT, watch=server1)
    server1.kill_tree()
    t_kill = time.monotonic() - t0
    done = json.loads((run / "state.json").read_text())["completed_round"]
    assert done == 1, "killed too late to be mid-run"
    kept_heads = {r: _sha(run / "rounds" / f"round_{r:03d}.safetensors") for r in range(done + 1)}
    kept_lines = (run / "metrics.jsonl").read_text().splitlines()[: done + 1]
    assert not port_open("127.0.0.1", loop.port, timeout=0.5)
    for dev in devices:  # the devices notice the server is gone
        dev.wait_for("is not reachable", 60)

    server2 = loop.server("server-2", "--resume")
    codes = procs.wait_all_exit(RUN_TIMEOUT)
    assert list(codes.values()) == [-signal.SIGKILL, 0, 0, 0], procs.report()
    elapsed = time.monotonic() - t0

    # --- nothing completed was lost or redone; rounds continue after the last completed one
    recs = records(run)
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
    out2 = server2.out()
    assert "finished: completed" in out2 and "resuming after round 1" in out2, out2[-4000:]
    # --- each device: its SuperNode was refused by the new SuperLink and restarted by the supervisor
    for i, dev in enumerate(devices):
        out = dev.out()
        assert "is not reachable" in out and "starting a new SuperNode (1/5)" in out, out[-3000:]
        assert "the server says the run is over" in out, out[-3000:]
        nodes = loop.node_ids(f"sk{i}")
        assert len(nodes) == 2, nodes  # the first SuperNode, then the one the supervisor started
        for r in recs[2:]:
            assert nodes[1] in [c["node_id"] for c in r["train"]["clients"]]
        assert nodes[0] in [c["node_id"] for c in recs[1]["train"]["clients"]]
        trained = {e.get("round") for e in loop.events(f"sk{i}") if e["kind"] == "train" and "error" not in e}
        assert {1, 2, 3} <= trained, trained
    print(f"server-kill test: {elapsed:.0f} s (server killed at {t_kill:.0f} s)")
