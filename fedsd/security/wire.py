"""What travels between server and devices: message names, config keys, and record encodings.

Both sides import this module, so the protocol is written down once. Rounds carry exit-head weights
only (``heads.<exit>.<param>``); the one-off model delivery carries a whole checkpoint directory as one
``uint8`` array per file (Flower chunks large arrays), each verified by sha256 on arrival. A device
accepts only the file names a fedsd model has (``fedsd.security.untrusted.model_file``) and digests that are
sha256 hex, checked before anything is written.

A delivery is bounded before it is decoded or parsed (:class:`DeliveryLimits`): total bytes, bytes per
file, number of weight shards, size of the JSON files, and the dimensions its configs declare (a
``backbone/config.json`` or ``fedsd.json`` may not describe a model larger than the weights delivered:
it is sized on the meta device, where nothing is allocated, before any real model is built).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedsd.checkpoint import CheckpointError, atomic_directory
from fedsd.security.untrusted import (
    MAX_MODEL_FILES,
    UntrustedValueError,
    model_dimensions,
    model_file,
    printable,
    sha256_hex,
)

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


@dataclass(frozen=True)
class DeliveryLimits:
    """What one model delivery may carry; a device refuses anything larger before decoding it.

    The defaults fit the largest backbones fedsd federates (a wav2vec2/WavLM large, about 1.3 GB in
    float32) with room to spare; a device may lower ``total_bytes`` (node config ``max-model-mb``).
    """

    total_bytes: int = 4 * 2**30
    """All files together (the serialized arrays)."""
    file_bytes: int = 4 * 2**30
    """One file (a weight shard or an unsharded ``model.safetensors``)."""
    shards: int = 64
    """Weight shards (``backbone/model-NNNNN-of-NNNNN.safetensors``)."""
    json_bytes: int = 2**20
    """One JSON file (``fedsd.json``, ``backbone/config.json``, the shard index)."""
    size_slack_bytes: int = 16 * 2**20
    """How far the float32 size of the model the configs describe may exceed twice the weights delivered."""


_SHARD = re.compile(r"backbone/model-[0-9]{5}-of-[0-9]{5}\.safetensors", re.ASCII)


def _check_sizes(arrays: ArrayRecord, limits: DeliveryLimits) -> None:
    """Sizes of the serialized arrays against ``limits``, before any is decoded."""
    total = 0
    shards = 0
    for rel, arr in arrays.items():
        size = len(arr.data)
        cap = limits.json_bytes if rel.endswith(".json") else limits.file_bytes
        what = "DeliveryLimits.json_bytes" if rel.endswith(".json") else "DeliveryLimits.file_bytes"
        if size > cap + 1024:  # + the .npy header of the serialized array
            raise UntrustedValueError(f"model delivery: {rel} has {size} bytes, over the cap {what} = {cap}")
        total += size
        shards += bool(_SHARD.fullmatch(rel))
    if total > limits.total_bytes:
        raise UntrustedValueError(
            f"model delivery: {total} bytes in all, over the cap DeliveryLimits.total_bytes = "
            f"{limits.total_bytes} (node config max-model-mb)"
        )
    if shards > limits.shards:
        raise UntrustedValueError(
            f"model delivery: {shards} weight shards, over the cap DeliveryLimits.shards = {limits.shards}"
        )


def _json(files: Mapping[str, bytes], rel: str) -> dict[str, Any]:
    try:
        value = json.loads(files[rel].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise UntrustedValueError(f"model delivery: {rel} is not JSON ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise UntrustedValueError(f"model delivery: {rel} is not a JSON object")
    return value


def described_model_bytes(backbone_config: Mapping[str, Any], meta: Mapping[str, Any]) -> int:
    """float32 bytes of the model that ``backbone/config.json`` and ``fedsd.json`` describe, counted on
    the meta device (no memory is allocated). Raises ValueError for configs that build no model."""
    import torch

    from fedsd.model.backbone import FAMILIES, _deterministic
    from fedsd.model.multiexit import MultiExitSER

    family = backbone_config.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"backbone model_type {family!r} is not one of {', '.join(FAMILIES)}")
    config_cls, model_cls = FAMILIES[family]
    config = _deterministic(config_cls.from_dict(dict(backbone_config)))
    with torch.device("meta"):
        model = MultiExitSER(
            model_cls(config), meta.get("exits", []), meta.get("label_names", []),
            head=str(meta.get("head", "stats")), head_kwargs=meta.get("head_kwargs"),
            final_norm_at_last_exit=meta.get("final_norm_at_last_exit"),
        )  # fmt: skip
    return 4 * sum(t.numel() for t in model.state_dict().values())


def check_model_files(files: Mapping[str, bytes], limits: DeliveryLimits = DeliveryLimits()) -> None:
    """The configs of a decoded delivery: JSON objects with bounded dimensions
    (:func:`fedsd.security.untrusted.model_dimensions`), describing no more than the weights delivered."""
    configs = {rel: _json(files, rel) for rel in ("fedsd.json", "backbone/config.json") if rel in files}
    for rel, value in configs.items():
        model_dimensions(value, f"model delivery: {rel}")
    if len(configs) < 2:
        return  # an incomplete model fails to load later; nothing here would build it
    weights = sum(len(b) for rel, b in files.items() if rel.endswith(".safetensors"))
    try:
        described = described_model_bytes(configs["backbone/config.json"], configs["fedsd.json"])
    except Exception as e:  # a config transformers or fedsd cannot build: nothing allocated, refused
        raise UntrustedValueError(
            f"model delivery: the configs describe no buildable model ({type(e).__name__}: {printable(e, 200)})"
        ) from None
    cap = 2 * weights + limits.size_slack_bytes
    if described > cap:
        raise UntrustedValueError(
            f"model delivery: the configs describe a {described} byte model but only {weights} bytes of "
            f"weights came (cap: 2 x weights + DeliveryLimits.size_slack_bytes = {cap})"
        )


def read_delivery(
    arrays: ArrayRecord, digests: ConfigRecord, limits: DeliveryLimits = DeliveryLimits()
) -> dict[str, bytes]:
    """A delivered checkpoint's files, every check done and nothing written: names (fedsd model files),
    digests (sha256 hex, matching), sizes and config dimensions (``limits``).

    Raises :class:`~fedsd.security.untrusted.UntrustedValueError` for what the server should not have sent and
    CheckpointError for a corrupt file."""
    names = list(arrays.keys())
    if set(names) != set(digests.keys()):
        raise CheckpointError("model delivery: the file list and the digest list differ")
    if not names or len(names) > MAX_MODEL_FILES:
        raise CheckpointError(f"model delivery: {len(names)} files (expected 1 to {MAX_MODEL_FILES})")
    expected = {model_file(rel, "model delivery: file name"): "" for rel in names}
    for rel in names:
        expected[rel] = sha256_hex(digests[rel], f"model delivery: sha256 of {rel}")
    _check_sizes(arrays, limits)
    files: dict[str, bytes] = {}
    for rel, arr in arrays.items():
        try:
            data = arr.numpy().tobytes()
        except Exception as e:  # a malformed Array: np.load raises many exception types
            raise CheckpointError(f"model delivery: {rel} cannot be decoded ({type(e).__name__})") from None
        if hashlib.sha256(data).hexdigest() != expected[rel]:
            raise CheckpointError(f"model delivery: {rel} is corrupt (sha256 mismatch)")
        files[rel] = data
    check_model_files(files, limits)
    return files


def write_delivery(files: Mapping[str, bytes], dest: str | os.PathLike[str]) -> Path:
    """Write checked files (:func:`read_delivery`) as the directory ``dest``, atomically."""
    dest = Path(dest)
    with atomic_directory(dest) as tmp:
        for rel, data in files.items():
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
    return dest


def record_to_checkpoint(
    arrays: ArrayRecord,
    digests: ConfigRecord,
    dest: str | os.PathLike[str],
    limits: DeliveryLimits = DeliveryLimits(),
) -> Path:
    """Write a delivered checkpoint atomically after checking every file (:func:`read_delivery`).

    A refused or corrupt delivery raises before anything is written and leaves ``dest`` as it was.
    """
    return write_delivery(read_delivery(arrays, digests, limits), dest)
