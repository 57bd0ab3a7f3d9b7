"""`fedsd client run`: one device — a supervised Flower SuperNode at a chosen exit;
`fedsd client keygen`: the device's key pair for servers that authenticate devices.

Example (the server prints the exact line for each device):
    fedsd client run --server server.lan:8000 --root-cert ca.pem --exit 4 --data devices/client-000.csv --root data/synth
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape

from fedsd.cli.errors import fail
from fedsd.cli.options import device_option
from fedsd.cli.output import JSONL_HELP, Output, console, err_console, json_option, json_output

app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich")

if TYPE_CHECKING:
    from fedsd.clients.service import DeviceEvent


@app.command("keygen")
def keygen_command(
    out: Path = typer.Option(
        ..., "--out", "-o", help="Private key file to write (KEY.pub is written next to it)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing key pair."),
    json_: bool = json_option(),
) -> None:
    """Make this device's key pair for servers that admit only registered devices (--auth).

    KEY stays on this device (mode 0600; pass it to [bold]fedsd client run --auth-key KEY[/]); send KEY.pub
    to the server operator, who registers it with [bold]fedsd server register-node KEY.pub[/].
    """
    from fedsd.security.certs import SecurityError, generate_node_key

    try:
        private, public = generate_node_key(out, force=force)
    except SecurityError as e:
        fail(str(e))
    except OSError as e:
        fail(f"--out {out}: {e}")
    with json_output(json_) as output:
        console.print(
            f"private key: {escape(str(private))} (mode 0600 — keep it on this device)", highlight=False
        )
        console.print(f"public key:  {escape(str(public))} (give it to the server operator)", highlight=False)
        output.document({"private_key": private, "public_key": public})


_DP = "Differential privacy"
SERVER = typer.Option(..., "--server", "-s", help="The server's SuperLink as HOST:PORT.")
EXIT = typer.Option(
    None, "--exit", "-e", help="Exit layer this device deploys (default: the model's deepest)."
)
DATA = typer.Option(..., "--data", help="This device's manifest CSV (its private speech).")
ROOT = typer.Option(..., "--root", help="Directory the manifest's audio paths are relative to.")
MODEL = typer.Option(
    None, "--model", "-m", help="The base model (checkpoint dir); omit to receive it from the server."
)
DEVICE = device_option("cpu")
CACHE = typer.Option(
    None, "--cache", help="Feature cache, delivered models and session logs (default ~/.cache/fedsd)."
)
ROOT_CERT = typer.Option(
    None, "--root-cert", help="TLS: the server's CA certificate (ca.pem of its --tls-dir)."
)
INSECURE = typer.Option(
    False, "--insecure", help="Talk plain HTTP, unencrypted (only to a server started with --insecure)."
)
AUTH_KEY = typer.Option(
    None, "--auth-key", help="This device's private key (fedsd client keygen) for a server with --auth."
)
DP_NOISE = typer.Option(
    None, "--dp-noise-multiplier", min=0.0, rich_help_panel=_DP,
    help="DP-SGD noise σ on this device (overrides the server's).",
)  # fmt: skip
DP_TARGET = typer.Option(
    None,
    "--dp-target-epsilon",
    min=0.0,
    rich_help_panel=_DP,
    help="Calibrate σ so the whole run spends this ε.",
)
DP_CLIP = typer.Option(
    None,
    "--dp-max-grad-norm",
    min=0.0,
    rich_help_panel=_DP,
    help="Per-utterance gradient clip C (default 1.0).",
)
DP_DELTA = typer.Option(
    None, "--dp-delta", min=0.0, max=1.0, rich_help_panel=_DP,
    help="δ of (ε, δ)-DP; keep it below 1 / utterances (default 1e-5).",
)  # fmt: skip
DP_ROUNDS = typer.Option(
    None, "--dp-rounds", min=1, rich_help_panel=_DP,
    help="Rounds --dp-target-epsilon covers (default: the server's rounds).",
)  # fmt: skip
DP_BUDGET = typer.Option(
    None, "--dp-epsilon-budget", min=0.0, rich_help_panel=_DP,
    help="Stop training before ε would exceed this (default: the target).",
)  # fmt: skip
DP_DEVICE_BUDGET = typer.Option(
    None, "--dp-device-budget", min=0.0, rich_help_panel=_DP,
    help="Stop training before this device's ε over all its runs (any server, any federation id) "
    "would exceed this; the device-wide ledger is <cache>/privacy/device.json.",
)  # fmt: skip
OUT = typer.Option(
    None, "--out", "-o",
    help="Keep this device's deployable model here: the exported slice for its exit with the global "
    "heads of the last completed round, the final ones when the run ends (+ OUT/personal: its personal "
    "heads). Loads with `fedsd predict --model OUT` and `fedsd evaluate`.",
)  # fmt: skip
PERSONALIZE = typer.Option(
    None, "--personalize-epochs", min=0,
    help="After the last round, fine-tune a private copy of the heads on this device's own speech for "
    "N epochs (kept, never sent; default: the server's federated.personalize_epochs).",
)  # fmt: skip
SERVER_TIMEOUT = typer.Option(
    300.0, "--server-timeout", min=1.0,
    help="Stop after the server is unreachable (or does not know this device's key) this many seconds "
    "(long enough to ride out a server restart with --resume).",
)  # fmt: skip
_STYLES = {"info": "", "detail": "dim", "warning": "yellow", "error": "bold red", "success": "bold green"}


def print_device_event(ev: DeviceEvent) -> None:
    """One line of a device's progress (a log: stderr)."""
    style = "red" if ev.source == "device" and ev.level == "error" else _STYLES.get(ev.level, "")
    text = escape(ev.text)
    err_console.print(f"[{style}]{text}[/]" if style else text, highlight=False, soft_wrap=True)


def _event_printer(output: Output) -> Callable[[DeviceEvent], None]:
    """Each event as a line on stderr and, with --json, as a JSON line on stdout too."""

    def on_event(ev: DeviceEvent) -> None:
        print_device_event(ev)
        output.line({"source": ev.source, "level": ev.level, "text": ev.text, "data": ev.data})

    return on_event

WARM_WORKER = typer.Option(
    False, "--warm-worker",
    help="Handle this device's messages in one long-lived worker that imports torch and loads the model "
    "once, instead of a fresh process per message (falls back to that if the worker fails).",
)  # fmt: skip


HEARTBEAT = typer.Option(
    None, "--heartbeat", min=10.0, max=1800.0,
    help="Heartbeat interval in seconds (default: Flower's 30); the server gives up on a silent device "
    "after twice this, so a shorter one frees a round held by a crashed device sooner.",
)  # fmt: skip


@app.command("run")
def run_command(
    server: str = SERVER,
    exit_: int | None = EXIT,
    data: Path = DATA,
    root: Path = ROOT,
    model: Path | None = MODEL,
    device: str = DEVICE,
    cache: Path | None = CACHE,
    root_cert: Path | None = ROOT_CERT,
    insecure: bool = INSECURE,
    auth_key: Path | None = AUTH_KEY,
    dp_noise_multiplier: float | None = DP_NOISE,
    dp_target_epsilon: float | None = DP_TARGET,
    dp_max_grad_norm: float | None = DP_CLIP,
    dp_delta: float | None = DP_DELTA,
    dp_rounds: int | None = DP_ROUNDS,
    dp_epsilon_budget: float | None = DP_BUDGET,
    dp_device_budget: float | None = DP_DEVICE_BUDGET,
    out: Path | None = OUT,
    personalize_epochs: int | None = PERSONALIZE,
    server_timeout: float = SERVER_TIMEOUT,
    warm_worker: bool = WARM_WORKER,
    heartbeat: float | None = HEARTBEAT,
    json_: bool = json_option(JSONL_HELP + " One line per event of the device: source, level, text, data."),
) -> None:
    """Join a federated run as one device; stops by itself when the run ends or the server is gone.

    Exit code 0 when the server ended the run, 3 when the server went away, 4 when the server refused
    this device (TLS or node authentication), 1 on a device error, 2 for options that do not fit.
    """
    from fedsd.clients.service import Device, DeviceOptionError

    with json_output(json_) as output:
        try:
            code = Device(
                server, exit=exit_, data=data, root=root, model=model, device=device, cache=cache,
                root_cert=root_cert, insecure=insecure, auth_key=auth_key, out=out,
                personalize_epochs=personalize_epochs, dp_noise_multiplier=dp_noise_multiplier,
                dp_target_epsilon=dp_target_epsilon, dp_max_grad_norm=dp_max_grad_norm, dp_delta=dp_delta,
                dp_rounds=dp_rounds, dp_epsilon_budget=dp_epsilon_budget, dp_device_budget=dp_device_budget,
                server_timeout=server_timeout, warm_worker=warm_worker, heartbeat_s=heartbeat,
                on_event=_event_printer(output),
            ).run()  # fmt: skip
        except DeviceOptionError as e:
            fail(str(e), e.code)
    raise typer.Exit(code)
