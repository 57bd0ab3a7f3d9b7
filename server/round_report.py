"""What happened to one round's replies: the accepted clients, the rejections, what was aggregated.

``RoundReport.to_dict()`` is the JSON the server writes to metrics.jsonl (``train``/``federated_eval``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .validation import Rejection


@dataclass
class ClientReport:
    """One accepted reply, as written to metrics.jsonl."""

    node_id: int
    num_examples: float
    metrics: dict[str, Any]
    keys: list[str] = field(default_factory=list)
    """Keys the client trained (train rounds only)."""
    update_norm: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "node_id": self.node_id,
            "num_examples": self.num_examples,
            "metrics": dict(self.metrics),
        }
        if self.keys:
            out["keys"] = list(self.keys)
        if self.update_norm is not None:
            out["update_norm"] = self.update_norm
        return out


@dataclass
class RoundReport:
    """What happened to one round's replies."""

    server_round: int
    kind: Literal["train", "evaluate"]
    clients: list[ClientReport] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    aggregated: bool = False
    """Train: whether the global record was updated. Evaluate: whether metrics were aggregated."""
    updated_keys: list[str] = field(default_factory=list)
    weight_cap: float | None = None
    """The largest weight one reply had this round (see :func:`weight_cap`); None: no cap."""
    note: str | None = None
    """Why nothing was aggregated, when that happened."""
    central_dp: dict[str, Any] | None = None
    """Clipping, noise and ε of the server's client-level DP this round (when on)."""
    held_back: dict[str, int] = field(default_factory=dict)
    """Exit → senders, for heads a robust rule did not aggregate (fewer than :func:`min_senders`)."""

    def to_dict(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"central_dp": self.central_dp} if self.central_dp is not None else {}
        if self.held_back:
            extra["held_back"] = dict(self.held_back)
        if self.weight_cap is not None:
            extra["weight_cap"] = self.weight_cap
        return extra | {
            "round": self.server_round,
            "kind": self.kind,
            "aggregated": self.aggregated,
            "num_clients": len(self.clients),
            "num_rejected": len(self.rejections),
            "clients": [c.to_dict() for c in self.clients],
            "rejections": [r.to_dict() for r in self.rejections],
            "updated_keys": list(self.updated_keys),
            "note": self.note,
        }
