"""Client-level differential privacy at the server (DP-FedAvg with fixed clipping, per exit head).

Devices deployed at different exits send different heads, so Flower's DP wrappers (which clip one
flat update per client and expect equal key sets) do not apply. Here every exit head is its own
Gaussian mechanism: for head e with senders S_e,

    Δ_i   = update_i[e] − global[e]                      (all keys of head e, flattened)
    Δ̂_i   = Δ_i · min(1, C / ‖Δ_i‖₂)                     (clip each device's change to norm C)
    new_e = global[e] + (Σ_{i∈S_e} Δ̂_i + N(0, σ²C²·I)) / |S_e|

so adding or removing one device moves the noised sum by at most C. A device that sent m heads took
part in m mechanisms that round; the ε reported is for the device with the most compositions so far
(RDP accountant, no amplification by sampling: conservative). Weights by ``num-examples`` are not
used (they would change the sensitivity); the mean is unweighted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedsd.privacy import central_epsilon
from fedsd.wire import exit_of_key

from .validation import ValidUpdate


@dataclass
class CentralDP:
    clip_norm: float
    noise_multiplier: float
    delta: float = 1e-5
    seed: int | None = None
    compositions: dict[int, int] = field(default_factory=dict)
    """Per device: Gaussian mechanisms it took part in so far (one per head per round)."""

    def __post_init__(self) -> None:
        if not self.clip_norm > 0:
            raise ValueError(f"central_dp.clip_norm must be > 0, got {self.clip_norm}")
        if self.noise_multiplier < 0:
            raise ValueError(f"central_dp.noise_multiplier must be >= 0, got {self.noise_multiplier}")
        self._rng = np.random.default_rng(self.seed)

    def epsilon(self) -> float:
        """ε (at ``delta``) of the device that took part in the most mechanisms so far."""
        worst = max(self.compositions.values(), default=0)
        return central_epsilon(self.noise_multiplier, worst, 1, self.delta)

    def aggregate(
        self, global_arrays: dict[str, np.ndarray], updates: Sequence[ValidUpdate]
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Noised mean of clipped changes per exit head; returns new arrays (changed keys) and a report."""
        heads: dict[int, list[str]] = {}
        for key in global_arrays:
            heads.setdefault(exit_of_key(key), []).append(key)
        out: dict[str, np.ndarray] = {}
        clipped = 0
        senders_per_head: dict[str, int] = {}
        for exit_k, keys in sorted(heads.items()):
            senders = [u for u in updates if any(k in u.arrays for k in keys)]
            if not senders:
                continue
            partial = [u.node_id for u in senders if not all(k in u.arrays for k in keys)]
            if partial:
                raise ValueError(f"exit {exit_k}: devices {partial} sent only part of the head")
            total = {k: np.zeros(global_arrays[k].shape, np.float64) for k in keys}
            for u in senders:
                deltas = {
                    k: u.arrays[k].astype(np.float64) - global_arrays[k].astype(np.float64) for k in keys
                }
                norm = math.sqrt(sum(float(np.sum(d * d)) for d in deltas.values()))
                factor = min(1.0, self.clip_norm / (norm + 1e-12))
                clipped += int(factor < 1.0)
                for k in keys:
                    total[k] += deltas[k] * factor
                self.compositions[u.node_id] = self.compositions.get(u.node_id, 0) + 1
            std = self.noise_multiplier * self.clip_norm
            for k in keys:
                noisy = total[k] + (self._rng.normal(0.0, std, total[k].shape) if std > 0 else 0.0)
                value = global_arrays[k].astype(np.float64) + noisy / len(senders)
                out[k] = value.astype(global_arrays[k].dtype)
            senders_per_head[str(exit_k)] = len(senders)
        report = {
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "delta": self.delta,
            "clipped_updates": clipped,
            "senders_per_head": senders_per_head,
            "epsilon": self.epsilon(),
        }
        return out, report
