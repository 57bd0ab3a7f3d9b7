"""Process and state hygiene (issue 11, hole 5).

- a fresh `fedsd server start` moves an earlier run's state.json (and metrics, rounds) aside, so a
  failure before round 0 cannot make the printed --resume hint continue the previous run;
- the server waits a bounded time for --min-clients devices, then exits 3 with a clear message (at the
  handshake and before every round: Flower's ``sample_nodes`` alone waits forever);
- SIGKILL of `fedsd server start` / `fedsd client run` (the supervisors only, no clean-up) leaves none
  of their processes running: every child runs under the guard of ``fedsd.process.lifetime``;
- a second Ctrl-C during the server's clean-up does not interrupt it.
(metrics.jsonl appended in place: tests/test_atomic.py.)
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest
from harness import Procs, running, write_config
from typer.testing import CliRunner

from fedsd.process.launch import free_port, port_free
from fedsd.server.strategy import PartialFedAvg


@pytest.fixture()
def config(tmp_path: Path, small_corpus: Path) -> Path:
    return write_config(
        tmp_path / "hygiene.yaml",
        small_corpus,
        name="hygiene",
        rounds=1,
        exits_mix=[1, 4],
        min_clients=2,
        lr=None,
    )


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
def _server_args(config: Path, run: Path, port: int, *extra: str) -> list[str]:
    return ["server", "start", "--config", str(config), "--insecure", "--out", str(run), "--port", str(port),
            "--base-model", str(run.parent / "base"), *extra]  # fmt: skip


@pytest.fixture()
def base(tmp_path: Path, tiny_model_dir: Path) -> Path:
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "base")
    return tmp_path / "base"


def _family(procs: Procs, *tops: int) -> dict[int, str]:
    """Every descendant of the started processes seen so far (pid -> command line), ``tops`` excluded."""
    return {pid: cmd for pid, (_, cmd) in procs.seen.items() if pid not in tops}


def _gone(procs: Procs, family: dict[int, str], port: int) -> bool:
    return not any(running(pid, procs.seen[pid][0]) for pid in family) and port_free("127.0.0.1", port)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_sigkill_of_the_supervisors_leaves_nothing_running(procs: Procs, config, base, small_corpus) -> None:
    """SIGKILL `fedsd server start` and `fedsd client run` themselves: within seconds their SuperLink,
    superexec, serverapp, SuperNode (and any clientapp) are gone and the port is free again."""
    tmp, port = procs.root, procs.port()
    run = tmp / "run"
    # guard=False: the pids are the supervisors' own, not a guard's
    server = procs.fedsd("server", *_server_args(config, run, port, "--device-wait", "300"), guard=False)
    server.wait_for("SuperLink listening on", 300)
    device = procs.fedsd(
        "device", "client", "run", "--server", f"127.0.0.1:{port}", "--insecure", "--exit", "1",
        "--data", small_corpus / "manifest.csv", "--root", small_corpus, "--model", base,
        "--cache", tmp / "cache", "--server-timeout", "300", guard=False,
    )  # fmt: skip

    def grown() -> bool:
        cmds = " ".join(_family(procs).values())
        return "flower-supernode" in cmds and "flwr-serverapp" in cmds and "flower-superexec" in cmds

    procs.wait_until("the SuperNode and the ServerApp", grown, 300)
    family = _family(procs, server.pid, device.pid)
    assert server.alive() and device.alive()
    server.send(signal.SIGKILL)  # no handler, no clean-up: only the parent-death signal
    device.send(signal.SIGKILL)
    server.wait_exit(10)
    device.wait_exit(10)
    try:
        procs.wait_until("the supervisors' processes to go", lambda: _gone(procs, family, port), 30)
    except AssertionError:
        left = {p: c[:160] for p, c in family.items() if running(p, procs.seen[p][0])}
        raise AssertionError(f"still running after SIGKILL of the supervisors: {left}") from None


@pytest.mark.slow
def test_server_without_enough_devices_exits_3_within_the_wait(procs: Procs, config, base) -> None:
    port = procs.port()
    server = procs.fedsd("server", *_server_args(config, procs.root / "run", port, "--device-wait", "5"))
    code = server.wait_exit(300)
    text = server.out()
    assert code == 3, text[-4000:]
    assert "not enough devices" in text and "only 0 device(s) connected" in text, text[-4000:]
    assert "--device-wait" in text
    assert "Traceback" not in text.split("SuperLink listening")[-1].split("not enough devices")[-1]
    server.managed.stop(timeout=10)
    assert port_free("127.0.0.1", port)


@pytest.mark.slow
def test_second_ctrl_c_does_not_interrupt_the_clean_up(procs: Procs, config, base) -> None:
    port = procs.port()
    server = procs.fedsd("server", *_server_args(config, procs.root / "run", port, "--device-wait", "300"),
                         guard=False)  # fmt: skip
    procs.wait_until("the ServerApp", lambda: "flwr-serverapp" in " ".join(_family(procs).values()), 300)
    family = _family(procs, server.pid)
    server.send(signal.SIGINT)
    for _ in range(6):  # an impatient operator
        time.sleep(0.4)
        if not server.alive():
            break
        server.send(signal.SIGINT)
    code = server.wait_exit(60)
    text = server.text()
    assert code == 130, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    assert "SuperLink stopped" in text, text[-4000:]
    procs.wait_until("the server's processes to go", lambda: _gone(procs, family, port), 20)
