"""The warm worker per device (clients/worker.py, opt-in with FEDSD_WARM_WORKER=1).

- a worker answers a cached train message exactly as the in-process handler: the same reply arrays
  bit for bit, the same metrics, the same ``context.state`` afterwards, and a handler error as the same
  exception type and text;
- the runner's forwarding path (what Flower's ClientApp process runs) never imports torch;
- one worker per device: a second connection reaches the same one, a stale socket is replaced, a peer
  of another uid is refused, the socket's directory is private;
- a worker exits when idle, and when the process it serves is gone.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto
from test_round_overhead import TRAIN, make_device

from fedsd.clients import client_app, worker
from fedsd.clients.dp_gate import LOCAL_METRICS_KEY
from fedsd.process.lifetime import alive

ROOT = Path(__file__).resolve().parents[1]


def sleeper() -> subprocess.Popen:
    """A stand-in for the SuperNode's executor: the process a worker serves."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


def stop(pid: int) -> None:
    if alive(pid):
        os.kill(pid, signal.SIGTERM)


def wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def worker_pid(cache: Path, parent: int, **kw: Any) -> int:
    with worker.connect(cache, parent, **kw) as sock:
        return worker.peer_creds(sock)[0]


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[dict[str, Any]]:
    """A device whose features are cached, and the executor process its worker serves."""
    node = make_device(tmp_path_factory.mktemp("dev"), tiny_model_dir)
    parent = sleeper()
    yield {"node": node, "parent": parent.pid}
    parent.kill()
    parent.wait()
    path = worker.socket_path(worker.cache_dir(node), parent.pid)
    assert wait_gone_socket(path), "the worker outlived the process it serves"


def wait_gone_socket(path: Path, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not path.exists()


def message_and_context(node: dict[str, str], config: dict[str, Any]) -> tuple[Message, Context]:
    msg = Message(RecordDict({"config": ConfigRecord(dict(config))}), dst_node_id=5, message_type="train")
    state = RecordDict({"kept": ConfigRecord({"a": 1}), LOCAL_METRICS_KEY: MetricRecord({"x": 1.0})})
    return msg, Context(run_id=7, node_id=5, node_config=dict(node), state=state, run_config={})


def reply_of(reply: Message) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays = {k: v.numpy() for k, v in reply.content.array_records["arrays"].items()}
    metrics = {k: v for k, v in reply.content.metric_records["metrics"].items() if k != "seconds"}
    return arrays, metrics


def test_a_worker_answers_as_the_handler_in_process(device: dict[str, Any], task_identity: None) -> None:
    node, parent = device["node"], device["parent"]
    msg, ctx = message_and_context(node, TRAIN)
    client_app.app(msg, ctx)  # fills the feature cache
    msg, ctx = message_and_context(node, TRAIN)
    here = client_app.app(msg, ctx)

    msg_w, ctx_w = message_and_context(node, TRAIN)
    there, state = worker.call(msg_w, ctx_w, parent=parent)
    arrays, metrics = reply_of(there)
    arrays_here, metrics_here = reply_of(here)
    assert metrics == metrics_here and metrics["cache-misses"] == 0
    assert arrays.keys() == arrays_here.keys()
    for k in arrays:
        np.testing.assert_array_equal(arrays[k], arrays_here[k])
    assert there.metadata.reply_to_message_id == here.metadata.reply_to_message_id
    # the handler popped what DP kept local: the worker's state says so, as the process's own did
    assert LOCAL_METRICS_KEY not in ctx.state and "kept" in ctx.state
    assert recorddict_to_proto(state) == recorddict_to_proto(ctx.state)

    bad = TRAIN | {"local-epochs": 10**12}  # refused by the handler: the same error, the state kept
    msg, ctx = message_and_context(node, bad)
    with pytest.raises(Exception) as in_process:
        client_app.app(msg, ctx)
    msg_w, ctx_w = message_and_context(node, bad)
    with pytest.raises(Exception) as relayed:
        worker.call(msg_w, ctx_w, parent=parent)
    assert str(type(relayed.value)) == str(type(in_process.value))
    assert str(relayed.value) == str(in_process.value)
    assert recorddict_to_proto(ctx_w.state) == recorddict_to_proto(ctx.state)


def test_the_forwarding_runner_never_imports_torch(device: dict[str, Any]) -> None:
    """As Flower's ClientApp process runs it: the runner's loader, called with a message and context."""
    script = textwrap.dedent(
        f"""
        import json, os, sys
        os.environ["FEDSD_WARM_WORKER"] = "1"
        from flwr.app import ConfigRecord, Context, Message, RecordDict
        from flwr.supercore.task_identity import TaskIdentity
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
        from fedsd.clients import runner
        runner._PARENT[:] = [{device["parent"]}]
        rc = runner.install_guard_rails()
        app = rc.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)("id", "1", "h")
        node = json.loads({json.dumps(json.dumps(device["node"]))})
        msg = Message(RecordDict({{"config": ConfigRecord({TRAIN!r})}}), dst_node_id=5, message_type="train")
        ctx = Context(run_id=7, node_id=5, node_config=node, state=RecordDict(), run_config={{}})
        reply = app(message=msg, context=ctx)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "sklearn"))
        print(json.dumps({{"heavy": heavy, "app": "fedsd.clients.client_app" in sys.modules,
                          "metrics": dict(reply.content.metric_records["metrics"])}}))
        """
    )
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "unavailable" not in done.stderr  # it was the worker that answered
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [] and result["app"] is False
    assert result["metrics"]["cache-misses"] == 0


def test_a_worker_that_cannot_be_used_costs_no_round(
    device: dict[str, Any], tmp_path: Path, task_identity: None
) -> None:
    """The forwarder handles the message in its own process when the worker's directory is unusable."""
    from fedsd.clients import runner

    node = device["node"] | {"cache": str(tmp_path / "cache")}
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / worker.DIR_NAME).write_text("not a directory")
    with pytest.raises(worker.WorkerUnavailable):
        worker.connect(tmp_path / "cache", device["parent"])
    msg, ctx = message_and_context(node, TRAIN)
    reply = runner.forwarding_app(device["parent"])(message=msg, context=ctx)
    assert not reply.has_error() and reply.content.metric_records["metrics"]["cache-misses"] > 0
    assert LOCAL_METRICS_KEY not in ctx.state and "kept" in ctx.state  # the handler ran here


def test_one_worker_per_device_stale_sockets_replaced_other_users_refused(tmp_path: Path) -> None:
    parent = sleeper()
    try:
        cache = tmp_path / "cache"
        pids: list[int] = []
        threads = [
            threading.Thread(target=lambda: pids.append(worker_pid(cache, parent.pid))) for _ in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(pids) == 3 and len(set(pids)) == 1  # three messages at once: one worker
        path = worker.socket_path(cache, parent.pid)
        assert (path.parent.stat().st_mode & 0o777) == 0o700
        os.kill(pids[0], signal.SIGKILL)  # dies without removing its socket
        assert wait_gone(pids[0]) and path.exists()
        with pytest.raises(ConnectionRefusedError):
            socket.socket(socket.AF_UNIX).connect(str(path))
        again = worker_pid(cache, parent.pid)  # the stale socket is replaced by a new worker
        assert again != pids[0] and alive(again)
        other = worker.socket_path(cache, parent.pid, stamp="another-install")
        assert other != path and other.parent == path.parent  # another installation: another worker
        stop(again)
    finally:
        parent.kill()
        parent.wait()
    worker.check_peer(os.getuid())
    with pytest.raises(worker.PeerRefused, match="not this user"):
        worker.check_peer(os.getuid() + 1)
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    assert (worker.secure_dir(loose).stat().st_mode & 0o777) == 0o700


def test_a_deep_cache_gets_a_short_private_socket(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    path = worker.socket_path(deep, 4242, stamp="s")
    assert len(os.fsencode(path)) <= worker.MAX_SOCKET_PATH
    assert not str(path).startswith(str(tmp_path)) and path.name.endswith("-s-4242.sock")
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    other = worker.socket_path(tmp_path / ("d" * 60) / ("f" * 60), 4242, stamp="s")
    assert other != path and other.parent == path.parent  # another cache: another worker
    assert worker.socket_path(tmp_path / "c", 4242, stamp="s") == tmp_path / "c" / worker.DIR_NAME / "s-4242.sock"
    assert worker.log_path(deep, 4242, stamp="s") == deep / worker.DIR_NAME / "s-4242.log"  # log stays in the cache


def test_the_supernode_environment_turns_it_on(tmp_path: Path) -> None:
    from fedsd.clients.runner import shim_env

    assert not worker.enabled(shim_env({"PATH": "/bin"}, tmp_path))  # off by default
    assert worker.enabled(shim_env({"PATH": "/bin"}, tmp_path, warm_worker=True))


def test_client_run_warm_worker_reaches_the_supernodes_environment(tmp_path: Path) -> None:
    """`fedsd client run --warm-worker` → Device(warm_worker=True) → the SuperNode's own environment."""
    from typer.testing import CliRunner

    from fedsd.cli.main import app
    from fedsd.clients.supervisor import Supervisor, SupervisorSettings

    shown = CliRunner().invoke(app, ["client", "run", "--help"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "--warm-worker" in shown.output
    for warm in (False, True):
        settings = SupervisorSettings(server="127.0.0.1:9", node_config={"exit": 1},
                                      session_dir=tmp_path / str(warm), warm_worker=warm)  # fmt: skip
        sup = Supervisor(settings)
        node = sup.start()
        try:
            deadline, environ = time.monotonic() + 20, []
            while b"PATH" not in b"".join(environ) and time.monotonic() < deadline:  # until it has exec'd
                environ = Path(f"/proc/{node.pid}/environ").read_bytes().split(b"\0")
                time.sleep(0.05)
        finally:
            sup.stop()
        assert (f"{worker.ENV}=1".encode() in environ) is warm


def test_a_worker_exits_when_idle_or_orphaned(tmp_path: Path) -> None:
    parent = sleeper()
    try:
        pid = worker_pid(tmp_path / "a", parent.pid, idle_s=1.0)
        assert wait_gone(pid, 10.0)  # idle for a second
        assert not worker.socket_path(tmp_path / "a", parent.pid).exists()
        pid = worker_pid(tmp_path / "b", parent.pid)
        time.sleep(1.5)
        assert alive(pid)
    finally:
        parent.kill()
        parent.wait()
    assert wait_gone(pid, 10.0)  # the process it served is gone
