"""Children that never outlive whoever started them.

Flower's processes start their own sessions (`flower-superlink` → `flower-superexec` →
`flwr-serverapp`; `flower-supernode` → one `flwr-clientapp` per message), so stopping the process
group of the command we started is not enough, and a SIGKILLed `fedsd server start` or
`fedsd client run` would leave them running (the SuperLink holding its port, a SuperNode training
forever). Every Flower command fedsd starts therefore runs under a *guard*:

    python -m fedsd.process.lifetime guard --parent PID --grace S -- COMMAND ARGS...

The guard (stdlib only, so it starts in ~50 ms):
- watches its parent *process*: ``getppid()`` stops being ``PID`` the moment that process has exited
  (the kernel re-parents the guard), checked every 0.1 s and at every signal. Not
  ``prctl(PR_SET_PDEATHSIG)``: that fires when the *thread* that forked the guard exits, so a server
  started from a short-lived worker thread (``api.Server.start()`` in a thread pool) would lose its
  SuperLink as soon as that thread finished, while ``getppid()`` names the thread group and only
  changes when the whole process is gone;
- becomes a *child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``): every process COMMAND spawns,
  in whatever session, is re-parented to the guard when its own parent dies, so the guard's
  descendants are always the whole family;
- runs COMMAND as its child, which itself gets SIGKILL should the guard die (here
  ``PR_SET_PDEATHSIG`` is exact: the guard is single-threaded, so the thread that forked COMMAND lives
  exactly as long as the guard);
- forwards SIGINT/SIGTERM/SIGHUP to COMMAND while the parent lives (an ordinary stop);
- when the parent is gone, or COMMAND has exited: SIGTERM to every descendant, SIGKILL to what is
  left after ``--grace`` seconds, then exits with COMMAND's status (its exit code, or the same signal).

Not Linux: no guard (the command runs directly; ``ManagedProcess.stop`` still stops its group).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _prctl(option: int, value: int) -> bool:
    """``prctl(option, value)``; False where it is not available (not Linux) or fails."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, value, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def set_parent_death_signal(sig: int = signal.SIGTERM, *, poll_s: float = 0.2) -> bool:
    """Send ``sig`` to this process when its parent *process* exits; True when watching (Linux).

    A daemon thread waits on a pidfd of the parent (readable once the whole parent process has exited;
    Linux ≥ 5.3) or, without one, polls ``getppid()``. Not ``prctl(PR_SET_PDEATHSIG)``, which fires
    when the parent *thread* that forked us exits (see the module docstring). Call it first thing:
    a parent that died before the call is not noticed (fedsd's children run under the guard, which
    checks that case).
    """
    if not guard_available():
        return False
    import select
    import threading

    parent = os.getppid()

    def fire() -> None:
        os.kill(os.getpid(), sig)

    def watch() -> None:
        fd = -1
        with contextlib.suppress(OSError, AttributeError):
            fd = os.pidfd_open(parent)
        try:
            if fd >= 0 and os.getppid() == parent:  # the pidfd is the parent's, not a reused pid's
                select.select([fd], [], [])
            else:
                while os.getppid() == parent:
                    time.sleep(poll_s)
        finally:
            if fd >= 0:
                os.close(fd)
        fire()

    threading.Thread(target=watch, name="fedsd-parent-watch", daemon=True).start()
    return True


def _set_pdeathsig(sig: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG)``: only where the forking thread lives as long as its process."""
    return _prctl(PR_SET_PDEATHSIG, int(sig))


def guard_available() -> bool:
    return sys.platform.startswith("linux") and Path("/proc/self/stat").exists()


def guarded(cmd: list[str], *, grace_s: float = 8.0) -> list[str]:
    """``cmd`` wrapped in the guard (see the module docstring), with this process as the parent."""
    if not guard_available():
        return list(cmd)
    return [
        sys.executable,
        "-m",
        "fedsd.process.lifetime",
        "guard",
        "--parent",
        str(os.getpid()),
        "--grace",
        repr(float(grace_s)),
        "--",
        *cmd,
    ]


# ----------------------------------------------------------------------------- /proc
def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def alive(pid: int) -> bool:
    """True for a running process (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


# ----------------------------------------------------------------------------- the guard
def _exit_like(status: int) -> None:
    """Leave with a waitpid ``status``: the same exit code, or death by the same signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        time.sleep(1.0)
        os._exit(128 + sig)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def _start_command(me: int, cmd: list[str]) -> int:
    """Fork and exec ``cmd`` as the guard's child, killed by the kernel if the guard dies."""
    child = os.fork()
    if child == 0:  # pragma: no cover - replaced by exec
        try:
            _set_pdeathsig(signal.SIGKILL)  # the guard is single-threaded: its thread is the process
            if os.getppid() != me:
                os._exit(1)
            for sig in _SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)
    return child


class _Reaper:
    """Reaps every exited descendant (the guard is their subreaper); remembers the command's status."""

    def __init__(self, child: int) -> None:
        self.child = child
        self.status: int | None = None

    def reap(self) -> None:
        while True:
            try:
                pid, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.child:
                self.status = st


def _watch(parent: int, reaper: _Reaper, received: list[int]) -> None:
    """Until the command exits or the guard's parent is gone, forward stop signals to the command."""
    orphaned = False
    while reaper.status is None:
        reaper.reap()
        if reaper.status is not None:
            break
        while received:
            sig = received.pop(0)
            if os.getppid() != parent:
                orphaned = True
            else:
                _signal(reaper.child, sig)  # an ordinary stop: let the command shut down its own way
        if orphaned or os.getppid() != parent:
            break
        time.sleep(0.1)


def _end_family(me: int, grace_s: float, reaper: _Reaper) -> None:
    """SIGTERM every descendant, SIGKILL what is left after ``grace_s``, and reap them all."""
    for pid in descendants(me):
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        reaper.reap()
        if not any(alive(p) for p in descendants(me)):
            break
        time.sleep(0.1)
    for _ in range(3):
        left = descendants(me)
        if not left:
            break
        for pid in left:
            _signal(pid, signal.SIGKILL)
        time.sleep(0.1)
        reaper.reap()


def _guard(parent: int, grace_s: float, cmd: list[str]) -> None:
    me = os.getpid()
    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)

    for sig in _SIGNALS:
        signal.signal(sig, on_signal)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    if os.getppid() != parent:  # the parent died before we got here: start nothing
        os._exit(1)
    reaper = _Reaper(_start_command(me, cmd))
    _watch(parent, reaper, received)
    # the command has exited, or whoever started us is gone: nothing of the family may stay
    _end_family(me, grace_s, reaper)
    end = time.monotonic() + 5.0
    while reaper.status is None and time.monotonic() < end:
        reaper.reap()
        time.sleep(0.05)
    if reaper.status is None:
        os._exit(1)
    _exit_like(reaper.status)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m fedsd.process.lifetime guard --parent PID [--grace S] -- COMMAND [ARGS...]"
    if not args or args[0] != "guard" or "--" not in args:
        print(usage, file=sys.stderr)
        raise SystemExit(2)
    split = args.index("--")
    opts, cmd = args[1:split], args[split + 1 :]
    parent, grace = os.getppid(), 8.0
    try:
        for key, value in zip(opts[::2], opts[1::2], strict=True):
            if key == "--parent":
                parent = int(value)
            elif key == "--grace":
                grace = float(value)
            else:
                raise ValueError(key)
    except ValueError:
        print(usage, file=sys.stderr)
        raise SystemExit(2) from None
    if not cmd:
        print(usage, file=sys.stderr)
        raise SystemExit(2)
    _guard(parent, grace, cmd)


if __name__ == "__main__":
    main()
