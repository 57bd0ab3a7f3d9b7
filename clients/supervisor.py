"""Supervise a device's Flower SuperNode: start it, report each round, stop it when the run is over.

Why a supervisor: `flower-supernode` never exits by itself — not when the run ends, not when the
SuperLink is gone (it gives up reconnecting and idles). So `fedsd client run` starts it in its own
process group and watches three things:

- the device's event log (one JSON line per message the ClientApp handled, written by
  ``fedsd.clients.events.log_event``): each line is reported; a ``done`` event (the server's
  ``query.done`` at the end of the run) ends the session with exit code 0;
- the server: a TCP connect to HOST:PORT every few seconds; unreachable for ``server_timeout``
  seconds ends the session with exit code 3;
- the SuperNode itself: a SuperNode exits when a restarted SuperLink does not know its node id (a
  server restarted with `fedsd server start --resume` has a fresh SuperLink); after a while up it is
  restarted (a new node registers and the resumed run picks it up). One that dies soon after its
  start, or too often, ends the session with exit code 1 and its log tail.

- refusals: a SuperNode the server turns away exits at once with Flower's reason in its log. A TLS
  failure (the server's certificate does not verify against --root-cert, or the server speaks plain
  HTTP) or a server that wants node authentication from a device without a key ends the session with
  exit code 4 and a hint; a key the server does not know (yet) is tried again every few seconds for
  ``server_timeout`` seconds — the operator may still be registering it — then exit code 4.

SIGINT/SIGTERM (or ``request_stop`` from another thread, as ``Device.stop()`` does) end the session
too (exit code 130). Every way out stops the SuperNode (SIGTERM to its process group, SIGKILL after a
timeout), so no `flwr-clientapp` is left behind.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsd.clients import supernode_main
from fedsd.clients.runner import shim_env
from fedsd.process.launch import (
    ManagedProcess,
    config_arg,
    flower_bin,
    flower_env,
    free_port,
    join_address,
    parse_address,
    port_open,
)
from fedsd.security.untrusted import printable

TLS_MISSING_CLIENT = (
    "choose how this device reaches the server: --root-cert CA.pem verifies the server's TLS "
    "certificate (the ca.pem of the server's --tls-dir, copied to this device), or --insecure talks "
    "plain HTTP, unencrypted (only to a server started with --insecure, on loopback or a trusted network)."
)
"""Neither --root-cert nor --insecure given to `fedsd client run`."""

EXIT_DONE = 0
EXIT_SUPERNODE_FAILED = 1
EXIT_SERVER_GONE = 3
EXIT_REFUSED = 4
EXIT_INTERRUPTED = 130

EventHandler = Callable[[dict[str, Any]], None]
StatusHandler = Callable[[str, str], None]
"""(level, text) with level in {"info", "warning", "error"}."""


def start_supernode(
    superlink: str,
    node_config: dict[str, Any],
    *,
    local_port: int,
    flwr_home: Path,
    log_path: Path,
    cwd: Path | None = None,
    root_certificates: Path | None = None,
    auth_key: Path | None = None,
    runner_dir: Path | None = None,
    warm_worker: bool = False,
    heartbeat_s: float | None = None,
) -> ManagedProcess:
    """`flower-supernode` connected to ``superlink`` (HOST:PORT), with its own Runtime API port
    (several SuperNodes on one host each need one).

    ``runner_dir``: where to put fedsd's ``flwr-clientapp`` (first on the SuperNode's PATH), so every
    ClientApp it runs is the installed fedsd's and never code from the run's app bundle
    (``fedsd.clients.runner``). Defaults to ``flwr_home/bin``.

    TLS verified against ``root_certificates`` (a CA PEM) when given, else plain HTTP (`--insecure`);
    ``auth_key`` (OpenSSH EC private key, needs TLS) signs every request for node authentication.
    ``heartbeat_s``: the heartbeat interval the SuperNode announces (None: Flower's 30 s); the SuperLink
    gives up on a silent node after twice this (clients/supernode_main.py).
    """
    if auth_key is not None and root_certificates is None:
        raise ValueError("node authentication (auth_key) needs TLS (root_certificates)")
    security = (
        ["--insecure"] if root_certificates is None else ["--root-certificates", str(root_certificates)]
    )
    if auth_key is not None:
        security += ["--auth-supernode-private-key", str(auth_key)]
    args = [
        "--superlink",
        superlink,
        *security,
        "--node-config",
        config_arg(node_config),
        "--host",
        "127.0.0.1",
        "--port",
        str(local_port),
    ]
    if heartbeat_s is None or heartbeat_s == supernode_main.DEFAULT_S:
        cmd = [flower_bin("flower-supernode"), *args]
    else:
        cmd = supernode_main.command(supernode_main.check_interval(heartbeat_s), args)
    env = shim_env(flower_env(flwr_home), runner_dir or flwr_home / "bin", warm_worker=warm_worker)
    return ManagedProcess("flower-supernode", cmd, env=env, log_path=log_path, cwd=cwd)


def read_new_lines(path: Path, offset: int) -> tuple[list[str], int]:
    """Complete lines appended to ``path`` since ``offset`` (a partial last line waits for its newline)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    chunk = data[: end + 1]
    return chunk.decode("utf-8", "replace").splitlines(), offset + len(chunk)


_SSL_LINE = re.compile(r"\[SSL[^\]]*\][^\n]*")


def diagnose_refusal(
    log_text: str, *, root_certificates: Path | None = None, auth_key: Path | None = None, server: str = ""
) -> tuple[str, str] | None:
    """Why the server turned a SuperNode away, from the SuperNode's log: (kind, explanation) or None.

    kind is ``"tls"`` (no trusted TLS session), ``"auth-required"`` (the server wants node
    authentication, this device has no key) or ``"not-registered"`` (the server does not know the key).
    The markers are Flower 1.42's: "[code: 2001]" FLEET_SUPERNODE_REGISTRATION_DISABLED, "[code: 2004]"
    FLEET_NODE_ACTIVATION_FAILED (supercore/error/base.py), the ssl module's "[SSL: ...]" text.
    """
    if "[code: 2001]" in log_text:
        return (
            "auth-required",
            f"the server {server} only admits registered devices (node authentication) and this device has "
            "no key: make one with `fedsd client keygen --out KEY`, have the server operator register "
            "KEY.pub (`fedsd server register-node KEY.pub ...`), then start with --auth-key KEY",
        )
    if "[code: 2004]" in log_text:
        pub = f"{auth_key}.pub" if auth_key is not None else "KEY.pub"
        return (
            "not-registered",
            f"the server {server} does not know this device's key: its operator must register {pub} "
            f"(`fedsd server register-node {pub} --out RUNDIR`)",
        )
    ssl_line = _SSL_LINE.search(log_text)
    if ssl_line is None and "SSL/TLS handshake error" not in log_text:
        return None
    detail = ssl_line.group(0).strip() if ssl_line else "TLS handshake failed"
    if "CERTIFICATE_VERIFY_FAILED" in detail:
        return (
            "tls",
            f"the server's TLS certificate was not accepted ({detail}): --root-cert {root_certificates} "
            f"must be the ca.pem of the server's --tls-dir, and its certificate must name the host in "
            f"--server {server}",
        )
    return (
        "tls",
        f"no TLS session with the server {server} ({detail}); a server started with --insecure speaks "
        "plain HTTP — ask its operator for TLS (`fedsd server start --tls-dir DIR`)",
    )


def _fmt_exits(values: Any) -> str:
    if not isinstance(values, dict) or not values:
        return "-"
    return ", ".join(f"exit {k} {float(v):.3f}" for k, v in sorted(values.items(), key=lambda kv: int(kv[0])))


def describe_event(ev: dict[str, Any]) -> str:
    """One readable line for an event-log entry, safe for a terminal (control characters escaped:
    the entry holds server-sent text, e.g. an error that quotes a refused value)."""
    try:
        return printable(_describe_event(ev), 2000)
    except Exception as e:  # a malformed entry must not stop the supervisor
        return printable(f"unreadable event ({type(e).__name__}): {ev!r}", 2000)


def _describe_event(ev: dict[str, Any]) -> str:
    kind = ev.get("kind", "?")
    rnd = f"round {ev['round']}: " if "round" in ev else ""
    secs = f"{float(ev.get('seconds', 0.0)):.1f} s"
    if "error" in ev:
        return f"{rnd}{kind} failed after {secs}: {ev['error']}"
    if kind == "info":
        model = "has the model" if ev.get("has_model") else "no model yet (the server will send it)"
        return (
            f"handshake: exit {ev.get('exit')}, {ev.get('n_utterances')} utterances "
            f"({ev.get('n_labelled')} labelled), {model}"
        )
    if kind == "model":
        return f"received the base model → {ev.get('stored')} ({secs})"
    if kind == "train":
        exits = ", ".join(str(k) for k in ev.get("trained_exits", [])) or "-"
        labelled = ev.get("n_labelled", 0)
        uar = ""
        if ev.get("uar_before") or ev.get("uar_after"):
            uar = f"; local UAR before {_fmt_exits(ev.get('uar_before'))} → after {_fmt_exits(ev.get('uar_after'))}"
        dp = ""
        if "dp_epsilon" in ev:
            dp = (
                f"; DP ε = {float(ev['dp_epsilon']):.2f} so far (δ = {float(ev.get('dp_delta', math.nan)):g}, "
                f"σ = {float(ev.get('dp_noise_multiplier', math.nan)):.2f})"
            )
        return (
            f"{rnd}trained exit(s) {exits} on {ev.get('n_utterances')} utterances ({labelled} labelled), "
            f"loss {float(ev.get('loss', 0.0)):.3f}{uar}{dp}; {secs}, "
            f"cache {ev.get('cache_hits', 0)} hits / {ev.get('cache_misses', 0)} misses"
        )
    if kind == "evaluate":
        return f"{rnd}evaluated: UAR {_fmt_exits(ev.get('uar'))} ({secs})"
    if kind == "done":
        rounds = f" after {ev['rounds']} rounds" if "rounds" in ev else ""
        return f"the server says the run is over{rounds}"
    return f"{rnd}{kind} ({secs})"


@dataclass
class SupervisorSettings:
    server: str
    """The SuperLink as HOST:PORT."""
    node_config: dict[str, Any]
    """exit, device, data, root, model, cache (``events`` is added)."""
    session_dir: Path
    """Holds events.jsonl, supernode.log and the SuperNode's FLWR_HOME."""
    server_timeout: float = 300.0
    probe_every_s: float = 2.0
    poll_s: float = 0.5
    done_grace_s: float = 3.0
    """After ``done``, time for the SuperNode to send the reply before it is stopped."""
    stop_timeout_s: float = 10.0
    max_restarts: int = 5
    min_uptime_s: float = 10.0
    """A SuperNode that dies sooner than this after its start is broken, not disconnected."""
    root_certificates: Path | None = None
    """CA certificate the server's TLS certificate must verify against; None: plain HTTP."""
    auth_key: Path | None = None
    """OpenSSH EC private key for node authentication (needs ``root_certificates``)."""
    refused_retry_s: float = 5.0
    """Pause before trying again when the server does not know this device's key (yet)."""
    warm_worker: bool = False
    """Handle the SuperNode's messages in one long-lived worker (``FEDSD_WARM_WORKER=1``, clients/worker.py)."""
    heartbeat_s: float | None = None
    """Heartbeat interval the SuperNode announces (None: Flower's 30 s; 10 s at least)."""


@dataclass
class _ServerWatch:
    """What the supervisor knows of the server's reachability between two probes."""

    last_reachable: float
    next_probe: float = 0.0
    warned: bool = False


class Supervisor:
    """Runs one SuperNode session; :meth:`run` returns the exit code (see the module docstring)."""

    def __init__(
        self,
        settings: SupervisorSettings,
        on_event: EventHandler | None = None,
        on_status: StatusHandler | None = None,
    ) -> None:
        self.settings = settings
        self.on_event = on_event or (lambda ev: None)
        self.on_status = on_status or (lambda level, text: None)
        self.host, self.port = parse_address(settings.server)
        self.session_dir = settings.session_dir
        self.events_path = self.session_dir / "events.jsonl"
        self.log_path = self.session_dir / "supernode.log"
        self.flwr_home = self.session_dir / "flwr"
        self.node: ManagedProcess | None = None
        self.restarts = 0
        self._started_at = 0.0
        self.events: list[dict[str, Any]] = []
        self._offset = 0
        self._log_offset = 0
        self._refused_since: float | None = None
        self._signal: str | None = None

    # ------------------------------------------------------------------ pieces
    def start(self) -> ManagedProcess:
        self.session_dir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.events_path.touch()
        node_config = {**self.settings.node_config, "events": str(self.events_path.resolve())}
        local_port = free_port("127.0.0.1")
        self._started_at = time.monotonic()
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.node = start_supernode(
            join_address(self.host, self.port),
            node_config,
            local_port=local_port,
            flwr_home=self.flwr_home,
            log_path=self.log_path,
            root_certificates=self.settings.root_certificates,
            auth_key=self.settings.auth_key,
            warm_worker=self.settings.warm_worker,
            heartbeat_s=self.settings.heartbeat_s,
        )
        self.on_status(
            "info",
            f"SuperNode started (pid {self.node.pid}, local port {local_port}); log {self.log_path}",
        )
        return self.node

    def poll_events(self) -> list[dict[str, Any]]:
        lines, self._offset = read_new_lines(self.events_path, self._offset)
        new = []
        for line in lines:
            if not line.strip():
                continue
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.events.append(ev)
            new.append(ev)
            self.on_event(ev)
        return new

    def current_log(self) -> str:
        """What the current SuperNode wrote to the (shared, appended) log since it started."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._log_offset)
                return fh.read(1_000_000).decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self._signal is None:
            time.sleep(0.1)

    def stop(self) -> None:
        if self.node is not None:
            self.node.stop(timeout=self.settings.stop_timeout_s)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signal = signal.Signals(signum).name

    def request_stop(self, reason: str = "stop requested") -> None:
        """End the session from another thread as a signal would (exit code 130; the SuperNode is
        stopped by :meth:`run` on its way out)."""
        self._signal = reason

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        """Start the SuperNode and supervise it until done, server gone, crash or signal.

        In the main thread SIGINT/SIGTERM end the session; in any other thread (Python delivers signals
        to the main thread only) the owner ends it with :meth:`request_stop`."""
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self.start()
            return self._loop()
        finally:
            self.poll_events()
            self.stop()
            for sig, old in handlers.items():
                signal.signal(sig, old)

    def _loop(self) -> int:
        """Watch until the session ends: a signal, the ``done`` event, the SuperNode's exit, the server gone."""
        assert self.node is not None
        watch = _ServerWatch(last_reachable=time.monotonic())
        while True:
            if self._signal is not None:
                self.on_status("warning", f"{self._signal}: stopping the SuperNode")
                return EXIT_INTERRUPTED
            new_events = self.poll_events()
            if new_events:
                self._refused_since = None
            if any(ev.get("kind") == "done" for ev in new_events):
                return self._after_done()
            if not self.node.alive():
                code = self._after_node_exit()
                if code is not None:
                    return code
                continue  # a new SuperNode was started: watch it at once
            code = self._probe_server(watch)
            if code is not None:
                return code
            time.sleep(self.settings.poll_s)

    def _after_done(self) -> int:
        """The server's ``done``: give the SuperNode ``done_grace_s`` to send its reply."""
        assert self.node is not None
        deadline = time.monotonic() + self.settings.done_grace_s
        while time.monotonic() < deadline and self._signal is None and self.node.alive():
            time.sleep(0.1)
        return EXIT_DONE

    def _after_node_exit(self) -> int | None:
        """The SuperNode exited: a refusal, a server restart (start a new one: None) or a broken node."""
        assert self.node is not None
        s = self.settings
        code = self.node.returncode
        uptime = time.monotonic() - self._started_at
        refusal = diagnose_refusal(
            self.current_log(),
            root_certificates=s.root_certificates,
            auth_key=s.auth_key,
            server=s.server,
        )
        if refusal is not None:
            return self._after_refusal(*refusal)
        if self.restarts < s.max_restarts and uptime >= s.min_uptime_s:
            self.restarts += 1
            self.on_status(
                "warning",
                f"flower-supernode exited (code {code}) after {uptime:.0f} s — the server "
                f"probably restarted and no longer knows this device; starting a new SuperNode "
                f"({self.restarts}/{s.max_restarts})",
            )
            self.node.stop(timeout=s.stop_timeout_s)
            self.start()
            return None
        self.on_status(
            "error",
            f"flower-supernode exited with code {code} after {uptime:.0f} s; last lines of "
            f"{self.log_path}:\n{self.node.tail()}",
        )
        return EXIT_SUPERNODE_FAILED

    def _after_refusal(self, kind: str, why: str) -> int | None:
        """The server turned the SuperNode away: a key it does not know (yet) is tried again every
        ``refused_retry_s`` for ``server_timeout`` (None: started again); anything else ends the session."""
        assert self.node is not None
        s = self.settings
        now = time.monotonic()
        if kind == "not-registered":
            if self._refused_since is None:
                self._refused_since = now
            waited = now - self._refused_since
            if waited + s.refused_retry_s < s.server_timeout:
                self.on_status(
                    "warning",
                    f"refused: {why}; trying again in {s.refused_retry_s:g} s (for up to "
                    f"{s.server_timeout:g} s, --server-timeout)",
                )
                self.node.stop(timeout=s.stop_timeout_s)
                self._pause(s.refused_retry_s)
                if self._signal is None:
                    self.start()
                return None
        self.on_status("error", f"refused: {why} (SuperNode log: {self.log_path})")
        return EXIT_REFUSED

    def _probe_server(self, watch: _ServerWatch) -> int | None:
        """Every ``probe_every_s``: is the server reachable? Unreachable for ``server_timeout``: exit code 3."""
        s = self.settings
        now = time.monotonic()
        if now < watch.next_probe:
            return None
        watch.next_probe = now + s.probe_every_s
        if port_open(self.host, self.port, timeout=min(1.0, s.probe_every_s)):
            if watch.warned:
                self.on_status("info", f"server {s.server} is reachable again")
            watch.warned = False
            watch.last_reachable = time.monotonic()
            return None
        down = time.monotonic() - watch.last_reachable
        if down >= s.server_timeout:
            self.on_status(
                "error",
                f"server {s.server} unreachable for {down:.0f} s (--server-timeout {s.server_timeout:g}): stopping",
            )
            return EXIT_SERVER_GONE
        if not watch.warned:
            self.on_status(
                "warning", f"server {s.server} is not reachable; waiting up to {s.server_timeout:g} s"
            )
            watch.warned = True
        return None


def default_session_dir(cache_dir: Path) -> Path:
    """``<cache>/sessions/<UTC time>-<pid>[-n]``, created here: one new directory per session, also when
    one process runs several devices on one cache in the same second."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    sessions = cache_dir / "sessions"
    sessions.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        path = sessions / (f"{stamp}-{os.getpid()}" + (f"-{n}" if n > 1 else ""))
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise AssertionError("unreachable")
