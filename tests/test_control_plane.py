"""The control plane is not the devices' business (issue 11, hole 2).

- `fedsd server start` binds the SuperLink to loopback; devices reach a fleet-only proxy on --host:--port.
  From another address, the Control and Runtime APIs are refused at the proxy (403, the SuperLink never
  sees the request) and the SuperLink's own port is not reachable at all, while a device connecting
  through the proxy completes a run;
- a device runs only its installed fedsd ClientApp: a run whose app bundle carries its own ClientApp
  code (which would write a marker file when imported) is answered by fedsd's handlers, and that code
  never executes on the device.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import tomllib

import pytest
from harness import Procs, events, write_config

from fedsd import launch
from fedsd.clients.runner import install_guard_rails, write_shim
from fedsd.proxy import allowed
from fedsd.server import deploy


def _outside_address() -> str | None:
    """A non-loopback address of this machine (connections from it are not loopback peers)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("10.255.255.255", 9))  # no packet is sent: only picks the outgoing interface
        addr = s.getsockname()[0]
        if not addr.startswith("127."):
            return addr
    return None


# ============================================================================ fast
@pytest.mark.parametrize(
    ("method", "path", "raw", "peer", "ok"),
    [
        ("POST", "/v1/fleet/pull-messages", b"/v1/fleet/pull-messages", "198.51.100.7", True),
        ("POST", "/v1/fleet/register-node", b"/v1/fleet/register-node", "2001:db8::1", True),
        ("POST", "/v1/control/start-run", b"/v1/control/start-run", "198.51.100.7", False),
        ("POST", "/v1/control/register-supernode", b"/v1/control/register-supernode", "10.0.0.2", False),
        ("POST", "/v1/runtime/pull-messages", b"/v1/runtime/pull-messages", "10.0.0.2", False),
        ("GET", "/v1/fleet/pull-messages", b"/v1/fleet/pull-messages", "10.0.0.2", False),
        ("POST", "/v1/fleet/../control/start-run", b"/v1/fleet/../control/start-run", "10.0.0.2", False),
        ("POST", "/v1/fleet/x/../../control/a", b"/v1/fleet/x%2F..%2F..%2Fcontrol/a", "10.0.0.2", False),
        ("POST", "/v1/fleet//pull", b"/v1/fleet//pull", "10.0.0.2", False),
        ("GET", "/health", b"/health", "10.0.0.2", False),
        ("POST", "/v1/control/start-run", b"/v1/control/start-run", "127.0.0.1", True),  # this machine
        ("POST", "/v1/control/start-run", b"/v1/control/start-run", "::1", True),
        ("POST", "/v1/control/start-run", b"/v1/control/start-run", None, False),
    ],
)
def test_proxy_passes_fleet_calls_only(method, path, raw, peer, ok) -> None:
    assert allowed(method, path, raw, peer) is ok


def test_proxy_app_refuses_control_calls_of_a_remote_peer() -> None:
    from starlette.testclient import TestClient

    from fedsd.proxy import make_app

    with TestClient(make_app("http://127.0.0.1:9"), client=("198.51.100.7", 4000)) as client:
        refused = client.post("/v1/control/start-run", content=b"x")
        assert refused.status_code == 403 and "only the Fleet API" in refused.text
        assert client.get("/v1/runtime/pull-messages").status_code == 403
        fleet = client.post("/v1/fleet/pull-messages", content=b"x")  # forwarded: nobody listens there
        assert fleet.status_code == 502


def test_runner_never_installs_or_loads_a_bundle(tmp_path) -> None:
    rc = install_guard_rails()
    from fedsd.clients.app import app

    assert rc.install_from_fab(b"PK\x03\x04 any bundle", skip_prompt=True) is None
    loader = rc.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    assert loader("evil/app", "6.6.6", "f" * 64) is app
    shim = write_shim(tmp_path / "bin")
    assert os.access(shim, os.X_OK) and "fedsd.clients.runner" in shim.read_text()


# ============================================================================ real processes
def _http(host: str, port: int, request: bytes, source: str | None = None) -> bytes:
    with socket.create_connection(
        (host, port), timeout=10, source_address=(source, 0) if source else None
    ) as s:
        s.sendall(request)
        s.settimeout(10)
        data = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := s.recv(65536):
                data += chunk
    return data


def _post(path: str, body: bytes = b"") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/protobuf\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


@pytest.mark.slow
def test_control_routes_refused_from_outside_and_a_device_runs_through_the_proxy(
    procs: Procs, tmp_path, small_corpus, tiny_model_dir
) -> None:
    outside = _outside_address()
    if outside is None:
        pytest.skip("this machine has no non-loopback address")
    config = write_config(
        tmp_path / "cp.yaml", small_corpus, name="controlplane", rounds=1, exits_mix=[1], lr=None
    )
    port, run = procs.port(), tmp_path / "run"
    server = procs.fedsd(
        "server", "server", "start", "--config", config, "--insecure", "--host", "0.0.0.0", "--port", port,
        "--out", run, "--base-model", tiny_model_dir, "--device-wait", "300",
    )  # fmt: skip
    server.wait_for("SuperLink listening on", 300)  # printed once the fleet proxy is up
    conn = tomllib.loads((run / ".flwr" / "config.toml").read_text())["superlink"]["fedsd"]
    internal = launch.parse_address(conn["address"])[1]
    assert internal != port
    # the SuperLink itself is not reachable from another address
    with pytest.raises(OSError):
        socket.create_connection((outside, internal), timeout=3).close()
    # from outside: control and runtime refused by the proxy, fleet forwarded
    for path in (
        "/v1/control/list-runs",
        "/v1/control/register-supernode",
        "/v1/control/stop-run",
        "/v1/runtime/pull-messages",
        "/v1/fleet/../control/list-runs",
        "/v1/fleet%2F..%2Fcontrol/x",
    ):
        reply = _http(outside, port, _post(path), source=outside)
        assert reply.startswith(b"HTTP/1.1 403") or reply.startswith(b"HTTP/1.1 404"), (path, reply[:200])
    fleet = _http(outside, port, _post("/v1/fleet/get-run"), source=outside)
    assert fleet.startswith(b"HTTP/1.1") and b"only the Fleet API" not in fleet, fleet[:300]
    # from this machine the operator's tools still reach the control API through the same port
    local = _http("127.0.0.1", port, _post("/v1/control/list-runs"))
    assert b"only the Fleet API" not in local, local[:300]
    # a device dialling the outside address trains through the proxy, and the run completes
    manifest = sorted((run / "devices").glob("*.csv"))[0]
    procs.fedsd(
        "device", "client", "run", "--server", f"{outside}:{port}", "--insecure", "--exit", "1",
        "--data", manifest, "--root", small_corpus, "--model", tiny_model_dir, "--cache", tmp_path / "cache",
        "--server-timeout", "120",
    )  # fmt: skip
    assert procs.wait_all_exit(600) == {"server": 0, "device": 0}, procs.report()
    assert "finished: completed" in server.out(), server.out()[-3000:]
    proxy_log = (run / ".flwr" / "proxy.log").read_text()
    assert "refused POST /v1/control/list-runs from " + outside in proxy_log


EVIL_PYPROJECT = """[project]
name = "evil"
version = "6.6.6"
description = "a run whose bundle carries its own ClientApp"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "mallory"

[tool.flwr.app.components]
serverapp = "evil_server:app"
clientapp = "evil_client:app"

[tool.flwr.app.config]
"""

EVIL_CLIENT = """from pathlib import Path
Path({marker!r}).write_text("code from the app bundle ran on the device")
from flwr.clientapp import ClientApp
app = ClientApp()
"""

EVIL_SERVER = """import json, time
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import ServerApp
app = ServerApp()

@app.main()
def main(grid, context):
    deadline = time.time() + 240
    while not list(grid.get_node_ids()) and time.time() < deadline:
        time.sleep(1)
    msgs = [Message(RecordDict({{"config": ConfigRecord({{"fingerprint": {fp!r}}})}}), dst_node_id=n,
                    message_type="query.info") for n in grid.get_node_ids()]
    replies = list(grid.send_and_receive(msgs, timeout=240))
    out = [{{"error": r.has_error(), "info": dict(r.content.config_records["info"]) if not r.has_error() else
             r.error.reason}} for r in replies]
    open({summary!r}, "w").write(json.dumps(out, default=str))
"""


@pytest.mark.slow
def test_a_bundle_with_its_own_clientapp_never_runs_it_on_a_device(
    procs: Procs, tmp_path, small_corpus, tiny_model_dir
) -> None:
    marker, summary = tmp_path / "PWNED", tmp_path / "summary.json"
    fp = json.loads((tiny_model_dir / "fedsd.json").read_text())["fingerprint"]
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "pyproject.toml").write_text(EVIL_PYPROJECT)
    (evil / "evil_client.py").write_text(EVIL_CLIENT.format(marker=str(marker)))
    (evil / "evil_server.py").write_text(EVIL_SERVER.format(fp=fp, summary=str(summary)))
    home = tmp_path / "flwr"
    port = procs.port()
    deploy.write_flwr_home(home, f"127.0.0.1:{port}", insecure=True)
    superlink = procs.adopt(
        deploy.start_superlink(home, "127.0.0.1", port, log_path=tmp_path / "superlink.log")
    )
    launch.wait_for_port("127.0.0.1", port, timeout=120, process=superlink.managed)
    procs.fedsd(
        "device", "client", "run", "--server", f"127.0.0.1:{port}", "--insecure", "--exit", "1",
        "--data", small_corpus / "manifest.csv", "--root", small_corpus, "--model", tiny_model_dir,
        "--cache", tmp_path / "cache", "--server-timeout", "300",
    )  # fmt: skip
    res = subprocess.run(
        [launch.flower_bin("flwr"), "run", str(evil), deploy.CONNECTION, "--stream"],
        env=launch.flower_env(home), cwd=tmp_path, capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    procs.wait_until("the bundle's ServerApp to finish", summary.is_file, 120)
    replies = json.loads(summary.read_text())
    assert not marker.exists(), "the bundle's ClientApp code ran on the device"
    assert len(replies) == 1 and not replies[0]["error"], (replies, res.stdout[-2000:], res.stderr[-2000:])
    assert replies[0]["info"]["exit"] == 1 and len(replies[0]["info"]["device-id"]) == 32  # fedsd's handler
    assert [e["kind"] for e in events(tmp_path / "cache")] == ["info"]
