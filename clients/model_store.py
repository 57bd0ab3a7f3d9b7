"""A device's model, verified once per model directory and loaded only as far as a message needs.

Each Flower message runs in a fresh process. Loading the model used to hash every backbone weight
(``from_pretrained`` checks the fingerprint in fedsd.json) and then hash them again (the device's
comparison with the server's fingerprint, the feature cache's key): seconds per message for a base
size backbone, for weights that never change.

- **Stamp**: after a full load has verified the fingerprint, ``<cache>/model-stamps/<dir hash>.json``
  records it with the identity of every file of the model directory (relative path, size, mtime_ns,
  ctime_ns, inode, device). A later message trusts the recorded fingerprint only when every one of
  those fields is unchanged, so a rewritten weight file (even with its size and mtime restored: the
  ctime still moves) is verified again. The stamp is written atomically and only when the files did
  not change during the verification.
- **Heads only**: with a valid stamp, ``weights=False`` builds the encoder's skeleton on the meta
  device (no weight is read) plus the real heads: enough to train and evaluate heads on cached
  features. The feature cache raises :class:`fedsd.training.features.BackboneNeeded` if a feature is missing,
  and the ClientApp then handles the message again with the full model.
- **Reuse within a process** (a Ray actor in simulation handles many messages): a loaded backbone is
  kept, keyed by the resolved directory and the identity of its files, and reused only while its
  tensors are the ones loaded and unmodified; every message still gets fresh heads from disk. The
  heads-only skeleton is kept the same way (building it cost more than the rest of a cached message).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fedsd.checkpoint import atomic_write_json
from fedsd.model.multiexit import META_FILE, MultiExitSER

STAMP_DIR = "model-stamps"
STAMP_FORMAT = 1
MAX_KEPT = 4
"""Backbones kept per process, skeletons included (a simulation federates one model; a device rarely
holds two)."""

_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


def file_identity(model_dir: Path) -> list[list[Any]]:
    """``[relative path, size, mtime_ns, ctime_ns, inode, device]`` of every file under ``model_dir``."""
    root = Path(model_dir).resolve()
    out: list[list[Any]] = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out.append([p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                        st.st_ino, st.st_dev])  # fmt: skip
    return out


def stamp_path(cache_dir: Path, model_dir: Path) -> Path:
    digest = hashlib.sha256(str(Path(model_dir).resolve()).encode("utf-8")).hexdigest()
    return Path(cache_dir) / STAMP_DIR / f"{digest[:32]}.json"


def read_stamp(cache_dir: Path, model_dir: Path, identity: list[list[Any]]) -> str | None:
    """The fingerprint verified for exactly these files, or None (no stamp, unreadable, any change)."""
    try:
        data = json.loads(stamp_path(cache_dir, model_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != STAMP_FORMAT:
        return None
    if data.get("model_dir") != str(Path(model_dir).resolve()) or data.get("files") != identity:
        return None
    fp = data.get("fingerprint")
    return fp if isinstance(fp, str) and _FINGERPRINT.fullmatch(fp) else None


def write_stamp(cache_dir: Path, model_dir: Path, identity: list[list[Any]], fingerprint: str) -> None:
    record = {"format": STAMP_FORMAT, "model_dir": str(Path(model_dir).resolve()), "files": identity,
              "fingerprint": fingerprint}  # fmt: skip
    with contextlib.suppress(OSError):  # a read-only cache: verify again next time
        atomic_write_json(stamp_path(cache_dir, model_dir), record)


def _versions(module: Any) -> tuple:
    return tuple((id(t), t._version) for t in module.state_dict(keep_vars=True).values())


class _Kept:
    """Backbones loaded in this process: (directory, file identity) → (fingerprint, backbone, versions)."""

    def __init__(self) -> None:
        self.entries: OrderedDict[tuple, tuple[str, Any, tuple]] = OrderedDict()

    def get(self, key: tuple) -> tuple[str, Any] | None:
        hit = self.entries.get(key)
        if hit is None:
            return None
        fp, backbone, versions = hit
        if _versions(backbone) != versions:  # moved or modified since it was loaded: not the same
            del self.entries[key]
            return None
        self.entries.move_to_end(key)
        return fp, backbone

    def put(self, key: tuple, fingerprint: str, backbone: Any) -> None:
        self.entries[key] = (fingerprint, backbone, _versions(backbone))
        self.entries.move_to_end(key)
        while len(self.entries) > MAX_KEPT:
            self.entries.popitem(last=False)


_KEPT = _Kept()


def load_model(model_dir: Path, cache_dir: Path, *, weights: bool = True) -> MultiExitSER:
    """The model in ``model_dir``, its fingerprint verified once per identity of its files.

    ``weights=False``: a heads-only model when a stamp vouches for the files (else the full model,
    which is what verifying them takes anyway).
    """
    root = Path(model_dir).resolve()
    identity = file_identity(root)
    key = (str(root), json.dumps(identity))
    kept = _KEPT.get(key)
    if kept is not None:
        return MultiExitSER.from_pretrained(root, fingerprint=kept[0], backbone=kept[1])
    fp = read_stamp(cache_dir, root, identity)
    if fp is not None and not weights:
        skeleton_key = (*key, "meta")
        kept = _KEPT.get(skeleton_key)
        reuse = kept[1] if kept is not None and kept[0] == fp else "meta"
        model = MultiExitSER.from_pretrained(root, fingerprint=fp, backbone=reuse)
        if reuse == "meta":
            _KEPT.put(skeleton_key, fp, model.backbone)
        return model
    model = MultiExitSER.from_pretrained(root, fingerprint=fp)  # no stamp: hashes the weights once
    if fp is None:
        fp = str(json.loads((root / META_FILE).read_text(encoding="utf-8"))["fingerprint"])
        if file_identity(root) != identity:  # changed while being verified: trust nothing of it
            return MultiExitSER.from_pretrained(root)
        model._verified = (fp, model._backbone_version())
        write_stamp(cache_dir, root, identity, fp)
    _KEPT.put(key, fp, model.backbone)
    return model
