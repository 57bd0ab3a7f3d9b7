"""`fedsd server start`: prepare a run, start a Flower SuperLink, submit the federated run, report it.

What it does, in order (each step says what it did):
1. load the config; prepare data, partition, base model and one manifest per device
   (`fedsd.server.prepare.prepare_run`; with --resume, reuse what the run directory already holds);
2. print each device's manifest with a ready-to-paste `fedsd client run ...` line;
3. write ``OUT/spec.json`` (the whole run spec), a private FLWR_HOME in ``OUT/.flwr`` with a SuperLink
   connection ``fedsd`` (TLS with ``--tls-dir``'s ca.pem, or plain HTTP with ``--insecure``) and a
   code-free Flower app dir ``OUT/.flwr/app`` (every process imports the installed `fedsd`);
4. start `flower-superlink` on 127.0.0.1 and a free port (log: ``OUT/.flwr/superlink.log``), then the
   fleet proxy on ``--host:--port`` (``fedsd.security.proxy``, log ``OUT/.flwr/proxy.log``): devices reach only
   the Fleet API, the Control API stays on loopback; with ``--auth`` register the ``--node-key`` public
   keys (more with `fedsd server register-node KEY.pub --out OUT`);
5. `flwr run OUT/.flwr/app fedsd --stream --run-config spec-file=...`, stream its output;
6. ask the SuperLink for the run's real outcome (`flwr ls --format json`; the exit code of
   `flwr run` is not it), stop the SuperLink, exit 0 only on ``finished:completed``.

The orchestration lives in :class:`fedsd.server.service.Server` (``api.Server``); these commands parse
flags, call it and print. Signal handling stays here: SIGINT/SIGTERM become KeyboardInterrupt, the
clean-up (``Server.stop``) always runs to its end, and a late signal cannot kill the exiting process.
"""

from __future__ import annotations

import argparse
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fedsd.cli.errors import ExitCode, fail
from fedsd.cli.output import Output, console, err_console, json_option, json_output
from fedsd.cli.overrides import SET_HELP, parse_set
from fedsd.server.service import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NO_DEVICES,
    PREVIOUS_RUN_FILES,
    DeviceSlot,
    Server,
    ServerError,
    ServerSummary,
    register_device_key,
    set_aside_previous_run,
)
from fedsd.tracking import MLFLOW_HELP, TENSORBOARD_HELP, TrackingError, tracking_overrides

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_NO_DEVICES", "PREVIOUS_RUN_FILES", "app",
           "set_aside_previous_run"]  # fmt: skip

app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich")

_STYLES = {"warn": "yellow", "ok": "green"}


def _log(message: str, level: str = "info") -> None:
    """The Server's progress messages (a log: stderr), coloured by level."""
    style = _STYLES.get(level)
    text = escape(message)
    err_console.print(f"[{style}]{text}[/]" if style else text, highlight=False, soft_wrap=True)


def _output(line: str) -> None:
    """A line of `flwr run --stream` (the ServerApp's log, with its colours: stderr)."""
    err_console.print(Text.from_ansi(line), soft_wrap=True)


# ----------------------------------------------------------------------------- signals
_INTERRUPTED: list[int] = []  # the signal that started a shutdown (the process is on its way out)


def _raise_interrupt(signum: int, _frame: Any) -> None:
    _shield_cleanup()  # only the first signal interrupts; the clean-up it starts runs to its end
    _INTERRUPTED.append(signum)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _still_stopping(signum: int, _frame: Any) -> None:
    name = signal.Signals(signum).name
    err_console.print(f"[yellow]{name}: already stopping the server, please wait[/]")


def _shield_cleanup() -> None:
    """From here on SIGINT/SIGTERM are noted, not raised: the clean-up (stopping the SuperLink and its
    helpers) always runs to its end; the handlers of before the command come back after it."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _still_stopping)


@contextmanager
def _signals_end_the_run() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt inside the block (an `&` job of a script starts with
    SIGINT ignored: re-arm it); afterwards the earlier handlers come back — unless a signal ended the
    run: then further signals are ignored at the OS level. A Python handler would be reset to the
    default during interpreter shutdown, so a late Ctrl-C then killed the exiting process by SIGINT
    (exit -2 instead of 130)."""
    _INTERRUPTED.clear()
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_IGN if _INTERRUPTED else handler)


# ----------------------------------------------------------------------------- printing
def _print_devices(devices: list[DeviceSlot]) -> None:
    if not devices:
        return
    table = Table(title="devices", title_justify="left")
    for col in ("device", "manifest", "utterances", "labelled", "suggested exit"):
        table.add_column(col)
    for d in devices:
        table.add_row(d.name, str(d.manifest), str(d.utterances), str(d.labelled), str(d.exit))
    console.print(table)
    console.print("start each device with (add --model DIR if it already has the base model):")
    for d in devices:
        console.print(f"  [bold]{escape(d.command)}[/]", soft_wrap=True, highlight=False)


def _print_summary(summary: ServerSummary) -> None:
    recs = summary.metrics
    if recs:
        exits = sorted(
            {int(k[4 : k.index("/")]) for r in recs for k in r if k.startswith("exit") and k.endswith("/uar")}
        )
        table = Table(title="UAR on the server's unseen speakers", title_justify="left")
        table.add_column("round")
        for k in exits:
            table.add_column(f"exit {k}", justify="right")
        for r in recs:
            table.add_row(str(r.get("round")), *[f"{r.get(f'exit{k}/uar', float('nan')):.3f}" for k in exits])
        console.print(table)
    if summary.completed:
        console.print(f"[bold green]{escape(summary.message)}[/]", highlight=False)
        return
    text = f"[bold red]{escape(summary.message)}[/]" + (f"\n{escape(summary.hint)}" if summary.hint else "")
    err_console.print(text, highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------- options
_Config = Annotated[Path, typer.Option("--config", "-c", help="Experiment YAML (see configs/).")]
_Host = Annotated[str, typer.Option("--host", help="Address the SuperLink binds (0.0.0.0: all).")]
_Port = Annotated[int, typer.Option("--port", "-p", min=1, max=65535, help="The SuperLink's one port.")]
_Rounds = Annotated[int | None, typer.Option("--rounds", min=1, help="Federated rounds (default: config).")]
_MinClients = Annotated[
    int | None,
    typer.Option("--min-clients", min=1, help="Devices needed to start and per round (default: config)."),
]
_Out = Annotated[Path | None, typer.Option("--out", "-o", help="Run directory (default runs/<name>-server).")]
_BaseModel = Annotated[
    Path | None,
    typer.Option("--base-model", help="Checkpoint to federate from (default: config, else trained here)."),
]
_Resume = Annotated[
    bool, typer.Option("--resume", help="Continue the run in --out from its last completed round.")
]
_TlsDir = Annotated[
    Path | None,
    typer.Option(
        "--tls-dir",
        help="Serve HTTPS with DIR/ca.pem, server.pem, server.key (make them: fedsd certs create).",
    ),
]
_Insecure = Annotated[
    bool,
    typer.Option("--insecure", help="Serve plain HTTP, unencrypted (loopback or a trusted network only)."),
]
_Auth = Annotated[
    bool,
    typer.Option(
        "--auth", help="Node authentication: only devices whose key is registered join (needs --tls-dir)."
    ),
]
_NodeKeys = Annotated[
    list[Path] | None,
    typer.Option(
        "--node-key",
        help="A device's KEY.pub to register once the SuperLink is up (with --auth; repeatable).",
    ),
]
_DeviceWait = Annotated[
    float,
    typer.Option(
        "--device-wait",
        min=1.0,
        help="Seconds to wait for --min-clients devices (at the start and before each round); "
        "then the server stops with exit code 3.",
    ),
]
_Set = Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE", help=SET_HELP)]
_Tensorboard = Annotated[Path | None, typer.Option("--tensorboard", metavar="DIR", help=TENSORBOARD_HELP)]
_MlflowUri = Annotated[str | None, typer.Option("--mlflow-uri", metavar="URI", help=MLFLOW_HELP)]
_ProxyMaxBody = Annotated[str | None, typer.Option(
    "--proxy-max-body", metavar="SIZE",
    help="Largest request body the fleet proxy takes from a device (64K, 512M, ...; 413 beyond).",
)]  # fmt: skip
_ProxyMaxConnections = Annotated[int | None, typer.Option(
    "--proxy-max-connections", min=1, help="Open device connections at the fleet proxy (503 beyond)."
)]  # fmt: skip
_Json = Annotated[
    bool, typer.Option("--json", help="Print the run's final summary as one JSON document; logs go to stderr.")
]


@app.command("start")
def start_command(
    config: _Config,
    host: _Host = "127.0.0.1",
    port: _Port = 8000,
    rounds: _Rounds = None,
    min_clients: _MinClients = None,
    out: _Out = None,
    base_model: _BaseModel = None,
    resume: _Resume = False,
    tls_dir: _TlsDir = None,
    insecure: _Insecure = False,
    auth: _Auth = False,
    node_keys: _NodeKeys = None,
    device_wait: _DeviceWait = 600.0,
    set_: _Set = None,
    tensorboard: _Tensorboard = None,
    mlflow_uri: _MlflowUri = None,
    proxy_max_body: _ProxyMaxBody = None,
    proxy_max_connections: _ProxyMaxConnections = None,
    json_: _Json = False,
) -> None:
    """Start the server of a federated run and wait for it to finish.

    Example: [bold]fedsd server start --config configs/demo.yaml --tls-dir certs --out runs/fed[/]
    Exit code 0 when the run completed, 3 when too few devices came within --device-wait, 130 when
    interrupted, 1 for any other failure.
    """
    max_body = _proxy_body(proxy_max_body)
    overrides = parse_set(set_) | _tracking(tensorboard, mlflow_uri)
    try:
        server = Server(
            config, out=out, host=host, port=port, rounds=rounds, min_clients=min_clients,
            proxy_max_body=max_body, proxy_max_connections=proxy_max_connections,
            base_model=base_model, resume=resume, tls_dir=tls_dir, insecure=insecure, auth=auth,
            node_keys=node_keys or [], device_wait=device_wait, overrides=overrides, log=_log, on_output=_output,
        )  # fmt: skip
    except ServerError as e:
        if e.code == EXIT_FAILED:
            _check_config(config, overrides)  # a config that does not load is a usage error, as everywhere
        fail(str(e), e.code)
    with json_output(json_) as output:
        code = _run(server, output)
    if code:
        raise typer.Exit(code)


def _proxy_body(size: str | None) -> int | None:
    """``--proxy-max-body 64K`` in bytes; an unreadable size is a usage error (exit 2)."""
    if size is None:
        return None
    from fedsd.security.proxy import _size

    try:
        return _size(size)
    except argparse.ArgumentTypeError as e:
        fail(f"--proxy-max-body {e}", ExitCode.USAGE)


def _check_config(config: Path, overrides: dict[str, Any]) -> None:
    """A missing or invalid config (with the overrides applied) is a usage error (exit 2), as on every
    command (``Server`` reports it as a failure, 1, after checking the security flags)."""
    from fedsd.config import ConfigError, load_config

    try:
        load_config(config, overrides)
    except ConfigError as e:
        fail(str(e), ExitCode.USAGE)


def _run(server: Server, output: Output) -> int:
    """Prepare, submit and wait for the run with SIGINT/SIGTERM turned into a clean stop; the exit code."""
    with _signals_end_the_run():
        try:
            devices = server.prepare()
            _print_devices(devices)
            server.submit()  # starts the SuperLink and the fleet proxy first
            summary = server.wait()
            _print_summary(summary)
            output.document({"devices": devices} | vars(summary))
            return summary.exit_code
        except ServerError as e:
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True, highlight=False)
            return e.code
        except KeyboardInterrupt as e:
            _shield_cleanup()  # a second Ctrl-C must not cut the clean-up short
            err_console.print(f"[yellow]{escape(str(e) or 'SIGINT')}: stopping the server[/]")
            return EXIT_INTERRUPTED
        finally:
            _shield_cleanup()
            server.stop()


def _tracking(tensorboard: Path | None, mlflow_uri: str | None) -> dict[str, Any]:
    """``--tensorboard`` / ``--mlflow-uri`` as ``log.*`` overrides; a missing package exits 2."""
    try:
        return tracking_overrides(tensorboard, mlflow_uri)
    except TrackingError as e:
        fail(str(e), ExitCode.USAGE)


@app.command("register-node")
def register_node_command(
    public_key: Path = typer.Argument(..., help="The device's KEY.pub (made by `fedsd client keygen`)."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Run directory of the running server: use its connection (OUT/.flwr)."
    ),
    host: str | None = typer.Option(None, "--host", help="Without --out: the server's address (127.0.0.1)."),
    port: int | None = typer.Option(
        None, "--port", "-p", min=1, max=65535, help="Without --out: the server's port (8000)."
    ),
    tls_dir: Path | None = typer.Option(
        None, "--tls-dir", help="Without --out: the server's --tls-dir (only its ca.pem is read)."
    ),
    json_: bool = json_option(),
) -> None:
    """Allow one device into a running server started with --auth (node authentication).

    Example: [bold]fedsd server register-node device-1.key.pub --out runs/fed[/]
    (or, from another shell on the server machine: [bold]--port 8000 --tls-dir certs[/])
    """
    try:
        reg = register_device_key(public_key, out=out, host=host, port=port, tls_dir=tls_dir)
    except ServerError as e:
        fail(str(e), e.code)
    with json_output(json_) as output:
        output.document(reg)
        console.print(
            f"[green]registered[/] {escape(str(reg.public_key))} with the server at {escape(reg.address)}: node "
            f"id {reg.node_id}; start that device with --auth-key {escape(str(reg.public_key.with_suffix('')))}",
            highlight=False,
            soft_wrap=True,
        )
