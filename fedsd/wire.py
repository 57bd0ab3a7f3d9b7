"""What travels between server and devices: message names, config keys, and record encodings.

Both sides import this module, so the protocol is written down once. Rounds carry exit-head weights
only (``heads.<exit>.<param>``); the one-off model delivery carries a whole checkpoint directory as one
``uint8`` array per file (Flower chunks large arrays), each verified by sha256 on arrival.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedsd.checkpoint import CheckpointError, atomic_directory

QUERY_INFO = "query.info"
"""Server asks a device for its exit, data size and whether it holds the server's model."""
QUERY_MODEL = "query.model"
"""Server delivers the base model checkpoint to a device that lacks it."""
QUERY_DONE = "query.done"
"""Server tells every device the run is over (a supervised device then stops its SuperNode)."""

HEAD_PREFIX = "heads."


def heads_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Head tensors → ArrayRecord (numpy copies, so later in-place training cannot alter a sent record)."""
    rec = ArrayRecord()
    for key, t in state.items():
        if not key.startswith(HEAD_PREFIX):
            raise ValueError(f"{key!r} is not a head parameter (expected '{HEAD_PREFIX}<exit>.<name>')")
        rec[key] = Array(t.detach().cpu().numpy().copy())
    return rec


def record_to_heads(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.array(arr.numpy(), copy=True)) for key, arr in record.items()}


def exit_of_key(key: str) -> int:
    """``heads.3.fc.weight`` → 3."""
    return int(key.split(".")[1])


def checkpoint_to_record(path: str | os.PathLike[str]) -> tuple[ArrayRecord, ConfigRecord]:
    """A checkpoint directory as (one uint8 array per file, {path: sha256})."""
    root = Path(path)
    arrays = ArrayRecord()
    digests = ConfigRecord()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        data = f.read_bytes()
        arrays[rel] = Array(np.frombuffer(data, dtype=np.uint8).copy())
        digests[rel] = hashlib.sha256(data).hexdigest()
    if not len(arrays):
        raise CheckpointError(f"{root}: empty checkpoint directory")
    return arrays, digests


def record_to_checkpoint(arrays: ArrayRecord, digests: ConfigRecord, dest: str | os.PathLike[str]) -> Path:
    """Write a delivered checkpoint atomically after checking every file's sha256."""
    dest = Path(dest)
    if set(arrays.keys()) != set(digests.keys()):
        raise CheckpointError("model delivery: the file list and the digest list differ")
    with atomic_directory(dest) as tmp:
        for rel, arr in arrays.items():
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise CheckpointError(f"model delivery: unsafe file name {rel!r}")
            data = arr.numpy().tobytes()
            if hashlib.sha256(data).hexdigest() != digests[rel]:
                raise CheckpointError(f"model delivery: {rel} is corrupt (sha256 mismatch)")
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
    return dest
