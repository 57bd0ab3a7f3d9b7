"""`fedsd certs create`: TLS certificates for `fedsd server start --tls-dir` (library: fedsd.security.certs).

Kept apart from the server commands because certificates are made once, often on another machine than
the one that runs the server, and copied: ``ca.pem`` to every device, the rest to the server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from fedsd.cli.errors import ExitCode, fail
from fedsd.cli.output import console, json_option, json_output

app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich")


@app.command("create")
def create_command(
    out: Path = typer.Option(
        ..., "--out", "-o", help="Directory for ca.pem, ca.key, server.pem, server.key."
    ),
    hosts: list[str] | None = typer.Option(
        None,
        "--host",
        help="A name or IP address devices dial to reach the server (repeatable); localhost, "
        "127.0.0.1 and ::1 are always included.",
    ),
    days: int = typer.Option(365, "--days", min=1, help="Validity of both certificates, in days."),
    force: bool = typer.Option(False, "--force", help="Replace certificates and keys already in --out."),
    json_: bool = json_option(),
) -> None:
    """Make a development CA and a server certificate signed by it.

    Example: [bold]fedsd certs create --out certs --host server.lan --host 192.168.1.20[/]
    then [bold]fedsd server start --tls-dir certs ...[/] and, on each device,
    [bold]fedsd client run --root-cert ca.pem ...[/] with a copy of certs/ca.pem.
    """
    from fedsd.security.certs import SecurityError, certificate_hosts, create_certificates, load_certificate

    try:
        files = create_certificates(out, hosts, days=days, force=force)
    except SecurityError as e:
        fail(str(e), ExitCode.USAGE if "--host" in str(e) or "--days" in str(e) else ExitCode.FAILURE)
    except OSError as e:
        fail(f"--out {out}: {e}")
    names = certificate_hosts(load_certificate(files.server_cert))
    with json_output(json_) as output:
        _print_files(files, names, days)
        output.document({"files": files, "hosts": names, "days": days})


def _print_files(files: Any, names: list[str], days: int) -> None:
    """Where each file went and what to do with it."""
    console.print(f"CA certificate:     {escape(str(files.ca_cert))}  (copy to every device: --root-cert)")
    console.print(
        f"CA key:             {escape(str(files.ca_key))}  (mode 0600; keep it off the server if you can)"
    )
    console.print(
        f"server certificate: {escape(str(files.server_cert))}  valid for {escape(', '.join(names))}"
    )
    console.print(f"server key:         {escape(str(files.server_key))}  (mode 0600)")
    console.print(
        f"valid for {days} days; start the server with [bold]--tls-dir {escape(str(files.ca_cert.parent))}[/]"
    )
