"""One device of a federated run as a Python object; `fedsd client run` is flags → :class:`Device` →
printing, and a notebook or a test drives the same object.

    from fedsd import api

    dev = api.Device("server.lan:8000", data="client-000.csv", root="data/synth", exit=2,
                     root_cert="ca.pem", out="my-model", on_event=lambda ev: print(ev.text))
    code = dev.run()            # blocks until the run ends: 0 done, 3 server gone, 4 refused, 1 failed
    # or without blocking: dev.start(); ...; dev.wait(timeout=600); dev.stop()

Everything that can be checked before joining is checked in the constructor (options that contradict
each other, files, key material, DP settings) and raises :class:`DeviceOptionError` without starting
anything; the parameters are named after the command's flags, so the messages (which name the flags)
point at the parameter to fix. :meth:`start` / :meth:`run` also refuse a server that speaks the other
transport (TLS vs plain HTTP) before a SuperNode is started — a mismatched SuperNode would retry forever.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsd.clients import supernode_main
from fedsd.clients.device import DEFAULT_CACHE, DeviceError
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
from fedsd.security.untrusted import printable

__all__ = ["Device", "DeviceEvent", "DeviceOptionError", "EventCallback"]


class DeviceOptionError(DeviceError):
    """An option of a device that cannot work, found before anything started. ``code`` is the exit status
    `fedsd client run` ends with: 2 for options that contradict each other or the server, 1 for files."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class DeviceEvent:
    """One line of progress for whoever watches the device (the command prints each one).

    ``source``: ``"setup"`` (what the device is about to do), ``"supervisor"`` (the SuperNode's life:
    start, restarts, refusals, an unreachable server), ``"device"`` (a message the ClientApp handled:
    ``data`` is its event-log entry with ``kind`` info/model/train/evaluate/done, ``round``, metrics) or
    ``"summary"`` (how the run ended). ``level``: info, detail, warning, error or success.
    """

    source: str
    level: str
    text: str
    """One printable line (control characters escaped: it may quote what the server sent)."""
    data: dict[str, Any] | None = None

    @property
    def kind(self) -> str | None:
        """The ClientApp event's kind (``train``, ``done`` …) for device events, else None."""
        return str(self.data.get("kind")) if self.data else None


EventCallback = Callable[[DeviceEvent], None]


def _check_key_material(root_cert: Path | None, auth_key: Path | None) -> tuple[Path | None, Path | None]:
    """Resolve and load --root-cert (PEM) and --auth-key (OpenSSH EC key) so a bad file fails here, named,
    and not deep inside Flower."""
    from fedsd.security.certs import SecurityError, load_certificate, load_node_private_key

    try:
        if root_cert is not None:
            root_cert = root_cert.expanduser().resolve()
            load_certificate(root_cert, "--root-cert")
        if auth_key is not None:
            auth_key = auth_key.expanduser().resolve()
            load_node_private_key(auth_key)
    except SecurityError as e:
        raise DeviceOptionError(str(e), 2) from None
    return root_cert, auth_key


def _check_transport(
    root_cert: str | Path | None, auth_key: str | Path | None, insecure: bool
) -> tuple[Path | None, Path | None]:
    """--root-cert (TLS) or --insecure, exactly one; --auth-key only with TLS; both files loadable."""
    cert = Path(root_cert) if root_cert is not None else None
    key = Path(auth_key) if auth_key is not None else None
    if cert is not None and insecure:
        raise DeviceOptionError(
            "--root-cert and --insecure contradict each other: give one (--root-cert talks TLS)"
        )
    if cert is None and not insecure:
        raise DeviceOptionError(TLS_MISSING_CLIENT)
    if key is not None and cert is None:
        raise DeviceOptionError(
            "--auth-key (node authentication) needs TLS: give --root-cert CA.pem instead of --insecure"
        )
    return _check_key_material(cert, key)


def _check_server(superlink: str) -> tuple[str, int, str]:
    """--server HOST:PORT as host, port and the address joined back."""
    from fedsd.process.launch import DeployError, join_address, parse_address

    try:
        host, port = parse_address(superlink)
    except DeployError as e:
        raise DeviceOptionError(f"--server {e}") from None
    return host, port, join_address(host, port)


def _check_amounts(
    personalize_epochs: int | None, dp_device_budget: float | None, server_timeout: float
) -> None:
    """Counts and budgets are >= 0, the server timeout > 0 (NaN fails both)."""
    for name, value in (
        ("--personalize-epochs", personalize_epochs),
        ("--dp-device-budget", dp_device_budget),
    ):
        if value is not None and not value >= 0:
            raise DeviceOptionError(f"{name} {value}: must be >= 0")
    if not server_timeout > 0:
        raise DeviceOptionError(f"--server-timeout {server_timeout}: must be > 0 seconds")


def _check_heartbeat(heartbeat_s: float | None) -> float | None:
    """The heartbeat interval the SuperNode will announce (None: Flower's), checked."""
    if heartbeat_s is None:
        return None
    try:
        return supernode_main.check_interval(heartbeat_s)
    except ValueError as e:
        raise DeviceOptionError(str(e)) from None


def _dp_node_config(given: dict[str, float | int | None]) -> tuple[dict[str, float | int], str | None]:
    """The device's own DP options as ``dp-*`` node config and a line describing them; checked here so
    mistakes fail before joining."""
    from fedsd.security.privacy import DP_KEYS, DPSettings, PrivacyError

    set_ = {k: v for k, v in given.items() if v is not None}
    if not set_:
        return {}, None
    noise, target = set_.get("noise_multiplier"), set_.get("target_epsilon")
    if noise is not None and target is not None:
        raise DeviceOptionError(
            "--dp-noise-multiplier and --dp-target-epsilon contradict each other: give one"
        )
    if "rounds" in set_ and target is None:
        raise DeviceOptionError("--dp-rounds only goes with --dp-target-epsilon")
    try:  # validate the values with a stand-in noise where the server will supply it
        DPSettings(**({"noise_multiplier": 1.0} if noise is None and target is None else {}) | set_)
    except (PrivacyError, TypeError) as e:
        raise DeviceOptionError(f"--dp-*: {e}") from None
    if noise is None and target is None:
        line = "DP: this device asks for DP; the noise (σ or target ε) must come from the server"
    else:
        delta, clip = set_.get("delta", 1e-5), set_.get("max_grad_norm", 1.0)
        line = (
            "DP: this device trains with DP-SGD, "
            + (f"σ = {noise:g}" if noise is not None else f"target ε = {target:g} over the run")
            + f", δ = {delta:g}, clip {clip:g}"
        )
    return {DP_KEYS[k]: v for k, v in set_.items()}, line


class Device:
    """A device that joins one federated run: a supervised Flower SuperNode at its exit, on its own speech.

    The parameters mirror `fedsd client run`'s flags: ``superlink`` (--server HOST:PORT), ``data`` (its
    manifest CSV) and ``root`` (where the manifest's audio paths point), ``exit`` (default: the model's
    deepest), ``model`` (a base checkpoint; None: the server delivers one), ``device`` (torch device),
    ``cache`` (feature cache, delivered models, session logs), ``root_cert`` (TLS: the server's CA) or
    ``insecure=True`` (plain HTTP), ``auth_key`` (node key for a server with --auth), ``out`` (keep the
    deployable model for its exit here), ``personalize_epochs``, the ``dp_*`` options,
    ``server_timeout``, ``warm_worker`` (one long-lived process handles its messages: clients/worker.py)
    and ``heartbeat_s`` (how soon the server notices this device is gone: twice this; None: Flower's
    30 s). ``session_dir`` overrides ``<cache>/sessions/<time>-<pid>``.

    ``on_event`` receives a :class:`DeviceEvent` per line of progress, from the thread that supervises
    (the caller's for :meth:`run`, a worker's after :meth:`start`).
    """

    def __init__(
        self,
        superlink: str,
        *,
        data: str | Path,
        root: str | Path,
        exit: int | None = None,
        model: str | Path | None = None,
        device: str = "cpu",
        cache: str | Path | None = None,
        root_cert: str | Path | None = None,
        insecure: bool = False,
        auth_key: str | Path | None = None,
        out: str | Path | None = None,
        personalize_epochs: int | None = None,
        dp_noise_multiplier: float | None = None,
        dp_target_epsilon: float | None = None,
        dp_max_grad_norm: float | None = None,
        dp_delta: float | None = None,
        dp_rounds: int | None = None,
        dp_epsilon_budget: float | None = None,
        dp_device_budget: float | None = None,
        server_timeout: float = 300.0,
        warm_worker: bool = False,
        heartbeat_s: float | None = None,
        session_dir: str | Path | None = None,
        on_event: EventCallback | None = None,
    ) -> None:
        self.root_cert, self.auth_key = _check_transport(root_cert, auth_key, insecure)
        self.insecure = bool(insecure)
        self.host, self.port, self.address = _check_server(superlink)
        if exit is not None and exit < 1:
            raise DeviceOptionError(f"--exit {exit}: an exit is a transformer layer number (>= 1)")
        self.exit = exit
        self.device = device
        self.data, self.root, self.n_utterances, self.n_labelled = _check_data(Path(data), Path(root))
        self.model = _check_model(Path(model), exit) if model is not None else None
        _check_amounts(personalize_epochs, dp_device_budget, server_timeout)
        dp = {"noise_multiplier": dp_noise_multiplier, "target_epsilon": dp_target_epsilon,
              "max_grad_norm": dp_max_grad_norm, "delta": dp_delta, "rounds": dp_rounds,
              "epsilon_budget": dp_epsilon_budget}  # fmt: skip
        self._dp_config, self._dp_line = _dp_node_config(dp)
        self.dp_device_budget = dp_device_budget
        self.cache_dir = Path(cache or DEFAULT_CACHE).expanduser().resolve()
        self.out = Path(out).expanduser().resolve() if out is not None else None
        self.personalize_epochs = personalize_epochs
        self.server_timeout = float(server_timeout)
        self.warm_worker = bool(warm_worker)
        self.heartbeat_s = _check_heartbeat(heartbeat_s)
        self._session_dir = Path(session_dir).expanduser().resolve() if session_dir is not None else None
        self.on_event = on_event
        self.returncode: int | None = None
        self._supervisor: Supervisor | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ what the device reports
    @property
    def node_config(self) -> dict[str, Any]:
        """The SuperNode's ``--node-config`` (the ClientApp reads its settings from it)."""
        budget = {"dp-device-budget": self.dp_device_budget} if self.dp_device_budget else {}
        return (
            {
                "exit": self.exit,
                "device": self.device,
                "data": str(self.data),
                "root": str(self.root),
                "model": str(self.model) if self.model else None,
                "cache": str(self.cache_dir),
                "out": str(self.out) if self.out else None,
                "personalize-epochs": self.personalize_epochs,
            }
            | self._dp_config
            | budget
        )

    @property
    def session_dir(self) -> Path | None:
        """Where this session's events.jsonl and supernode.log are (None before :meth:`start`)."""
        return self._supervisor.session_dir if self._supervisor else self._session_dir

    @property
    def events(self) -> list[dict[str, Any]]:
        """The ClientApp's event-log entries so far (one per handled message)."""
        return list(self._supervisor.events) if self._supervisor else []

    @property
    def rounds_trained(self) -> int:
        return sum(1 for ev in self.events if ev.get("kind") == "train" and "error" not in ev)

    @property
    def deployable_model(self) -> Path | None:
        """``out`` once the device has written its model there (loads with `fedsd predict --model`)."""
        return self.out if self.out is not None and (self.out / "fedsd.json").is_file() else None

    # ------------------------------------------------------------------ running
    def run(self) -> int:
        """Join the run and block until it ends; returns the exit code (0 done, 3 server gone, 4 refused,
        1 SuperNode failure, 130 interrupted). In the main thread SIGINT/SIGTERM stop it cleanly."""
        return self._finish(self._prepare().run())

    def start(self) -> Device:
        """Join the run in a background thread and return at once (see :meth:`wait`, :meth:`stop`)."""
        sup = self._prepare()

        def target() -> None:
            try:
                self._finish(sup.run())
            except BaseException as e:  # re-raised by wait() in the caller's thread
                self._error = e
                self.returncode = self.returncode if self.returncode is not None else 1

        self._thread = threading.Thread(target=target, name=f"fedsd-device-{self.address}", daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code once the run has ended, or None if it is still going after ``timeout`` seconds."""
        if self._thread is None:
            return self.returncode
        self._thread.join(timeout)
        if self._thread.is_alive():
            return None
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        return self.returncode

    def stop(self, timeout: float | None = 30.0) -> int | None:
        """Stop the SuperNode (exit code 130 unless the run had already ended) and wait for it."""
        if self._supervisor is not None:
            self._supervisor.request_stop("stop requested")
        return self.wait(timeout)

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ pieces
    def check_server(self) -> None:
        """Refuse a server that speaks the other transport (a plain-HTTP SuperNode retries a TLS server
        forever; a TLS device must not fall back to plain HTTP). An unreachable server is not an error
        here: the supervisor waits ``server_timeout`` for it."""
        from fedsd.process.launch import probe_transport

        spoken = probe_transport(self.host, self.port)
        if self.insecure and spoken == "tls":
            raise DeviceOptionError(
                f"the server {self.address} serves TLS: start this device with --root-cert CA.pem "
                "(the ca.pem of the server's --tls-dir) instead of --insecure"
            )
        if self.root_cert is not None and spoken == "plain":
            raise DeviceOptionError(
                f"the server {self.address} serves plain HTTP (started with --insecure): this device will "
                "not send its data unencrypted; ask for a TLS server (fedsd server start --tls-dir)"
            )

    def _emit(self, source: str, level: str, text: str, data: dict[str, Any] | None = None) -> None:
        if self.on_event is not None:
            self.on_event(DeviceEvent(source, level, printable(text, 2000), data))

    def _prepare(self) -> Supervisor:
        with self._lock:
            if self._supervisor is not None:
                raise RuntimeError("this Device has already been started; make a new one for another run")
            self.check_server()
            if self._dp_line:
                self._emit("setup", "info", self._dp_line)
            if self.insecure:
                self._emit("setup", "warning", "warning: --insecure: traffic to the server is not encrypted "
                           "(use only on loopback or a trusted network)")  # fmt: skip
            else:
                self._emit("setup", "info", f"TLS: the server must present a certificate signed by "
                           f"{self.root_cert}" + (f"; node authentication with {self.auth_key}"
                                                  if self.auth_key else ""))  # fmt: skip
            self._emit("setup", "info", f"device: exit {self.exit if self.exit is not None else 'deepest'} "
                       f"on {self.device}, {self.n_utterances} utterances ({self.n_labelled} labelled) "
                       f"from {self.data}")  # fmt: skip
            self._emit("setup", "info", f"model: {self.model}" if self.model
                       else "model: none given — the server will deliver its base model")  # fmt: skip
            session = self._session_dir or default_session_dir(self.cache_dir)
            self._emit("setup", "info", f"connecting to {self.address} (session files: {session})")
            self._supervisor = Supervisor(
                SupervisorSettings(
                    server=self.address,
                    node_config=self.node_config,
                    session_dir=session,
                    server_timeout=self.server_timeout,
                    root_certificates=self.root_cert,
                    auth_key=self.auth_key,
                    warm_worker=self.warm_worker,
                    heartbeat_s=self.heartbeat_s,
                ),
                on_event=self._on_client_event,
                on_status=self._on_status,
            )
            return self._supervisor

    def _on_client_event(self, ev: dict[str, Any]) -> None:
        level = "error" if "error" in ev else ("success" if ev.get("kind") == "done" else "info")
        self._emit("device", level, describe_event(ev), ev)

    def _on_status(self, level: str, text: str) -> None:
        self._emit("supervisor", "detail" if level == "info" else level, text)

    def _finish(self, code: int) -> int:
        self.returncode = code
        trained = self.rounds_trained
        if code == EXIT_DONE:
            self._emit("summary", "success", f"done: {trained} round(s) trained on this device")
        if self.deployable_model is not None:
            self._emit("summary", "info", f"deployable model: {self.out} (fedsd predict --model {self.out})")
        if code == EXIT_REFUSED:
            self._emit("summary", "error", "the server refused this device (see the reason above)")
        elif code == EXIT_SERVER_GONE:
            self._emit("summary", "warning", f"the server went away after {trained} trained round(s) on "
                       "this device")  # fmt: skip
        return code


def _check_data(data: Path, root: Path) -> tuple[Path, Path, int, int]:
    """The manifest and audio root, resolved; every audio file it names must be there."""
    from fedsd.data.manifest import ManifestError, read_manifest

    data, root = data.expanduser().resolve(), root.expanduser().resolve()
    if not data.is_file():
        raise DeviceOptionError(f"--data {data}: manifest file not found", 1)
    try:
        rows = read_manifest(data)
    except (ManifestError, OSError, ValueError) as e:
        raise DeviceOptionError(f"--data {data}: {e}", 1) from None
    if not rows:
        raise DeviceOptionError(f"--data {data}: the manifest has no rows", 1)
    if not root.is_dir():
        raise DeviceOptionError(f"--root {root}: directory not found", 1)
    missing = [r.path for r in rows if not (root / r.path).is_file()]
    if missing:
        raise DeviceOptionError(
            f"--root {root}: {len(missing)} of {len(rows)} audio files of {data.name} are missing there "
            f"(first: {missing[0]})",
            1,
        )
    return data, root, len(rows), sum(1 for r in rows if r.label)


def _check_model(model: Path, exit: int | None) -> Path:
    """A fedsd checkpoint that has the chosen exit."""
    model = model.expanduser().resolve()
    if not (model / "fedsd.json").is_file():
        raise DeviceOptionError(f"--model {model}: not a fedsd checkpoint (no fedsd.json)", 1)
    try:
        exits = [
            int(k) for k in json.loads((model / "fedsd.json").read_text(encoding="utf-8")).get("exits", [])
        ]
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise DeviceOptionError(f"--model {model}: unreadable fedsd.json ({e})", 1) from None
    if exit is not None and exits and exit not in exits:
        raise DeviceOptionError(f"--exit {exit}: the model {model} has exits {exits}")
    return model
