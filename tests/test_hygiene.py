"""Process and state hygiene (issue 11, hole 5).

- a fresh `fedsd server start` moves an earlier run's state.json (and metrics, rounds) aside, so a
  failure before round 0 cannot make the printed --resume hint continue the previous run;
- the server waits a bounded time for --min-clients devices, then exits 3 with a clear message (at the
  handshake and before every round: Flower's ``sample_nodes`` alone waits forever);
- SIGKILL of `fedsd server start` / `fedsd client run` (the supervisors only, no clean-up) leaves none
  of their processes running: every child runs under the guard of ``fedsd.processes``;
- a second Ctrl-C during the server's clean-up does not interrupt it.
(metrics.jsonl appended in place: tests/test_atomic.py.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsd.launch import ManagedProcess, descendants, free_port, port_free, port_open
from fedsd.server.strategy import PartialFedAvg

FEDSD = [sys.executable, "-m", "fedsd.cli"]
CONFIG = """name: hygiene
data: {{corpus: synth, root: {root}, labels: [neutral, happy, angry, sad], crop: {{max_seconds: 2.0, mode: tile}}}}
model: {{backbone: tiny, pretrained: false, exits: [1, 2, 3, 4]}}
federated: {{num_clients: 2, test_speakers: 1, server_speakers: 0, rounds: 1, local_epochs: 1,
            batch_size: 8, min_clients: 2, exits_mix: [1, 4], label_fraction: 0.5}}
"""


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


@pytest.fixture()
def config(tmp_path: Path, small_corpus: Path) -> Path:
    path = tmp_path / "hygiene.yaml"
    path.write_text(CONFIG.format(root=small_corpus), encoding="utf-8")
    return path


# ============================================================================ fast
def test_fresh_start_moves_the_earlier_runs_state_aside(tmp_path, config) -> None:
    """A fresh start that fails before round 0 leaves no state.json that --resume would continue."""
    from fedsd.server.cli import app

    run = tmp_path / "run"
    (run / "rounds").mkdir(parents=True)
    (run / "state.json").write_text('{"completed_round": 2, "federation_id": "old"}')
    (run / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1}\n{"round": 2}\n')
    (run / "rounds" / "round_002.safetensors").write_bytes(b"old heads")
    res = CliRunner().invoke(
        app,
        ["start", "--config", str(config), "--insecure", "--out", str(run), "--port", str(free_port()),
         "--base-model", str(tmp_path / "no-such-model")],
    )  # fmt: skip
    assert res.exit_code != 0, res.output  # fails before any round (the base model is missing)
    assert not (run / "state.json").exists()
    assert not (run / "metrics.jsonl").exists()
    assert not (run / "rounds").exists()
    moved = sorted((run / "previous").iterdir())
    assert len(moved) == 1
    assert (moved[0] / "state.json").read_text() == '{"completed_round": 2, "federation_id": "old"}'
    assert (moved[0] / "rounds" / "round_002.safetensors").read_bytes() == b"old heads"


class _FewNodes:
    """A grid with one connected node; fails loudly instead of letting a test hang forever."""

    def __init__(self, nodes: list[int], max_calls: int = 30) -> None:
        self.nodes, self.calls, self.max_calls = nodes, 0, max_calls

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        if self.calls > self.max_calls:
            raise AssertionError("still waiting for nodes: the wait is not bounded")
        return list(self.nodes)


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_rounds_wait_a_bounded_time_for_min_clients(kind) -> None:
    from flwr.app import ArrayRecord, ConfigRecord

    from fedsd.server.strategy import NotEnoughDevices

    strategy = PartialFedAvg(min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2, node_wait_s=0.5)
    grid = _FewNodes([7])
    t0 = time.monotonic()
    configure = strategy.configure_train if kind == "train" else strategy.configure_evaluate
    with pytest.raises(NotEnoughDevices, match=r"only 1 device\(s\) connected .* 2 are needed"):
        configure(1, ArrayRecord(), ConfigRecord(), grid)
    assert time.monotonic() - t0 < 5.0


def test_wait_for_nodes_returns_once_enough_connect() -> None:
    from fedsd.server.strategy import wait_for_nodes

    grid = _FewNodes([1, 2, 3])
    assert wait_for_nodes(grid, 2, 0.5) == [1, 2, 3]


# ============================================================================ real processes
def _popen(args: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    """A `fedsd` command as a plain child (its own session, no guard): its pid is the supervisor's."""
    return subprocess.Popen(
        [*FEDSD, *args], env=_env(), cwd=cwd, stdin=subprocess.DEVNULL, stdout=open(log, "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def _wait(what: str, cond, timeout: float, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out waiting for {what}\n"
                + "\n".join(f"--- {p}\n{p.read_text()[-4000:]}" for p in logs)
            )
        time.sleep(0.3)


def alive(pid: int) -> bool:
    """Running (a zombie is dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] not in "ZX"
    except (OSError, IndexError):
        return False


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _reap_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _server_args(config: Path, run: Path, port: int, *extra: str) -> list[str]:
    return ["server", "start", "--config", str(config), "--insecure", "--out", str(run), "--port", str(port),
            "--base-model", str(run.parent / "base"), *extra]  # fmt: skip


@pytest.fixture()
def base(tmp_path: Path, tiny_model_dir: Path) -> Path:
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "base")
    return tmp_path / "base"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_sigkill_of_the_supervisors_leaves_nothing_running(tmp_path, config, base, small_corpus) -> None:
    """SIGKILL `fedsd server start` and `fedsd client run` themselves: within seconds their SuperLink,
    superexec, serverapp, SuperNode (and any clientapp) are gone and the port is free again."""
    port = free_port()
    run = tmp_path / "run"
    logs = [tmp_path / "server.log", tmp_path / "device.log"]
    server = _popen(_server_args(config, run, port, "--device-wait", "300"), logs[0], tmp_path)
    device = None
    family: dict[int, str] = {}
    try:
        _wait("the SuperLink", lambda: port_open("127.0.0.1", port, timeout=0.5), 300, logs)
        device = _popen(
            ["client", "run", "--server", f"127.0.0.1:{port}", "--insecure", "--exit", "1",
             "--data", str(small_corpus / "manifest.csv"), "--root", str(small_corpus), "--model", str(base),
             "--cache", str(tmp_path / "cache"), "--server-timeout", "300"],
            logs[1], tmp_path,
        )  # fmt: skip

        def grown() -> bool:
            for sup in (server, device):
                for pid in descendants(sup.pid):
                    family.setdefault(pid, _cmd(pid))
            cmds = " ".join(family.values())
            return "flower-supernode" in cmds and "flwr-serverapp" in cmds and "flower-superexec" in cmds

        _wait("the SuperNode and the ServerApp", grown, 300, logs)
        time.sleep(1.0)
        grown()
        assert all(alive(p) for p in (server.pid, device.pid))
        os.kill(server.pid, signal.SIGKILL)  # no handler, no clean-up: only the parent-death signal
        os.kill(device.pid, signal.SIGKILL)
        server.wait(10)
        device.wait(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
            any(alive(p) for p in family) or not port_free("127.0.0.1", port)
        ):
            time.sleep(0.2)
        left = {p: c[:160] for p, c in family.items() if alive(p)}
        assert not left, f"still running after SIGKILL of the supervisors: {left}"
        assert port_free("127.0.0.1", port)
    finally:
        _reap_all([p for p in family if alive(p)])
        for sup in (server, device):
            if sup is not None and sup.poll() is None:
                sup.kill()


@pytest.mark.slow
def test_server_without_enough_devices_exits_3_within_the_wait(tmp_path, config, base) -> None:
    port = free_port()
    run = tmp_path / "run"
    log = tmp_path / "server.log"
    proc = ManagedProcess("server", [*FEDSD, *_server_args(config, run, port, "--device-wait", "5")],
                          env=_env(), log_path=log, cwd=tmp_path)  # fmt: skip
    try:
        _wait("the server to give up", lambda: not proc.alive(), 300, [log])
        text = " ".join(log.read_text(errors="replace").split())
        assert proc.returncode == 3, text[-4000:]
        assert "not enough devices" in text and "only 0 device(s) connected" in text, text[-4000:]
        assert "--device-wait" in text
        assert "Traceback" not in text.split("SuperLink listening")[-1].split("not enough devices")[-1]
    finally:
        proc.stop(timeout=10)
    assert port_free("127.0.0.1", port)


@pytest.mark.slow
def test_second_ctrl_c_does_not_interrupt_the_clean_up(tmp_path, config, base) -> None:
    port = free_port()
    run = tmp_path / "run"
    log = tmp_path / "server.log"
    server = _popen(_server_args(config, run, port, "--device-wait", "300"), log, tmp_path)
    family: dict[int, str] = {}
    try:

        def started() -> bool:
            for pid in descendants(server.pid):
                family.setdefault(pid, _cmd(pid))
            return "flwr-serverapp" in " ".join(family.values())

        _wait("the ServerApp", started, 300, [log])
        os.kill(server.pid, signal.SIGINT)
        for _ in range(6):  # an impatient operator
            time.sleep(0.4)
            if server.poll() is not None:
                break
            os.kill(server.pid, signal.SIGINT)
        code = server.wait(60)
        text = log.read_text(errors="replace")
        assert code == 130, text[-4000:]
        assert "Traceback" not in text, text[-4000:]
        assert "SuperLink stopped" in text, text[-4000:]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(alive(p) for p in family):
            time.sleep(0.2)
        assert not [c for p, c in family.items() if alive(p)]
        assert port_free("127.0.0.1", port)
    finally:
        _reap_all([p for p in family if alive(p)])
        if server.poll() is None:
            server.kill()
