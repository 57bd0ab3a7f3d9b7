"""What travels between server and devices: message names, config keys, and record encodings.

Both sides import this module, so the protocol is written down once. Rounds carry exit-head weights
only (``heads.<exit>.<param>``); the one-off model delivery carries a whole checkpoint directory as one
``uint8`` array per file (Flower chunks large arrays), each verified by sha256 on arrival. A device
accepts only the file names a fedsd model has (``fedsd.untrusted.model_file``) and digests that are
sha256 hex, checked before anything is written.
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
from fedsd.untrusted import MAX_MODEL_FILES, UntrustedValueError, model_file, sha256_hex

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
    """A checkpoint directory as (one uint8 array per file, {path: sha256}).

    Only the files of a fedsd model travel (``fedsd.json``, ``heads.safetensors``, ``backbone/``
    config and weights); anything else in the directory stays home, as devices would refuse it.
    """
    root = Path(path)
    arrays = ArrayRecord()
    digests = ConfigRecord()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        try:
            model_file(rel)
        except UntrustedValueError:
            continue
        data = f.read_bytes()
        arrays[rel] = Array(np.frombuffer(data, dtype=np.uint8).copy())
        digests[rel] = hashlib.sha256(data).hexdigest()
    if not len(arrays):
        raise CheckpointError(f"{root}: empty checkpoint directory")
    return arrays, digests


def record_to_checkpoint(arrays: ArrayRecord, digests: ConfigRecord, dest: str | os.PathLike[str]) -> Path:
    """Write a delivered checkpoint atomically after checking every file's name and sha256.

    Every name must be a fedsd model file and every digest sha256 hex before anything is written
    (:class:`~fedsd.untrusted.UntrustedValueError` otherwise); a corrupt file raises CheckpointError
    and leaves ``dest`` as it was.
    """
    dest = Path(dest)
    names = list(arrays.keys())
    if set(names) != set(digests.keys()):
        raise CheckpointError("model delivery: the file list and the digest list differ")
    if not names or len(names) > MAX_MODEL_FILES:
        raise CheckpointError(f"model delivery: {len(names)} files (expected 1 to {MAX_MODEL_FILES})")
    expected = {model_file(rel, "model delivery: file name"): "" for rel in names}
    for rel in names:
        expected[rel] = sha256_hex(digests[rel], f"model delivery: sha256 of {rel}")
    with atomic_directory(dest) as tmp:
        for rel, arr in arrays.items():
            try:
                data = arr.numpy().tobytes()
            except Exception as e:  # a malformed Array: np.load raises many exception types
                raise CheckpointError(
                    f"model delivery: {rel} cannot be decoded ({type(e).__name__})"
                ) from None
            if hashlib.sha256(data).hexdigest() != expected[rel]:
                raise CheckpointError(f"model delivery: {rel} is corrupt (sha256 mismatch)")
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
    return dest
