"""A warm worker per device: one long-lived process that handles the device's messages (opt-in).

Why: Flower 1.42 starts a fresh ``flwr-clientapp`` process per message, and fedsd's ClientApp costs
torch, transformers and scikit-learn imports plus model loading each time — over 10× the floor Flower
itself sets. With ``FEDSD_WARM_WORKER=1`` in the SuperNode's environment (``fedsd client run
--warm-worker``), the runner (clients/runner.py) keeps Flower's task loop but relays the message and
context to this worker, which imported ``fedsd.clients.client_app`` once. The runner never imports torch.

- **Same result as a fresh process**: the request is Flower's own protobuf of the message and the
  context; the reply is the reply message and the whole ``context.state`` afterwards (the DP ledger and
  what DP keeps local come back exactly). A handler's exception comes back as the same type name and
  text, so Flower's error reply reads the same. Loaded backbones are reused only through
  ``fedsd.clients.model_store`` (keyed by model directory and the identity of its files).
- **Security**: the socket lives in ``<device cache>/warm``, a 0700 directory owned by this user; both
  ends check the other's uid with ``SO_PEERCRED``. The socket's name holds a stamp of this installation
  (fedsd's files, their sizes and mtimes, the Python executable) and the SuperNode's pid, so a worker of
  another fedsd version or of a previous SuperNode is never reused.
- **Lifetime**: it is started by the first message that finds none listening (under a lock, so two
  messages never start two) and imports the ClientApp for that message; it exits when idle for ``--idle`` seconds (600), when the process it serves (the
  SuperNode's executor) is gone, when its socket is replaced, or when the installation changes.
- **Never costs a round**: any failure to start or reach it raises :class:`WorkerUnavailable`, and the
  runner then handles the message in its own process. A worker that dies mid-message may have written
  to disk first (the device-wide DP ledger): handled again, such a round is counted twice, never missed.

This module imports neither torch nor the ClientApp unless it runs as the worker (``python -m``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ENV = "FEDSD_WARM_WORKER"
IDLE_S = 600.0
START_TIMEOUT_S = 30.0
IO_TIMEOUT_S = 60.0
"""How long one side waits for the other's request bytes (never for the handler itself)."""
POLL_S = 1.0
STAMP_EVERY_S = 30.0
DIR_NAME = "warm"
MAX_SOCKET_PATH = 104  # sun_path is 108 bytes on Linux, with room for the terminating NUL
_FRAME = struct.Struct("!Q")
_MAX_FRAME = 1 << 34


class WorkerUnavailable(RuntimeError):
    """The worker could not be started or reached, or its answer was unreadable: handle in-process."""


class PeerRefused(WorkerUnavailable):
    """The other end of the socket is another user's process."""


def enabled(env: dict[str, str] | None = None) -> bool:
    return (os.environ if env is None else env).get(ENV, "") == "1"


def cache_dir(node_config: dict[str, Any]) -> Path:
    """The device's cache directory, by the rule of ``fedsd.clients.device.DeviceSettings`` (a deployed
    device: its node config's ``cache``, else ``$FEDSD_CACHE``, else ``~/.cache/fedsd``), without
    importing that module (it pulls numpy and the config stack into the light runner)."""
    default = os.environ.get("FEDSD_CACHE", str(Path.home() / ".cache" / "fedsd"))
    return Path(str(node_config.get("cache") or default))


def install_stamp() -> str:
    """A hash of this installation: every file of fedsd's packages (path, size, mtime) and the Python."""
    import importlib.util

    import fedsd

    h = hashlib.sha256(f"{fedsd.__version__}\0{sys.executable}\0".encode())
    for name in ("fedsd", "fedsd.clients", "fedsd.server"):
        spec = importlib.util.find_spec(name)
        for root in (spec.submodule_search_locations or []) if spec else []:
            for p in sorted(Path(root).rglob("*.py")):
                st = p.stat()
                h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def secure_dir(path: Path) -> Path:
    """``path`` as a directory only this user can enter (created 0700); refuses one owned by another."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise WorkerUnavailable(f"{path}: not a directory owned by this user; the warm worker is not used")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


def socket_path(cache: Path, parent: int, stamp: str | None = None) -> Path:
    """``<cache>/warm/<installation stamp>-<parent pid>.sock`` (the directory is made private here).

    A cache deep enough to exceed the Unix socket path limit (~107 bytes) puts the socket in a private
    ``<tmp>/fedsd-<uid>/warm`` instead, named by a hash of the cache path too, so a device with a long
    cache path still gets its warm worker and two caches never share one.
    """
    cache = Path(cache).resolve()
    name = f"{stamp or install_stamp()}-{parent}.sock"
    path = secure_dir(cache / DIR_NAME) / name
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        short = Path(tempfile.gettempdir()) / f"fedsd-{os.getuid()}"
        tag = hashlib.sha256(os.fsencode(cache)).hexdigest()[:16]
        secure_dir(short)
        path = secure_dir(short / DIR_NAME) / f"{tag}-{name}"
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise WorkerUnavailable(f"{path}: too long for a Unix socket path")
    return path


def peer_creds(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected Unix socket (``SO_PEERCRED``)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


def peer_uid(sock: socket.socket) -> int:
    return peer_creds(sock)[1]


def check_peer(uid: int) -> None:
    """Refuses a peer that is another user (root included: the worker serves its own user only)."""
    if uid != os.getuid():
        raise PeerRefused(f"warm worker: peer uid {uid} is not this user's ({os.getuid()})")


# --------------------------------------------------------------------------------------- framing
def _send(sock: socket.socket, *frames: bytes) -> None:
    sock.sendall(b"".join(_FRAME.pack(len(f)) + f for f in frames))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("the other end closed the connection")
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket) -> bytes:
    (n,) = _FRAME.unpack(_recv_exact(sock, _FRAME.size))
    if n > _MAX_FRAME:
        raise ValueError(f"frame of {n} bytes")
    return _recv_exact(sock, n)


# --------------------------------------------------------------------------------------- client side
def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        check_peer(peer_uid(sock))
    except BaseException:
        sock.close()
        raise
    return sock


def log_path(cache: Path, parent: int, stamp: str | None = None) -> Path:
    """``<cache>/warm/<installation stamp>-<parent pid>.log``: the worker's log stays with the device's
    cache even when its socket had to move to a shorter path."""
    return secure_dir(Path(cache).resolve() / DIR_NAME) / f"{stamp or install_stamp()}-{parent}.log"


def _start(path: Path, log_file: Path, parent: int, idle_s: float) -> None:
    log = open(log_file, "ab")  # noqa: SIM115  (handed to the child)
    try:
        subprocess.Popen(
            [sys.executable, "-m", "fedsd.clients.worker", "--socket", str(path), "--parent", str(parent),
             "--idle", str(idle_s)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True,
        )  # fmt: skip
    finally:
        log.close()


def connect(
    cache: Path, parent: int, *, idle_s: float = IDLE_S, start_timeout_s: float = START_TIMEOUT_S
) -> socket.socket:
    """A connection to this device's worker; starts it (once, under a lock) when none listens."""
    try:
        path = socket_path(cache, parent)
    except OSError as e:
        raise WorkerUnavailable(f"{type(e).__name__}: {e}") from None
    with contextlib.suppress(OSError):
        return _connect(path)
    try:
        with open(path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a second message waits for the first one's worker
            with contextlib.suppress(OSError):
                return _connect(path)  # started meanwhile
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a stale socket: nobody listens on it
            _start(path, log_path(cache, parent), parent, idle_s)
            deadline = time.monotonic() + start_timeout_s
            while True:
                try:
                    return _connect(path)
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline:
                        raise WorkerUnavailable(
                            f"no worker listens on {path} after {start_timeout_s:g} s"
                        ) from None
                    time.sleep(0.05)
    except OSError as e:
        raise WorkerUnavailable(f"{type(e).__name__}: {e}") from None


def stop(cache: Path, parent: int) -> int | None:
    """Ends the worker of this device and executor, if one listens; returns its pid."""
    try:
        with _connect(socket_path(cache, parent)) as sock:
            pid = peer_creds(sock)[0]
    except (OSError, WorkerUnavailable):
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    return pid


def _remote_error(err: dict[str, str]) -> Exception:
    """The handler's exception as the same type name and text (what Flower's error reply shows)."""
    cls = type(err["qualname"].rsplit(".", 1)[-1], (Exception,),
               {"__module__": err["module"], "__qualname__": err["qualname"]})  # fmt: skip
    return cls(err["text"])


def call(message: Any, context: Any, *, parent: int, idle_s: float = IDLE_S) -> tuple[Any, Any]:
    """Handle ``message`` in the device's worker: (reply message, ``context.state`` afterwards).

    Raises the handler's exception (after putting the state it left into ``context.state``), or
    :class:`WorkerUnavailable` when the worker cannot be used (the message was then not handled)."""
    from flwr.common.serde import (
        context_to_proto,
        message_from_proto,
        message_to_proto,
        recorddict_from_proto,
    )
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
    from flwr.supercore.task_identity import TaskIdentity

    sock = connect(cache_dir(dict(context.node_config)), parent, idle_s=idle_s)
    header = {"task": [TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id],
              "message_id": message.metadata.message_id}  # fmt: skip
    try:
        with sock:
            sock.settimeout(IO_TIMEOUT_S)
            _send(sock, json.dumps(header).encode(), message_to_proto(message).SerializeToString(),
                  context_to_proto(context).SerializeToString())  # fmt: skip
            sock.settimeout(None)  # the handler takes as long as it takes
            answer = json.loads(_recv(sock))
            reply_bytes, state_bytes = _recv(sock), _recv(sock)
            state = recorddict_from_proto(ProtoRecordDict.FromString(state_bytes))
            reply = message_from_proto(ProtoMessage.FromString(reply_bytes)) if answer.get("ok") else None
    except (OSError, EOFError, ValueError) as e:
        raise WorkerUnavailable(f"{type(e).__name__}: {e}") from None
    if reply is None:
        context.state = state
        raise _remote_error(answer["error"])
    return reply, state


# --------------------------------------------------------------------------------------- worker side
def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class Worker:
    """Serves one device's messages, one at a time, until idle, orphaned or replaced."""

    def __init__(self, path: Path, parent: int, idle_s: float) -> None:
        self.path, self.parent, self.idle_s = path, parent, idle_s
        self.parent_start = _start_time(parent)
        self.stamp = install_stamp()
        self.app: Any = None
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # the starter holds the lock and found nobody listening
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            self.sock.bind(str(path))
        finally:
            os.umask(old)
        self.ino = os.stat(path).st_ino
        self.sock.listen(16)
        self.sock.settimeout(POLL_S)

    def should_exit(self, idle_since: float, stamp_checked: list[float]) -> str | None:
        from fedsd.process.lifetime import alive

        if time.monotonic() - idle_since > self.idle_s:
            return f"idle for {self.idle_s:g} s"
        if not alive(self.parent) or _start_time(self.parent) != self.parent_start:
            return f"process {self.parent} is gone"
        try:
            if os.stat(self.path).st_ino != self.ino:
                return "its socket was replaced"
        except FileNotFoundError:
            return "its socket was removed"
        if time.monotonic() - stamp_checked[0] > STAMP_EVERY_S:
            stamp_checked[0] = time.monotonic()
            if install_stamp() != self.stamp:
                return "fedsd's installed files changed"
        return None

    def serve(self) -> str:
        idle_since, stamp_checked = time.monotonic(), [time.monotonic()]
        try:
            while True:
                try:
                    conn, _ = self.sock.accept()
                except TimeoutError:
                    why = self.should_exit(idle_since, stamp_checked)
                    if why:
                        return why
                    continue
                with conn:
                    self.handle(conn)
                idle_since = time.monotonic()
        finally:
            self.sock.close()
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self.ino:
                    self.path.unlink()

    def handle(self, conn: socket.socket) -> None:
        from flwr.common.serde import (
            context_from_proto,
            message_from_proto,
            message_to_proto,
            recorddict_to_proto,
        )
        from flwr.proto.message_pb2 import Context as ProtoContext
        from flwr.proto.message_pb2 import Message as ProtoMessage
        from flwr.supercore.task_identity import TaskIdentity

        try:
            check_peer(peer_uid(conn))
            conn.settimeout(IO_TIMEOUT_S)
            header = json.loads(_recv(conn))
            message = message_from_proto(ProtoMessage.FromString(_recv(conn)))
            context = context_from_proto(ProtoContext.FromString(_recv(conn)))
        except (OSError, EOFError, ValueError, WorkerUnavailable) as e:
            print(f"fedsd warm worker: request refused: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return
        if self.app is None:  # the one heavy import, at the first message (if it fails: EOF, fallback)
            from fedsd.clients.client_app import app

            self.app = app
        message.metadata.__dict__["_message_id"] = header["message_id"]
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = header["task"]
        answer: dict[str, Any] = {"ok": True}
        reply_bytes = b""
        t0 = time.monotonic()
        try:
            reply = self.app(message=message, context=context)
            reply_bytes = message_to_proto(reply).SerializeToString()
        except Exception as e:  # the handler's error travels back; the runner raises it as Flower expects
            answer = {"ok": False, "error": {"module": type(e).__module__, "qualname": type(e).__qualname__,
                                             "text": str(e)}}  # fmt: skip
        # one line per message in the worker's log (<cache>/warm/*.log): what it served, how fast
        print(f"fedsd warm worker {os.getpid()}: {message.metadata.message_type} "
              f"{'answered' if answer['ok'] else 'failed'} in {time.monotonic() - t0:.2f} s",
              file=sys.stderr, flush=True)  # fmt: skip
        conn.settimeout(IO_TIMEOUT_S)
        with contextlib.suppress(OSError):
            _send(conn, json.dumps(answer).encode(), reply_bytes,
                  recorddict_to_proto(context.state).SerializeToString())  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fedsd.clients.worker", description=__doc__.split("\n")[0])
    p.add_argument("--socket", type=Path, required=True)
    p.add_argument("--parent", type=int, required=True, help="exit when this process is gone")
    p.add_argument("--idle", type=float, default=IDLE_S, help="exit after this many idle seconds")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # leave through serve()'s clean-up
    why = Worker(args.socket, args.parent, args.idle).serve()
    print(f"fedsd warm worker {os.getpid()}: exits ({why})", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
