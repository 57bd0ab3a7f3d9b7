"""`fedsd client run`: one device — a supervised Flower SuperNode at a chosen exit;
`fedsd client keygen`: the device's key pair for servers that authenticate devices.

Example (the server prints the exact line for each device):
    fedsd client run --server server.lan:8000 --root-cert ca.pem --exit 4 --data devices/client-000.csv --root data/synth
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich")
console = Console()
err_console = Console(stderr=True)


def _fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def _model_exits(model: Path) -> list[int]:
    import json

    meta = json.loads((model / "fedsd.json").read_text(encoding="utf-8"))
    return [int(k) for k in meta.get("exits", [])]


def _check_key_material(root_cert: Path | None, auth_key: Path | None) -> tuple[Path | None, Path | None]:
    """Resolve and check --root-cert (a PEM certificate) and --auth-key (an OpenSSH EC key); exit 2 naming
    the file otherwise, so a bad file fails here and not deep inside Flower."""
    from fedsd.security import SecurityError, load_certificate, load_node_private_key

    try:
        if root_cert is not None:
            root_cert = root_cert.expanduser().resolve()
            load_certificate(root_cert, "--root-cert")
        if auth_key is not None:
            auth_key = auth_key.expanduser().resolve()
            load_node_private_key(auth_key)
    except SecurityError as e:
        _fail(str(e), 2)
    return root_cert, auth_key


@app.command("keygen")
def keygen_command(
    out: Path = typer.Option(
        ..., "--out", "-o", help="Private key file to write (KEY.pub is written next to it)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing key pair."),
) -> None:
    """Make this device's key pair for servers that admit only registered devices (--auth).

    KEY stays on this device (mode 0600; pass it to [bold]fedsd client run --auth-key KEY[/]); send KEY.pub
    to the server operator, who registers it with [bold]fedsd server register-node KEY.pub[/].
    """
    from fedsd.security import SecurityError, generate_node_key

    try:
        private, public = generate_node_key(out, force=force)
    except SecurityError as e:
        _fail(str(e), 1)
    except OSError as e:
        _fail(f"--out {out}: {e}", 1)
    console.print(
        f"private key: {escape(str(private))} (mode 0600 — keep it on this device)", highlight=False
    )
    console.print(f"public key:  {escape(str(public))} (give it to the server operator)", highlight=False)


def _dp_node_config(
    noise: float | None,
    target: float | None,
    clip: float | None,
    delta: float | None,
    rounds: int | None,
    budget: float | None,
) -> dict[str, float | int]:
    """The device's own DP flags as ``dp-*`` node config; checked here so mistakes fail before joining."""
    from fedsd.privacy import DP_KEYS, DPSettings, PrivacyError

    given = {
        "noise_multiplier": noise, "target_epsilon": target, "max_grad_norm": clip, "delta": delta,
        "rounds": rounds, "epsilon_budget": budget,
    }  # fmt: skip
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return {}
    if noise is not None and target is not None:
        _fail("--dp-noise-multiplier and --dp-target-epsilon contradict each other: give one", 2)
    if rounds is not None and target is None:
        _fail("--dp-rounds only goes with --dp-target-epsilon", 2)
    try:  # validate the values with a stand-in noise where the server will supply it
        DPSettings(**({"noise_multiplier": 1.0} if noise is None and target is None else {}) | given)
    except PrivacyError as e:
        _fail(f"--dp-*: {e}", 2)
    if noise is None and target is None:
        console.print("DP: this device asks for DP; the noise (σ or target ε) must come from the server")
    else:
        console.print(
            "DP: this device trains with DP-SGD, "
            + (f"σ = {noise:g}" if noise is not None else f"target ε = {target:g} over the run")
            + f", δ = {delta if delta is not None else 1e-5:g}, clip {clip if clip is not None else 1.0:g}",
            highlight=False,
        )
    return {DP_KEYS[k]: v for k, v in given.items()}


@app.command("run")
def run_command(
    server: str = typer.Option(..., "--server", "-s", help="The server's SuperLink as HOST:PORT."),
    exit_: int | None = typer.Option(
        None, "--exit", "-e", help="Exit layer this device deploys (default: the model's deepest)."
    ),
    data: Path = typer.Option(..., "--data", help="This device's manifest CSV (its private speech)."),
    root: Path = typer.Option(..., "--root", help="Directory the manifest's audio paths are relative to."),
    model: Path | None = typer.Option(
        None, "--model", "-m", help="The base model (checkpoint dir); omit to receive it from the server."
    ),
    device: str = typer.Option("cpu", "--device", help="torch device: cpu, cuda, cuda:1, mps ..."),
    cache: Path | None = typer.Option(
        None, "--cache", help="Feature cache, delivered models and session logs (default ~/.cache/fedsd)."
    ),
    root_cert: Path | None = typer.Option(
        None, "--root-cert", help="TLS: the server's CA certificate (ca.pem of its --tls-dir)."
    ),
    insecure: bool = typer.Option(
        False, "--insecure", help="Talk plain HTTP, unencrypted (only to a server started with --insecure)."
    ),
    auth_key: Path | None = typer.Option(
        None, "--auth-key", help="This device's private key (fedsd client keygen) for a server with --auth."
    ),
    dp_noise_multiplier: float | None = typer.Option(
        None,
        "--dp-noise-multiplier",
        min=0.0,
        help="DP-SGD noise σ on this device (overrides the server's).",
        rich_help_panel="Differential privacy",
    ),
    dp_target_epsilon: float | None = typer.Option(
        None,
        "--dp-target-epsilon",
        min=0.0,
        help="Calibrate σ so the whole run spends this ε.",
        rich_help_panel="Differential privacy",
    ),
    dp_max_grad_norm: float | None = typer.Option(
        None,
        "--dp-max-grad-norm",
        min=0.0,
        help="Per-utterance gradient clip C (default 1.0).",
        rich_help_panel="Differential privacy",
    ),
    dp_delta: float | None = typer.Option(
        None,
        "--dp-delta",
        min=0.0,
        max=1.0,
        help="δ of (ε, δ)-DP; keep it below 1 / utterances (default 1e-5).",
        rich_help_panel="Differential privacy",
    ),
    dp_rounds: int | None = typer.Option(
        None,
        "--dp-rounds",
        min=1,
        help="Rounds --dp-target-epsilon covers (default: the server's rounds).",
        rich_help_panel="Differential privacy",
    ),
    dp_epsilon_budget: float | None = typer.Option(
        None,
        "--dp-epsilon-budget",
        min=0.0,
        help="Stop training before ε would exceed this (default: the target).",
        rich_help_panel="Differential privacy",
    ),
    dp_device_budget: float | None = typer.Option(
        None,
        "--dp-device-budget",
        min=0.0,
        help="Stop training before this device's ε over all its runs (any server, any federation id) "
        "would exceed this; the device-wide ledger is <cache>/privacy/device.json.",
        rich_help_panel="Differential privacy",
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="Keep this device's deployable model here: the exported slice for its exit with the global "
        "heads of the last completed round, the final ones when the run ends (+ OUT/personal: its personal "
        "heads). Loads with `fedsd predict --model OUT` and `fedsd evaluate`.",
    ),
    personalize_epochs: int | None = typer.Option(
        None,
        "--personalize-epochs",
        min=0,
        help="After the last round, fine-tune a private copy of the heads on this device's own speech for "
        "N epochs (kept, never sent; default: the server's federated.personalize_epochs).",
    ),
    server_timeout: float = typer.Option(
        300.0,
        "--server-timeout",
        min=1.0,
        help="Stop after the server is unreachable (or does not know this device's key) this many seconds "
        "(long enough to ride out a server restart with --resume).",
    ),
) -> None:
    """Join a federated run as one device; stops by itself when the run ends or the server is gone.

    Exit code 0 when the server ended the run, 3 when the server went away, 4 when the server refused
    this device (TLS or node authentication), 1 on a device error.
    """
    from fedsd.clients.device import DEFAULT_CACHE
    from fedsd.clients.supervisor import (
        EXIT_DONE,
        EXIT_REFUSED,
        EXIT_SERVER_GONE,
        TLS_MISSING_CLIENT,
        Supervisor,
        SupervisorSettings,
        default_session_dir,
        describe_event,
    )
    from fedsd.data.manifest import ManifestError, read_manifest
    from fedsd.launch import DeployError, join_address, parse_address, probe_transport
    from fedsd.untrusted import printable

    if root_cert is not None and insecure:
        _fail("--root-cert and --insecure contradict each other: give one (--root-cert talks TLS)", 2)
    if root_cert is None and not insecure:
        _fail(TLS_MISSING_CLIENT, 2)
    if auth_key is not None and root_cert is None:
        _fail("--auth-key (node authentication) needs TLS: give --root-cert CA.pem instead of --insecure", 2)
    root_cert, auth_key = _check_key_material(root_cert, auth_key)
    try:
        host, port = parse_address(server)
    except DeployError as e:
        _fail(f"--server {e}", 2)
    if exit_ is not None and exit_ < 1:
        _fail(f"--exit {exit_}: an exit is a transformer layer number (>= 1)", 2)
    data = data.expanduser().resolve()
    root = root.expanduser().resolve()
    if not data.is_file():
        _fail(f"--data {data}: manifest file not found")
    try:
        rows = read_manifest(data)
    except (ManifestError, OSError, ValueError) as e:
        _fail(f"--data {data}: {e}")
    if not rows:
        _fail(f"--data {data}: the manifest has no rows")
    if not root.is_dir():
        _fail(f"--root {root}: directory not found")
    missing = [r.path for r in rows if not (root / r.path).is_file()]
    if missing:
        _fail(
            f"--root {root}: {len(missing)} of {len(rows)} audio files of {data.name} are missing there "
            f"(first: {missing[0]})"
        )
    if model is not None:
        model = model.expanduser().resolve()
        if not (model / "fedsd.json").is_file():
            _fail(f"--model {model}: not a fedsd checkpoint (no fedsd.json)")
        exits = _model_exits(model)
        if exit_ is not None and exits and exit_ not in exits:
            _fail(f"--exit {exit_}: the model {model} has exits {exits}", 2)
    cache_dir = (cache or DEFAULT_CACHE).expanduser().resolve()
    dp_config = _dp_node_config(
        dp_noise_multiplier, dp_target_epsilon, dp_max_grad_norm, dp_delta, dp_rounds, dp_epsilon_budget
    )

    # A device set up for the other transport than the server's would never join (a plain-HTTP
    # SuperNode retries a TLS server forever): tell the two apart before starting anything.
    spoken = probe_transport(host, port)
    if insecure and spoken == "tls":
        _fail(
            f"the server {join_address(host, port)} serves TLS: start this device with --root-cert CA.pem "
            "(the ca.pem of the server's --tls-dir) instead of --insecure",
            2,
        )
    if root_cert is not None and spoken == "plain":
        _fail(
            f"the server {join_address(host, port)} serves plain HTTP (started with --insecure): this "
            "device will not send its data unencrypted; ask for a TLS server (fedsd server start --tls-dir)",
            2,
        )
    if insecure:
        console.print(
            "[yellow]warning: --insecure: traffic to the server is not encrypted "
            "(use only on loopback or a trusted network)[/]"
        )
    else:
        console.print(
            f"TLS: the server must present a certificate signed by {root_cert}"
            + (f"; node authentication with {auth_key}" if auth_key else ""),
            highlight=False,
        )
    labelled = sum(1 for r in rows if r.label)
    console.print(
        f"device: exit {exit_ if exit_ is not None else 'deepest'} on {device}, {len(rows)} utterances "
        f"({labelled} labelled) from {data}"
    )
    console.print(
        f"model: {model}" if model else "model: none given — the server will deliver its base model"
    )
    node_config = {
        "exit": exit_,
        "device": device,
        "data": str(data),
        "root": str(root),
        "model": str(model) if model else None,
        "cache": str(cache_dir),
        "out": str(out.expanduser().resolve()) if out else None,
        "personalize-epochs": personalize_epochs,
    } | dp_config | ({"dp-device-budget": dp_device_budget} if dp_device_budget else {})
    session = default_session_dir(cache_dir)
    styles = {"info": "dim", "warning": "yellow", "error": "bold red"}

    def on_event(ev: dict) -> None:
        style = "red" if "error" in ev else ("bold green" if ev.get("kind") == "done" else "")
        text = escape(describe_event(ev))
        console.print(f"[{style}]{text}[/]" if style else text, highlight=False, soft_wrap=True)

    def on_status(level: str, text: str) -> None:
        target = err_console if level == "error" else console
        text = printable(text, 2000)  # may quote the SuperNode's log: no control characters to the terminal
        target.print(f"[{styles.get(level, '')}]{escape(text)}[/]", highlight=False, soft_wrap=True)

    console.print(f"connecting to {join_address(host, port)} (session files: {session})")
    sup = Supervisor(
        SupervisorSettings(
            server=join_address(host, port),
            node_config=node_config,
            session_dir=session,
            server_timeout=server_timeout,
            root_certificates=root_cert,
            auth_key=auth_key,
        ),
        on_event=on_event,
        on_status=on_status,
    )
    code = sup.run()
    trained = [ev for ev in sup.events if ev.get("kind") == "train" and "error" not in ev]
    if code == EXIT_DONE:
        console.print(f"[bold green]done[/]: {len(trained)} round(s) trained on this device")
    if out is not None and (out / "fedsd.json").is_file():
        console.print(f"deployable model: {escape(str(out))} (fedsd predict --model {escape(str(out))})")
    elif code == EXIT_REFUSED:
        err_console.print("[bold red]the server refused this device[/] (see the reason above)")
    elif code == EXIT_SERVER_GONE:
        err_console.print(
            f"[yellow]the server went away after {len(trained)} trained round(s) on this device[/]"
        )
    raise typer.Exit(code)
