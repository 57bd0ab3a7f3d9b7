"""`fedsd server start`: prepare a run, start a Flower SuperLink, submit the federated run, report it.

What it does, in order (each step says what it did):
1. load the config; prepare data, partition, base model and one manifest per device
   (`fedsd.server.prepare.prepare_run`; with --resume, reuse what the run directory already holds);
2. print each device's manifest with a ready-to-paste `fedsd client run ...` line;
3. write ``OUT/spec.json`` (the whole run spec), a private FLWR_HOME in ``OUT/.flwr`` with a SuperLink
   connection ``fedsd`` (TLS with ``--tls-dir``'s ca.pem, or plain HTTP with ``--insecure``) and a
   code-free Flower app dir ``OUT/.flwr/app`` (every process imports the installed `fedsd`);
4. start `flower-superlink` on 127.0.0.1 and a free port (log: ``OUT/.flwr/superlink.log``), then the
   fleet proxy on ``--host:--port`` (``fedsd.proxy``, log ``OUT/.flwr/proxy.log``): devices reach only
   the Fleet API, the Control API stays on loopback; with ``--auth`` register the ``--node-key`` public
   keys (more with `fedsd server register-node KEY.pub --out OUT`);
5. `flwr run OUT/.flwr/app fedsd --stream --run-config spec-file=...`, stream its output;
6. ask the SuperLink for the run's real outcome (`flwr ls --format json`; the exit code of
   `flwr run` is not it), stop the SuperLink, exit 0 only on ``finished:completed``.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fedsd import launch
from fedsd.server import deploy

if TYPE_CHECKING:
    from fedsd.security import TlsFiles

app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich")
console = Console()
err_console = Console(stderr=True)

EXIT_FAILED = 1
EXIT_NO_DEVICES = 3
"""Fewer than --min-clients devices were connected within --device-wait seconds."""
EXIT_INTERRUPTED = 130


def _fail(message: str, code: int = EXIT_FAILED) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def _say(message: str) -> None:
    console.print(escape(message), highlight=False, soft_wrap=True)


def _parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``--set federated.lr=0.01`` → ``{"federated.lr": 0.01}``; a malformed item exits 2."""
    from fedsd.config import ConfigError, parse_overrides

    try:
        return parse_overrides(items)
    except ConfigError as e:
        _fail(str(e), 2)
        raise  # unreachable: _fail exits


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


def _client_host(host: str) -> str:
    """What a device should dial: the bind address, or this machine's name for a wildcard bind."""
    return socket.gethostname() if host in ("0.0.0.0", "::", "") else host


def _security(
    tls_dir: Path | None, insecure: bool, auth: bool, node_keys: list[Path] | None, host: str
) -> TlsFiles | None:
    """Check the transport/auth flags before anything starts; exit 2 with the reason if they do not fit.

    Returns the TLS files (None for --insecure).
    """
    from fedsd.security import (
        SecurityError,
        certificate_hosts,
        check_tls_dir,
        covers_host,
        load_certificate,
        load_node_public_key,
    )

    if tls_dir is not None and insecure:
        _fail("--tls-dir and --insecure contradict each other: give one (--tls-dir serves HTTPS)", 2)
    if tls_dir is None and not insecure:
        _fail(deploy.TLS_MISSING, 2)
    if auth and tls_dir is None:
        _fail(
            "--auth (node authentication) needs TLS: give --tls-dir DIR (make one with `fedsd certs "
            "create --out DIR`); Flower refuses node authentication over plain HTTP",
            2,
        )
    if node_keys and not auth:
        _fail("--node-key registers device keys for node authentication: add --auth", 2)
    for key in node_keys or []:
        try:
            load_node_public_key(key)
        except SecurityError as e:
            _fail(f"--node-key {e}", 2)
    if tls_dir is None:
        return None
    try:
        files = check_tls_dir(tls_dir)
        cert = load_certificate(files.server_cert, "server certificate")
    except SecurityError as e:
        _fail(str(e), 2)
    names = certificate_hosts(cert)
    local = "127.0.0.1"  # the SuperLink binds loopback only; the fleet proxy faces the devices
    if not covers_host(cert, local):
        _fail(
            f"{files.server_cert} names {', '.join(names) or 'no host'}, but Flower's own helper and the "
            f"flwr CLI reach this SuperLink at {local}: make certificates that name it, e.g. "
            f"`fedsd certs create --out {tls_dir} --host {local} --force`",
            2,
        )
    if host not in ("0.0.0.0", "::", "") and not covers_host(cert, host):
        _fail(
            f"{files.server_cert} names {', '.join(names) or 'no host'}, but devices reach this server at "
            f"{host} (--host): make certificates that name it, e.g. "
            f"`fedsd certs create --out {tls_dir} --host {host} --force`",
            2,
        )
    remote = _client_host(host)
    if not covers_host(cert, remote):
        console.print(
            f"[yellow]warning: {escape(str(files.server_cert))} names {escape(', '.join(names))} but not "
            f"{escape(remote)}: devices dialling {escape(remote)} will refuse it — give them a name it "
            f"holds, or remake the certificates with --host {escape(remote)}[/]",
            highlight=False,
            soft_wrap=True,
        )
    return files


def _resume_spec(out: Path) -> tuple[Any, str] | None:
    """(spec, where it came from) of an earlier run in ``out``, or None."""
    from fedsd.server.federation import FederationSpec

    spec_path = out / "spec.json"
    if spec_path.is_file():
        return FederationSpec.from_json(spec_path.read_text(encoding="utf-8")), str(spec_path)
    state_path = out / "state.json"
    if state_path.is_file():
        state = json.loads(state_path.read_text(encoding="utf-8"))
        if isinstance(state.get("spec"), dict):
            return FederationSpec(**state["spec"]), str(state_path)
    return None


PREVIOUS_RUN_FILES = (
    "state.json",
    "spec.json",
    "metrics.jsonl",
    "rounds",
    "final",
    "outcome.json",
    "central_dp.json",
)
"""What a fresh start moves out of the run directory (never the data, partition or base model)."""


def set_aside_previous_run(run_dir: Path) -> Path | None:
    """Move an earlier run's progress out of ``run_dir`` before a fresh (not --resume) start.

    Without this a fresh run that fails before its round 0 leaves the old ``state.json`` in place,
    and the printed ``--resume`` hint would continue the *previous* run. Everything goes to
    ``run_dir/previous/<UTC time>/`` (nothing is deleted); returns that directory, or None when
    there was nothing to move.
    """
    present = [run_dir / name for name in PREVIOUS_RUN_FILES if (run_dir / name).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest = run_dir / "previous" / stamp
    n = 1
    while dest.exists():
        n += 1
        dest = run_dir / "previous" / f"{stamp}-{n}"
    dest.mkdir(parents=True)
    for path in present:
        os.replace(path, dest / path.name)
    return dest


def _outcome(run_dir: Path) -> dict[str, Any]:
    """What the ServerApp wrote about an early end (``outcome.json``), or {}."""
    try:
        data = json.loads((run_dir / "outcome.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _device_table(manifests: list[Path], exits: list[int], client_line: str) -> tuple[Table, list[str]]:
    from fedsd.data.manifest import read_manifest

    table = Table(title="devices", title_justify="left")
    for col in ("device", "manifest", "utterances", "labelled", "suggested exit"):
        table.add_column(col)
    lines = []
    for i, m in enumerate(manifests):
        rows = read_manifest(m)
        k = exits[i % len(exits)]
        table.add_row(m.stem, str(m), str(len(rows)), str(sum(1 for r in rows if r.label)), str(k))
        lines.append(client_line.format(exit=k, data=m))
    return table, lines


def _summary(run_dir: Path) -> Table | None:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    recs = [json.loads(x) for x in metrics.read_text(encoding="utf-8").splitlines() if x.strip()]
    if not recs:
        return None
    exits = sorted(
        {int(k[4 : k.index("/")]) for r in recs for k in r if k.startswith("exit") and k.endswith("/uar")}
    )
    table = Table(title="UAR on the server's unseen speakers", title_justify="left")
    table.add_column("round")
    for k in exits:
        table.add_column(f"exit {k}", justify="right")
    for r in recs:
        table.add_row(str(r.get("round")), *[f"{r.get(f'exit{k}/uar', float('nan')):.3f}" for k in exits])
    return table


@app.command("start")
def start_command(
    config: Path = typer.Option(..., "--config", "-c", help="Experiment YAML (see configs/)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address the SuperLink binds (0.0.0.0: all)."),
    port: int = typer.Option(8000, "--port", "-p", min=1, max=65535, help="The SuperLink's one port."),
    rounds: int | None = typer.Option(None, "--rounds", min=1, help="Federated rounds (default: config)."),
    min_clients: int | None = typer.Option(
        None, "--min-clients", min=1, help="Devices needed to start and per round (default: config)."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run directory (default runs/<name>-server)."),
    base_model: Path | None = typer.Option(
        None, "--base-model", help="Checkpoint to federate from (default: config, else trained here)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --out from its last completed round."
    ),
    tls_dir: Path | None = typer.Option(
        None,
        "--tls-dir",
        help="Serve HTTPS with DIR/ca.pem, server.pem, server.key (make them: fedsd certs create).",
    ),
    insecure: bool = typer.Option(
        False, "--insecure", help="Serve plain HTTP, unencrypted (loopback or a trusted network only)."
    ),
    auth: bool = typer.Option(
        False,
        "--auth",
        help="Node authentication: only devices whose key is registered join (needs --tls-dir).",
    ),
    node_keys: list[Path] | None = typer.Option(
        None,
        "--node-key",
        help="A device's KEY.pub to register once the SuperLink is up (with --auth; repeatable).",
    ),
    device_wait: float = typer.Option(
        600.0,
        "--device-wait",
        min=1.0,
        help="Seconds to wait for --min-clients devices (at the start and before each round); "
        "then the server stops with exit code 3.",
    ),
    set_: list[str] | None = typer.Option(
        None, "--set", help="Any config field: --set federated.local_epochs=2 (repeatable)."
    ),
) -> None:
    """Start the server of a federated run and wait for it to finish.

    Example: [bold]fedsd server start --config configs/demo.yaml --tls-dir certs --out runs/fed[/]
    """
    tls = _security(tls_dir, insecure, auth, node_keys, host)
    node_keys = list(dict.fromkeys(k.expanduser().resolve() for k in node_keys or []))
    if tls is not None:
        security_flags = ["--tls-dir", str(tls.ca_cert.parent), *(["--auth"] if auth else [])]
        for key in node_keys:
            security_flags += ["--node-key", str(key)]
    else:
        security_flags = ["--insecure"]
    from fedsd.checkpoint import atomic_write_json
    from fedsd.config import ConfigError, load_config
    from fedsd.server.federation import FederationSpec

    overrides = _parse_overrides(set_)
    if not launch.port_free(host, port):
        _fail(f"port {port} on {host} is in use (another server?); choose another with --port", 1)
    if tls is None:
        console.print(
            "[yellow]warning: --insecure: the SuperLink serves plain HTTP; traffic (model heads, metrics) "
            "is not encrypted and any device can join — use it only on loopback or a trusted network[/]"
        )
    else:
        _say(
            f"TLS: serving HTTPS with {tls.server_cert} (CA {tls.ca_cert}); "
            + (
                "node authentication on: only registered device keys may join"
                if auth
                else "no node authentication: any device with the CA certificate can join (add --auth)"
            )
        )
    # Both signals end the run cleanly (an `&` job of a script starts with SIGINT ignored: re-arm it).
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    superlink = None
    proxy = None
    flwr_home: Path | None = None
    run_id_box: dict[str, int | None] = {"id": None}
    try:
        try:
            cfg = load_config(config, overrides)
        except ConfigError as e:
            _fail(str(e))
        run_dir = (out or Path("runs") / f"{cfg.name}-server").expanduser().resolve()
        config_abs = config.expanduser().resolve()

        # ------------------------------------------------------------ 1. prepare (or reuse)
        earlier = _resume_spec(run_dir) if resume else None
        spec: FederationSpec
        if earlier is not None:
            spec, source = earlier
            base_ok = (Path(spec.base_model) / "fedsd.json").is_file()
            part_ok = spec.partition is None or Path(spec.partition).is_file()
            if not (base_ok and part_ok):
                _fail(
                    f"--resume: {source} names base model {spec.base_model} and partition "
                    f"{spec.partition}, which are gone; start over without --resume"
                )
            if base_model is not None and base_model.expanduser().resolve() != Path(spec.base_model):
                _fail(
                    f"--resume: the run in {run_dir} federates {spec.base_model}, not --base-model "
                    f"{base_model}; drop --base-model or start a new run"
                )
            state_path = run_dir / "state.json"
            done = (
                json.loads(state_path.read_text(encoding="utf-8")).get("completed_round")
                if state_path.is_file()
                else None
            )
            _say(
                f"resume: reusing {source} (base model {spec.base_model}, partition {spec.partition}); "
                + (f"state.json says round {done} is complete" if done is not None else "no round done yet")
                + " — no data preparation, no training"
            )
            spec.config = str(config_abs)
            spec.overrides = {**spec.overrides, **overrides}
            spec.resume = True
            manifests = sorted((run_dir / "devices").glob("*.csv"))
        else:
            from fedsd.server.prepare import prepare_run

            if resume:
                _say(f"resume: {run_dir} holds no earlier run (no spec.json/state.json); starting a new one")
            elif (run_dir / "state.json").is_file():
                console.print(
                    f"[yellow]{escape(str(run_dir))} holds an earlier run: starting over "
                    "(pass --resume to continue it)[/]"
                )
            if not resume:
                moved = set_aside_previous_run(run_dir)
                if moved is not None:
                    _say(f"moved the earlier run's state, metrics and rounds to {moved}")
            try:
                prepared = prepare_run(
                    cfg,
                    run_dir,
                    log=_say,
                    base_model=base_model.expanduser().resolve() if base_model else None,
                )
            except (ConfigError, ValueError, FileNotFoundError) as e:
                _fail(str(e))
            _say(
                "base model: "
                + (
                    f"trained here → {prepared.base_model}"
                    if prepared.trained_here
                    else f"{prepared.base_model} (existing checkpoint, not retrained)"
                )
            )
            spec = FederationSpec(
                config=str(config_abs),
                run_dir=str(run_dir),
                base_model=str(prepared.base_model),
                partition=str(prepared.partition.resolve()),
                eval_manifest=str(cfg.data.manifest_path.expanduser().resolve()),
                eval_root=str(cfg.data.root.expanduser().resolve()),
                resume=resume,
                overrides=overrides,
            )
            manifests = [m.resolve() for m in prepared.client_manifests]
        if rounds is not None:
            spec.rounds = rounds
        if min_clients is not None:
            spec.min_clients = min_clients
        spec.node_wait_s = device_wait
        _say(f"partition: {spec.partition}")
        _say(
            f"rounds: {spec.rounds or cfg.federated.rounds}, devices needed: "
            f"{spec.min_clients or cfg.federated.min_clients}"
        )

        # ------------------------------------------------------------ 2. how to start the devices
        exits = list(cfg.federated.exits_mix or [cfg.model.exits[-1]])
        address = launch.join_address(_client_host(host), port)
        data_root = cfg.data.root.expanduser().resolve()
        if tls is None:
            transport = "--insecure"
        else:
            transport = f"--root-cert {shlex.quote(str(tls.ca_cert))}" + (" --auth-key KEY" if auth else "")
        client_line = (
            f"fedsd client run --server {address} {transport.replace('{', '{{').replace('}', '}}')} "
            f"--exit {{exit}} --data {{data}} --root {data_root}"
        )
        if manifests:
            table, lines = _device_table(manifests, exits, client_line)
            console.print(table)
            console.print("start each device with (add --model DIR if it already has the base model):")
            for line in lines:
                console.print(f"  [bold]{escape(line)}[/]", soft_wrap=True, highlight=False)
        if tls is not None:
            _say(
                f"copy {tls.ca_cert} to each device (it is public; never copy ca.key or server.key)"
                + (
                    "; each device makes KEY with `fedsd client keygen --out KEY` and you register its "
                    f"KEY.pub with `fedsd server register-node KEY.pub --out {run_dir}` (or --node-key)"
                    if auth
                    else ""
                )
            )

        # ------------------------------------------------------------ 3. spec, FLWR_HOME, app dir
        spec_path = atomic_write_json(run_dir / "spec.json", json.loads(spec.to_json()))
        flwr_home = run_dir / ".flwr"
        internal_port = launch.free_port("127.0.0.1")  # the SuperLink's own port: loopback only
        deploy.write_flwr_home(
            flwr_home,
            launch.join_address("127.0.0.1", internal_port),
            insecure=tls is None,
            root_certificates=tls.ca_cert if tls is not None else None,
        )
        app_dir = deploy.write_app_dir(flwr_home / "app")
        _say(f"run spec: {spec_path}; Flower home: {flwr_home}")

        # ------------------------------------------------------------ 4. the SuperLink
        if not launch.port_free(host, port):
            _fail(f"port {port} on {host} was taken while preparing; choose another with --port")
        superlink = deploy.start_superlink(
            flwr_home,
            "127.0.0.1",
            internal_port,
            log_path=flwr_home / "superlink.log",
            cwd=Path.cwd(),
            tls=tls,
            node_auth=auth,
        )
        try:
            launch.wait_for_port(
                "127.0.0.1", internal_port, timeout=60.0, process=superlink, what="the SuperLink"
            )
            proxy = deploy.start_fleet_proxy(
                flwr_home, host, port, internal_port, log_path=flwr_home / "proxy.log", tls=tls
            )
            launch.wait_for_port(host, port, timeout=60.0, process=proxy, what="the fleet proxy")
        except launch.DeployError as e:
            _fail(str(e))
        console.print(
            f"[green]SuperLink listening on {escape(launch.join_address(host, port))}[/] "
            f"(pid {superlink.pid}, log {escape(str(superlink.log_path))}): devices reach only its Fleet API "
            f"there (fleet proxy, pid {proxy.pid}); its Control API is on loopback "
            f"{escape(launch.join_address('127.0.0.1', internal_port))}",
            highlight=False,
        )
        for key in node_keys:
            try:
                node_id = deploy.register_node(flwr_home, key)
            except launch.DeployError as e:
                _fail(f"--node-key {key}: {e}")
            _say(f"registered device key {key} (node id {node_id})")

        # ------------------------------------------------------------ 5. submit and stream the run
        (run_dir / "outcome.json").unlink(missing_ok=True)  # only this run's outcome counts
        tail: deque[str] = deque(maxlen=40)

        def on_line(line: str) -> None:
            tail.append(line)
            if run_id_box["id"] is None:
                run_id_box["id"] = deploy.parse_run_id(line)
            console.print(Text.from_ansi(line), soft_wrap=True)

        run_id, code = deploy.submit_run(
            flwr_home, app_dir, {"spec-file": str(spec_path)}, on_line=on_line, cwd=Path.cwd()
        )
        run_id_box["id"] = run_id
        if run_id is None:
            _fail(f"`flwr run` started no run (exit code {code}); its last lines:\n" + "\n".join(tail))

        # ------------------------------------------------------------ 6. the real outcome
        try:
            status = deploy.wait_finished(flwr_home, run_id, timeout=60.0)
        except launch.DeployError as e:
            _fail(f"could not read the outcome of run {run_id}: {e}")
        summary = _summary(run_dir)
        if summary is not None:
            console.print(summary)
        state = str(status.get("status", "?"))
        if state == "finished:completed":
            console.print(
                f"[bold green]run {run_id} finished: completed[/] — run directory {escape(str(run_dir))} "
                f"(final model {escape(str(run_dir / 'final'))}, report {escape(str(run_dir / 'report.md'))})",
                highlight=False,
            )
            return
        outcome = _outcome(run_dir)
        if outcome.get("status") == "not-enough-devices":
            err_console.print(
                f"[bold red]run {run_id} stopped: not enough devices[/] — {escape(str(outcome.get('message')))}",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(EXIT_NO_DEVICES)
        details = status.get("status-details") or ""
        err_console.print(
            f"[bold red]run {run_id} {escape(state)}[/] {escape(str(details))}\n"
            f"SuperLink log: {escape(str(superlink.log_path))}; "
            f"resume with: fedsd server start --config {escape(str(config))} --out {escape(str(run_dir))} "
            f"--port {port} {escape(shlex.join(security_flags))} --resume"
            + (
                " (a new SuperLink knows no device keys: register them again, or add --node-key KEY.pub)"
                if auth and not node_keys
                else ""
            ),
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_FAILED)
    except KeyboardInterrupt as e:
        _shield_cleanup()  # a second Ctrl-C must not cut the clean-up short
        err_console.print(f"[yellow]{escape(str(e) or 'SIGINT')}: stopping the server[/]")
        if superlink is not None and superlink.alive() and flwr_home and run_id_box["id"] is not None:
            deploy.stop_run(flwr_home, int(run_id_box["id"]))
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        _shield_cleanup()
        if proxy is not None:
            proxy.stop(timeout=5.0)
        if superlink is not None:
            superlink.stop(timeout=10.0)
            _say("SuperLink stopped")
        if _INTERRUPTED:
            # The clean-up is done and the process is on its way out: ignore further signals at the OS
            # level. A Python handler would be reset to the default during interpreter shutdown, so a
            # late Ctrl-C then killed the exiting process by SIGINT (exit -2 instead of 130).
            for sig in previous:
                signal.signal(sig, signal.SIG_IGN)
        else:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


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
) -> None:
    """Allow one device into a running server started with --auth (node authentication).

    Example: [bold]fedsd server register-node device-1.key.pub --out runs/fed[/]
    (or, from another shell on the server machine: [bold]--port 8000 --tls-dir certs[/])
    """
    import tomllib

    from fedsd.security import SecurityError, load_node_public_key

    try:
        load_node_public_key(public_key)
    except SecurityError as e:
        _fail(str(e), 2)
    public_key = public_key.expanduser().resolve()
    if out is not None and (host is not None or port is not None or tls_dir is not None):
        _fail("give either --out (the server's run directory) or --host/--port/--tls-dir, not both", 2)
    with tempfile.TemporaryDirectory(prefix="fedsd-flwr-") as tmp:
        if out is not None:
            flwr_home = out.expanduser().resolve() / ".flwr"
            config_path = flwr_home / "config.toml"
            if not config_path.is_file():
                _fail(
                    f"--out {out}: no server connection there ({config_path} is missing); give the --out "
                    "of a running `fedsd server start`, or --port and --tls-dir",
                    1,
                )
            conn = tomllib.loads(config_path.read_text(encoding="utf-8"))["superlink"][deploy.CONNECTION]
            if conn.get("insecure") or not conn.get("root-certificates"):
                _fail(
                    f"the server of {out} serves plain HTTP (--insecure): node authentication needs "
                    "`fedsd server start --tls-dir DIR --auth`",
                    1,
                )
            address = str(conn["address"])
        else:
            if tls_dir is None:
                _fail(
                    "tell me which server: --out RUNDIR (its run directory), or --port PORT and --tls-dir "
                    "DIR (registration goes over TLS, verified with DIR/ca.pem)",
                    2,
                )
            ca = tls_dir.expanduser().resolve() / "ca.pem"
            if not ca.is_file():
                _fail(f"--tls-dir {tls_dir}: ca.pem is missing ({ca})", 2)
            address = launch.join_address(launch.connect_host(host or "127.0.0.1"), port or 8000)
            flwr_home = Path(tmp)
            deploy.write_flwr_home(flwr_home, address, insecure=False, root_certificates=ca)
        try:
            h, p = launch.parse_address(address)
        except launch.DeployError as e:
            _fail(str(e))
        if not launch.port_open(h, p, timeout=2.0):
            _fail(f"no server is listening at {address} (is `fedsd server start` running?)")
        try:
            node_id = deploy.register_node(flwr_home, public_key)
        except launch.DeployError as e:
            _fail(str(e))
    console.print(
        f"[green]registered[/] {escape(str(public_key))} with the server at {escape(address)}: node id "
        f"{node_id}; start that device with --auth-key {escape(str(public_key.with_suffix('')))}",
        highlight=False,
        soft_wrap=True,
    )
