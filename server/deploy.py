"""Deployment plumbing for `fedsd server start` and `fedsd client run`: Flower processes on real sockets.

What this module knows about flwr 1.42 (see DESIGN.md §4):
- `flower-superlink`/`flower-supernode` start `flower-superexec`, `flwr-serverapp` and `flwr-clientapp`
  by bare command name, so the environment's bin directory must lead PATH;
- the SuperLink would `uv sync` each app's dependencies (offline that fails): always
  `--disable-runtime-dependency-installation`;
- the `flwr` CLI reads its SuperLink connections from ``$FLWR_HOME/config.toml``; each server gets a
  private FLWR_HOME (also where Flower installs the app bundles it runs);
- `flwr run --stream` exits 0 even when the run failed: the outcome comes from `flwr ls --format json`;
- a SuperNode never exits by itself: whoever starts one must stop it;
- TLS is one set of flags on the SuperLink (`--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`, all
  three or none) and `--root-certificates CA.pem` on every client; the SuperLink's own
  `flower-superexec` dials it at loopback (a wildcard bind) or at the bind address, with TLS, so the
  server certificate must name that address (`fedsd certs create` always adds localhost/127.0.0.1);
- SuperNode authentication (`--enable-supernode-auth`, TLS only) refuses any SuperNode whose public key
  was not registered beforehand with `flwr supernode register KEY.pub <connection>` (Control API, same
  port, same TLS); registrations live in the SuperLink's state (in memory here: a restarted SuperLink
  needs them again).

Every child runs in its own process group, so stopping one (SIGTERM, then SIGKILL after a timeout)
also stops the helpers it spawned (superexec, serverapp, clientapp processes). On Linux every child also
runs under `fedsd.processes`' guard (parent-death signal + child subreaper): a SIGKILLed `fedsd server
start` or `fedsd client run` leaves no Flower process behind.
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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsd import processes as _processes

if TYPE_CHECKING:
    from fedsd.security import TlsFiles

CONNECTION = "fedsd"
"""Name of the SuperLink connection in the server's private ``$FLWR_HOME/config.toml``."""

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}

TLS_MISSING = (
    "choose how devices reach this server: --tls-dir DIR serves HTTPS with the certificates in DIR "
    "(make them with `fedsd certs create --out DIR --host <this machine's name or IP>`), or --insecure "
    "serves plain HTTP, unencrypted (loopback or a trusted network only)."
)
"""Neither --tls-dir nor --insecure given to `fedsd server start`."""

TLS_MISSING_CLIENT = (
    "choose how this device reaches the server: --root-cert CA.pem verifies the server's TLS "
    "certificate (the ca.pem of the server's --tls-dir, copied to this device), or --insecure talks "
    "plain HTTP, unencrypted (only to a server started with --insecure, on loopback or a trusted network)."
)
"""Neither --root-cert nor --insecure given to `fedsd client run`."""

_RUN_ID = re.compile(r"Successfully started run (\d+)")


class DeployError(RuntimeError):
    """A deployment step failed; the message says which and what to look at."""


# ----------------------------------------------------------------------------- environment
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


# ----------------------------------------------------------------------------- sockets
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


# ----------------------------------------------------------------------------- TOML bits
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


def write_flwr_home(
    home: Path, address: str, *, insecure: bool = True, root_certificates: Path | None = None
) -> Path:
    """A private FLWR_HOME whose config.toml has one SuperLink connection, ``fedsd``, as the default.

    With ``root_certificates`` (a CA PEM) the `flwr` CLI talks TLS and verifies the SuperLink against
    it; otherwise ``insecure`` must be True (plain HTTP).
    """
    if root_certificates is None and not insecure:
        raise ValueError("write_flwr_home: give root_certificates for TLS, or insecure=True")
    home.mkdir(parents=True, exist_ok=True)
    lines = [
        "[superlink]",
        f"default = {toml_value(CONNECTION)}",
        "",
        f"[superlink.{CONNECTION}]",
        f"address = {toml_value(address)}",
    ]
    if root_certificates is not None:
        lines.append(f"root-certificates = {toml_value(str(Path(root_certificates).resolve()))}")
    else:
        lines.append("insecure = true")
    path = home / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_app_dir(app_dir: Path) -> Path:
    """A minimal Flower app directory: only a pyproject naming our components.

    The bundle Flower builds from it carries no code, so every process imports the `fedsd` installed in
    its environment — this works from a regular (non-editable) install as well as from a checkout.
    """
    from fedsd import __version__

    app_dir.mkdir(parents=True, exist_ok=True)
    text = f"""# Written by `fedsd server start`: the Flower app bundle submitted with `flwr run`.
[project]
name = "fedsd"
version = "{__version__}"
description = "fedsd federated run (code comes from the installed fedsd package)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedsd"

[tool.flwr.app.components]
serverapp = "fedsd.server.app:app"
clientapp = "fedsd.clients.app:app"

[tool.flwr.app.config]
spec-file = ""
"""
    (app_dir / "pyproject.toml").write_text(text, encoding="utf-8")
    return app_dir


# ----------------------------------------------------------------------------- processes
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


# ----------------------------------------------------------------------------- the SuperLink side
def start_superlink(
    flwr_home: Path,
    host: str,
    port: int,
    *,
    log_path: Path,
    cwd: Path | None = None,
    database: Path | None = None,
    tls: TlsFiles | None = None,
    node_auth: bool = False,
) -> ManagedProcess:
    """`flower-superlink` on host:port (one port for Fleet, Control and Runtime APIs).

    ``tls``: serve HTTPS with these files (else plain HTTP, `--insecure`). ``node_auth``: only
    SuperNodes whose key was registered (:func:`register_node`) may connect; needs ``tls``.
    """
    if node_auth and tls is None:
        raise DeployError(
            "SuperNode authentication needs TLS (Flower refuses --enable-supernode-auth without it)"
        )
    if tls is None:
        security = ["--insecure"]
    else:
        security = [
            "--ssl-ca-certfile",
            str(tls.ca_cert),
            "--ssl-certfile",
            str(tls.server_cert),
            "--ssl-keyfile",
            str(tls.server_key),
        ]
        if node_auth:
            security.append("--enable-supernode-auth")
    cmd = [
        flower_bin("flower-superlink"),
        *security,
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    if database is not None:
        cmd += ["--database", str(database)]
    return ManagedProcess("flower-superlink", cmd, env=flower_env(flwr_home), log_path=log_path, cwd=cwd)


def start_fleet_proxy(
    flwr_home: Path,
    host: str,
    port: int,
    upstream_port: int,
    *,
    log_path: Path,
    tls: TlsFiles | None = None,
) -> ManagedProcess:
    """The device-facing port: `fedsd.proxy` on host:port passing only the Fleet API (and, from this
    machine only, the rest) to the SuperLink on 127.0.0.1:``upstream_port``; TLS on both legs with
    ``tls`` (towards devices with the server certificate, towards the SuperLink verified by the CA)."""
    scheme = "http" if tls is None else "https"
    cmd = [
        sys.executable,
        "-m",
        "fedsd.proxy",
        "--listen",
        join_address(host, port),
        "--upstream",
        f"{scheme}://127.0.0.1:{upstream_port}",
    ]
    if tls is not None:
        cmd += [
            "--certfile",
            str(tls.server_cert),
            "--keyfile",
            str(tls.server_key),
            "--cafile",
            str(tls.ca_cert),
        ]
    return ManagedProcess("fedsd fleet proxy", cmd, env=flower_env(flwr_home), log_path=log_path)


def submit_run(
    flwr_home: Path,
    app_dir: Path,
    run_config: Mapping[str, Any],
    *,
    on_line: Callable[[str], None],
    on_start: Callable[[ManagedProcess], None] | None = None,
    cwd: Path | None = None,
) -> tuple[int | None, int]:
    """`flwr run <app_dir> fedsd --stream --run-config ...`; streams its lines to ``on_line``.

    Returns (run id or None, exit code of `flwr run`). The exit code is not the run's outcome
    (use :func:`run_status`).
    """
    cmd = [
        flower_bin("flwr"),
        "run",
        str(app_dir),
        CONNECTION,
        "--stream",
        "--run-config",
        config_arg(run_config),
    ]
    proc = ManagedProcess("flwr run", cmd, env=flower_env(flwr_home), cwd=cwd, pipe=True)
    if on_start is not None:
        on_start(proc)
    run_id: int | None = None
    try:
        assert proc.proc.stdout is not None
        for line in proc.proc.stdout:
            line = line.rstrip("\n")
            if run_id is None:
                run_id = parse_run_id(line)
            on_line(line)
        code = proc.proc.wait()
    finally:
        proc.stop(timeout=5.0)
    return run_id, code


def parse_run_id(line: str) -> int | None:
    """The run id from `flwr run`'s "Successfully started run <id>" line, else None."""
    m = _RUN_ID.search(line)
    return int(m.group(1)) if m else None


def _flwr_json(flwr_home: Path, args: list[str], timeout: float = 30.0) -> dict[str, Any]:
    try:
        res = subprocess.run(
            [flower_bin("flwr"), *args, "--format", "json"],
            env=flower_env(flwr_home),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise DeployError(f"`flwr {' '.join(args)}` did not answer within {timeout:.0f} s") from None
    try:
        return json.loads(res.stdout)
    except json.JSONDecodeError:
        raise DeployError(
            f"`flwr {' '.join(args)}` gave no JSON (exit {res.returncode}): "
            f"{(res.stdout + res.stderr).strip()[-2000:]}"
        ) from None


def run_status(flwr_home: Path, run_id: int) -> dict[str, Any]:
    """The SuperLink's record of a run: {"status": "finished:completed", "status-details": ...}."""
    data = _flwr_json(flwr_home, ["ls", CONNECTION, "--run-id", str(run_id)])
    runs = data.get("runs") or []
    if not data.get("success", True) or not runs:
        raise DeployError(f"the SuperLink has no run {run_id}: {json.dumps(data)[:500]}")
    return dict(runs[0])


def wait_finished(flwr_home: Path, run_id: int, timeout: float = 30.0) -> dict[str, Any]:
    """Poll :func:`run_status` until the run is finished (the stream may end a little earlier).

    A poll that fails (e.g. `flwr ls` too slow to answer on a loaded machine) is retried until the
    deadline; only then does its :class:`DeployError` propagate.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = run_status(flwr_home, run_id)
        except DeployError:
            if time.monotonic() > deadline:
                raise
        else:
            if str(status.get("status", "")).startswith("finished") or time.monotonic() > deadline:
                return status
        time.sleep(1.0)


def stop_run(flwr_home: Path, run_id: int) -> None:
    """Best effort `flwr stop ID fedsd` (the run is marked stopped rather than left running)."""
    with contextlib.suppress(Exception):
        subprocess.run(
            [flower_bin("flwr"), "stop", str(run_id), CONNECTION],
            env=flower_env(flwr_home),
            capture_output=True,
            timeout=15,
            stdin=subprocess.DEVNULL,
        )


# ----------------------------------------------------------------------------- security
def register_node(flwr_home: Path, public_key: Path, *, timeout: float = 60.0) -> int:
    """Register a device's public key with the running SuperLink of ``flwr_home``'s connection
    (`flwr supernode register KEY.pub fedsd --format json`); returns the node id it assigned.

    Needed when the SuperLink runs with node authentication: it then refuses every SuperNode whose key
    was not registered. `flwr` exits 0 even when the SuperLink refused, so the JSON ``success`` decides.
    It runs in ``flwr_home`` so that `flwr` never sees (and migrates) a pyproject.toml of the caller's
    working directory.
    """
    cmd = [flower_bin("flwr"), "supernode", "register", str(public_key), CONNECTION, "--format", "json"]
    try:
        res = subprocess.run(
            cmd,
            env=flower_env(flwr_home),
            cwd=flwr_home,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise DeployError(f"`flwr supernode register` did not answer within {timeout:.0f} s") from None
    text = res.stdout.strip()
    try:
        data = json.loads(text[text.find("{") :]) if "{" in text else None
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise DeployError(
            f"`flwr supernode register {public_key}` gave no JSON (exit {res.returncode}): "
            f"{(res.stdout + res.stderr).strip()[-2000:]}"
        )
    if not data.get("success") or "node-id" not in data:
        reason = str(data.get("error-message") or json.dumps(data))
        reason = re.sub(r"^Using SuperLink: [^\n]*\n+", "", reason).strip()
        if "already in use" in reason:
            reason += " (this key is already registered with this server)"
        raise DeployError(f"the SuperLink did not register {public_key}: {reason}")
    return int(data["node-id"])


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
