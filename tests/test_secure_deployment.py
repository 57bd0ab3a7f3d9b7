"""One real, secured deployment on this machine, asserted on by several tests.

`fedsd server start` with TLS, node authentication (`--auth`) and its fleet-only proxy on every address
(`--host 0.0.0.0`); it trains its own tiny base model first and runs 2 rounds with device DP from its
config. Around it:

- **good-0** (exit 1, registered key, `--model`, warm worker, `--out` with personal heads) runs inside a
  network namespace the test makes (another address: a remote device) and reaches the server through
  the proxy only; without namespaces it dials loopback and the remote-peer checks are skipped;
- **good-1** (exit 2, registered key, no `--model`: the server delivers it, its own `--dp-noise-multiplier`)
  is the cold path: a fresh process per message;
- **wrong-ca**, **stranger** (unknown key) and **no-key** are refused by Flower and never train;
  `--insecure` against the TLS port is refused before any SuperNode starts;
- from the namespace, the Control and Runtime APIs get 403 at the proxy and the SuperLink's own port is
  unreachable; from this machine, `register-node --port` still reaches the Control API through the proxy.

One deployment instead of one per claim: each claim below reads the same run.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from harness import FEDSD, NetNamespace, Proc, Procs, env, events, flat, uar_from_confusion, write_config
from typer.testing import CliRunner

from fedsd.cli.main import app
from fedsd.process import launch
from fedsd.process.launch import port_open

pytestmark = pytest.mark.slow
runner = CliRunner()

START_TIMEOUT = 600.0  # the server trains a tiny base model first; a failure bound, not a benchmark
RUN_TIMEOUT = 900.0
FLEET_ONLY = [
    "/v1/control/list-runs",
    "/v1/control/register-supernode",
    "/v1/control/stop-run",
    "/v1/runtime/pull-messages",
    "/v1/fleet/../control/list-runs",
    "/v1/fleet%2F..%2Fcontrol/x",
]

# What a remote peer sees: run inside the namespace, prints one JSON document.
PEER_PROBE = r"""
import json, socket, ssl, sys
host, port, internal, ca, paths = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5:]
ctx = ssl.create_default_context(cafile=ca)
def post(path):
    with socket.create_connection((host, port), timeout=10) as raw, ctx.wrap_socket(raw, server_hostname=host) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/protobuf\r\n"
                  "Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except (TimeoutError, ConnectionResetError, ssl.SSLError):
            pass
    return data[:300].decode("latin-1")
try:
    socket.create_connection((host, internal), timeout=3).close()
    superlink = "reachable"
except OSError as e:
    superlink = type(e).__name__
print(json.dumps({"paths": {p: post(p) for p in paths}, "fleet": post("/v1/fleet/get-run"),
                  "superlink": superlink}))
"""


@dataclass
class Deployment:
    tmp: Path
    run: Path
    port: int
    material: dict[str, Path]
    procs: Procs
    outside: NetNamespace | None
    server: Proc | None = None
    devices: dict[str, Proc] = field(default_factory=dict)
    codes: dict[str, int | None] = field(default_factory=dict)
    good_ids: list[int] = field(default_factory=list)
    register_twice: Any = None
    insecure: Any = None
    plain_http_reply: bytes = b""
    peer: dict[str, Any] | None = None
    proxy_argv: list[bytes] = field(default_factory=list)
    elapsed: float = 0.0

    def records(self) -> list[dict]:
        return [json.loads(x) for x in (self.run / "metrics.jsonl").read_text().splitlines() if x.strip()]

    def cache(self, name: str) -> Path:
        return self.tmp / f"c-{name}"


def _register(key: Path, run: Path) -> int:
    reg = runner.invoke(app, ["server", "register-node", f"{key}.pub", "--out", str(run)], env=env())
    assert reg.exit_code == 0, reg.output
    return int(flat(reg.output).split("node id ")[1].split(";")[0])


def _plain_http(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        raw.settimeout(5)
        try:
            return raw.recv(64)
        except (TimeoutError, ConnectionResetError):
            return b""


def _deploy(d: Deployment, corpus: Path) -> None:
    tmp, run, tls, port = d.tmp, d.run, d.material["tls"], d.port
    config = write_config(
        tmp / "secure.yaml", corpus, name="secure-deployment", train={"epochs": 1, "batch_size": 16, "lr": 1e-3},
        server_speakers=1, batch_size=None, lr=None, min_clients=2, round_timeout=120,
    )  # fmt: skip
    t0 = time.monotonic()
    d.server = d.procs.fedsd(
        "server", "server", "start", "--config", config, "--tls-dir", tls, "--auth", "--host", "0.0.0.0",
        "--port", port, "--rounds", "2", "--min-clients", "2", "--out", run, "--device-wait", "180",
        "--node-key", f"{d.material['spare']}.pub", "--proxy-max-body", "8M", "--proxy-max-connections", "64",
        # device DP from the server's config; good-1 overrides the noise with its own flag
        "--set", "federated.dp.noise_multiplier=1.0", "--set", "federated.dp.delta=0.001",
    )  # fmt: skip
    listening = d.server.wait_for(r"SuperLink listening on .*?fleet proxy, pid (\d+)", START_TIMEOUT)
    d.proxy_argv = (Path("/proc") / listening.group(1) / "cmdline").read_bytes().split(b"\0")
    # --- device keys registered through the run directory; again through the port (Control API via the
    # proxy from this machine, over TLS): already registered
    d.good_ids = [_register(d.material[f"good{i}"], run) for i in (0, 1)]
    d.register_twice = runner.invoke(
        app, ["server", "register-node", f"{d.material['good0']}.pub", "--port", str(port), "--tls-dir", str(tls)],
        env=env(),
    )  # fmt: skip
    d.plain_http_reply = _plain_http(port)
    manifests = sorted((run / "devices").glob("*.csv"))
    assert len(manifests) == 2, manifests
    ca = str(tls / "ca.pem")
    common = ["client", "run", "--root", str(corpus), "--server-timeout", "60"]
    local = ["--server", f"127.0.0.1:{port}"]
    d.insecure = runner.invoke(
        app, [*common, *local, "--exit", "1", "--insecure", "--data", str(manifests[1]), "--cache",
              str(d.cache("insecure"))], env=env(),
    )  # fmt: skip
    # --- the remote peer: what the proxy lets through, then a device from there
    base = run / "central" / "best"
    good0 = [*common, "--exit", "1", "--data", str(manifests[0]), "--model", str(base), "--root-cert", ca,
             "--auth-key", str(d.material["good0"]), "--warm-worker", "--out", str(tmp / "mine"),
             "--personalize-epochs", "1", "--cache", str(d.cache("good-0"))]  # fmt: skip
    if d.outside is not None:
        conn = tomllib.loads((run / ".flwr" / "config.toml").read_text())["superlink"]["fedsd"]
        internal = launch.parse_address(conn["address"])[1]
        probe = subprocess.run(
            [*d.outside.exec(), sys.executable, "-c", PEER_PROBE, d.outside.host_ip, str(port), str(internal), ca,
             *FLEET_ONLY], capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert probe.returncode == 0, probe.stderr[-3000:]
        d.peer = json.loads(probe.stdout)
        d.devices["good-0"] = d.procs.start(
            "good-0", [*d.outside.exec(), *FEDSD, *good0, "--server", f"{d.outside.host_ip}:{port}"]
        )
    else:
        d.devices["good-0"] = d.procs.fedsd("good-0", *good0, *local)
    on_tls = [*common, *local, "--root-cert", ca]
    others = {
        "good-1": [*on_tls, "--exit", "2", "--auth-key", str(d.material["good1"]), "--data", str(manifests[1]),
                   "--dp-noise-multiplier", "1.5"],
        # the registered key, but it does not trust the server's certificate
        "wrong-ca": [*common, *local, "--root-cert", str(d.material["other"] / "ca.pem"), "--exit", "1",
                     "--auth-key", str(d.material["good1"]), "--data", str(manifests[1])],
        "stranger": [*on_tls, "--exit", "1", "--auth-key", str(d.material["stranger"]), "--data",
                     str(manifests[1]), "--server-timeout", "8"],
        "no-key": [*on_tls, "--exit", "1", "--data", str(manifests[1])],
    }  # fmt: skip
    for name, args in others.items():
        d.devices[name] = d.procs.fedsd(name, *args, "--cache", d.cache(name))
    d.codes = d.procs.wait_all_exit(RUN_TIMEOUT)
    d.elapsed = time.monotonic() - t0
    print(f"secure deployment: {d.elapsed:.0f} s")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path):
    from fedsd.security.certs import create_certificates, generate_node_key

    tmp = tmp_path_factory.mktemp("secure")
    outside = None if NetNamespace.available() else NetNamespace("sd")
    material = {"tls": tmp / "tls", "other": tmp / "other"}
    create_certificates(material["tls"], [outside.host_ip] if outside else None)
    create_certificates(material["other"])
    for name in ("good0", "good1", "stranger", "spare"):
        material[name] = tmp / f"{name}.key"
        generate_node_key(material[name])
    procs = Procs(tmp)
    d = Deployment(tmp, tmp / "run", procs.port(), material, procs, outside)
    try:
        _deploy(d, small_corpus)
        yield d
    finally:
        left = procs.close()
        if outside is not None:
            outside.close()
    assert not left, "processes left after the deployment:\n" + "\n".join(left)
    assert not port_open("127.0.0.1", d.port, timeout=0.5)


def test_only_registered_devices_are_admitted(deployment: Deployment) -> None:
    d = deployment
    assert d.codes == {"server": 0, "good-0": 0, "good-1": 0, "wrong-ca": 4, "stranger": 4, "no-key": 4}, (
        d.procs.report()
    )
    assert d.register_twice.exit_code == 1 and "already registered" in flat(d.register_twice.output)
    assert not d.plain_http_reply.startswith(b"HTTP/"), d.plain_http_reply  # the port speaks TLS only
    assert d.insecure.exit_code == 2, d.insecure.output
    assert "serves TLS" in flat(d.insecure.output) and "--root-cert" in flat(d.insecure.output)
    assert not d.cache("insecure").exists()  # refused before any SuperNode started
    reasons = {
        "wrong-ca": ["TLS certificate was not accepted", "CERTIFICATE_VERIFY_FAILED"],
        "stranger": ["does not know this device's key", f"{d.material['stranger']}.pub", "trying again"],
        "no-key": ["only admits registered devices", "fedsd client keygen"],
    }
    for name, pieces in reasons.items():
        out = d.devices[name].out()
        for piece in pieces:
            assert piece in out, (name, piece, out)
        assert "the server refused this device" in out, out
        assert events(d.cache(name)) == [], name  # its ClientApp never ran: no handshake, no training
    superlink_log = (d.run / ".flwr" / "superlink.log").read_text()
    assert "Uvicorn running on https://" in superlink_log
    assert superlink_log.count("Activated node_id=") == 2, superlink_log[-3000:]
    for node in d.good_ids:
        assert f"Activated node_id={node}" in superlink_log
    assert "[ApiError:2004]" in superlink_log and "[ApiError:2001]" in superlink_log
    server_out = d.server.out()
    assert "--root-cert" in server_out and "--auth-key KEY" in server_out, server_out[:3000]
    assert f"registered device key {d.material['spare']}.pub (node id" in server_out, server_out[:3000]
    config_toml = (d.run / ".flwr" / "config.toml").read_text()
    ca = (d.material["tls"] / "ca.pem").resolve()
    assert f'root-certificates = "{ca}"' in config_toml and "insecure" not in config_toml


def test_the_run_completes_with_both_devices_every_round(deployment: Deployment) -> None:
    d = deployment
    assert "finished: completed" in d.server.out(), d.server.out()[-3000:]
    state = json.loads((d.run / "state.json").read_text())
    assert state["completed_round"] == 2
    for r in range(3):
        assert (d.run / "rounds" / f"round_{r:03d}.safetensors").is_file()
    recs = d.records()
    assert [r["round"] for r in recs] == [0, 1, 2]
    for r in recs[1:]:  # both devices took part in every round, each at its own exit, and no one else
        assert sorted(c["metrics"]["exit"] for c in r["train"]["clients"]) == [1, 2]
        assert sorted(c["node_id"] for c in r["train"]["clients"]) == sorted(d.good_ids)
    # every round's UAR is its confusion matrix's, over every held-out utterance; exits 3 and 4 were
    # trained by no device, so their heads and UAR are round 0's
    from fedsd.data.partition import Partition

    n_test = len(Partition.load(d.run / "partition.json").test_utt_ids)
    for r in recs:
        for k in (1, 2, 3, 4):
            confusion = r["eval"][str(k)]["confusion"]
            assert sum(map(sum, confusion)) == n_test > 0
            assert r[f"exit{k}/uar"] == pytest.approx(uar_from_confusion(confusion), abs=1e-9)
    for k in (3, 4):
        assert recs[2][f"exit{k}/uar"] == recs[0][f"exit{k}/uar"]
        assert recs[2]["eval"][str(k)]["confusion"] == recs[0]["eval"][str(k)]["confusion"]
    from fedsd.model.multiexit import MultiExitSER

    assert MultiExitSER.from_pretrained(d.run / "final").exits == [1, 2, 3, 4]
    assert (d.run / "report.md").is_file()
    assert json.loads((d.run / "spec.json").read_text())["rounds"] == 2
    for name in ("good-0", "good-1"):
        out = d.devices[name].out()
        assert "round 1: trained exit(s)" in out and "round 2: trained exit(s)" in out, out
        assert "DP ε = " in out and "the server says the run is over" in out, out


def test_device_dp_accumulates_across_rounds_and_a_device_flag_wins(deployment: Deployment) -> None:
    """The ledger lived in each SuperNode's context.state between rounds (the cold device's fresh
    processes included), so round 2's ε is cumulative; good-1's own --dp-noise-multiplier won."""
    from fedsd.security.privacy import epsilon

    recs = deployment.records()
    for rnd in (1, 2):
        for c in recs[rnd]["train"]["clients"]:
            m = c["metrics"]
            assert m["dp-rounds"] == rnd and m["dp-ledger-from-state"] == (rnd == 2)
            assert m["dp-noise-multiplier"] == (1.5 if m["exit"] == 2 else 1.0)
            history = [(m["dp-noise-multiplier"], m["dp-sample-rate"], m["dp-steps"])]
            assert m["dp-epsilon"] == pytest.approx(epsilon(history, 1e-3), rel=1e-9)
        assert recs[rnd]["privacy"]["max_epsilon"] == max(
            c["metrics"]["dp-epsilon"] for c in recs[rnd]["train"]["clients"]
        )


def test_a_device_without_the_model_receives_it_and_stores_it_by_fingerprint(deployment: Deployment) -> None:
    from fedsd.model.multiexit import MultiExitSER

    d = deployment
    out1 = d.devices["good-1"].out()
    assert "trained exit(s) 1, 2" in out1 and "received the base model" in out1, out1
    assert "received the base model" not in d.devices["good-0"].out()
    fingerprint = json.loads((d.run / "state.json").read_text())["fingerprint"]
    delivered = list((d.cache("good-1") / "models").glob("*/fedsd.json"))
    assert len(delivered) == 1, delivered
    assert MultiExitSER.from_pretrained(delivered[0].parent).backbone_fingerprint() == fingerprint
    assert not (d.cache("good-0") / "models").exists()
    evs = events(d.cache("good-1"))  # one line per handled message, ending with `done`
    assert [e["kind"] for e in evs] == ["info", "model", "train", "train", "done"]
    assert [e.get("round") for e in evs if e["kind"] == "train"] == [1, 2]
    assert evs[2]["trained_exits"] == [1, 2] and "uar_after" in evs[2]


def test_warm_device_keeps_its_deployable_model_and_personal_heads(deployment: Deployment) -> None:
    from fedsd.model.multiexit import MultiExitSER

    d = deployment
    out = d.devices["good-0"].out()
    assert f"deployable model: {d.tmp / 'mine'}" in out, out
    assert MultiExitSER.from_pretrained(d.tmp / "mine").exits == [1]
    assert MultiExitSER.from_pretrained(d.tmp / "mine" / "personal").exits == [1]
    assert [e["kind"] for e in events(d.cache("good-0"))][-1] == "done"
    # its messages were answered by one long-lived worker, not by fresh processes
    logs = list((d.cache("good-0") / "warm").glob("*.log"))
    assert len(logs) == 1 and logs[0].read_text().strip(), logs


def test_a_remote_peer_reaches_the_fleet_api_only(deployment: Deployment) -> None:
    d = deployment
    if d.outside is None:
        pytest.skip(f"no network namespace here: {NetNamespace.available()}")
    assert d.peer is not None
    assert d.peer["superlink"] != "reachable"  # the SuperLink itself listens on loopback only
    for path, reply in d.peer["paths"].items():
        assert reply.startswith(("HTTP/1.1 403", "HTTP/1.1 404")), (path, reply)
    assert d.peer["fleet"].startswith("HTTP/1.1") and "only the Fleet API" not in d.peer["fleet"]
    # `server start --proxy-max-body/--proxy-max-connections` reach the proxy process
    argv = d.proxy_argv
    assert argv[argv.index(b"--max-body") + 1] == str(8 * 2**20).encode()
    assert argv[argv.index(b"--max-connections") + 1] == b"64"
    proxy_log = (d.run / ".flwr" / "proxy.log").read_text()
    assert f"refused POST /v1/control/list-runs from {d.outside.peer_ip}" in proxy_log
    # ... and the device in the namespace trained through the proxy
    trained = {c["node_id"] for r in d.records()[1:] for c in r["train"]["clients"] if c["metrics"]["exit"] == 1}
    assert len(trained) == 1 and trained <= set(d.good_ids)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [(["--proxy-max-body", "lots"], "--proxy-max-body"), (["--proxy-max-connections", "0"], "proxy-max-connections")],
)
def test_bad_proxy_limits_are_refused_before_anything_starts(tmp_path: Path, flags: list[str], needle: str) -> None:
    res = runner.invoke(app, ["server", "start", "--config", "demo", "--out", str(tmp_path / "run"), *flags])
    assert res.exit_code == 2 and needle in res.output, res.output
    assert not (tmp_path / "run").exists()
