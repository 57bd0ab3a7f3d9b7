"""On-disk cache of the frozen backbone's per-exit head inputs, one file per utterance.

Why: on a device the backbone is frozen, so the expensive forward pass is a pure function of
(backbone weights, audio file, crop policy). Running it once per utterance — not once per epoch and
round — is what makes on-device adaptation cheap. In a Flower deployment every message runs in a fresh
process, so the cache lives on disk.

What is cached per utterance and exit is the head's *precomputed input* (``ExitHead.precompute``:
pooled statistics for ``stats`` heads, the frame sequence for ``gru`` heads), never head outputs: heads
change every round, the backbone does not. Entries are keyed by backbone fingerprint + file identity
(absolute path, size, mtime) + crop policy + exit + head kind, and each file stores its own key, so a
stale or corrupt entry is detected and recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fedsd.audio import CropPolicy
from fedsd.data.dataset import SpeechDataset, collate_batch
from fedsd.data.manifest import ManifestRow
from fedsd.model.multiexit import MultiExitSER

CACHE_FORMAT = 1


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


def _file_identity(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


class FeatureCache:
    """Compute-once store of per-exit head inputs for one backbone."""

    def __init__(self, cache_dir: str | os.PathLike[str], model: MultiExitSER, crop: CropPolicy) -> None:
        self.model = model
        self.crop = crop
        self.fingerprint = model.backbone_fingerprint()
        self.dir = Path(cache_dir) / "features" / self.fingerprint[:16]
        self.head_kind = model.head_kind

    def entry_key(self, audio_path: Path, exit_k: int) -> str:
        ident = "|".join(
            [
                f"v{CACHE_FORMAT}",
                self.fingerprint,
                _file_identity(audio_path),
                self.crop.key(),
                f"exit{exit_k}",
                self.head_kind,
            ]
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
        keys = [{k: self.entry_key(root / r.path, k) for k in exits} for r in rows]
        inputs: dict[int, list[torch.Tensor | None]] = {k: [None] * len(rows) for k in exits}
        todo: list[int] = []
        for i, kk in enumerate(keys):
            found = {k: self._read(kk[k]) for k in exits}
            if all(v is not None for v in found.values()):
                for k in exits:
                    inputs[k][i] = found[k]
            else:
                todo.append(i)
        index = {n: i for i, n in enumerate(label_names)}
        unknown = sorted({r.label for r in rows if r.label and r.label not in index})
        if unknown:
            raise ValueError(f"labels {unknown} are not in the model's label set {list(label_names)}")
        mask = list(labelled) if labelled is not None else [True] * len(rows)
        labels = torch.tensor(
            [index[r.label] if (m and r.label) else -1 for r, m in zip(rows, mask, strict=True)],
            dtype=torch.long,
        )
        if todo:
            ds = SpeechDataset(rows, root, label_names, self.crop, labelled=labelled, train=False)
            self.model.eval().to(device)
            done = 0
            for start in range(0, len(todo), batch_size):
                idx = todo[start : start + batch_size]
                batch = collate_batch([ds[i] for i in idx])
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
                done += len(idx)
                if progress is not None:
                    progress(done, len(todo))
        return CachedFeatures(
            utt_ids=[r.utt_id for r in rows],
            inputs={k: [t for t in v if t is not None] for k, v in inputs.items()},
            labels=labels,
            hits=len(rows) - len(todo),
            misses=len(todo),
        )
