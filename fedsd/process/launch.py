"""Flower's commands as managed child processes: environment, addresses and process groups.

Shared by both sides: `fedsd server start` runs a SuperLink with these pieces and
`fedsd client run` a SuperNode, so neither imports the other's modules. What it knows about flwr 1.42:
the SuperLink and SuperNode start `flower-superexec`, `flwr-serverapp` and `flwr-clientapp` by bare
command name, so this environment's bin directory must lead PATH; every Flower process runs without
telemetry or update checks.

Every child runs in its own process group, so stopping one (SIGTERM, then SIGKILL after a timeout)
also stops the helpers it spawned. On Linux every child also runs under `fedsd.process.lifetime`' guard
(parent-death signal + child subreaper): a SIGKILLed parent leaves no Flower process behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedsd.process import lifetime as _processes

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


class DeployError(RuntimeError):
    """A deployment step failed; the message says which and what to look at."""


def bin_dir() -> Path:
    """The directory of this environment's console scripts (the venv's bin)."""
    return Path(sys.executable).parent


def flower_bin(name: str) -> str:
    """Absolute path of a Flower command from this environment (falls back to PATH)."""
    here = bin_dir() / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"`{name}` not found next to {sys.executable} nor on PATH; is flwr installed?")
    return found


def flower_env(flwr_home: Path | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: our bin first on PATH, no telemetry, a private FLWR_HOME."""
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    env["PATH"] = os.pathsep.join([str(bin_dir()), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env.update(extra or {})
    return env


def parse_address(address: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) → (host, port); a clear error for anything else."""
    text = address.strip()
    if "://" in text:
        raise DeployError(f"{address!r}: give HOST:PORT without a URL scheme, e.g. 127.0.0.1:8000")
    m = re.fullmatch(r"\[(?P<h6>[^\]]+)\](?::(?P<p6>\d+))?|(?P<h>[^:]+)(?::(?P<p>\d+))?", text)
    if not m:
        raise DeployError(f"{address!r}: expected HOST:PORT, e.g. 127.0.0.1:8000")
    host = m.group("h6") or m.group("h")
    port_text = m.group("p6") or m.group("p")
    if port_text is None:
        if default_port is None:
            raise DeployError(f"{address!r}: no port; expected HOST:PORT, e.g. {host}:8000")
        return host, default_port
    port = int(port_text)
    if not 0 < port < 65536:
        raise DeployError(f"{address!r}: port {port} is out of range")
    return host, port


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect_host(host: str) -> str:
    """Where a local client reaches a server bound to ``host`` (a wildcard bind → loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free right now (bind to port 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((connect_host(host), port), timeout=timeout):
            return True
    except OSError:
        return False


def port_free(host: str, port: int) -> bool:
    """True when a server could bind host:port now (nobody listens there; TIME_WAIT leftovers of a
    server that just stopped do not count, as servers bind with SO_REUSEADDR)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def probe_transport(host: str, port: int, timeout: float = 3.0) -> str | None:
    """What the server at host:port speaks: ``"tls"``, ``"plain"``, or None (unreachable/unclear).

    A TLS handshake without certificate verification: it only tells the two transports apart so a
    device configured for the other one fails at once with a clear message (a plain-HTTP SuperNode
    would otherwise retry a TLS server forever). Trust is still decided by Flower, against --root-cert.
    """
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        sock = socket.create_connection((connect_host(host), port), timeout=timeout)
    except OSError:
        return None
    try:
        with ctx.wrap_socket(sock, server_hostname=None) as tls:
            tls.do_handshake()
            return "tls"
    except ssl.SSLError:
        return "plain"
    except OSError:
        return None
    finally:
        sock.close()


def toml_value(value: Any) -> str:
    """A Python scalar as a TOML value (strings are JSON-escaped, which is valid TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def config_arg(values: Mapping[str, Any]) -> str:
    """``{"exit": 4, "device": "cpu"}`` → ``exit=4 device="cpu"`` (Flower's --node-config/--run-config)."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items() if v is not None)


descendants = _processes.descendants
"""Every live descendant of a pid (Linux /proc; empty elsewhere). Needed because Flower's helpers start
their own sessions (flower-superexec does), so signalling a process group does not reach them."""


_alive = _processes.alive


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


class ManagedProcess:
    """A child process in its own process group, output to a log file (or a pipe), stoppable as a group."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        *,
        env: Mapping[str, str],
        log_path: Path | None = None,
        cwd: Path | None = None,
        pipe: bool = False,
        guard: bool = True,
        grace_s: float = 8.0,
    ) -> None:
        self.name = name
        self.cmd = cmd
        self.guarded = guard and _processes.guard_available()
        self.log_path = log_path
        self._log = None
        stdout: Any = None
        if pipe:
            stdout = subprocess.PIPE
        elif log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
            stdout = self._log
        self.proc = subprocess.Popen(
            _processes.guarded(cmd, grace_s=grace_s) if self.guarded else cmd,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            text=pipe,
            bufsize=1 if pipe else -1,
        )
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process, its group and every descendant; SIGKILL what is left after
        ``timeout``; returns the exit code."""
        family = descendants(self.pid) if self.alive() else []
        if self.alive() or self._group_alive() or any(_alive(p) for p in family):
            self._signal_group(signal.SIGTERM)
            for p in family:
                _kill(p, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
            deadline = time.monotonic() + min(timeout, 3.0)
            while time.monotonic() < deadline and (self._group_alive() or any(_alive(p) for p in family)):
                time.sleep(0.1)
            if self.alive() or self._group_alive() or any(_alive(p) for p in family):
                self._signal_group(signal.SIGKILL)
                for p in family:
                    _kill(p, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=5.0)
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.poll()

    def tail(self, lines: int = 30) -> str:
        """The last lines of the log file (empty without one)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64_000))
            text = fh.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])


def wait_for_port(
    host: str, port: int, *, timeout: float, process: ManagedProcess | None = None, what: str = "server"
) -> None:
    """Block until host:port accepts connections; raise with the process log if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise DeployError(
                f"{process.name} exited with code {process.returncode} before {what} was up on "
                f"{join_address(host, port)}; last lines of {process.log_path}:\n{process.tail()}"
            )
        if port_open(host, port, timeout=0.5):
            return
        time.sleep(0.2)
    log_hint = f"; last lines of {process.log_path}:\n{process.tail()}" if process is not None else ""
    raise DeployError(f"{what} did not open {join_address(host, port)} within {timeout:.0f} s{log_hint}")
