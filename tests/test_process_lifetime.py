"""Children live as long as the process that started them: not shorter, not longer (issue 23, finding 8).

``PR_SET_PDEATHSIG`` fires when the *thread* that forked a child exits, so a server started from a
worker thread (``api.Server.start()`` in a thread pool) lost its SuperLink as soon as that thread ended.
Here a real parent process starts children from a short-lived thread, the thread exits, and the
children must stay; then the parent is SIGKILLed and they must go.

- through the guard (``launch.ManagedProcess``, how every Flower process is started);
- a process that calls ``processes.set_parent_death_signal()`` itself (the fleet proxy, the
  ClientApp runner), started by a thread with a plain ``subprocess.Popen``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsd.process.lifetime import alive, guard_available

pytestmark = pytest.mark.skipif(not guard_available(), reason="Linux only (/proc, prctl)")

ROOT = Path(__file__).resolve().parents[1]

# The parent: starts the child from a worker thread, lets the thread exit, reports pids, then waits.
PARENT = r"""
import json, os, subprocess, sys, threading, time
from fedsd.process import launch
how, out = sys.argv[1], sys.argv[2]
child = [sys.executable, "-c", "import time; time.sleep(600)"]
ready = out + ".ready"
watching = [sys.executable, "-c", "import sys, time; from fedsd.process.lifetime import set_parent_death_signal as s; "
            "s(); open(sys.argv[1], 'w').close(); time.sleep(600)", ready]
box = {}
def start():
    # the thread lives until the child is fully set up (its death signal armed), as a server's start-up
    # thread does while it waits for the port, and only then exits
    if how == "guard":
        box["p"] = launch.ManagedProcess("sleeper", child, env=dict(os.environ))
        while not launch.descendants(box["p"].pid):
            time.sleep(0.05)
        time.sleep(0.3)
    else:
        box["p"] = subprocess.Popen(watching)
        while not os.path.exists(ready):
            time.sleep(0.05)
t = threading.Thread(target=start)
t.start()
t.join()  # the thread that forked the child is gone from here on
pid = box["p"].pid
time.sleep(1.0)  # let a thread-tied death signal (and the guard's reaction to it) land
family = launch.descendants(pid) if how == "guard" else []
with open(out + ".tmp", "w") as fh:
    proc = box["p"].proc if how == "guard" else box["p"]
    json.dump({"pid": pid, "family": family, "alive": proc.poll() is None}, fh)
os.replace(out + ".tmp", out)
time.sleep(600)
"""


def _wait(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


@pytest.mark.parametrize("how", ["guard", "self-watch"])
def test_a_child_started_from_a_worker_thread_outlives_the_thread_not_the_process(tmp_path, how) -> None:
    out = tmp_path / "pids.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, how, str(out)], env=env, cwd=ROOT)
    family: list[int] = []
    try:
        assert _wait(lambda: out.exists() or parent.poll() is not None, 60), "the parent never reported"
        assert parent.poll() is None, f"the parent failed (exit {parent.returncode})"
        info = json.loads(out.read_text())
        family = [info["pid"], *info["family"]]
        assert info["alive"], f"{how}: the child died when the thread that started it exited"
        assert all(alive(p) for p in family), f"{how}: part of the family died with the thread: {family}"
        if how == "guard":
            assert len(family) >= 2  # the guard and its command
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        assert _wait(lambda: not any(alive(p) for p in family), 30), (
            f"{how}: still running after the parent process died: {[p for p in family if alive(p)]}"
        )
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=10)
        for p in family:
            if alive(p):
                os.kill(p, signal.SIGKILL)
