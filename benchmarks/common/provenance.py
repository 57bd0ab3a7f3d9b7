"""Provenance and result writing: who ran what, on which code, and the atomic results JSON.

Every results JSON carries a ``provenance`` block (:meth:`Run.provenance`): the git commit and whether
the tree was dirty (and a hash of the uncommitted code), the exact command line, the full config, the
backbone fingerprint(s) of the model(s) involved, library versions, the machine, UTC start and end, and
the wall time. Files are written atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .paths import CODE_PATHS, ROOT


def digest(obj: Any, n: int = 16) -> str:
    """Short sha256 of a JSON-able object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


# ---------------------------------------------------------------------------------------- provenance
def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    ).stdout


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """Commit, dirty flags and a hash of the uncommitted code (taken once per process).

    ``dirty``: anything uncommitted in the tree; ``code_dirty``: uncommitted changes (or untracked
    files) under :data:`CODE_PATHS`, hashed into ``code_diff_sha256``; results files don't count.
    """
    try:
        commit = _git("rev-parse", "HEAD").strip()
        status = [line for line in _git("status", "--porcelain").splitlines() if line.strip()]
        spec = ["--", *CODE_PATHS, ":(exclude)benchmarks/results"]
        diff = _git("diff", "HEAD", "--binary", *spec)
        untracked = sorted(_git("ls-files", "--others", "--exclude-standard", *spec).split())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "code_dirty": None, "code_diff_sha256": None, "status": []}
    h = hashlib.sha256(diff.encode())
    for name in untracked:
        h.update(f"\n{name}\n".encode())
        with contextlib.suppress(OSError):
            h.update((ROOT / name).read_bytes())
    code_dirty = bool(diff or untracked)
    return {
        "commit": commit,
        "dirty": bool(status),
        "code_dirty": code_dirty,
        "code_diff_sha256": h.hexdigest() if code_dirty else None,
        "status": status[:100],
    }


def code_tag() -> str:
    """``<commit12>`` or ``<commit12>-dirty-<hash8>``: names work directories and keys caches."""
    v = code_version()
    tag = (v["commit"] or "nogit")[:12]
    return tag + (f"-dirty-{v['code_diff_sha256'][:8]}" if v["code_dirty"] else "")


def library_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("fedsd", "torch", "torchaudio", "transformers", "flwr", "numpy", "scikit-learn", "opacus"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def machine() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "hostname": platform.node(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def checkpoint_fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """The backbone fingerprint recorded in a fedsd checkpoint's ``fedsd.json``."""
    return str(json.loads((Path(model_dir) / "fedsd.json").read_text(encoding="utf-8"))["fingerprint"])


def checkpoint_id(model_dir: str | os.PathLike[str]) -> str:
    """sha256 of ``fedsd.json`` (backbone fingerprint + per-file hashes of the heads): the whole model."""
    return hashlib.sha256((Path(model_dir) / "fedsd.json").read_bytes()).hexdigest()


def jsonable(obj: Any) -> Any:
    """argparse namespaces, paths and tuples → plain JSON values."""
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)


class Run:
    """One invocation of a benchmark: its command line and clock, a logger, and the results writer."""

    def __init__(self, script: str, argv: Sequence[str] | None, *, quiet: bool = False) -> None:
        self.script = Path(script).resolve()
        self.argv = list(sys.argv[1:] if argv is None else argv)
        self.started = datetime.now(UTC)
        self.t0 = time.perf_counter()
        self.quiet = quiet
        self.code = code_version()

    @property
    def name(self) -> str:
        return self.script.stem

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{self.seconds:6.0f} s] {msg}", file=sys.stderr, flush=True)

    def command(self) -> str:
        """The command that reproduces this run, from the repository root."""
        try:
            script = self.script.relative_to(ROOT)
        except ValueError:
            script = self.script
        return shlex.join([".venv/bin/python", str(script), *self.argv])

    def provenance(
        self, *, config: Any, fingerprint: str | dict[str, str] | None = None, args: Any = None
    ) -> dict[str, Any]:
        """Everything needed to tell where a result came from (see the module docstring)."""
        return {
            "benchmark": self.name,
            "git": dict(self.code),
            "code_tag": code_tag(),
            "command": self.command(),
            "argv": self.argv,
            "sys_argv": list(sys.argv),
            "args": jsonable(args) if args is not None else None,
            "config": jsonable(config),
            "backbone_fingerprint": fingerprint,
            "versions": library_versions(),
            "machine": machine(),
            "started_utc": self.started.isoformat(timespec="seconds"),
            "finished_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "wall_s": self.seconds,
        }

    def write(
        self,
        path: str | os.PathLike[str],
        payload: dict[str, Any],
        *,
        config: Any,
        fingerprint: str | dict[str, str] | None = None,
        args: Any = None,
    ) -> dict[str, Any]:
        """Atomically write ``{"provenance": ..., **payload}`` to ``path``; return that dict."""
        from fedsd.checkpoint import atomic_write_json

        out = {"provenance": self.provenance(config=config, fingerprint=fingerprint, args=args), **payload}
        atomic_write_json(path, out)
        self.log(f"wrote {path}")
        return out


def run_main(
    script: str,
    argv: Sequence[str] | None,
    parse: Callable[[Sequence[str] | None], argparse.Namespace],
    body: Callable[[argparse.Namespace, Any], dict[str, Any]],
    *,
    setup: Callable[[argparse.Namespace, Run], Any] | None = None,
) -> dict[str, Any]:
    """A script's ``main``: parse ``argv``, start the clock, run ``body(args, run)`` and return its results.

    With ``setup`` the body gets ``setup(args, run)`` instead of the run (``FedBench.from_args``: the
    federated benchmarks' corpus, recipe and work directory). An integer ``args.threads`` sets torch's
    intra-op threads for the run; the caller's count is restored afterwards (the tests call ``main``
    in-process). ``args.quiet`` silences the progress log.
    """
    args = parse(argv)
    run = Run(script, argv, quiet=bool(getattr(args, "quiet", False)))
    threads = getattr(args, "threads", None)
    before = set_threads(threads if isinstance(threads, int) else None)
    try:
        return body(args, run if setup is None else setup(args, run))
    finally:
        set_threads(before)


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (None: leave them); return the previous count to restore."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    return before
