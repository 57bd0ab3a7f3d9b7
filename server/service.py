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
import os
import shlex
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsd.process import launch
from fedsd.server import deploy

from .previous_run import (
    PREVIOUS_RUN_FILES,
    central_dp_change,
    read_json,
    read_metrics,
    resume_spec,
    set_aside_previous_run,
)
from .run_stream import RunStream
from .security_checks import check_security, checked_key, client_host, register_device_key
from .service_types import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NO_DEVICES,
    EXIT_OK,
    EXIT_USAGE,
    DeviceSlot,
    Log,
    Registration,
    ServerError,
    ServerSummary,
    log_to_logging,
)

if TYPE_CHECKING:
    from fedsd.config import ExperimentConfig
    from fedsd.process.launch import ManagedProcess
    from fedsd.server.federation import FederationSpec


def proxy_limits(max_body: int | None, max_connections: int | None) -> list[str]:
    """The fleet proxy's limit flags; ServerError (code 2) for a limit below 1."""
    if max_body is not None and max_body < 1:
        raise ServerError(f"--proxy-max-body {max_body}: must be at least 1 byte", EXIT_USAGE)
    if max_connections is not None and max_connections < 1:
        raise ServerError(f"--proxy-max-connections {max_connections}: must be >= 1", EXIT_USAGE)
    return [
        *(["--max-body", str(max_body)] if max_body is not None else []),
        *(["--max-connections", str(max_connections)] if max_connections is not None else []),
    ]


def _load(
    config: ExperimentConfig | str | os.PathLike[str], overrides: dict[str, Any]
) -> tuple[Path | None, ExperimentConfig]:
    """(the YAML path or None for an object, the config with ``overrides``); ServerError if it is unusable."""
    from fedsd.config import ConfigError, ExperimentConfig, load_config, resolve_config_path

    try:
        if isinstance(config, ExperimentConfig):
            return None, _with_overrides(config, overrides)
        # a shipped name (`demo`) too
        return resolve_config_path(config).resolve(), load_config(config, overrides)
    except ConfigError as e:
        raise ServerError(str(e)) from None


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
        self.proxy_limits = proxy_limits(proxy_max_body, proxy_max_connections)
        self._log_fn: Log = log if log is not None else log_to_logging
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
        self.config_path, self.cfg = _load(config, self.overrides)
        self.run_dir = Path(out or Path("runs") / f"{self.cfg.name}-server").expanduser().resolve()
        self.flwr_home = self.run_dir / ".flwr"
        self.spec: FederationSpec | None = None
        self.devices: list[DeviceSlot] = []
        self.internal_port: int | None = None
        self._superlink: ManagedProcess | None = None
        self._proxy: ManagedProcess | None = None
        self._run_stream: RunStream | None = None
        self._summary: ServerSummary | None = None

    def _log(self, message: str, level: str = "info") -> None:
        self._log_fn(message, level)

    # ------------------------------------------------------------------ properties
    @property
    def address(self) -> str:
        """What devices dial (``--server`` of `fedsd client run`)."""
        return launch.join_address(client_host(self.host), self.port)

    @property
    def run_id(self) -> int | None:
        """The id of the submitted run, once the SuperLink accepted it (None before)."""
        return self._run_stream.run_id if self._run_stream is not None else None

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
        flwr_run = self._run_stream.process if self._run_stream is not None else None
        for proc in (self._superlink, self._proxy, flwr_run):
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
        earlier = resume_spec(self.run_dir) if self.resume else None
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
        done = read_json(self.run_dir / "state.json").get("completed_round")
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
        change = central_dp_change(read_json(self.run_dir / "state.json"), self.cfg)
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
        self._run_stream = RunStream(self.flwr_home, self.spec_path, self.on_output)
        return self._run_stream.start(timeout)

    # ------------------------------------------------------------------ 4. wait
    def wait(self, timeout: float | None = None) -> ServerSummary:
        """Submit (if not yet), wait until the run's stream ends and ask the SuperLink for its real
        outcome (`flwr run`'s exit code is not it). TimeoutError after ``timeout`` seconds (the run goes
        on: wait again or stop); ServerError if the outcome cannot be read."""
        if self._summary is not None:
            return self._summary
        run_id = self.submit()
        assert self._run_stream is not None
        stream = self._run_stream.thread
        deadline = None if timeout is None else time.monotonic() + timeout
        while stream.is_alive():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"run {run_id} still running after {timeout:.0f} s; wait() again or stop()"
                )
            stream.join(0.5)
        try:
            status = deploy.wait_finished(self.flwr_home, run_id, timeout=60.0)
        except launch.DeployError as e:
            raise ServerError(f"could not read the outcome of run {run_id}: {e}") from None
        self._summary = self._summarize(run_id, status)
        return self._summary

    def _summarize(self, run_id: int, status: dict[str, Any]) -> ServerSummary:
        state = str(status.get("status", "?"))
        details = str(status.get("status-details") or "")
        outcome = read_json(self.run_dir / "outcome.json")
        summary = ServerSummary(
            run_id, state, details, EXIT_FAILED, self.run_dir, "", None, outcome, read_metrics(self.run_dir)
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
        superlink, proxy, run_stream = self._superlink, self._proxy, self._run_stream
        flwr_run = run_stream.process if run_stream is not None else None
        stream = run_stream.thread if run_stream is not None and run_stream.thread.ident is not None else None
        self._superlink = self._proxy = None
        if run_stream is not None:
            run_stream.process = None
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
        key = checked_key(public_key)
        try:
            return deploy.register_node(self.flwr_home, key)
        except launch.DeployError as e:
            raise ServerError(str(e)) from None


__all__ = [
    "PREVIOUS_RUN_FILES",
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
