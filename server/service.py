"""The server of a federated run as a Python object: what `fedsd server start` does, without the CLI.

    from fedsd import api

    cfg = api.load_config("configs/demo.yaml")
    with api.Server(cfg, out="runs/fed", port=9092, insecure=True) as server:
        devices = server.prepare()      # data, partition, base model, one manifest per device
        server.start()                  # SuperLink on loopback + the fleet proxy on host:port
        server.submit()                 # `flwr run` of the fedsd app (returns the run id)
        summary = server.wait()         # ServerSummary: completed? exit code, metrics, message
    # leaving the block stopped every process the server started

Each step runs the ones before it when they have not run yet, so ``server.wait()`` alone does it all.

Why an object: the command, a notebook, a benchmark and the tests share one orchestration (resume,
setting an earlier run aside, preparation, SuperLink + fleet proxy, submission, the real outcome and the
clean-up) instead of a 300-line command. Flags map one to one onto the constructor's arguments.

Signals: a ``Server`` installs no signal handler — a library must not change a process's signal
disposition behind its caller's back (a notebook's kernel, a test runner). Whoever owns the process maps
SIGINT/SIGTERM to an exception and calls :meth:`Server.stop` (the ``with`` block does); `fedsd server
start` does exactly that, and also keeps a second Ctrl-C from cutting the clean-up short.

Errors: anything that keeps the run from starting raises :class:`ServerError` (its ``code`` is the exit
code the command uses: 2 for flags that do not fit, 1 otherwise); a run that started and failed is not
an exception but a :class:`ServerSummary` whose ``exit_code`` says how it ended.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsd.process import launch
from fedsd.server import deploy

if TYPE_CHECKING:
    from fedsd.config import ExperimentConfig
    from fedsd.process.launch import ManagedProcess
    from fedsd.security.certs import TlsFiles
    from fedsd.server.federation import FederationSpec

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_DEVICES = 3
"""Fewer than min_clients devices were connected within device_wait seconds."""
EXIT_INTERRUPTED = 130

Log = Callable[[str, str], None]
"""``log(message, level)``; level is ``"info"``, ``"warn"`` or ``"ok"`` (a step that succeeded)."""

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

_logger = logging.getLogger("fedsd.server")


def _log_to_logging(message: str, level: str) -> None:
    _logger.log(logging.WARNING if level == "warn" else logging.INFO, message)


class ServerError(RuntimeError):
    """The server could not start (or read its run's outcome); the message says why and what to do.

    ``code`` is the exit code `fedsd server start` ends with: 2 for options that do not fit, else 1.
    """

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class DeviceSlot:
    """One device of the prepared run: its manifest and the command that starts it."""

    name: str
    manifest: Path
    utterances: int
    labelled: int
    exit: int
    """The exit the config's ``federated.exits_mix`` suggests for it."""
    command: str
    """A ready-to-paste ``fedsd client run ...`` line (add ``--model DIR`` if the device has the model)."""


@dataclass
class ServerSummary:
    """How a submitted run ended, as the SuperLink recorded it (``flwr ls``) plus the run directory."""

    run_id: int
    status: str
    """Flower's run status, e.g. ``finished:completed``, ``finished:failed``, ``finished:stopped``."""
    details: str
    exit_code: int
    """0 completed, 3 not enough devices, 1 any other failure."""
    run_dir: Path
    message: str
    """One line for a person: what happened and where the results are."""
    hint: str | None = None
    """For a failed run: where the SuperLink log is and the command that resumes the run."""
    outcome: dict[str, Any] = field(default_factory=dict)
    """What the ServerApp wrote about an early end (``outcome.json``), or {}."""
    metrics: list[dict[str, Any]] = field(default_factory=list)
    """The records of ``metrics.jsonl`` (one per evaluated round)."""

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"


@dataclass(frozen=True)
class Registration:
    """A device key registered with a running server (node authentication)."""

    public_key: Path
    node_id: int
    address: str


# ----------------------------------------------------------------------------- helpers
def client_host(host: str) -> str:
    """What a device should dial: the bind address, or this machine's name for a wildcard bind."""
    return socket.gethostname() if host in ("0.0.0.0", "::", "") else host


def check_security(
    tls_dir: Path | None,
    insecure: bool,
    auth: bool,
    node_keys: Iterable[Path],
    host: str,
    log: Log = _log_to_logging,
) -> TlsFiles | None:
    """Check the transport/auth options before anything starts; a ServerError (code 2) says what does
    not fit. Returns the TLS files (None for ``insecure``)."""
    from fedsd.security.certs import (
        SecurityError,
        certificate_hosts,
        check_tls_dir,
        covers_host,
        load_certificate,
        load_node_public_key,
    )

    node_keys = list(node_keys)
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
    if tls_dir is None:
        return None
    try:
        files = check_tls_dir(tls_dir)
        cert = load_certificate(files.server_cert, "server certificate")
    except SecurityError as e:
        raise ServerError(str(e), 2) from None
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
    return files


def _resume_spec(run_dir: Path) -> tuple[FederationSpec, str] | None:
    """(spec, where it came from) of an earlier run in ``run_dir``, or None."""
    from fedsd.server.federation import FederationSpec

    spec_path = run_dir / "spec.json"
    if spec_path.is_file():
        return FederationSpec.from_json(spec_path.read_text(encoding="utf-8")), str(spec_path)
    state_path = run_dir / "state.json"
    if state_path.is_file():
        state = json.loads(state_path.read_text(encoding="utf-8"))
        if isinstance(state.get("spec"), dict):
            return FederationSpec(**state["spec"]), str(state_path)
    return None


def set_aside_previous_run(run_dir: Path) -> Path | None:
    """Move an earlier run's progress out of ``run_dir`` before a fresh (not resumed) start.

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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _with_overrides(cfg: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """An ExperimentConfig with dotted overrides applied (validated like a YAML file's)."""
    from pydantic import ValidationError

    from fedsd.config import ConfigError, ExperimentConfig

    raw = cfg.model_dump(mode="json")
    for key, value in overrides.items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: '{p}' is not a section")
        node[leaf] = value
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"overrides {overrides}: {e}") from None


def central_dp_change(state: dict[str, Any], cfg: ExperimentConfig) -> tuple[str, str] | None:
    """(message, level) when a resume changes central DP from what ``state.json`` says the run used.

    Nothing is refused: the ServerApp composes ε over every σ (``fedsd.server.central_dp``); this says
    so before the run starts, and warns where the accounting can no longer promise a bound.
    """
    done = int(state.get("completed_round") or 0)
    if done <= 0:
        return None
    saved = state.get("central_dp")
    rounds = saved.get("rounds") if isinstance(saved, dict) else None
    used = sorted({float(v) for v in (rounds or {}).values() if isinstance(v, int | float)})
    new = cfg.federated.central_dp
    if new is None and saved:
        return (
            f"resume: central DP is off from round {done + 1} on (rounds 1..{done} used σ "
            f"{', '.join(f'{v:g}' for v in used) or '?'}): the heads released from now on are not noised "
            "and no ε is reported for them",
            "warn",
        )
    if new is not None and not saved:
        return (
            f"resume: central DP is switched on after {done} round(s) released without it: its ε is ∞ "
            "(no bound covers those rounds); start a new run for a finite ε",
            "warn",
        )
    if new is not None and used and used != [float(new.noise_multiplier)]:
        return (
            f"resume: central DP σ {new.noise_multiplier:g} after σ {', '.join(f'{v:g}' for v in used)}: "
            "ε composes over every round's σ (state.json keeps them)",
            "info",
        )
    return None


# ----------------------------------------------------------------------------- the server
class Server:
    """A federated run's server: prepare → start (SuperLink + fleet proxy) → submit → wait → stop.

    ``config``: an :class:`~fedsd.config.ExperimentConfig` (written to ``OUT/config.yaml`` for the
    ServerApp, with its data paths made absolute) or the path of a YAML config. The keyword arguments are
    `fedsd server start`'s options: ``out`` (default ``runs/<name>-server``), ``host``/``port`` (where
    devices connect: the fleet proxy; the SuperLink itself listens on loopback), ``rounds``,
    ``min_clients``, ``base_model``, ``resume`` (continue the run in ``out``), ``tls_dir`` or
    ``insecure`` (exactly one), ``auth`` + ``node_keys`` (node authentication), ``device_wait`` (seconds
    to wait for ``min_clients`` devices before the run ends with exit code 3) and ``overrides`` (dotted
    config keys). ``log(message, level)`` receives what the server does (default: the ``fedsd.server``
    logger); ``on_output(line)`` every line `flwr run --stream` prints (default: dropped).

    The options are checked here (a :class:`ServerError` with code 2 when they do not fit); nothing starts
    before :meth:`prepare`/:meth:`start`.
    """

    def __init__(
        self,
        config: ExperimentConfig | str | os.PathLike[str],
        *,
        out: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 8000,
        rounds: int | None = None,
        min_clients: int | None = None,
        base_model: str | os.PathLike[str] | None = None,
        resume: bool = False,
        tls_dir: str | os.PathLike[str] | None = None,
        insecure: bool = False,
        auth: bool = False,
        node_keys: Iterable[str | os.PathLike[str]] = (),
        device_wait: float = 600.0,
        overrides: dict[str, Any] | None = None,
        log: Log | None = None,
        on_output: Callable[[str], None] | None = None,
        proxy_max_body: int | None = None,
        proxy_max_connections: int | None = None,
    ) -> None:
        from fedsd.config import ConfigError, ExperimentConfig, load_config, resolve_config_path

        if proxy_max_body is not None and proxy_max_body < 1:
            raise ServerError(f"--proxy-max-body {proxy_max_body}: must be at least 1 byte", EXIT_USAGE)
        if proxy_max_connections is not None and proxy_max_connections < 1:
            raise ServerError(f"--proxy-max-connections {proxy_max_connections}: must be >= 1", EXIT_USAGE)
        self.proxy_limits = [
            *(["--max-body", str(proxy_max_body)] if proxy_max_body is not None else []),
            *(["--max-connections", str(proxy_max_connections)] if proxy_max_connections is not None else []),
        ]

        self._log_fn: Log = log if log is not None else _log_to_logging
        self.on_output = on_output
        self.host, self.port = host, port
        self.rounds, self.min_clients, self.device_wait = rounds, min_clients, device_wait
        self.resume, self.auth = resume, auth
        self.base_model = Path(base_model).expanduser().resolve() if base_model is not None else None
        self.overrides = dict(overrides or {})
        keys = [Path(k) for k in node_keys]
        self.tls = check_security(
            Path(tls_dir) if tls_dir else None, insecure, auth, keys, host, self._log_fn
        )
        self.node_keys = list(dict.fromkeys(k.expanduser().resolve() for k in keys))
        try:
            if isinstance(config, ExperimentConfig):
                self.config_path: Path | None = None
                self.cfg = _with_overrides(config, self.overrides)
            else:
                self.config_path = resolve_config_path(config).resolve()  # a shipped name (`demo`) too
                self.cfg = load_config(config, self.overrides)
        except ConfigError as e:
            raise ServerError(str(e)) from None
        self.run_dir = Path(out or Path("runs") / f"{self.cfg.name}-server").expanduser().resolve()
        self.flwr_home = self.run_dir / ".flwr"
        self.spec: FederationSpec | None = None
        self.devices: list[DeviceSlot] = []
        self.internal_port: int | None = None
        self.run_id: int | None = None
        self._superlink: ManagedProcess | None = None
        self._proxy: ManagedProcess | None = None
        self._flwr_run: ManagedProcess | None = None
        self._stream: threading.Thread | None = None
        self._stream_result: tuple[int | None, int] | None = None
        self._stream_error: BaseException | None = None
        self._tail: deque[str] = deque(maxlen=40)
        self._summary: ServerSummary | None = None

    def _log(self, message: str, level: str = "info") -> None:
        self._log_fn(message, level)

    # ------------------------------------------------------------------ properties
    @property
    def address(self) -> str:
        """What devices dial (``--server`` of `fedsd client run`)."""
        return launch.join_address(client_host(self.host), self.port)

    @property
    def spec_path(self) -> Path:
        return self.run_dir / "spec.json"

    @property
    def running(self) -> bool:
        """The SuperLink is up (between :meth:`start` and :meth:`stop`)."""
        return self._superlink is not None and self._superlink.alive()

    def pids(self) -> list[int]:
        """The live processes this server started (SuperLink, fleet proxy, `flwr run`) and their
        descendants (superexec, serverapp): what :meth:`stop` ends."""
        found: list[int] = []
        for proc in (self._superlink, self._proxy, self._flwr_run):
            if proc is not None and proc.alive():
                found += [proc.pid, *launch.descendants(proc.pid)]
        return found

    def security_flags(self) -> list[str]:
        """The transport options of `fedsd server start` that reproduce this server's."""
        if self.tls is None:
            return ["--insecure"]
        flags = ["--tls-dir", str(self.tls.ca_cert.parent), *(["--auth"] if self.auth else [])]
        for key in self.node_keys:
            flags += ["--node-key", str(key)]
        return flags

    # ------------------------------------------------------------------ 1. prepare
    def prepare(self) -> list[DeviceSlot]:
        """Data, partition, base model and one manifest per device (or, with ``resume``, what the run
        directory already holds); writes ``OUT/spec.json``. Returns the devices to start."""
        if self.spec is not None:
            return self.devices
        self._check_port(
            f"port {self.port} on {self.host} is in use (another server?); choose another with --port"
        )
        if self.tls is None:
            self._log(
                "warning: --insecure: the SuperLink serves plain HTTP; traffic (model heads, metrics) is not "
                "encrypted and any device can join — use it only on loopback or a trusted network",
                "warn",
            )
        else:
            self._log(
                f"TLS: serving HTTPS with {self.tls.server_cert} (CA {self.tls.ca_cert}); "
                + (
                    "node authentication on: only registered device keys may join"
                    if self.auth
                    else "no node authentication: any device with the CA certificate can join (add --auth)"
                )
            )
        earlier = _resume_spec(self.run_dir) if self.resume else None
        spec, manifests = self._reuse(*earlier) if earlier is not None else self._prepare_fresh()
        if self.rounds is not None:
            spec.rounds = self.rounds
        if self.min_clients is not None:
            spec.min_clients = self.min_clients
        spec.node_wait_s = self.device_wait
        fed = self.cfg.federated
        self._log(f"partition: {spec.partition}", "info")
        self._log(
            f"rounds: {spec.rounds or fed.rounds}, devices needed: {spec.min_clients or fed.min_clients}",
            "info",
        )
        from fedsd.checkpoint import atomic_write_json

        atomic_write_json(self.spec_path, json.loads(spec.to_json()))
        self.spec = spec
        self.devices = self._device_slots(manifests)
        return self.devices

    def _config_file(self) -> str:
        """The config the ServerApp loads: the given YAML, or the object written to ``OUT/config.yaml``."""
        if self.config_path is not None:
            return str(self.config_path)
        from fedsd.config import config_to_yaml

        cfg = self.cfg.model_copy(deep=True)
        cfg.data.root = cfg.data.root.expanduser().resolve()
        if cfg.data.manifest is not None:
            cfg.data.manifest = cfg.data.manifest.expanduser().resolve()
        if cfg.base_model is not None:
            cfg.base_model = cfg.base_model.expanduser().resolve()
        path = self.run_dir / "config.yaml"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(config_to_yaml(cfg), encoding="utf-8")
        return str(path)

    def _reuse(self, spec: FederationSpec, source: str) -> tuple[FederationSpec, list[Path]]:
        """Resume: the earlier run's spec, checked, with this start's config and overrides."""
        base_ok = (Path(spec.base_model) / "fedsd.json").is_file()
        part_ok = spec.partition is None or Path(spec.partition).is_file()
        if not (base_ok and part_ok):
            raise ServerError(
                f"--resume: {source} names base model {spec.base_model} and partition {spec.partition}, "
                "which are gone; start over without --resume"
            )
        if self.base_model is not None and self.base_model != Path(spec.base_model):
            raise ServerError(
                f"--resume: the run in {self.run_dir} federates {spec.base_model}, not --base-model "
                f"{self.base_model}; drop --base-model or start a new run"
            )
        done = _read_json(self.run_dir / "state.json").get("completed_round")
        self._log(
            f"resume: reusing {source} (base model {spec.base_model}, partition {spec.partition}); "
            + (f"state.json says round {done} is complete" if done is not None else "no round done yet")
            + " — no data preparation, no training",
            "info",
        )
        spec.config = self._config_file()
        # an ExperimentConfig object already holds its overrides: the written file is the whole config
        spec.overrides = {**spec.overrides, **self.overrides} if self.config_path is not None else {}
        spec.resume = True
        change = central_dp_change(_read_json(self.run_dir / "state.json"), self.cfg)
        if change is not None:
            self._log(*change)
        return spec, sorted((self.run_dir / "devices").glob("*.csv"))

    def _prepare_fresh(self) -> tuple[FederationSpec, list[Path]]:
        from fedsd.config import ConfigError
        from fedsd.server.federation import FederationSpec
        from fedsd.server.prepare import prepare_run

        if self.resume:
            self._log(
                f"resume: {self.run_dir} holds no earlier run (no spec.json/state.json); starting a new one"
            )
        else:
            if (self.run_dir / "state.json").is_file():
                self._log(
                    f"{self.run_dir} holds an earlier run: starting over (pass --resume to continue it)",
                    "warn",
                )
            moved = set_aside_previous_run(self.run_dir)
            if moved is not None:
                self._log(f"moved the earlier run's state, metrics and rounds to {moved}", "info")
        try:
            prepared = prepare_run(
                self.cfg, self.run_dir, log=lambda m: self._log(m, "info"), base_model=self.base_model
            )
        except (ConfigError, ValueError, FileNotFoundError) as e:
            raise ServerError(str(e)) from None
        self._log(
            "base model: "
            + (
                f"trained here → {prepared.base_model}"
                if prepared.trained_here
                else f"{prepared.base_model} (existing checkpoint, not retrained)"
            ),
            "info",
        )
        spec = FederationSpec(
            config=self._config_file(),
            run_dir=str(self.run_dir),
            base_model=str(prepared.base_model),
            partition=str(prepared.partition.resolve()),
            eval_manifest=str(self.cfg.data.manifest_path.expanduser().resolve()),
            eval_root=str(self.cfg.data.root.expanduser().resolve()),
            resume=self.resume,
            overrides=self.overrides if self.config_path is not None else {},
        )
        return spec, [m.resolve() for m in prepared.client_manifests]

    def _device_slots(self, manifests: list[Path]) -> list[DeviceSlot]:
        from fedsd.data.manifest import read_manifest

        exits = list(self.cfg.federated.exits_mix or [self.cfg.model.exits[-1]])
        if self.tls is None:
            transport = "--insecure"
        else:
            transport = f"--root-cert {shlex.quote(str(self.tls.ca_cert))}" + (
                " --auth-key KEY" if self.auth else ""
            )
        root = shlex.quote(str(self.cfg.data.root.expanduser().resolve()))
        slots = []
        for i, m in enumerate(manifests):
            rows = read_manifest(m)
            k = exits[i % len(exits)]
            command = (
                f"fedsd client run --server {self.address} {transport} --exit {k} "
                f"--data {shlex.quote(str(m))} --root {root}"
            )
            slots.append(DeviceSlot(m.stem, m, len(rows), sum(1 for r in rows if r.label), k, command))
        return slots

    # ------------------------------------------------------------------ 2. start
    def start(self) -> None:
        """Prepare (if not yet), then start the SuperLink on loopback and the fleet proxy on host:port;
        registers ``node_keys``. A failure stops what was started and raises ServerError."""
        if self._superlink is not None:
            return
        self.prepare()
        if self.tls is not None:
            self._log(
                f"copy {self.tls.ca_cert} to each device (it is public; never copy ca.key or server.key)"
                + (
                    "; each device makes KEY with `fedsd client keygen --out KEY` and you register its "
                    f"KEY.pub with `fedsd server register-node KEY.pub --out {self.run_dir}` (or --node-key)"
                    if self.auth
                    else ""
                ),
                "info",
            )
        self.internal_port = launch.free_port("127.0.0.1")  # the SuperLink's own port: loopback only
        deploy.write_flwr_home(
            self.flwr_home,
            launch.join_address("127.0.0.1", self.internal_port),
            insecure=self.tls is None,
            root_certificates=self.tls.ca_cert if self.tls is not None else None,
        )
        deploy.write_app_dir(self.flwr_home / "app")
        self._log(f"run spec: {self.spec_path}; Flower home: {self.flwr_home}", "info")
        self._check_port(
            f"port {self.port} on {self.host} was taken while preparing; choose another with --port"
        )
        try:
            self._start_processes()
        except Exception:
            self.stop()
            raise
        for key in self.node_keys:
            try:
                node_id = deploy.register_node(self.flwr_home, key)
            except launch.DeployError as e:
                self.stop()
                raise ServerError(f"--node-key {key}: {e}") from None
            self._log(f"registered device key {key} (node id {node_id})", "info")

    def _start_processes(self) -> None:
        assert self.internal_port is not None
        self._superlink = deploy.start_superlink(
            self.flwr_home,
            "127.0.0.1",
            self.internal_port,
            log_path=self.flwr_home / "superlink.log",
            cwd=Path.cwd(),
            tls=self.tls,
            node_auth=self.auth,
        )
        try:
            launch.wait_for_port(
                "127.0.0.1", self.internal_port, timeout=60.0, process=self._superlink, what="the SuperLink"
            )
            self._proxy = deploy.start_fleet_proxy(
                self.flwr_home, self.host, self.port, self.internal_port,
                log_path=self.flwr_home / "proxy.log", tls=self.tls, limits=self.proxy_limits,
            )  # fmt: skip
            launch.wait_for_port(
                self.host, self.port, timeout=60.0, process=self._proxy, what="the fleet proxy"
            )
        except launch.DeployError as e:
            raise ServerError(str(e)) from None
        self._log(
            f"SuperLink listening on {launch.join_address(self.host, self.port)} (pid {self._superlink.pid}, "
            f"log {self._superlink.log_path}): devices reach only its Fleet API there (fleet proxy, pid "
            f"{self._proxy.pid}); its Control API is on loopback "
            f"{launch.join_address('127.0.0.1', self.internal_port)}",
            "ok",
        )

    def _check_port(self, message: str) -> None:
        if not launch.port_free(self.host, self.port):
            raise ServerError(message)

    # ------------------------------------------------------------------ 3. submit
    def submit(self, timeout: float = 300.0) -> int:
        """Start (if not yet) and submit the run (`flwr run ... --stream`, read in a background thread);
        returns its run id once the SuperLink accepted it. ServerError if `flwr run` started none."""
        if self.run_id is not None:
            return self.run_id
        self.start()
        (self.run_dir / "outcome.json").unlink(missing_ok=True)  # only this run's outcome counts
        self._stream = threading.Thread(target=self._read_stream, name="fedsd flwr run", daemon=True)
        self._stream.start()
        deadline = time.monotonic() + timeout
        while self.run_id is None and self._stream.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.run_id is None:
            code = self._stream_result[1] if self._stream_result else None
            why = f"exit code {code}" if code is not None else f"no run id within {timeout:.0f} s"
            if self._stream_error is not None:
                why = f"{type(self._stream_error).__name__}: {self._stream_error}"
            raise ServerError(f"`flwr run` started no run ({why}); its last lines:\n" + "\n".join(self._tail))
        return self.run_id

    def _read_stream(self) -> None:
        def on_start(proc: ManagedProcess) -> None:
            self._flwr_run = proc

        def on_line(line: str) -> None:
            self._tail.append(line)
            if self.run_id is None:
                self.run_id = deploy.parse_run_id(line)
            if self.on_output is not None:
                self.on_output(line)

        try:
            self._stream_result = deploy.submit_run(
                self.flwr_home,
                self.flwr_home / "app",
                {"spec-file": str(self.spec_path)},
                on_line=on_line,
                on_start=on_start,
                cwd=Path.cwd(),
            )
        except BaseException as e:  # noqa: BLE001 - reported by submit()/wait() in the caller's thread
            self._stream_error = e

    # ------------------------------------------------------------------ 4. wait
    def wait(self, timeout: float | None = None) -> ServerSummary:
        """Submit (if not yet), wait until the run's stream ends and ask the SuperLink for its real
        outcome (`flwr run`'s exit code is not it). TimeoutError after ``timeout`` seconds (the run goes
        on: wait again or stop); ServerError if the outcome cannot be read."""
        if self._summary is not None:
            return self._summary
        run_id = self.submit()
        assert self._stream is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._stream.is_alive():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"run {run_id} still running after {timeout:.0f} s; wait() again or stop()"
                )
            self._stream.join(0.5)
        try:
            status = deploy.wait_finished(self.flwr_home, run_id, timeout=60.0)
        except launch.DeployError as e:
            raise ServerError(f"could not read the outcome of run {run_id}: {e}") from None
        self._summary = self._summarize(run_id, status)
        return self._summary

    def _summarize(self, run_id: int, status: dict[str, Any]) -> ServerSummary:
        state = str(status.get("status", "?"))
        details = str(status.get("status-details") or "")
        outcome = _read_json(self.run_dir / "outcome.json")
        summary = ServerSummary(
            run_id, state, details, EXIT_FAILED, self.run_dir, "", None, outcome, _read_metrics(self.run_dir)
        )
        if summary.completed:
            summary.exit_code = EXIT_OK
            summary.message = (
                f"run {run_id} finished: completed — run directory {self.run_dir} (final model "
                f"{self.run_dir / 'final'}, report {self.run_dir / 'report.md'})"
            )
        elif outcome.get("status") == "not-enough-devices":
            summary.exit_code = EXIT_NO_DEVICES
            summary.message = f"run {run_id} stopped: not enough devices — {outcome.get('message')}"
        else:
            summary.message = f"run {run_id} {state} {details}".rstrip()
            config = self.config_path or self.run_dir / "config.yaml"
            summary.hint = (
                f"SuperLink log: {self.flwr_home / 'superlink.log'}; resume with: fedsd server start --config "
                f"{config} --out {self.run_dir} --port {self.port} {shlex.join(self.security_flags())} --resume"
                + (
                    " (a new SuperLink knows no device keys: register them again, or add --node-key KEY.pub)"
                    if self.auth and not self.node_keys
                    else ""
                )
            )
        return summary

    # ------------------------------------------------------------------ 5. stop
    def stop(self) -> None:
        """Stop everything this server started, by pid (a run still in flight is marked stopped first);
        safe to call any number of times, also after a failed start."""
        superlink, proxy, flwr_run, stream = self._superlink, self._proxy, self._flwr_run, self._stream
        self._superlink = self._proxy = self._flwr_run = None
        in_flight = self.run_id is not None and self._summary is None
        if in_flight and superlink is not None and superlink.alive():
            deploy.stop_run(self.flwr_home, int(self.run_id or 0))
        if flwr_run is not None:
            flwr_run.stop(timeout=5.0)
        if stream is not None:
            stream.join(timeout=10.0)
        if proxy is not None:
            proxy.stop(timeout=5.0)
        if superlink is not None:
            superlink.stop(timeout=10.0)
            self._log("SuperLink stopped", "info")

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ node authentication
    def register_node(self, public_key: str | os.PathLike[str]) -> int:
        """Allow one more device into this running server (``auth=True``); returns its node id."""
        if not self.auth:
            raise ServerError(
                "register_node: this server runs without node authentication (auth=True, tls_dir)"
            )
        if not self.running:
            raise ServerError("register_node: the server is not running; start() it first")
        key = _checked_key(public_key)
        try:
            return deploy.register_node(self.flwr_home, key)
        except launch.DeployError as e:
            raise ServerError(str(e)) from None


def _checked_key(public_key: str | os.PathLike[str]) -> Path:
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

    key = _checked_key(public_key)
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


__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_NO_DEVICES",
    "EXIT_OK",
    "EXIT_USAGE",
    "DeviceSlot",
    "Registration",
    "Server",
    "ServerError",
    "ServerSummary",
    "central_dp_change",
    "check_security",
    "client_host",
    "register_device_key",
    "set_aside_previous_run",
]
