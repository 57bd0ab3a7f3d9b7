"""Deployment plumbing for `fedsd server start` and `fedsd client run`: Flower processes on real sockets.

What this module knows about flwr 1.42 (see docs/architecture.md §4):
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
runs under `fedsd.process.lifetime`' guard (parent-death signal + child subreaper): a SIGKILLed `fedsd server
start` or `fedsd client run` leaves no Flower process behind.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsd.process.launch import (
    DeployError,
    ManagedProcess,
    config_arg,
    flower_bin,
    flower_env,
    join_address,
    toml_value,
)

if TYPE_CHECKING:
    from fedsd.security.certs import TlsFiles

CONNECTION = "fedsd"
"""Name of the SuperLink connection in the server's private ``$FLWR_HOME/config.toml``."""


TLS_MISSING = (
    "choose how devices reach this server: --tls-dir DIR serves HTTPS with the certificates in DIR "
    "(make them with `fedsd certs create --out DIR --host <this machine's name or IP>`), or --insecure "
    "serves plain HTTP, unencrypted (loopback or a trusted network only)."
)
"""Neither --tls-dir nor --insecure given to `fedsd server start`."""


_RUN_ID = re.compile(r"Successfully started run (\d+)")


# ----------------------------------------------------------------------------- TOML bits


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
serverapp = "fedsd.server.server_app:app"
clientapp = "fedsd.clients.client_app:app"

[tool.flwr.app.config]
spec-file = ""
"""
    (app_dir / "pyproject.toml").write_text(text, encoding="utf-8")
    return app_dir


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
    limits: Sequence[str] = (),
) -> ManagedProcess:
    """The device-facing port: `fedsd.security.proxy` on host:port passing only the Fleet API (and, from this
    machine only, the rest) to the SuperLink on 127.0.0.1:``upstream_port``; TLS on both legs with
    ``tls`` (towards devices with the server certificate, towards the SuperLink verified by the CA).
    ``limits``: the proxy's limit flags (``--max-body 1M``, ...; `python -m fedsd.security.proxy --help`)."""
    scheme = "http" if tls is None else "https"
    cmd = [
        sys.executable,
        "-m",
        "fedsd.security.proxy",
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
    cmd += list(limits)
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
