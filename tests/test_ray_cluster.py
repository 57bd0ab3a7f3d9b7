"""`simulate(..., ray_address=...)` joins a running Ray cluster, runs there, and leaves it running.

The cluster is a real Ray head started with this environment's `ray` CLI on a private temp dir (short:
Ray's unix sockets live under it) and private ports. It is stopped by killing exactly the processes
that carry that temp dir or port — never with `ray stop`, which stops every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedsd import api
from fedsd.process.launch import FLOWER_ENV, free_port

CONFIG = """
name: raycluster
data: {{corpus: synth, root: {root}, labels: [neutral, happy, angry, sad], crop: {{max_seconds: 2.0, mode: tile}}}}
model: {{backbone: tiny, pretrained: false, exits: [1, 2, 3, 4]}}
federated: {{num_clients: 4, test_speakers: 1, server_speakers: 0, rounds: 2, local_epochs: 1,
            batch_size: 8, lr: 0.01, exits_mix: [1, 2], label_fraction: 0.5, min_clients: 4}}
"""


@dataclass
class RayHead:
    address: str
    port: int
    temp_dir: Path


def _ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


def head_pids(temp_dir: Path, port: int) -> set[int]:
    """Processes of this head: those naming its temp dir or GCS port, and all their descendants."""
    marks, found, children = (str(temp_dir), f":{port} "), set(), {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace") + " "
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
        if any(m in cmd for m in marks):
            found.add(int(d.name))
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found - {os.getpid(), os.getppid()}


def stop_head(temp_dir: Path, port: int, grace_s: float = 10.0) -> None:
    """SIGTERM this head's processes (only these), SIGKILL what is left after ``grace_s``."""
    pids = head_pids(temp_dir, port)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (pids := {p for p in pids if Path(f"/proc/{p}").exists()}):
            time.sleep(0.2)
        if not pids:
            return


@pytest.fixture()
def ray_head() -> Iterator[RayHead]:
    ray_bin = Path(sys.executable).parent / "ray"
    if not ray_bin.exists() or not sys.platform.startswith("linux"):
        pytest.skip("needs this environment's `ray` CLI on Linux")
    temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    port, client_port, agent_port, dash_port = _ports(4)
    cmd = [str(ray_bin), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--ray-client-server-port", str(client_port), "--dashboard-agent-listen-port", str(agent_port),
           "--dashboard-port", str(dash_port), "--num-cpus", "2", "--include-dashboard=false",
           "--disable-usage-stats", "--temp-dir", str(temp_dir)]  # fmt: skip
    env = os.environ | FLOWER_ENV | {"RAY_DISABLE_USAGE_STATS": "1"}
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert started.returncode == 0, started.stdout + started.stderr
        yield RayHead(f"127.0.0.1:{port}", port, temp_dir)
    finally:
        stop_head(temp_dir, port)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_simulation_runs_on_a_joined_ray_cluster_and_leaves_it_up(
    ray_head: RayHead, tmp_path: Path, small_corpus: Path, tiny_model_dir: Path
) -> None:
    import ray
    from ray._private import state  # the GCS job table (the public state API needs the dashboard)

    cfg = tmp_path / "ray.yaml"
    cfg.write_text(CONFIG.format(root=small_corpus), encoding="utf-8")
    result = api.simulate(
        cfg, out=tmp_path / "run", base_model=tiny_model_dir, ray_address=ray_head.address,
        cpus_per_client=1.0, gpus_per_client=0.0, log=lambda _: None,
    )  # fmt: skip
    assert result.rounds_done == 2
    for k in (1, 2, 3, 4):
        assert [r["round"] for r in result.global_metrics[k]] == [0, 1, 2]
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["train"]["num_clients"] for r in lines[1:]] == [4, 4]
    ray_info = result.settings["ray"]
    assert ray_info["joined_cluster"] and ray_info["address"] == ray_head.address
    assert ray_info["cluster_resources"]["CPU"] == 2.0 and len(ray_info["nodes"]) == 1
    assert result.settings["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert ray_info["devices_at_once"] == 2  # 2 CPUs / 1 CPU per device: the requested resources held
    assert not ray.is_initialized()  # disconnected ...

    ray.init(address=ray_head.address, log_to_driver=False)  # ... and the cluster is still up
    try:
        nodes = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
        assert nodes.get(ray_info["nodes"][0]["node_id"]) is True
        jobs = {j["JobID"]: j for j in state.jobs()}
        assert jobs[ray_info["job_id"]]["IsDead"]  # our driver's job ran there and has ended
    finally:
        ray.shutdown()
