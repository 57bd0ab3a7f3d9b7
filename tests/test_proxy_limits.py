"""The fleet proxy under hostile peers, before any authentication (issue 23, finding 3).

The proxy read a whole body and only then compared it with the cap; nothing limited connections, head
sizes or slow senders. Every peer here is a remote one: a process in a network namespace the test makes
(harness.NetNamespace), reaching the real proxy process (``python -m fedsd.security.proxy``) on the host end of
the veth pair; nothing is sent to this machine's own interface address. Upstream is a small recording
HTTP server on loopback, except in the last test, where a real Flower SuperLink completes a round with a
SuperNode in the namespace while over-cap bodies keep arriving.

- a ``Content-Length`` over the cap: 413 before a byte of body is read; a chunked body: 413 as it passes
  the cap, and the SuperLink saw at most the cap;
- a body is streamed on: the upstream receives its first part while the peer still holds the rest;
- a head over ``--max-header-bytes``: 431; a head or body trickled in: 408 and closed;
- connections over ``--max-connections``: 503; a fleet call gets through again once one closes;
- RSS growth under 32 concurrent over-cap bodies ≤ 2 × the cap (benchmarks/proxy_memory.py, run here
  from the namespace), and a fleet call during the flood is answered.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import NetNamespace, Procs

from fedsd.process import launch

pytestmark = pytest.mark.skipif(NetNamespace.available() is not None, reason=str(NetNamespace.available()))

ROOT = Path(__file__).resolve().parents[1]
CAP = 1024 * 1024

# A remote peer: runs a plan of socket steps inside the namespace, prints what it read, as JSON.
PEER = r"""
import json, socket, sys, time
host, port, plan = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
socks, out = {}, []
def reply(s, timeout):
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except TimeoutError:
        data += b"<timeout>"
    except OSError as e:
        data += f"<{type(e).__name__}>".encode()
    return data.decode("latin-1")
for op, i, *arg in plan:
    try:
        if op == "open":
            socks[i] = socket.create_connection((host, port), timeout=10)
        elif op == "send":
            socks[i].sendall(arg[0].encode("latin-1"))
        elif op == "chunk":
            socks[i].sendall(b"%x\r\n" % arg[0] + b"x" * arg[0] + b"\r\n")
        elif op == "wait":
            sys.stdin.readline()
        elif op == "reply":
            out.append(reply(socks[i], arg[0]))
        elif op == "close":
            socks.pop(i).close()
        elif op == "until-not-503":  # a request on fresh connections until the proxy has room again
            for _ in range(100):
                with socket.create_connection((host, port), timeout=10) as s:
                    s.sendall(arg[0].encode("latin-1"))
                    got = reply(s, 20)
                if not got.startswith("HTTP/1.1 503"):
                    break
                time.sleep(0.1)
            out.append(got)
    except OSError as e:
        out.append(f"<{type(e).__name__}>")
print(json.dumps(out))
"""


class Recorder(http.server.BaseHTTPRequestHandler):
    """The stand-in SuperLink: counts body bytes as they arrive (``received``), answers ``ok <n>``."""

    protocol_version = "HTTP/1.1"
    received = 0
    requests: list[tuple[str, int, bool]] = []  # (path, body bytes, complete)
    lock = threading.Lock()

    def _take(self, n: int) -> int:
        got = 0
        while got < n:
            data = self.rfile.read1(min(n - got, 65536))
            if not data:
                raise ConnectionError
            got += len(data)
            with self.lock:
                Recorder.received += len(data)
        return got

    def _line(self) -> bytes:
        line = self.rfile.readline(100)
        if not line.endswith(b"\n"):
            raise ConnectionError("body cut off")
        return line.strip()

    def do_POST(self) -> None:  # noqa: N802
        total, complete = 0, False
        try:
            if "chunked" in self.headers.get("transfer-encoding", ""):
                while size := int(self._line(), 16):
                    total += self._take(size)
                    self._line()
                self._line()
            else:
                total = self._take(int(self.headers.get("content-length") or 0))
            complete = True
        except (ConnectionError, ValueError, OSError):
            self.close_connection = True
        with self.lock:
            Recorder.requests.append((self.path, total, complete))
        if complete:
            body = f"ok {total}".encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except OSError:  # the proxy gave up on this request (its peer went away)
                self.close_connection = True

    do_GET = do_POST

    def log_message(self, *_a: Any) -> None:
        pass


@pytest.fixture(scope="module")
def ns() -> Iterator[NetNamespace]:
    space = NetNamespace("px")
    try:
        yield space
    finally:
        space.close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    http.server.ThreadingHTTPServer.request_queue_size = 128
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _proxy(procs: Procs, ns: NetNamespace, upstream: int, name: str, *limits: str) -> int:
    port = launch.free_port(ns.host_ip)
    cmd = [sys.executable, "-m", "fedsd.security.proxy", "--listen", f"{ns.host_ip}:{port}",
           "--upstream", f"http://127.0.0.1:{upstream}", *limits]  # fmt: skip
    proc = procs.start(name, cmd)
    launch.wait_for_port(ns.host_ip, port, timeout=60, process=proc.managed, what="the fleet proxy")
    return port


@pytest.fixture(scope="module")
def proxies(
    ns: NetNamespace, upstream: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """``roomy``: cap 1 MiB, 8 KiB heads; ``strict``: 1 s deadlines, 1 MiB/s; ``narrow``: 2 connections."""
    procs = Procs(tmp_path_factory.mktemp("proxies"))
    try:
        out = {
            "roomy": _proxy(procs, ns, upstream, "roomy", "--max-body", "1M", "--max-header-bytes", "8K"),
            "strict": _proxy(procs, ns, upstream, "strict", "--max-body", "1M", "--header-timeout", "1",
                             "--body-timeout", "1", "--min-body-rate", "1M"),
            "narrow": _proxy(procs, ns, upstream, "narrow", "--max-connections", "2"),
        }  # fmt: skip
        out["procs"] = procs
        yield out
    finally:
        left = procs.close()
    assert not left, left


def _peer(ns: NetNamespace, port: int, plan: list[list[Any]], **kw: Any) -> subprocess.Popen:
    return subprocess.Popen(
        [*ns.exec(), sys.executable, "-c", PEER, ns.host_ip, str(port), json.dumps(plan)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw,
    )  # fmt: skip


def _run(ns: NetNamespace, port: int, plan: list[list[Any]]) -> list[str]:
    peer = _peer(ns, port, plan)
    out, err = peer.communicate(timeout=120)
    assert peer.returncode == 0, err
    return json.loads(out)


def _head(path: str = "/v1/fleet/push-messages", extra: str = "") -> str:
    return f"POST {path} HTTP/1.1\r\nHost: fleet\r\nContent-Type: application/protobuf\r\n{extra}"


def _until(pred: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


def test_a_fleet_call_is_forwarded_and_the_rest_refused_for_a_remote_peer(ns, proxies) -> None:
    ok, control = _run(ns, proxies["roomy"], [
        ["open", 0], ["send", 0, _head(extra="Content-Length: 5\r\nConnection: close\r\n\r\nhello")], ["reply", 0, 30],
        ["open", 1], ["send", 1, _head("/v1/control/list-runs", "Content-Length: 0\r\n\r\n")], ["reply", 1, 30],
    ])  # fmt: skip
    assert ok.startswith("HTTP/1.1 200") and ok.endswith("ok 5"), ok
    assert control.startswith("HTTP/1.1 403") and "only the Fleet API" in control, control
    log = (proxies["procs"].root / "roomy.log").read_text()
    assert f"refused POST /v1/control/list-runs from {ns.peer_ip}" in log


def test_an_announced_body_over_the_cap_is_refused_before_it_is_read(ns, proxies) -> None:
    before = len(Recorder.requests)
    # the head announces 64 MiB and no byte of body follows: only a proxy that decides on the head answers
    (reply,) = _run(ns, proxies["roomy"], [
        ["open", 0], ["send", 0, _head(extra=f"Content-Length: {64 * CAP}\r\n\r\n")], ["reply", 0, 20],
    ])  # fmt: skip
    assert reply.startswith("HTTP/1.1 413") and "too large" in reply, reply
    assert len(Recorder.requests) == before  # the SuperLink never saw it


def test_a_body_is_streamed_on_and_refused_as_it_passes_the_cap(ns, proxies) -> None:
    start = Recorder.received
    piece = 192 * 1024
    # part one, then the peer waits: the upstream must already have it (streamed, not buffered whole)
    peer = _peer(ns, proxies["roomy"], [
        ["open", 0], ["send", 0, _head(extra="Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")],
        ["chunk", 0, piece], ["wait", 0], ["send", 0, "0\r\n\r\n"], ["reply", 0, 30],
        # a second body keeps going past the cap
        ["open", 1], ["send", 1, _head(extra="Transfer-Encoding: chunked\r\n\r\n")],
        *[["chunk", 1, piece] for _ in range(2 * CAP // piece)], ["reply", 1, 30],
    ])  # fmt: skip
    try:
        streamed = _until(lambda: Recorder.received - start >= piece, 30)
    finally:
        assert peer.stdin is not None
        peer.stdin.write("go\n")
        peer.stdin.flush()
    out, err = peer.communicate(timeout=120)
    assert streamed, "the upstream got nothing while the peer held the rest of its body"
    done, over = json.loads(out)
    assert done.startswith("HTTP/1.1 200") and done.endswith(f"ok {piece}"), done
    assert over.startswith("HTTP/1.1 413") or over.startswith("<Connection"), over
    assert Recorder.requests[-1][2] is False and Recorder.requests[-1][1] <= CAP  # cut off at the cap
    assert Recorder.received - start <= piece + CAP + piece


def test_an_oversized_head_gets_431(ns, proxies) -> None:
    (reply,) = _run(ns, proxies["roomy"], [
        ["open", 0], ["send", 0, _head(extra=f"X-Pad: {'a' * 20000}\r\nContent-Length: 0\r\n\r\n")], ["reply", 0, 20],
    ])  # fmt: skip
    assert reply.startswith("HTTP/1.1 431"), reply


def test_slow_senders_are_timed_out(ns, proxies) -> None:
    head, body = _run(ns, proxies["strict"], [
        # slowloris: half a head, then nothing
        ["open", 0], ["send", 0, "POST /v1/fleet/push-messages HTTP/1.1\r\nHost: fl"], ["reply", 0, 30],
        # a body that stalls after its first bytes
        ["open", 1], ["send", 1, _head(extra="Content-Length: 100000\r\n\r\n") + "x" * 100], ["reply", 1, 30],
    ])  # fmt: skip
    assert head.startswith("HTTP/1.1 408"), head  # answered and closed long before the peer's 30 s
    assert body.startswith("HTTP/1.1 408"), body


def test_connections_over_the_cap_get_503(ns, proxies) -> None:
    fleet = _head(extra="Content-Length: 2\r\nConnection: close\r\n\r\nhi")
    busy, again = _run(ns, proxies["narrow"], [
        ["open", 0], ["open", 1], ["send", 0, "P"], ["send", 1, "P"],  # two connections hold the two slots
        ["open", 2], ["reply", 2, 20],
        ["close", 0], ["close", 1], ["until-not-503", 3, fleet],
    ])  # fmt: skip
    assert busy.startswith("HTTP/1.1 503"), busy
    assert again.startswith("HTTP/1.1 200") and again.endswith("ok 2"), again


TLS_PEER = r"""
import json, socket, ssl, sys
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
def call(head):
    with socket.create_connection((host, port), timeout=10) as raw, ctx.wrap_socket(raw, server_hostname=host) as s:
        s.sendall(head.encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.decode("latin-1")
out = [call("POST /v1/fleet/push-messages HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"),
       call(f"POST /v1/fleet/push-messages HTTP/1.1\r\nHost: x\r\nContent-Length: {64 << 20}\r\n\r\n")]
with socket.create_connection((host, port), timeout=10) as raw:  # plain HTTP to the TLS port
    raw.sendall(b"POST /v1/fleet/push-messages HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    raw.settimeout(10)
    try:
        out.append(raw.recv(100).decode("latin-1"))
    except OSError as e:
        out.append(type(e).__name__)
print(json.dumps(out))
"""


def test_tls_towards_devices(ns, upstream, tmp_path) -> None:
    """The same limits behind TLS: a fleet call over TLS is forwarded, an announced over-cap body gets
    413, and plain HTTP on the TLS port gets no HTTP reply."""
    from fedsd.security.certs import create_certificates

    tls = create_certificates(tmp_path / "tls", [ns.host_ip])
    procs = Procs(tmp_path)
    try:
        port = _proxy(procs, ns, upstream, "tls", "--max-body", "1M", "--certfile", str(tls.server_cert),
                      "--keyfile", str(tls.server_key))  # fmt: skip
        assert launch.probe_transport(ns.host_ip, port) == "tls"
        run = subprocess.run([*ns.exec(), sys.executable, "-c", TLS_PEER, ns.host_ip, str(port), str(tls.ca_cert)],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        ok, big, plain = json.loads(run.stdout)
    finally:
        left = procs.close()
    assert not left, left
    assert ok.startswith("HTTP/1.1 200") and ok.endswith("ok 3"), ok
    assert big.startswith("HTTP/1.1 413"), big
    assert not plain.startswith("HTTP/1.1 2"), plain


def _bench() -> Any:
    path = ROOT / "benchmarks" / "proxy_memory.py"
    spec = importlib.util.spec_from_file_location("bench_proxy_memory", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_memory_stays_bounded_under_32_concurrent_over_cap_bodies(ns, tmp_path) -> None:
    """benchmarks/proxy_memory.py from the namespace at a 2 MiB cap: 32 × 4 MiB chunked bodies."""
    out = tmp_path / "proxy_memory.json"
    res = _bench().main(["--caps", "2M", "--senders", "32", "--body-factor", "2", "--netns", ns.name,
                         "--host", ns.host_ip, "--work", str(tmp_path), "--out", str(out), "--quiet"])  # fmt: skip
    (row,) = res["rows"]
    assert json.loads(out.read_text())["provenance"]["benchmark"] == "proxy_memory"
    assert row["growth_bytes"] <= 2 * row["cap_bytes"], row
    assert set(row["over_cap_outcomes"]) <= {"413", "ConnectionResetError", "BrokenPipeError"}, row
    assert sum(row["over_cap_outcomes"].values()) == 32
    assert row["fleet_during_flood"]["status"] == "200", row


# ---------------------------------------------------------------------------- a real Flower round
APP_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "roundtrip"
version = "1.0.0"
description = "one query round through the fleet proxy"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedsd-tests"

[tool.flwr.app.components]
serverapp = "rt_server:app"
clientapp = "rt_client:app"

[tool.flwr.app.config]
"""

APP_CLIENT = """from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
app = ClientApp()

@app.query()
def query(msg, context):
    n = int(msg.content.config_records["q"]["n"])
    return Message(RecordDict({"r": ConfigRecord({"n2": n * 2})}), reply_to=msg)
"""

APP_SERVER = """import json, time
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import ServerApp
app = ServerApp()

@app.main()
def main(grid, context):
    deadline = time.time() + 120
    while not list(grid.get_node_ids()) and time.time() < deadline:
        time.sleep(0.5)
    msgs = [Message(RecordDict({"q": ConfigRecord({"n": 21})}), dst_node_id=n, message_type="query")
            for n in grid.get_node_ids()]
    replies = list(grid.send_and_receive(msgs, timeout=120))
    out = [r.content.config_records["r"]["n2"] if not r.has_error() else str(r.error.reason) for r in replies]
    open(SUMMARY, "w").write(json.dumps(out))
"""


@pytest.mark.slow  # Flower's own round trip: ~12 s on an idle machine, more under load
def test_a_real_fleet_round_completes_while_over_cap_bodies_arrive(ns, procs: Procs, tmp_path) -> None:
    """A SuperLink on loopback, its fleet proxy (cap 1 MiB) on the veth, a SuperNode in the namespace, and
    32 peers there that keep sending 2 MiB chunked bodies (paced: ~1 MB/s each) until the round is over."""
    from fedsd.server import deploy

    summary, stop = tmp_path / "summary.json", tmp_path / "flood-stop"
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(APP_PYPROJECT)
    (app / "rt_client.py").write_text(APP_CLIENT)
    (app / "rt_server.py").write_text(APP_SERVER.replace("SUMMARY", repr(str(summary))))
    home, port = tmp_path / "flwr", procs.port()
    deploy.write_flwr_home(home, f"127.0.0.1:{port}", insecure=True)
    superlink = procs.adopt(
        deploy.start_superlink(home, "127.0.0.1", port, log_path=tmp_path / "superlink.log")
    )
    launch.wait_for_port("127.0.0.1", port, timeout=60, process=superlink.managed)
    edge = launch.free_port(ns.host_ip)
    proxy = procs.adopt(
        deploy.start_fleet_proxy(
            home, ns.host_ip, edge, port, log_path=tmp_path / "proxy.log", limits=["--max-body", "1M"]
        )
    )
    launch.wait_for_port(ns.host_ip, edge, timeout=60, process=proxy.managed, what="the fleet proxy")
    flood = subprocess.Popen(
        [*ns.exec(), sys.executable, str(ROOT / "benchmarks" / "proxy_memory.py"), "--send", ns.host_ip, str(edge),
         "32", str(2 * CAP), str(stop), "0.05"], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        procs.start(
            "supernode",
            [
                *ns.exec(),
                launch.flower_bin("flower-supernode"),
                "--insecure",
                "--superlink",
                f"{ns.host_ip}:{edge}",
            ],
            environ=launch.flower_env(tmp_path / "device-home"),
        )
        run = subprocess.run(
            [launch.flower_bin("flwr"), "run", str(app), deploy.CONNECTION], env=launch.flower_env(home),
            cwd=tmp_path, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        procs.wait_until("the round to finish", summary.is_file, 150)
    finally:
        stop.touch()
        out, _ = flood.communicate(timeout=120)
    assert json.loads(summary.read_text()) == [42]  # the SuperNode's reply, through the proxy
    refused = json.loads(out)["over_cap"]
    assert sum(refused.values()) > 32 and set(refused) <= {
        "413",
        "ConnectionResetError",
        "BrokenPipeError",
    }, refused
    assert "request too large" in (tmp_path / "proxy.log").read_text()
