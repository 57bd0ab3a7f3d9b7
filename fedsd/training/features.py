"""On-disk cache of the frozen backbone's per-exit head inputs, one file per utterance.

Why: on a device the backbone is frozen, so the expensive forward pass is a pure function of
(backbone weights, audio file, crop policy). Running it once per utterance — not once per epoch and
round — is what makes on-device adaptation cheap. In a Flower deployment every message runs in a fresh
process, so the cache lives on disk.

What is cached per utterance and exit is the head's *precomputed input* (``ExitHead.precompute``:
pooled statistics for ``stats`` heads, the frame sequence for ``gru`` heads), never head outputs: heads
change every round, the backbone does not. Entries are keyed by backbone fingerprint + file identity
(absolute path, size, mtime and the sha256 of the file's bytes) + crop policy + exit + head kind, and
each file stores its own key, so a stale or corrupt entry is detected and recomputed, never trusted.
The content hash is what catches audio rewritten with the same size and a preserved mtime
(``cp -p``, ``rsync -t``); path, size and mtime alone would reuse stale features.

Cached tensors are CPU tensors; the backbone runs on the ``device`` asked for and the model stays there,
so whoever feeds cached inputs to the heads moves them to the heads' device (``clients/training.py``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fedsd.data.audio import CropPolicy
from fedsd.data.dataset import SpeechDataset, collate_batch
from fedsd.data.manifest import ManifestRow
from fedsd.model.multiexit import MultiExitSER

CACHE_FORMAT = 2  # 2: the key holds the audio's sha256

# sha256 of audio files already hashed by this process, keyed by what stat says about the file: a file
# is rehashed only when one of these changes. ctime is in the key because no user-space tool can
# preserve it: rewriting a file in place (same inode, size, restored mtime) still changes it.
_CONTENT_HASHES: dict[tuple[str, int, int, int, int, int], str] = {}


class BackboneNeeded(RuntimeError):
    """A feature is not cached and the model has no backbone weights (heads only): load them."""


@dataclass
class CachedFeatures:
    """Head inputs for a set of utterances: ``inputs[k][i]`` is utterance i's precomputed input at exit k."""

    utt_ids: list[str]
    inputs: dict[int, list[torch.Tensor]]
    labels: torch.Tensor  # [N], -1 = unlabelled
    hits: int
    misses: int

    def stacked(self, k: int) -> torch.Tensor:
        """Inputs of exit k as one tensor (stats heads: fixed-size vectors)."""
        return torch.stack(self.inputs[k])


def _content_sha256(path: Path, st: os.stat_result) -> str:
    """sha256 of the file's bytes, computed once per process for an unchanged file."""
    memo = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _CONTENT_HASHES.get(memo)
    if digest is None:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        digest = _CONTENT_HASHES[memo] = h.hexdigest()
    return digest


def _file_identity(path: Path) -> str:
    """Path, size, mtime and content hash: a rewrite with a preserved size and mtime is still noticed.

    The path is made absolute lexically (``os.path.abspath``, no file-system walk: ``resolve()`` cost more
    than the rest of a cached lookup); the stat follows links, and the content hash is of the bytes.
    """
    resolved = Path(os.path.abspath(path))
    st = resolved.stat()
    return f"{resolved}|{st.st_size}|{st.st_mtime_ns}|{_content_sha256(resolved, st)}"


class FeatureCache:
    """Compute-once store of per-exit head inputs for one backbone."""

    def __init__(self, cache_dir: str | os.PathLike[str], model: MultiExitSER, crop: CropPolicy) -> None:
        self.model = model
        self.crop = crop
        self.fingerprint = model.backbone_fingerprint()
        self.dir = Path(cache_dir) / "features" / self.fingerprint[:16]
        self.head_kind = model.head_kind

    def entry_key(self, audio_path: Path, exit_k: int) -> str:
        return self.entry_keys(audio_path, [exit_k])[exit_k]

    def entry_keys(self, audio_path: Path, exits: Sequence[int]) -> dict[int, str]:
        """:meth:`entry_key` of every exit, the audio file's identity (stat + content hash) taken once."""
        identity, crop = _file_identity(audio_path), self.crop.key()
        return {k: self._key(identity, crop, k) for k in exits}

    def _key(self, file_identity: str, crop: str, exit_k: int) -> str:
        ident = "|".join(
            [f"v{CACHE_FORMAT}", self.fingerprint, file_identity, crop, f"exit{exit_k}", self.head_kind]
        )
        return hashlib.sha256(ident.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def _read(self, key: str) -> torch.Tensor | None:
        """The cached tensor, or None when missing, unreadable, for another key, or non-finite."""
        path = self._path(key)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                if (fh.metadata() or {}).get("key") != key:
                    return None
                x = fh.get_tensor("x")
        except (SafetensorError, OSError, ValueError, RuntimeError, KeyError):
            return None
        if not torch.isfinite(x).all():
            return None
        return x

    def _write(self, key: str, x: torch.Tensor) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"x": x.contiguous()}, str(tmp), metadata={"key": key})
        os.replace(tmp, path)

    def _lookup(
        self, keys: list[dict[int, str]], exits: list[int]
    ) -> tuple[dict[int, list[torch.Tensor | None]], list[int]]:
        """Cached inputs per exit (None where missing) and the rows with any exit missing."""
        inputs: dict[int, list[torch.Tensor | None]] = {k: [None] * len(keys) for k in exits}
        todo: list[int] = []
        for i, kk in enumerate(keys):
            found = {k: self._read(kk[k]) for k in exits}
            if all(v is not None for v in found.values()):
                for k in exits:
                    inputs[k][i] = found[k]
            else:
                todo.append(i)
        return inputs, todo

    @staticmethod
    def _labels(
        rows: Sequence[ManifestRow], label_names: Sequence[str], labelled: Sequence[bool] | None
    ) -> torch.Tensor:
        """Class indices, -1 where the row is unlabelled or its label is hidden."""
        index = {n: i for i, n in enumerate(label_names)}
        unknown = sorted({r.label for r in rows if r.label and r.label not in index})
        if unknown:
            raise ValueError(f"labels {unknown} are not in the model's label set {list(label_names)}")
        mask = list(labelled) if labelled is not None else [True] * len(rows)
        return torch.tensor(
            [index[r.label] if (m and r.label) else -1 for r, m in zip(rows, mask, strict=True)],
            dtype=torch.long,
        )

    def _store_batch(
        self, batch: dict[str, Any], idx: list[int], exits: list[int], keys: list[dict[int, str]],
        inputs: dict[int, list[torch.Tensor | None]], device: str,
    ) -> None:  # fmt: skip
        """Run the backbone on one batch of missing rows; cache and keep each exit's head input."""
        states = self.model.hidden_for_exits(
            batch["input_values"].to(device), batch["attention_mask"].to(device), exits
        )
        for k in exits:
            hidden, mask = states[k]
            pre = self.model.heads[str(k)].precompute(hidden, mask).float().cpu()
            for j, i in enumerate(idx):
                x = pre[j]
                if x.dim() == 2:  # frame sequences: drop padding
                    x = x[: int(mask[j].sum())]
                x = x.clone()
                self._write(keys[i][k], x)
                inputs[k][i] = x

    @torch.no_grad()
    def get(
        self,
        rows: Sequence[ManifestRow],
        root: str | os.PathLike[str],
        exits: Sequence[int],
        *,
        label_names: Sequence[str],
        labelled: Sequence[bool] | None = None,
        batch_size: int = 8,
        device: str = "cpu",
        progress: Callable[[int, int], None] | None = None,
    ) -> CachedFeatures:
        """Head inputs at ``exits`` for ``rows``; the backbone runs only for utterances not cached."""
        root = Path(root)
        exits = sorted(set(exits))
        keys = [self.entry_keys(root / r.path, exits) for r in rows]
        inputs, todo = self._lookup(keys, exits)
        labels = self._labels(rows, label_names, labelled)
        if todo and not self.model.has_backbone_weights:
            raise BackboneNeeded(f"{len(todo)} of {len(rows)} utterances are not cached")
        if todo:
            ds = SpeechDataset(rows, root, label_names, self.crop, labelled=labelled, train=False)
            self.model.eval().to(device)
            for start in range(0, len(todo), batch_size):
                idx = todo[start : start + batch_size]
                self._store_batch(collate_batch([ds[i] for i in idx]), idx, exits, keys, inputs, device)
                if progress is not None:
                    progress(start + len(idx), len(todo))
        return CachedFeatures(
            utt_ids=[r.utt_id for r in rows],
            inputs={k: [t for t in v if t is not None] for k, v in inputs.items()},
            labels=labels,
            hits=len(rows) - len(todo),
            misses=len(todo),
        )
