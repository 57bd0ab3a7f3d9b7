"""Supervise a device's Flower SuperNode: start it, report each round, stop it when the run is over.

Why a supervisor: `flower-supernode` never exits by itself — not when the run ends, not when the
SuperLink is gone (it gives up reconnecting and idles). So `fedsd client run` starts it in its own
process group and watches three things:

- the device's event log (one JSON line per message the ClientApp handled, written by
  ``fedsd.clients.app.log_event``): each line is reported; a ``done`` event (the server's
  ``query.done`` at the end of the run) ends the session with exit code 0;
- the server: a TCP connect to HOST:PORT every few seconds; unreachable for ``server_timeout``
  seconds ends the session with exit code 3;
- the SuperNode itself: a SuperNode exits when a restarted SuperLink does not know its node id (a
  server restarted with `fedsd server start --resume` has a fresh SuperLink); after a while up it is
  restarted (a new node registers and the resumed run picks it up). One that dies soon after its
  start, or too often, ends the session with exit code 1 and its log tail.

SIGINT/SIGTERM end the session too (exit code 130). Every way out stops the SuperNode (SIGTERM to its
process group, SIGKILL after a timeout), so no `flwr-clientapp` is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsd.server.deploy import (
    ManagedProcess,
    config_arg,
    flower_bin,
    flower_env,
    free_port,
    join_address,
    parse_address,
    port_open,
)

EXIT_DONE = 0
EXIT_SUPERNODE_FAILED = 1
EXIT_SERVER_GONE = 3
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
) -> ManagedProcess:
    """`flower-supernode --insecure` connected to ``superlink`` (HOST:PORT), with its own Runtime API
    port (several SuperNodes on one host each need one)."""
    cmd = [
        flower_bin("flower-supernode"),
        "--superlink",
        superlink,
        "--insecure",
        "--node-config",
        config_arg(node_config),
        "--host",
        "127.0.0.1",
        "--port",
        str(local_port),
    ]
    return ManagedProcess("flower-supernode", cmd, env=flower_env(flwr_home), log_path=log_path, cwd=cwd)


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


def _fmt_exits(values: Any) -> str:
    if not isinstance(values, dict) or not values:
        return "-"
    return ", ".join(f"exit {k} {float(v):.3f}" for k, v in sorted(values.items(), key=lambda kv: int(kv[0])))


def describe_event(ev: dict[str, Any]) -> str:
    """One readable line for an event-log entry."""
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
        return (
            f"{rnd}trained exit(s) {exits} on {ev.get('n_utterances')} utterances ({labelled} labelled), "
            f"loss {float(ev.get('loss', 0.0)):.3f}{uar}; {secs}, "
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
    server_timeout: float = 60.0
    probe_every_s: float = 2.0
    poll_s: float = 0.5
    done_grace_s: float = 3.0
    """After ``done``, time for the SuperNode to send the reply before it is stopped."""
    stop_timeout_s: float = 10.0
    max_restarts: int = 5
    min_uptime_s: float = 10.0
    """A SuperNode that dies sooner than this after its start is broken, not disconnected."""


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
        self._signal: str | None = None

    # ------------------------------------------------------------------ pieces
    def start(self) -> ManagedProcess:
        self.session_dir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.events_path.touch()
        node_config = {**self.settings.node_config, "events": str(self.events_path.resolve())}
        local_port = free_port("127.0.0.1")
        self._started_at = time.monotonic()
        self.node = start_supernode(
            join_address(self.host, self.port),
            node_config,
            local_port=local_port,
            flwr_home=self.flwr_home,
            log_path=self.log_path,
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

    def stop(self) -> None:
        if self.node is not None:
            self.node.stop(timeout=self.settings.stop_timeout_s)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signal = signal.Signals(signum).name

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        """Start the SuperNode and supervise it until done, server gone, crash or signal."""
        handlers = {}
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
        assert self.node is not None
        s = self.settings
        last_reachable = time.monotonic()
        next_probe = 0.0
        warned = False
        while True:
            if self._signal is not None:
                self.on_status("warning", f"{self._signal}: stopping the SuperNode")
                return EXIT_INTERRUPTED
            if any(ev.get("kind") == "done" for ev in self.poll_events()):
                deadline = time.monotonic() + s.done_grace_s
                while time.monotonic() < deadline and self._signal is None and self.node.alive():
                    time.sleep(0.1)
                return EXIT_DONE
            if not self.node.alive():
                code = self.node.returncode
                uptime = time.monotonic() - self._started_at
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
                    continue
                self.on_status(
                    "error",
                    f"flower-supernode exited with code {code} after {uptime:.0f} s; last lines of "
                    f"{self.log_path}:\n{self.node.tail()}",
                )
                return EXIT_SUPERNODE_FAILED
            now = time.monotonic()
            if now >= next_probe:
                next_probe = now + s.probe_every_s
                if port_open(self.host, self.port, timeout=min(1.0, s.probe_every_s)):
                    if warned:
                        self.on_status("info", f"server {s.server} is reachable again")
                    warned = False
                    last_reachable = time.monotonic()
                else:
                    down = time.monotonic() - last_reachable
                    if down >= s.server_timeout:
                        self.on_status(
                            "error",
                            f"server {s.server} unreachable for {down:.0f} s (--server-timeout "
                            f"{s.server_timeout:g}): stopping",
                        )
                        return EXIT_SERVER_GONE
                    if not warned:
                        self.on_status(
                            "warning",
                            f"server {s.server} is not reachable; waiting up to {s.server_timeout:g} s",
                        )
                        warned = True
            time.sleep(s.poll_s)


def default_session_dir(cache_dir: Path) -> Path:
    """``<cache>/sessions/<UTC time>-<pid>``: one directory per `fedsd client run`."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return cache_dir / "sessions" / f"{stamp}-{os.getpid()}"
