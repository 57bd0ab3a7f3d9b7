"""`flwr run --stream` of one submitted run, read in a background thread.

Why a thread: the stream lasts as long as the run, but the caller needs the run id as soon as the
SuperLink accepted it (to stop the run, or to wait for it with a timeout of its own).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fedsd.server import deploy
from fedsd.server.service_types import ServerError

if TYPE_CHECKING:
    from fedsd.process.launch import ManagedProcess


class RunStream:
    """The `flwr run` of the app in ``flwr_home/app`` with ``spec_path`` as its run spec; every line goes
    to ``on_output`` (when given), the last 40 are kept for an error message."""

    def __init__(self, flwr_home: Path, spec_path: Path, on_output: Callable[[str], None] | None) -> None:
        self.flwr_home, self.spec_path, self.on_output = flwr_home, spec_path, on_output
        self.process: ManagedProcess | None = None
        self.run_id: int | None = None
        self.result: tuple[int | None, int] | None = None
        self.error: BaseException | None = None
        self.tail: deque[str] = deque(maxlen=40)
        self.thread = threading.Thread(target=self._read, name="fedsd flwr run", daemon=True)

    def start(self, timeout: float) -> int:
        """Start reading; the run id once the SuperLink accepted the run, else ServerError (with the
        stream's last lines) when `flwr run` ended or ``timeout`` passed without one."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while self.run_id is None and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.run_id is None:
            code = self.result[1] if self.result else None
            why = f"exit code {code}" if code is not None else f"no run id within {timeout:.0f} s"
            if self.error is not None:
                why = f"{type(self.error).__name__}: {self.error}"
            raise ServerError(f"`flwr run` started no run ({why}); its last lines:\n" + "\n".join(self.tail))
        return self.run_id

    def _read(self) -> None:
        def on_start(proc: ManagedProcess) -> None:
            self.process = proc

        def on_line(line: str) -> None:
            self.tail.append(line)
            if self.run_id is None:
                self.run_id = deploy.parse_run_id(line)
            if self.on_output is not None:
                self.on_output(line)

        try:
            self.result = deploy.submit_run(
                self.flwr_home,
                self.flwr_home / "app",
                {"spec-file": str(self.spec_path)},
                on_line=on_line,
                on_start=on_start,
                cwd=Path.cwd(),
            )
        except BaseException as e:  # noqa: BLE001 - reported by start()/Server.wait() in the caller's thread
            self.error = e
