"""Atomic writes and fingerprints shared by every component that persists results.

Why: a checkpoint or metrics file interrupted half-way (crash, SIGKILL, full disk) must never replace
the previous good version. Every write goes to a temporary file in the same directory, is fsynced,
then atomically renamed over the target.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: the classic swap (not thread-safe, but only for a moment)
    os.umask(mask)
    return mask


def shared_mode(directory: bool = False) -> int:
    """Mode a plain ``open()``/``mkdir()`` would give under the user's umask (mkstemp's is 0600/0700)."""
    return (0o777 if directory else 0o666) & ~current_umask()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` so that readers see either the old or the new file, never half.

    The file gets ``mode`` (default: what the umask allows, like any other file the user writes);
    private files (keys) pass 0o600. The mode is set before the rename, so the path never shows the
    wrong one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, shared_mode() if mode is None else mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def _torn_tail(fh: Any, size: int) -> tuple[int, bytes]:
    """(offset, bytes) of the text after the last newline of an open binary file of ``size`` bytes."""
    pos = size
    tail = b""
    while pos > 0:
        step = min(65536, pos)
        pos -= step
        fh.seek(pos)
        tail = fh.read(step) + tail
        cut = tail.rfind(b"\n")
        if cut >= 0:
            return pos + cut + 1, tail[cut + 1 :]
    return 0, tail


def append_jsonl(path: str | os.PathLike[str], record: dict[str, Any]) -> Path:
    """Append one JSON line, fsynced; the earlier lines are never rewritten (cost per line, not per file).

    All-or-nothing: the record is serialised before the file is touched, and a failed write or fsync
    truncates the file back to its earlier size. A last line without its newline (a writer killed
    mid-line) is completed when it is whole JSON, else dropped, so every line stays parseable.
    """
    path = Path(path)
    line = (json.dumps(record, default=str) + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    with os.fdopen(fd, "r+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size:
            fh.seek(size - 1)
            if fh.read(1) != b"\n":
                start, tail = _torn_tail(fh, size)
                try:
                    json.loads(tail)
                except ValueError:
                    fh.truncate(start)  # half a record: drop it
                    size = start
                else:
                    line = b"\n" + line
        fh.seek(size)
        try:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                fh.truncate(size)
                fh.flush()
            raise
    if created:
        _fsync_dir(path.parent)
    return path


def _fsync_tree(root: Path) -> None:
    for child in root.rglob("*"):
        if child.is_file():
            with open(child, "rb") as fh:
                os.fsync(fh.fileno())


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the platform or file system cannot do it (the caller falls back to two renames).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl without it
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _backup_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def recover_directory(path: str | os.PathLike[str]) -> bool:
    """Put back ``path`` from its backup if a process died between the two renames of a non-atomic
    swap (only where :func:`_exchange` is unavailable); True if it did."""
    path = Path(path)
    backup = _backup_path(path)
    if backup.is_dir() and not path.exists():
        os.replace(backup, path)
        return True
    return False


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` atomically.

    If the block raises (or the swap fails), the temporary directory is removed and ``path`` is left
    exactly as it was. On Linux the swap is one ``renameat2(RENAME_EXCHANGE)``, so readers (and a
    crash at any instant) see the old or the new directory, never none; elsewhere it is two renames
    via ``.NAME.old``, which :func:`recover_directory` undoes after a crash between them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, shared_mode(directory=True))  # mkdtemp makes 0700; a model dir is as shareable as any
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists() and _exchange(tmp, path):
            pass  # tmp now holds the previous version; removed below
        elif path.exists():
            backup = _backup_path(path)
            if backup.exists():
                shutil.rmtree(backup)
            os.replace(path, backup)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(backup, path)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sweep_temporaries(directory: str | os.PathLike[str], older_than_s: float = 60.0) -> list[Path]:
    """Remove the hidden ``.NAME.*.tmp`` files/dirs a killed writer left in ``directory`` (not recursive).

    Only entries older than ``older_than_s`` go, so a writer running right now keeps its temp file.
    Returns what was removed.
    """
    import time

    removed: list[Path] = []
    root = Path(directory)
    if not root.is_dir():
        return removed
    now = time.time()
    for entry in root.glob(".*.tmp"):
        try:
            if now - entry.lstat().st_mtime < older_than_s:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            continue
    return removed


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


# --- model checkpoints (tensors) -------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong with it."""


def save_tensors(
    path: str | os.PathLike[str], tensors: dict[str, Any], metadata: dict[str, str] | None = None
) -> Path:
    """Write a dict of tensors as safetensors, atomically (contiguous CPU copies are stored)."""
    from safetensors.torch import save

    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write_bytes(path, save(data, metadata=metadata))


def load_tensors(path: str | os.PathLike[str], expected_sha256: str | None = None) -> dict[str, Any]:
    """Read a safetensors file; a missing, corrupt or altered file raises CheckpointError naming it."""
    from safetensors.torch import load

    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: file is missing") from err
    if expected_sha256 is not None:
        actual = hashlib.sha256(raw).hexdigest()
        if actual != expected_sha256:
            raise CheckpointError(
                f"{path}: content changed (sha256 {actual[:12]}…, recorded {expected_sha256[:12]}…)"
            )
    try:
        return load(raw)
    except Exception as err:  # safetensors raises its own error types for truncated/garbled files
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err


# --- what a model was trained and selected on (speaker leakage guard) -------------------------------

DATA_RECORD_KEY = "data_seen"
"""Key in a model's ``meta`` (``fedsd.json``): the speakers and utterances it was trained and selected on."""


def data_record(train: Any, select: Any) -> dict[str, Any]:
    """What ``meta[DATA_RECORD_KEY]`` holds for a model trained on rows ``train`` and whose epoch was
    selected on rows ``select`` (manifest rows: ``.speaker``, ``.utt_id``).

    Why: a run that reuses a base model, and anyone evaluating it, must be able to tell whether its test
    speakers were seen. Speakers are listed; the utterance ids are hashed (sha256 of the sorted ids), which
    identifies the exact data without storing thousands of ids.
    """
    train, select = list(train), list(select)
    return {
        "train_speakers": sorted({r.speaker for r in train}),
        "select_speakers": sorted({r.speaker for r in select}),
        "train_utt_ids_sha256": sha256_json(sorted(r.utt_id for r in train)),
        "select_utt_ids_sha256": sha256_json(sorted(r.utt_id for r in select)),
        "n_train": len(train),
        "n_select": len(select),
    }


def seen_speakers(meta: dict[str, Any] | None) -> set[str] | None:
    """Speakers a model was trained or selected on, from its ``meta``; None when it has no record
    (a checkpoint from before the record existed, or one made elsewhere): unknown, not "none"."""
    record = (meta or {}).get(DATA_RECORD_KEY)
    if not isinstance(record, dict):
        return None
    return {str(s) for key in ("train_speakers", "select_speakers") for s in record.get(key) or []}


def read_model_meta(model_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``meta`` of a fedsd model directory's ``fedsd.json`` (None if there is none or it is unreadable)."""
    path = Path(model_dir) / "fedsd.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    meta = info.get("meta") if isinstance(info, dict) else None
    return meta if isinstance(meta, dict) else None


def speaker_overlap(meta: dict[str, Any] | None, speakers: Any) -> dict[str, Any]:
    """``{"status": "none" | "overlap" | "unknown", "speakers": [...]}``: which of ``speakers`` the model
    (by its ``meta``) was trained or selected on; "unknown" when it records nothing."""
    seen = seen_speakers(meta)
    if seen is None:
        return {"status": "unknown", "speakers": []}
    both = sorted(seen & {str(s) for s in speakers})
    return {"status": "overlap" if both else "none", "speakers": both}


def replace_directory_keeping(
    new: str | os.PathLike[str], path: str | os.PathLike[str], keep_as: str
) -> Path | None:
    """Put the finished directory ``new`` at ``path``; the previous ``path`` (if any) is kept, renamed to
    the sibling ``keep_as``, and returned (None if there was none).

    Readers see the old or the new directory at ``path``, never none (one ``renameat2`` exchange on
    Linux; elsewhere two renames, undone by :func:`recover_directory`); nothing is deleted.
    """
    new, path = Path(new), Path(path)
    kept = path.with_name(keep_as)
    if kept.exists():
        raise FileExistsError(f"{kept}: already exists; move it away first")
    _fsync_tree(new)
    if not path.exists():
        os.replace(new, path)
        _fsync_dir(path.parent)
        return None
    if _exchange(new, path):
        os.replace(new, kept)  # ``new`` now names the previous directory
    else:
        backup = _backup_path(path)
        os.replace(path, backup)
        os.replace(new, path)
        os.replace(backup, kept)
    _fsync_dir(path.parent)
    return kept
