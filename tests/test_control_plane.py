"""The control plane is not the devices' business (issue 11, hole 2).

- the proxy's rules (fast, here); what a remote peer reaches of a real deployment (403 for Control and
  Runtime, no SuperLink port, a device training through the proxy) is asserted in
  tests/test_secure_deployment.py, from a network namespace of its own;
- a device runs only its installed fedsd ClientApp: a run whose app bundle carries its own ClientApp
  code (which would write a marker file when imported) is answered by fedsd's handlers, and that code
  never executes on the device.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from harness import Procs, events

from fedsd.clients.runner import install_guard_rails, write_shim
from fedsd.process import launch
from fedsd.security.proxy import allowed
from fedsd.server import deploy


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


# the proxy process itself, from a peer in a network namespace: tests/test_proxy_limits.py


HOST_ADDRESS_LOOKUPS = (
    "gethostbyname(",
    "gethostname()",
    "hostname -I",
    "getfqdn(",
    "ip route get",
    "ifaddr",
)
"""Ways a test could find this machine's own interface address (issue 23, item 9): traffic there is not
allowed on shared machines; a peer from another address comes from harness.NetNamespace."""


def test_no_test_sends_to_this_machines_own_address() -> None:
    from pathlib import Path

    here = Path(__file__).resolve().parent
    found = [
        f"{p.name}:{n}: {line.strip()}"
        for p in sorted(here.glob("*.py"))
        if p.name != Path(__file__).name
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if any(word in line for word in HOST_ADDRESS_LOOKUPS)
    ]
    assert not found, "use harness.NetNamespace for a remote peer, not this machine's address:\n" + "\n".join(
        found
    )


def test_runner_never_installs_or_loads_a_bundle(tmp_path) -> None:
    rc = install_guard_rails()
    from fedsd.clients.client_app import app

    assert rc.install_from_fab(b"PK\x03\x04 any bundle", skip_prompt=True) is None
    loader = rc.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    assert loader("evil/app", "6.6.6", "f" * 64) is app
    shim = write_shim(tmp_path / "bin")
    assert os.access(shim, os.X_OK) and "fedsd.clients.runner" in shim.read_text()


# ============================================================================ real processes
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
