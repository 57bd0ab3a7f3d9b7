"""Transport and node-authentication checks of the server's options, and registering a device key.

Everything here runs before a process starts: a :class:`ServerError` with code 2 names the option that
does not fit (TLS files, certificate host names, node keys).
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsd.process import launch
from fedsd.server import deploy
from fedsd.server.service_types import EXIT_USAGE, Log, Registration, ServerError, log_to_logging

if TYPE_CHECKING:
    from fedsd.security.certs import TlsFiles


def client_host(host: str) -> str:
    """What a device should dial: the bind address, or this machine's name for a wildcard bind."""
    return socket.gethostname() if host in ("0.0.0.0", "::", "") else host


def check_security(
    tls_dir: Path | None,
    insecure: bool,
    auth: bool,
    node_keys: Iterable[Path],
    host: str,
    log: Log = log_to_logging,
) -> TlsFiles | None:
    """Check the transport/auth options before anything starts; a ServerError (code 2) says what does
    not fit. Returns the TLS files (None for ``insecure``)."""
    from fedsd.security.certs import SecurityError, check_tls_dir, load_certificate

    _check_flags(tls_dir, insecure, auth, list(node_keys))
    if tls_dir is None:
        return None
    try:
        files = check_tls_dir(tls_dir)
        cert = load_certificate(files.server_cert, "server certificate")
    except SecurityError as e:
        raise ServerError(str(e), 2) from None
    _check_hosts(files, cert, tls_dir, host, log)
    return files


def _check_flags(tls_dir: Path | None, insecure: bool, auth: bool, node_keys: list[Path]) -> None:
    """Options that contradict each other, and node keys that cannot be read."""
    from fedsd.security.certs import SecurityError, load_node_public_key

    if tls_dir is not None and insecure:
        raise ServerError(
            "--tls-dir and --insecure contradict each other: give one (--tls-dir serves HTTPS)", 2
        )
    if tls_dir is None and not insecure:
        raise ServerError(deploy.TLS_MISSING, 2)
    if auth and tls_dir is None:
        raise ServerError(
            "--auth (node authentication) needs TLS: give --tls-dir DIR (make one with `fedsd certs "
            "create --out DIR`); Flower refuses node authentication over plain HTTP",
            2,
        )
    if node_keys and not auth:
        raise ServerError("--node-key registers device keys for node authentication: add --auth", 2)
    for key in node_keys:
        try:
            load_node_public_key(key)
        except SecurityError as e:
            raise ServerError(f"--node-key {e}", 2) from None


def _check_hosts(files: TlsFiles, cert: Any, tls_dir: Path, host: str, log: Log) -> None:
    """The server certificate must name loopback (the SuperLink's own clients) and ``host``; a warning
    when it does not name the host devices are told to dial."""
    from fedsd.security.certs import certificate_hosts, covers_host

    names = ", ".join(certificate_hosts(cert)) or "no host"

    def remake(who: str, needed: str) -> ServerError:
        return ServerError(
            f"{files.server_cert} names {names}, but {who}: make certificates that name it, "
            f"e.g. `fedsd certs create --out {tls_dir} --host {needed} --force`",
            2,
        )

    local = "127.0.0.1"  # the SuperLink binds loopback only; the fleet proxy faces the devices
    if not covers_host(cert, local):
        raise remake(f"Flower's own helper and the flwr CLI reach this SuperLink at {local}", local)
    if host not in ("0.0.0.0", "::", "") and not covers_host(cert, host):
        raise remake(f"devices reach this server at {host} (--host)", host)
    remote = client_host(host)
    if not covers_host(cert, remote):
        log(
            f"warning: {files.server_cert} names {names} but not {remote}: devices dialling {remote} "
            f"will refuse it — give them a name it holds, or remake the certificates with --host {remote}",
            "warn",
        )


def checked_key(public_key: str | os.PathLike[str]) -> Path:
    from fedsd.security.certs import SecurityError, load_node_public_key

    try:
        load_node_public_key(Path(public_key))
    except SecurityError as e:
        raise ServerError(str(e), EXIT_USAGE) from None
    return Path(public_key).expanduser().resolve()


def register_device_key(
    public_key: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None = None,
    host: str | None = None,
    port: int | None = None,
    tls_dir: str | os.PathLike[str] | None = None,
) -> Registration:
    """Register a device's KEY.pub with a server running elsewhere (another process): through its run
    directory ``out`` (its ``.flwr`` connection), or its ``host``/``port`` and ``tls_dir`` (only ca.pem
    is read). ServerError (code 2: options that do not fit; 1: no server, or it refused)."""
    import tomllib

    key = checked_key(public_key)
    if out is not None and (host is not None or port is not None or tls_dir is not None):
        raise ServerError(
            "give either --out (the server's run directory) or --host/--port/--tls-dir, not both", 2
        )
    with tempfile.TemporaryDirectory(prefix="fedsd-flwr-") as tmp:
        if out is not None:
            flwr_home = Path(out).expanduser().resolve() / ".flwr"
            config_path = flwr_home / "config.toml"
            if not config_path.is_file():
                raise ServerError(
                    f"--out {out}: no server connection there ({config_path} is missing); give the --out "
                    "of a running `fedsd server start`, or --port and --tls-dir"
                )
            conn = tomllib.loads(config_path.read_text(encoding="utf-8"))["superlink"][deploy.CONNECTION]
            if conn.get("insecure") or not conn.get("root-certificates"):
                raise ServerError(
                    f"the server of {out} serves plain HTTP (--insecure): node authentication needs "
                    "`fedsd server start --tls-dir DIR --auth`"
                )
            address = str(conn["address"])
        else:
            if tls_dir is None:
                raise ServerError(
                    "tell me which server: --out RUNDIR (its run directory), or --port PORT and --tls-dir "
                    "DIR (registration goes over TLS, verified with DIR/ca.pem)",
                    2,
                )
            ca = Path(tls_dir).expanduser().resolve() / "ca.pem"
            if not ca.is_file():
                raise ServerError(f"--tls-dir {tls_dir}: ca.pem is missing ({ca})", 2)
            address = launch.join_address(launch.connect_host(host or "127.0.0.1"), port or 8000)
            flwr_home = Path(tmp)
            deploy.write_flwr_home(flwr_home, address, insecure=False, root_certificates=ca)
        try:
            h, p = launch.parse_address(address)
            if not launch.port_open(h, p, timeout=2.0):
                raise ServerError(f"no server is listening at {address} (is `fedsd server start` running?)")
            node_id = deploy.register_node(flwr_home, key)
        except launch.DeployError as e:
            raise ServerError(str(e)) from None
    return Registration(key, node_id, address)
