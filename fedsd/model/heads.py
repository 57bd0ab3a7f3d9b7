"""Exit heads: a frame sequence [B, F, H] from one encoder layer -> emotion logits.

Each head splits into a cacheable ``precompute`` (no trainable parameters) and a trainable
``forward_precomputed``: on devices the frozen backbone runs once per utterance and the heads then
train from the cache for many rounds (docs/architecture.md §3).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fedsd.model.backbone import ConfigError

EMBED_DIM = 256


@dataclass
class HeadOutput:
    """``embedding`` is the head's penultimate representation, used by the feature-distillation loss.

    It depends on head parameters, so the feature term still trains the heads when the backbone is frozen.
    """

    logits: Tensor
    embedding: Tensor


def _mask_or_all(hidden: Tensor, frame_mask: Tensor | None) -> Tensor:
    if frame_mask is None:
        return torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    if frame_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"frame_mask shape {tuple(frame_mask.shape)} does not match hidden {tuple(hidden.shape)}"
        )
    return frame_mask.to(device=hidden.device, dtype=torch.bool)


def masked_mean(x: Tensor, frame_mask: Tensor) -> Tensor:
    """Mean over valid frames ([B, F, D] -> [B, D]); a clip always has at least one valid frame."""
    w = frame_mask.unsqueeze(-1).to(x.dtype)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


def stats_pool(hidden: Tensor, frame_mask: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Masked mean and standard deviation over valid frames -> [B, 2H] (parameter-free, cacheable)."""
    mask = _mask_or_all(hidden, frame_mask)
    mean = masked_mean(hidden, mask)
    var = masked_mean((hidden - mean.unsqueeze(1)) ** 2, mask)
    return torch.cat([mean, torch.sqrt(var + eps)], dim=-1)  # eps keeps the gradient finite at var = 0


class ExitHead(nn.Module):
    """Common interface; subclasses define ``precompute`` and ``forward_precomputed``."""

    kind: str = ""
    #: True when ``precompute`` returns one vector per clip (no frame mask needed afterwards).
    pooled: bool = True

    def __init__(self, hidden_size: int, num_classes: int, embed_dim: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        self.embed_dim = embed_dim

    def precompute(self, hidden: Tensor, frame_mask: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward_precomputed(self, x: Tensor, frame_mask: Tensor | None = None) -> HeadOutput:
        raise NotImplementedError

    def forward(self, hidden: Tensor, frame_mask: Tensor | None = None) -> HeadOutput:
        return self.forward_precomputed(self.precompute(hidden, frame_mask), frame_mask)

    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments (besides sizes), so a checkpoint can rebuild the head."""
        raise NotImplementedError


class StatsHead(ExitHead):
    """Statistics pooling -> LayerNorm(2H) -> Linear(2H, E) -> GELU -> Dropout -> Linear(E, C)."""

    kind = "stats"
    pooled = True

    def __init__(
        self, hidden_size: int, num_classes: int, embed_dim: int = EMBED_DIM, dropout: float = 0.1
    ) -> None:
        super().__init__(hidden_size, num_classes, embed_dim)
        self.dropout_p = dropout
        self.norm = nn.LayerNorm(2 * hidden_size)
        self.proj = nn.Linear(2 * hidden_size, embed_dim)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(embed_dim, num_classes)

    def precompute(self, hidden: Tensor, frame_mask: Tensor | None) -> Tensor:
        return stats_pool(hidden, frame_mask)

    def forward_precomputed(self, x: Tensor, frame_mask: Tensor | None = None) -> HeadOutput:
        embedding = self.act(self.proj(self.norm(x)))
        return HeadOutput(self.classifier(self.dropout(embedding)), embedding)

    def config(self) -> dict[str, Any]:
        return {"embed_dim": self.embed_dim, "dropout": self.dropout_p}


class GRUHead(ExitHead):
    """The paper's head: GRU -> LayerNorm -> SELU -> masked mean-pool -> Linear(E) -> Linear(C).

    Padded frames are packed away and the initial state is zero, so a clip's logits do not depend on
    what it is batched with.
    """

    kind = "gru"
    pooled = False

    def __init__(
        self,
        hidden_size: int,
        num_classes: int,
        embed_dim: int = EMBED_DIM,
        gru_hidden: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(hidden_size, num_classes, embed_dim)
        self.gru_hidden = gru_hidden
        self.dropout_p = dropout
        self.gru = nn.GRU(hidden_size, gru_hidden, batch_first=True)
        self.norm = nn.LayerNorm(gru_hidden)
        self.act = nn.SELU()
        self.proj = nn.Linear(gru_hidden, embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(embed_dim, num_classes)

    def precompute(self, hidden: Tensor, frame_mask: Tensor | None) -> Tensor:
        mask = _mask_or_all(hidden, frame_mask)
        return hidden.masked_fill(~mask.unsqueeze(-1), 0.0)

    def forward_precomputed(self, x: Tensor, frame_mask: Tensor | None = None) -> HeadOutput:
        mask = _mask_or_all(x, frame_mask)
        lengths = mask.sum(1).clamp_min(1).to("cpu", torch.long)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)  # no initial state given -> zeros
        seq, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        pooled = masked_mean(self.act(self.norm(seq)), mask)
        embedding = self.proj(pooled)
        return HeadOutput(self.classifier(self.dropout(embedding)), embedding)

    def config(self) -> dict[str, Any]:
        return {"embed_dim": self.embed_dim, "gru_hidden": self.gru_hidden, "dropout": self.dropout_p}


HEADS: dict[str, type[ExitHead]] = {"stats": StatsHead, "gru": GRUHead}


def check_head_kwargs(kind: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` if head ``kind`` takes every one of them; else ConfigError naming ``head_kwargs``."""
    fixed = ("self", "hidden_size", "num_classes")
    allowed = [p for p in inspect.signature(HEADS[kind].__init__).parameters if p not in fixed]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ConfigError(
            "head_kwargs",
            f"unknown option(s) {unknown} for head {kind!r}; valid options: {', '.join(allowed)}",
        )
    return kwargs


def build_head(kind: str, hidden_size: int, num_classes: int, **kwargs: Any) -> ExitHead:
    """Build an exit head by name; unknown kinds or options are reported against ``head``/``head_kwargs``."""
    if kind not in HEADS:
        raise ConfigError("head", f"unknown value {kind!r}; valid values: {', '.join(HEADS)}")
    check_head_kwargs(kind, kwargs)
    if num_classes < 2:
        raise ConfigError("label_names", f"need at least 2 classes, got {num_classes}")
    return HEADS[kind](hidden_size, num_classes, **kwargs)
