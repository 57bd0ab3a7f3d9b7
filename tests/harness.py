"""One harness for tests that run real processes (servers, devices, Flower commands) on loopback.

Why: starting `fedsd server start`, devices and Flower commands, waiting for what they print and
cleaning up after them is the same in every process test; written once here, each wait has its own
deadline, a failure shows the last log lines and exit code of every process, and the teardown stops
everything by pid and fails the test if anything is left.

- ``Procs`` (the ``procs`` fixture in conftest.py) starts processes as ``fedsd.process.launch.ManagedProcess``
  children (own process group, parent-death guard), each with its output in ``<tmp>/<name>.log``;
- ``Proc.wait_for(regex, timeout)`` waits for a LOG LINE (the log with whitespace folded, as rich
  wraps long lines), never for a sleep; it raises at once when the process dies without printing it;
- ``Proc.wait_exit``, ``Procs.wait_all_exit`` and ``Procs.wait_until`` each take their own deadline;
- every descendant seen while waiting is remembered (pid + start time), so the teardown also reaches
  children that were re-parented after their parent was killed, and asserts none is left.

Also here: the environment of a test command, config files and the in-process federation set-up that
several test files share.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedsd.process.launch import ManagedProcess, descendants, free_port

FEDSD = [sys.executable, "-m", "fedsd.cli.main"]
LABELS = ["neutral", "happy", "angry", "sad"]
POLL_S = 0.25


def env(**extra: str) -> dict[str, str]:
    """The environment of a test command: offline, no telemetry, wide unbuffered output."""
    out = dict(os.environ)
    out.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        COLUMNS="200",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",  # a test runs a server, a ServerApp and devices at once on 2 cores
        MKL_NUM_THREADS="1",
    )
    out.update(extra)
    return out


def flat(text: str) -> str:
    """``text`` with whitespace folded: rich's line wrapping undone."""
    return " ".join(text.split())


def read_text(path: Path | None) -> str:
    if path is None or not path.exists():
        return ""
    return path.read_text(encoding="utf-8", errors="replace")


# ----------------------------------------------------------------------------- /proc
def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], fields[19]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def running(pid: int, started: str | None = None) -> bool:
    """The process runs (a zombie is dead) and, with ``started``, is the one seen then (no pid reuse)."""
    st = _stat(pid)
    return st is not None and st[0] not in "ZX" and (started is None or st[1] == started)


def flower_processes(marker: str) -> list[str]:
    """Live Flower processes whose command line mentions ``marker`` (e.g. ``127.0.0.1:PORT``)."""
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if entry.name.isdigit():
            cmd = cmdline(int(entry.name))
            if marker in cmd and ("flower-" in cmd or "flwr" in cmd) and running(int(entry.name)):
                found.append(f"{entry.name}: {cmd[:200]}")
    return found


# ----------------------------------------------------------------------------- one process
class Proc:
    """A started process: its log, waits with deadlines, signals."""

    def __init__(self, managed: ManagedProcess, owner: Procs) -> None:
        self.managed = managed
        self.owner = owner
        self.name = managed.name
        self.pid = managed.pid
        self.log_path: Path = managed.log_path  # type: ignore[assignment]

    def alive(self) -> bool:
        return self.managed.alive()

    @property
    def returncode(self) -> int | None:
        return self.managed.returncode

    def text(self) -> str:
        return read_text(self.log_path)

    def out(self) -> str:
        """The whole log, whitespace folded (what assertions on printed messages read)."""
        return flat(self.text())

    def tail(self, lines: int = 60) -> str:
        return f"--- {self.name} (pid {self.pid}, exit {self.returncode}, {self.log_path}) ---\n" + "\n".join(
            self.text().splitlines()[-lines:]
        )

    def wait_for(self, pattern: str, timeout: float, *, count: int = 1) -> re.Match[str]:
        """The ``count``-th match of ``pattern`` in this process's log; raises when the process exits
        without printing it or ``timeout`` seconds pass."""
        return self.owner.wait_line(self.log_path, pattern, timeout, count=count, watch=self)

    def wait_exit(self, timeout: float) -> int:
        """The exit code; raises with the log tails if it still runs after ``timeout`` seconds."""
        self.owner.wait_until(f"{self.name} to exit", lambda: not self.alive(), timeout)
        code = self.returncode
        assert code is not None
        return code

    def send(self, sig: int) -> None:
        """Send ``sig`` to the process (a guarded one forwards it to its command)."""
        self.owner.observe()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def kill_tree(self) -> list[int]:
        """SIGKILL the process, its group and every descendant (a power cut: no handler, no clean-up)."""
        killed: list[int] = []
        for _ in range(3):  # a child may be spawning another while we kill
            family = [self.pid, *descendants(self.pid)] if self.alive() else []
            for pid in family:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            time.sleep(0.2)
        self.managed.proc.wait(timeout=30)
        return killed

    def family(self) -> list[str]:
        """Command lines of the live descendants."""
        return [cmdline(p) for p in descendants(self.pid)]


# ----------------------------------------------------------------------------- all of a test's processes
class Procs:
    """Every process one test starts; ``close()`` stops them all and says what was left."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[Proc] = []
        self.ports: list[int] = []
        self.seen: dict[int, tuple[str, str]] = {}  # pid -> (start time, command line)

    # -- starting
    def start(
        self,
        name: str,
        cmd: list[str],
        *,
        cwd: Path | None = None,
        environ: dict[str, str] | None = None,
        guard: bool = True,
    ) -> Proc:
        """Start ``cmd`` with its output in ``<root>/<name>.log``. ``guard=False`` makes the pid the
        command's own (for tests that SIGKILL the command itself)."""
        managed = ManagedProcess(
            name,
            cmd,
            env=environ or env(),
            log_path=self.root / f"{name}.log",
            cwd=cwd or self.root,
            guard=guard,
        )
        return self.adopt(managed)

    def adopt(self, managed: ManagedProcess) -> Proc:
        """Watch and clean up a process started elsewhere (e.g. by ``fedsd.server.deploy``)."""
        proc = Proc(managed, self)
        self.procs.append(proc)
        self.observe()
        return proc

    def fedsd(self, name: str, *args: str, guard: bool = True, cwd: Path | None = None) -> Proc:
        """A `fedsd` command (``python -m fedsd.cli.main ARGS``)."""
        return self.start(name, [*FEDSD, *map(str, args)], guard=guard, cwd=cwd)

    def port(self) -> int:
        """A free loopback port; the teardown checks that no Flower process still uses it."""
        port = free_port()
        self.ports.append(port)
        return port

    # -- watching
    def observe(self) -> None:
        """Remember every live descendant of the started processes (pid, start time, command line)."""
        for proc in self.procs:
            for pid in [proc.pid, *descendants(proc.pid)]:
                st = _stat(pid)
                if st is not None and self.seen.get(pid, ("",))[0] != st[1]:  # new, or a reused pid
                    self.seen[pid] = (st[1], cmdline(pid))

    def report(self, lines: int = 60) -> str:
        return "\n".join(p.tail(lines) for p in self.procs)

    def wait_until(
        self,
        what: str,
        cond: Callable[[], Any],
        timeout: float,
        poll: float = POLL_S,
        *,
        watch: Proc | None = None,
    ) -> Any:
        """Poll ``cond`` until it returns something true; raises with every log tail after ``timeout``
        or as soon as ``watch`` has exited without it."""
        deadline = time.monotonic() + timeout
        while True:
            self.observe()
            value = cond()
            if value:
                return value
            if watch is not None and not watch.alive() and not (value := cond()):
                raise AssertionError(
                    f"{watch.name} exited with code {watch.returncode} before {what}\n{self.report()}"
                )
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.report()}")
            time.sleep(poll)

    def wait_line(
        self,
        path: Path | Callable[[], Path | None],
        pattern: str,
        timeout: float,
        *,
        count: int = 1,
        watch: Proc | None = None,
    ) -> re.Match[str]:
        """The ``count``-th match of ``pattern`` in the file ``path`` (or the file a callable finds);
        raises when ``watch`` exits first or after ``timeout`` seconds, with the log tails."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        where = lambda: path() if callable(path) else path  # noqa: E731

        def found() -> re.Match[str] | None:
            matches = list(regex.finditer(flat(read_text(where()))))
            return matches[count - 1] if len(matches) >= count else None

        while True:
            self.observe()
            if (m := found()) is not None:
                return m
            if watch is not None and not watch.alive():
                if (m := found()) is not None:  # printed just before exiting
                    return m
                raise AssertionError(
                    f"{watch.name} exited with code {watch.returncode} before {pattern!r} appeared in "
                    f"{where()}\n{self.report()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{pattern!r} did not appear in {where()} within {timeout:.0f} s\n{self.report()}"
                )
            time.sleep(POLL_S)

    def wait_all_exit(self, timeout: float, procs: Iterable[Proc] | None = None) -> dict[str, int | None]:
        """Wait for every process (or ``procs``) to exit; their exit codes by name."""
        chosen = list(self.procs if procs is None else procs)
        self.wait_until("every process to exit", lambda: not any(p.alive() for p in chosen), timeout, 1.0)
        return {p.name: p.returncode for p in chosen}

    # -- the end
    def leftovers(self) -> list[str]:
        left = [f"{pid}: {cmd[:200]}" for pid, (started, cmd) in self.seen.items() if running(pid, started)]
        for port in self.ports:
            left += [x for x in flower_processes(f"127.0.0.1:{port}") if x not in left]
        return left

    def close(self, timeout: float = 20.0) -> list[str]:
        """Stop every process (group + descendants, SIGKILL after ``timeout``) and every descendant
        ever seen; what is still running after that."""
        self.observe()
        for proc in self.procs:
            proc.managed.stop(timeout=timeout)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid, (started, _) in self.seen.items():
                if running(pid, started):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, sig)
            deadline = time.monotonic() + 10.0
            while self.leftovers() and time.monotonic() < deadline:
                time.sleep(POLL_S)
        return self.leftovers()


# ----------------------------------------------------------------------------- an in-process TLS server
class TlsEcho:
    """A one-thread TLS (or plain TCP) server on loopback: accepts connections, completes the handshake,
    closes. Enough to check that Python's ssl (what uvicorn and httpx use) accepts our certificates."""

    def __init__(self, cert: Path | None, key: Path | None) -> None:
        self.ctx = None
        if cert is not None:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.load_cert_chain(cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                conn.settimeout(5)
                if self.ctx is not None:
                    with self.ctx.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(1)
                else:
                    conn.recv(1024)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            except (OSError, ssl.SSLError) as e:
                self.errors.append(str(e))
            finally:
                conn.close()

    def close(self) -> None:
        self.sock.close()


# ----------------------------------------------------------------------------- configs and set-ups
FEDERATED = {
    "num_clients": 2,
    "test_speakers": 1,
    "server_speakers": 0,
    "rounds": 2,
    "local_epochs": 1,
    "batch_size": 8,
    "lr": 0.01,
    "exits_mix": [1, 2],
    "label_fraction": 0.5,
    "min_clients": 1,
}


def write_config(path: Path, corpus: Path, *, name: str, train: dict | None = None, **federated: Any) -> Path:
    """A federated config on the generated corpus and the tiny backbone; ``federated`` overrides
    ``FEDERATED`` (None removes a key)."""
    fed = {k: v for k, v in (FEDERATED | federated).items() if v is not None}
    doc: dict[str, Any] = {
        "name": name,
        "data": {
            "corpus": "synth",
            "root": str(corpus),
            "labels": LABELS,
            "crop": {"max_seconds": 2.0, "mode": "tile"},
        },
        "model": {"backbone": "tiny", "pretrained": False, "exits": [1, 2, 3, 4]},
        "federated": fed,
    }
    if train is not None:
        doc["train"] = train
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


@dataclass
class Federation:
    """A prepared in-process federation: config, prepared run, device run-config and spec."""

    cfg: Any
    prepared: Any
    rc: dict
    spec: Any

    @property
    def run_dir(self) -> Path:
        return Path(self.spec.run_dir)

    def grid(self, n: int = 2) -> Any:
        return inprocess_grid(self.rc, n)

    def records(self) -> list[dict]:
        return records(self.run_dir)


def inprocess_grid(rc: dict, n: int = 2, **kw: Any) -> Any:
    """An in-process grid of ``n`` devices (partitions 0..n-1) running the real ClientApp."""
    from fedsd.clients.client_app import make_client_app
    from fedsd.server.inprocess import InProcessGrid

    nodes = [{"partition-id": i, "num-partitions": n} for i in range(n)]
    return InProcessGrid(make_client_app(rc), nodes, **kw)


def records(run_dir: Path) -> list[dict]:
    """The lines of a run's metrics.jsonl."""
    text = (run_dir / "metrics.jsonl").read_text(encoding="utf-8")
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def federation(
    tmp: Path,
    corpus: Path,
    base: Path,
    *,
    name: str,
    device_models: Path | None = None,
    spec: dict | None = None,
    **federated: Any,
) -> Federation:
    """Prepare a run in ``tmp/run`` from ``write_config(...)`` with the given base model; ``spec``
    adds FederationSpec fields (rounds, overrides, ...)."""
    from fedsd.clients.device import simulated_device_config
    from fedsd.config import load_config
    from fedsd.server.federation import FederationSpec
    from fedsd.server.prepare import prepare_run

    cfg_path = write_config(tmp / "fed.yaml", corpus, name=name, **federated)
    cfg = load_config(cfg_path)
    run_dir = tmp / "run"
    prepared = prepare_run(cfg, run_dir, base_model=base, log=lambda _: None)
    extra = {} if device_models is None else {"device_models": device_models}
    rc = simulated_device_config(cfg, prepared.partition, prepared.base_model, run_dir, **extra)
    fspec = FederationSpec(
        config=str(cfg_path),
        run_dir=str(run_dir),
        base_model=str(prepared.base_model),
        partition=str(prepared.partition),
        **(spec or {}),
    )
    return Federation(cfg, prepared, rc, fspec)


def uar_from_confusion(confusion: list[list[int]]) -> float:
    """Unweighted average recall from a confusion matrix (rows: true class), over present classes:
    an independent reference for the UAR a run reports."""
    recalls = [row[i] / sum(row) for i, row in enumerate(confusion) if sum(row)]
    return sum(recalls) / len(recalls)


def session_file(cache: Path, filename: str) -> Path | None:
    """``<cache>/sessions/<latest>/<filename>`` of a `fedsd client run`, None before it exists."""
    found = sorted((cache / "sessions").glob(f"*/{filename}"))
    return found[-1] if found else None


def events(cache: Path) -> list[dict]:
    """A device's event log (one line per handled message), every session of ``cache`` in order."""
    files = sorted((cache / "sessions").glob("*/events.jsonl"))
    return [json.loads(x) for f in files for x in f.read_text(encoding="utf-8").splitlines() if x.strip()]


# ----------------------------------------------------------------------------- tiny models
FAMILY_CASES = [
    ("wav2vec2", False, {}),
    ("wav2vec2", True, {}),
    ("hubert", False, {}),
    ("hubert", True, {}),
    ("wavlm", False, {}),
    ("wavlm", True, {}),
    # a pre-LN model whose last hidden state includes the encoder's final LayerNorm: shallower exits
    # must stay raw, the deepest one sees the norm
    ("wav2vec2", True, {"tie_last_hidden_states": True}),
]
"""(family, pre-LN, config overrides): every tiny backbone shape an export must reproduce."""


def tiny_net(
    family: str = "wav2vec2",
    preln: bool = False,
    *,
    exits: Iterable[int] = (1, 2, 3, 4),
    labels: list[str] | None = None,
    meta: dict | None = None,
    **overrides: Any,
) -> Any:
    """An untrained tiny multi-exit model (seed 0, eval mode) of ``family``, post- or pre-LN."""
    import torch

    from fedsd.model import MultiExitSER, build_backbone, builtin_config

    config = builtin_config("tiny-preln" if preln else "tiny", family)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return MultiExitSER(build_backbone(config), list(exits), labels or LABELS, meta=meta).eval()


# ----------------------------------------------------------------------------- another host
class NetNamespace:
    """A network namespace of the test's own, joined to this machine by a veth pair: a peer with another
    address for tests of what a remote device may reach. Traffic stays on the pair (never this machine's
    own interface address); ``close()`` deletes both. Needs root and iproute2 (``available()``)."""

    def __init__(self, tag: str) -> None:
        n = os.getpid() % 200 + 20  # one /30 per pytest process: xdist workers never collide
        self.name = f"fedsd-{tag}-{os.getpid()}"
        self.host_if, self.peer_if = f"fh{os.getpid()}"[:15], f"fp{os.getpid()}"[:15]
        self.host_ip, self.peer_ip = f"10.231.{n}.1", f"10.231.{n}.2"
        steps = [
            ["ip", "netns", "add", self.name],
            ["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if],
            ["ip", "link", "set", self.peer_if, "netns", self.name],
            ["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if],
            ["ip", "link", "set", self.host_if, "up"],
            [*self.exec(), "ip", "addr", "add", f"{self.peer_ip}/30", "dev", self.peer_if],
            [*self.exec(), "ip", "link", "set", self.peer_if, "up"],
            [*self.exec(), "ip", "link", "set", "lo", "up"],
        ]
        try:
            for cmd in steps:
                subprocess.run(cmd, check=True, capture_output=True, timeout=20)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def available() -> str | None:
        """None when namespaces can be made here, else why not."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        if shutil.which("ip") is None:
            return "iproute2's `ip` is not installed"
        return None

    def exec(self) -> list[str]:
        """The prefix that runs a command inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def close(self) -> None:
        for cmd in (["ip", "link", "del", self.host_if], ["ip", "netns", "del", self.name]):
            subprocess.run(cmd, capture_output=True, timeout=20)
