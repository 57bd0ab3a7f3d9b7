"""Interrupted writes lose nothing: every helper of fedsd.checkpoint (and MultiExitSER.save_pretrained)
leaves the previous version intact and no temporary file behind when the write fails half-way —
whether the serializer raises, the data write fails, or the final rename fails. A writer killed with
SIGKILL mid-write leaves the previous version intact too (its temporary file stays, hidden)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedsd import checkpoint
from fedsd.checkpoint import (
    append_jsonl,
    atomic_directory,
    atomic_write_json,
    load_tensors,
    recover_directory,
    save_tensors,
)


def _entries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


class Boom(RuntimeError):
    pass


def _raise(*_a, **_k):
    raise Boom("simulated failure")


def _fail_nth_replace(monkeypatch, n: int) -> None:
    """os.replace works n-1 times, then raises (as on EIO/ENOSPC/EXDEV)."""
    real = os.replace
    calls = {"n": 0}

    def replace(a, b):
        calls["n"] += 1
        if calls["n"] >= n:
            raise OSError(5, "simulated I/O error")
        return real(a, b)

    monkeypatch.setattr(checkpoint.os, "replace", replace)


# --------------------------------------------------------------------- atomic_write_json
@pytest.mark.parametrize("where", ["serialize", "write", "fsync", "rename"])
def test_atomic_write_json_failure_keeps_old_file(tmp_path, monkeypatch, where) -> None:
    path = tmp_path / "state.json"
    atomic_write_json(path, {"completed_round": 1})
    before = path.read_bytes()
    new: object = {"completed_round": 2}
    if where == "serialize":
        circular: dict = {}
        circular["self"] = circular
        new = circular  # json.dumps raises ValueError before anything is written
    elif where == "write":
        real_fdopen = os.fdopen

        class HalfWriter:
            def __init__(self, fh):
                self.fh = fh

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.fh.close()

            def write(self, data):
                self.fh.write(data[: len(data) // 2])
                raise OSError(28, "No space left on device")

        monkeypatch.setattr(checkpoint.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    elif where == "fsync":
        monkeypatch.setattr(checkpoint.os, "fsync", _raise)
    else:
        _fail_nth_replace(monkeypatch, 1)
    with pytest.raises((Boom, OSError, ValueError)):
        atomic_write_json(path, new)
    assert path.read_bytes() == before
    assert json.loads(path.read_text())["completed_round"] == 1
    assert _entries(tmp_path) == ["state.json"]


def test_atomic_write_json_replaces_and_creates_parent(tmp_path) -> None:
    path = tmp_path / "a" / "b" / "state.json"
    atomic_write_json(path, {"x": 1})
    atomic_write_json(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    assert _entries(path.parent) == ["state.json"]


# --------------------------------------------------------------------- save_tensors
@pytest.mark.parametrize("where", ["serialize", "rename"])
def test_save_tensors_failure_keeps_old_file(tmp_path, monkeypatch, where) -> None:
    path = tmp_path / "rounds" / "round_001.safetensors"
    old = {"heads.1.w": torch.arange(6.0).reshape(2, 3)}
    save_tensors(path, old, {"fingerprint": "abc"})
    before = path.read_bytes()
    if where == "serialize":
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save", _raise)
    else:
        _fail_nth_replace(monkeypatch, 1)
    with pytest.raises((Boom, OSError)):
        save_tensors(path, {"heads.1.w": torch.zeros(2, 3)})
    assert path.read_bytes() == before
    assert torch.equal(load_tensors(path)["heads.1.w"], old["heads.1.w"])
    assert _entries(path.parent) == ["round_001.safetensors"]


# --------------------------------------------------------------------- append_jsonl
@pytest.mark.parametrize("where", ["serialize", "fsync"])
def test_append_jsonl_failure_keeps_every_earlier_line(tmp_path, monkeypatch, where) -> None:
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"round": 0})
    append_jsonl(path, {"round": 1})
    before = path.read_bytes()
    record: dict = {"round": 2}
    if where == "serialize":
        record["self"] = record  # circular: json.dumps raises
    elif where == "fsync":
        monkeypatch.setattr(checkpoint.os, "fsync", _raise)
    with pytest.raises((Boom, OSError, ValueError)):
        append_jsonl(path, record)
    assert path.read_bytes() == before
    assert [json.loads(x)["round"] for x in path.read_text().splitlines()] == [0, 1]
    assert _entries(tmp_path) == ["metrics.jsonl"]


def test_append_jsonl_appends_in_place_never_rewriting_earlier_lines(tmp_path, monkeypatch) -> None:
    """metrics.jsonl grows by one line per round: no copy of the whole file (issue 11, hole 5)."""
    path = tmp_path / "metrics.jsonl"
    for rnd in range(3):
        append_jsonl(path, {"round": rnd, "pad": "x" * 1000})
    inode = path.stat().st_ino
    _fail_nth_replace(monkeypatch, 1)  # a rewrite-and-rename would raise here
    reads: list[int] = []
    real_read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(1) or real_read_bytes(self))
    append_jsonl(path, {"round": 3})
    assert path.stat().st_ino == inode
    assert not reads
    assert [json.loads(x)["round"] for x in path.read_text().splitlines()] == [0, 1, 2, 3]


def test_append_jsonl_drops_half_a_record_left_by_a_killed_writer(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 0}\n{"round": 1, "eval": {"ex')
    append_jsonl(path, {"round": 1})
    assert [json.loads(x) for x in path.read_text().splitlines()] == [{"round": 0}, {"round": 1}]


def test_append_jsonl_after_a_torn_last_line_starts_a_new_line(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 0}\n{"round": 1}')  # no final newline (written by something else)
    append_jsonl(path, {"round": 2})
    assert [json.loads(x)["round"] for x in path.read_text().splitlines()] == [0, 1, 2]


# --------------------------------------------------------------------- atomic_directory
def _make_dir(path: Path, text: str) -> None:
    with atomic_directory(path) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "a.txt").write_text(text)
        (tmp / "sub" / "b.txt").write_text(text * 2)


def _read_dir(path: Path) -> tuple[str, str]:
    return (path / "a.txt").read_text(), (path / "sub" / "b.txt").read_text()


def test_atomic_directory_block_raising_keeps_old_directory(tmp_path) -> None:
    final = tmp_path / "final"
    _make_dir(final, "v1")
    with pytest.raises(Boom), atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("v2 partial")
        _raise()
    assert _read_dir(final) == ("v1", "v1v1")
    assert _entries(tmp_path) == ["final"]


def test_atomic_directory_replaces_whole_directory(tmp_path) -> None:
    final = tmp_path / "final"
    _make_dir(final, "v1")
    with atomic_directory(final) as tmp:
        (tmp / "only.txt").write_text("v2")
    assert _entries(final) == ["only.txt"]  # nothing of v1 survives
    assert _entries(tmp_path) == ["final"]


def test_atomic_directory_swap_failure_keeps_old_directory(tmp_path, monkeypatch) -> None:
    final = tmp_path / "final"
    _make_dir(final, "v1")
    monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: _raise())
    with pytest.raises(Boom):
        _make_dir(final, "v2")
    assert _read_dir(final) == ("v1", "v1v1")
    assert _entries(tmp_path) == ["final"]


@pytest.mark.parametrize("fail_at", [1, 2])
def test_atomic_directory_fallback_rename_failure_restores_old(tmp_path, monkeypatch, fail_at) -> None:
    """Where RENAME_EXCHANGE is unavailable: two renames; whichever fails, v1 is back in place."""
    final = tmp_path / "final"
    _make_dir(final, "v1")
    monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
    # the directory write itself does no os.replace; the swap does path->backup (1), tmp->path (2)
    _fail_nth_replace(monkeypatch, fail_at)
    real_replace = checkpoint.os.replace

    def replace(a, b):  # let the restore (backup -> path) through
        if Path(a).name == ".final.old":
            return os.rename(a, b)
        return real_replace(a, b)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        _make_dir(final, "v2")
    assert _read_dir(final) == ("v1", "v1v1")
    assert _entries(tmp_path) == ["final"]


def test_atomic_directory_fallback_success_and_crash_recovery(tmp_path, monkeypatch) -> None:
    final = tmp_path / "final"
    _make_dir(final, "v1")
    monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
    _make_dir(final, "v2")
    assert _read_dir(final) == ("v2", "v2v2")
    assert _entries(tmp_path) == ["final"]
    # a crash between the two renames leaves only the backup: the next writer (or reader) restores it
    os.rename(final, tmp_path / ".final.old")
    assert recover_directory(final)
    assert _read_dir(final) == ("v2", "v2v2")
    os.rename(final, tmp_path / ".final.old")
    with pytest.raises(Boom), atomic_directory(final):
        _raise()
    assert _read_dir(final) == ("v2", "v2v2")
    assert _entries(tmp_path) == ["final"]


# --------------------------------------------------------------------- MultiExitSER.save_pretrained
def _model(seed: int):
    from fedsd.model.backbone import load_backbone
    from fedsd.model.multiexit import MultiExitSER

    torch.manual_seed(seed)
    return MultiExitSER(load_backbone("tiny"), [1, 2], ["neutral", "happy", "angry", "sad"])


@pytest.mark.parametrize("where", ["backbone", "heads", "meta", "swap"])
def test_save_pretrained_failure_keeps_previous_checkpoint(tmp_path, monkeypatch, where) -> None:
    import fedsd.model.multiexit as multiexit
    from fedsd.model.multiexit import MultiExitSER

    old, new = _model(0), _model(1)
    final = tmp_path / "final"
    old.save_pretrained(final)
    files_before = {p.relative_to(final): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    if where == "backbone":
        real = type(new.backbone).save_pretrained

        def half(self, d, *a, **k):
            real(self, d, *a, **k)  # the backbone files are written, then it fails
            raise Boom("disk full after the backbone")

        monkeypatch.setattr(type(new.backbone), "save_pretrained", half)
    elif where == "heads":
        monkeypatch.setattr(multiexit, "save_tensors", _raise)
    elif where == "meta":
        monkeypatch.setattr(multiexit, "atomic_write_json", _raise)
    else:
        monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: _raise())
    with pytest.raises(Boom):
        new.save_pretrained(final)
    files_after = {p.relative_to(final): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    assert files_after == files_before
    assert _entries(tmp_path) == ["final"]
    loaded = MultiExitSER.from_pretrained(final)
    for k, v in old.head_state_dict().items():
        assert torch.equal(loaded.head_state_dict()[k], v), k
    monkeypatch.undo()
    new.save_pretrained(final)  # and a later write that works replaces it whole
    loaded = MultiExitSER.from_pretrained(final)
    for k, v in new.head_state_dict().items():
        assert torch.equal(loaded.head_state_dict()[k], v), k
    assert _entries(tmp_path) == ["final"]


# --------------------------------------------------------------------- SIGKILL mid-write
KILLED_WRITER = """
import os, sys, time
from fedsd import checkpoint
real_fsync = os.fsync
def stuck(fd):  # the data is in the temporary file; the process dies before the rename
    print("writing", flush=True)
    time.sleep(600)
checkpoint.os.fsync = stuck
checkpoint.atomic_write_json(sys.argv[1], {"completed_round": 2, "pad": "x" * 1000000})
"""


def test_writer_killed_mid_write_leaves_previous_version(tmp_path) -> None:
    path = tmp_path / "state.json"
    atomic_write_json(path, {"completed_round": 1})
    before = path.read_bytes()
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    leftovers = [n for n in _entries(tmp_path) if n != "state.json"]
    assert all(n.startswith(".state.json.") and n.endswith(".tmp") for n in leftovers), leftovers


def test_sweep_removes_only_stale_temporaries(tmp_path: Path) -> None:
    import time

    from fedsd.checkpoint import sweep_temporaries

    stale_file = tmp_path / ".state.json.abc.tmp"
    stale_file.write_text("half")
    stale_dir = tmp_path / ".final.xyz.tmp"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"x")
    fresh = tmp_path / ".metrics.jsonl.def.tmp"
    fresh.write_text("being written")
    keep = tmp_path / "state.json"
    keep.write_text("{}")
    old = time.time() - 3600
    for p in (stale_file, stale_dir):
        os.utime(p, (old, old))
    removed = sweep_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted([stale_file.name, stale_dir.name])
    assert fresh.exists() and keep.exists() and not stale_file.exists() and not stale_dir.exists()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_follow_the_umask_not_mkstemp(tmp_path: Path, umask: int) -> None:
    """Results, reports and checkpoints land with the mode the user's umask gives (mkstemp's is 0600)."""
    from fedsd.checkpoint import atomic_directory, atomic_write_json, shared_mode

    old = os.umask(umask)
    try:
        assert shared_mode() == 0o666 & ~umask
        f = atomic_write_json(tmp_path / "results.json", {"uar": 0.5})
        with atomic_directory(tmp_path / "model") as d:
            (d / "weights.bin").write_bytes(b"x")
        key = checkpoint.atomic_write_bytes(tmp_path / "key.pem", b"secret", mode=0o600)
    finally:
        os.umask(old)
    assert f.stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "model" / "weights.bin").stat().st_mode & 0o777 == 0o666 & ~umask
    assert key.stat().st_mode & 0o777 == 0o600


def test_generated_private_keys_stay_private_under_a_lax_umask(tmp_path: Path) -> None:
    from fedsd.security.certs import generate_node_key

    old = os.umask(0o000)
    try:
        priv, pub = generate_node_key(tmp_path / "node")
    finally:
        os.umask(old)
    assert Path(priv).stat().st_mode & 0o777 == 0o600
    assert Path(pub).stat().st_mode & 0o077 != 0  # the public half is readable by others
