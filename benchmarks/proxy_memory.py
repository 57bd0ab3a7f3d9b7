"""Memory of the fleet proxy (fedsd/security/proxy.py) under concurrent over-cap bodies, before any authentication.

Issue 23, finding 3: the proxy read each body whole before comparing it with the cap (a 64 MiB body at a
1 MiB cap raised its RSS by 128 MiB). Now a body is streamed to the SuperLink in small chunks with the
cap counted while reading, so what the proxy holds grows with the number of connections, not with body
sizes. For each cap this script

1. starts a sink upstream (a stand-in SuperLink on loopback that reads and discards every body) and the
   real proxy process (``python -m fedsd.security.proxy --max-body CAP``) in front of it, plain HTTP;
2. warms the proxy up (a few fleet calls, one refused body), then resets its peak RSS (``clear_refs``);
3. has ``--senders`` peers stream chunked bodies of ``--body-factor`` × CAP each, all at once, and one
   ordinary fleet call while they stream;
4. reports RSS before, the peak during (``VmHWM``), after, and growth / cap (target: ≤ 2); then the same
   flood again ("again": its growth; near zero when the memory of the first is reused, not leaked).

The peers are one separate process (``--send``); ``--netns NAME --host IP`` runs it inside a network
namespace the caller made, reaching the proxy at IP (the tests do this; the proxy then sees a remote
peer). Without ``--netns`` everything stays on loopback.

    .venv/bin/python benchmarks/proxy_memory.py                    # caps 1M, 4M, 16M; 32 senders
    .venv/bin/python benchmarks/proxy_memory.py --caps 1M --senders 8 --body-factor 2
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common.provenance import Run, run_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 64 * 1024
FLEET = "/v1/fleet/push-messages"


# ----------------------------------------------------------------------------- the stand-in SuperLink
class _Sink(http.server.BaseHTTPRequestHandler):
    """Reads a body (Content-Length or chunked) and throws it away; answers ``ok <bytes>``."""

    protocol_version = "HTTP/1.1"

    def _body_size(self) -> int:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            total = 0
            while True:
                line = self.rfile.readline(1024)
                if not line:
                    raise ConnectionError("body ended early")
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline(1024)
                    return total
                left = size
                while left:
                    got = self.rfile.read(min(left, CHUNK))
                    if not got:
                        raise ConnectionError("body ended early")
                    left -= len(got)
                total += size
                self.rfile.readline(1024)
        left = total = int(self.headers.get("content-length") or 0)
        while left:
            got = self.rfile.read(min(left, CHUNK))
            if not got:
                raise ConnectionError("body ended early")
            left -= len(got)
        return total

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        try:
            size = self._body_size()
        except (ConnectionError, ValueError, OSError):
            self.close_connection = True
            return
        body = f"ok {size}".encode()
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


def start_sink() -> http.server.ThreadingHTTPServer:
    http.server.ThreadingHTTPServer.request_queue_size = 256  # all the proxy's upstream connections at once
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# ----------------------------------------------------------------------------- the proxy process
def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def reset_peak(pid: int) -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of ``pid``; False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def start_proxy(listen_host: str, upstream_port: int, cap: int, log: Path) -> tuple[subprocess.Popen, int]:
    from fedsd.process.launch import free_port, port_open

    port = free_port(listen_host)
    cmd = [sys.executable, "-m", "fedsd.security.proxy", "--listen", f"{listen_host}:{port}",
           "--upstream", f"http://127.0.0.1:{upstream_port}", "--max-body", str(cap)]  # fmt: skip
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ))
    deadline = time.monotonic() + 60
    while not port_open(listen_host, port, timeout=0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the proxy did not start; see {log}")
        time.sleep(0.05)
    return proc, port


# ----------------------------------------------------------------------------- the peers (--send)
def _status(sock: socket.socket) -> str:
    sock.settimeout(30)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError as e:
        return type(e).__name__
    line = data.split(b"\r\n", 1)[0].decode("latin-1")
    return line.split(" ")[1] if line.startswith("HTTP/1.1 ") else (line or "closed")


def send_over_cap(host: str, port: int, size: int, started: threading.Event, pause_s: float = 0.0) -> str:
    """One chunked body of ``size`` bytes, as fast as the proxy takes it; the reply's status (or how the
    connection ended: a 413 sent while we were still writing can arrive as a reset)."""
    piece = b"%x\r\n" % CHUNK + b"x" * CHUNK + b"\r\n"
    try:
        sock = socket.create_connection((host, port), timeout=30)
    except OSError as e:
        return type(e).__name__
    with sock:
        try:
            sock.sendall(f"POST {FLEET} HTTP/1.1\r\nHost: fleet\r\nTransfer-Encoding: chunked\r\n"
                         "Content-Type: application/protobuf\r\n\r\n".encode())  # fmt: skip
            sent = 0
            while sent < size:
                sock.sendall(piece)
                sent += CHUNK
                started.set()
                if pause_s:
                    time.sleep(pause_s)
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass
        return _status(sock)


def fleet_call(host: str, port: int, body: bytes) -> dict[str, Any]:
    """An ordinary, small fleet request; its status and reply."""
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(f"POST {FLEET} HTTP/1.1\r\nHost: fleet\r\nContent-Length: {len(body)}\r\n"
                     "Content-Type: application/protobuf\r\nConnection: close\r\n\r\n".encode() + body)  # fmt: skip
        sock.settimeout(30)
        data = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1].decode() if head.startswith(b"HTTP/1.1 ") else "none"
    return {"status": status, "body": payload.decode("latin-1")[:200]}


def peers(
    host: str, port: int, senders: int, size: int, until: Path | None = None, pause_s: float = 0.0
) -> dict[str, Any]:
    """``senders`` over-cap bodies at once, and one fleet call once they all stream. With ``until``,
    each sender starts another body after each refusal until that file exists; ``pause_s`` between
    64 KiB pieces paces each sender."""
    events = [threading.Event() for _ in range(senders)]
    results: list[str] = []

    def run(i: int) -> None:
        while True:
            results.append(send_over_cap(host, port, size, events[i], pause_s))
            if until is None or until.exists():
                return

    threads = [threading.Thread(target=run, args=(i,)) for i in range(senders)]
    for t in threads:
        t.start()
    for e in events:
        e.wait(timeout=60)
    fleet = fleet_call(host, port, b"fleet request during the flood")
    for t in threads:
        t.join(timeout=120)
    counts: dict[str, int] = {}
    for r in results:
        counts[r] = counts.get(r, 0) + 1
    return {"over_cap": counts, "fleet": fleet}


# ----------------------------------------------------------------------------- one measurement
def _flood(proc: subprocess.Popen, cmd: list[str]) -> tuple[int, int, int, dict[str, Any]]:
    """One flood: RSS before, peak during, after (KiB), and what the peers saw."""
    before = rss_kib(proc.pid)
    exact = reset_peak(proc.pid)
    samples = [before]
    flood = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    while flood.poll() is None:  # sampling backs up VmHWM where clear_refs is not allowed
        samples.append(rss_kib(proc.pid))
        time.sleep(0.01)
    out, _ = flood.communicate(timeout=60)
    if flood.returncode != 0:
        raise RuntimeError(f"the peers failed (exit {flood.returncode})")
    time.sleep(0.3)
    peak = max(max(samples), rss_kib(proc.pid, "VmHWM")) if exact else max(samples)
    return before, peak, rss_kib(proc.pid), json.loads(out)


def measure(
    cap: int, senders: int, factor: int, *, netns: str | None, host: str | None, work: Path
) -> dict[str, Any]:
    """The first flood (what the target is about), then the same flood again: its growth shows whether
    memory is reused (allocator high-water mark) or keeps growing."""
    sink = start_sink()
    listen = host or "127.0.0.1"
    proc, port = start_proxy(listen, sink.server_address[1], cap, work / f"proxy-{cap}.log")
    prefix = ["ip", "netns", "exec", netns] if netns else []
    send = [*prefix, sys.executable, __file__, "--send", listen, str(port)]
    try:
        # warm-up: the code paths of a forwarded call and a refused body are loaded before measuring
        subprocess.run([*send, "2", str(2 * cap)], check=True, capture_output=True, timeout=120)
        time.sleep(0.3)
        before, peak, after, result = _flood(proc, [*send, str(senders), str(factor * cap)])
        before2, peak2, _after2, _ = _flood(proc, [*send, str(senders), str(factor * cap)])
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()
        sink.shutdown()
        sink.server_close()
    growth = max(peak - before, 0) * 1024
    return {
        "cap_bytes": cap, "senders": senders, "body_bytes_each": factor * cap, "rss_before_kib": before,
        "rss_peak_kib": peak, "rss_after_kib": after, "growth_bytes": growth, "growth_over_cap": growth / cap,
        "again_growth_bytes": max(peak2 - before2, 0) * 1024,
        "over_cap_outcomes": result["over_cap"], "fleet_during_flood": result["fleet"],
    }  # fmt: skip


def _size(text: str) -> int:
    from fedsd.security.proxy import _size as parse

    return parse(text)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--caps", default="1M,4M,16M", help="comma-separated --max-body values")
    p.add_argument("--senders", type=int, default=32, help="concurrent over-cap bodies")
    p.add_argument("--body-factor", type=int, default=4, help="each body is this many times the cap")
    p.add_argument(
        "--netns", help="send from this network namespace (with --host: the proxy's address there)"
    )
    p.add_argument("--host", help="address the proxy listens on (default 127.0.0.1)")
    p.add_argument("--work", type=Path, default=Path("runs/proxy_memory"), help="logs go here")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "proxy_memory.json")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def body(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    if bool(args.netns) != bool(args.host):
        raise SystemExit("--netns and --host go together")
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for cap in (_size(c) for c in args.caps.split(",")):
        run.log(f"cap {cap} bytes: {args.senders} senders × {args.body_factor * cap} bytes")
        rows.append(
            measure(cap, args.senders, args.body_factor, netns=args.netns, host=args.host, work=args.work)
        )
    header = f"{'cap':>9} {'senders':>7} {'body each':>10} {'RSS before':>11} {'peak':>9} {'after':>9} "
    header += f"{'growth':>9} {'growth/cap':>10} {'again':>8}  fleet call during flood"
    print(header)
    for r in rows:
        print(f"{r['cap_bytes'] / 2**20:>7.1f}Mi {r['senders']:>7} {r['body_bytes_each'] / 2**20:>8.1f}Mi "
              f"{r['rss_before_kib'] / 1024:>9.1f}Mi {r['rss_peak_kib'] / 1024:>7.1f}Mi {r['rss_after_kib'] / 1024:>7.1f}Mi "
              f"{r['growth_bytes'] / 2**20:>7.2f}Mi {r['growth_over_cap']:>10.2f} {r['again_growth_bytes'] / 2**20:>6.2f}Mi"
              f"  {r['fleet_during_flood']['status']}")  # fmt: skip
    config = {
        "caps": args.caps,
        "senders": args.senders,
        "body_factor": args.body_factor,
        "netns": bool(args.netns),
    }
    return run.write(args.out, {"rows": rows}, config=config, args=args)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--send"]:  # the peers' process
        host, port, n, size = args[1], int(args[2]), int(args[3]), int(args[4])
        until = Path(args[5]) if len(args) > 5 else None
        pause_s = float(args[6]) if len(args) > 6 else 0.0
        print(json.dumps(peers(host, port, n, size, until, pause_s)))
        return {}
    return run_main(__file__, argv, parse, body)


if __name__ == "__main__":
    main()
