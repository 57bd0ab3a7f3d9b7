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

Across restarts (issue 11): compositions are counted per *device identity* (the ``device-id`` a device
declares at the handshake, which survives SuperNode restarts; Flower's node id does not), and
:meth:`CentralDP.state` / :meth:`CentralDP.restore` carry them through ``state.json`` so a resumed run
keeps counting. A resumed run never replays noise: with a fixed ``seed`` the generator is seeded with
``(seed, resume round, number of starts)``.
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
    compositions: dict[Any, int] = field(default_factory=dict)
    """Per device identity: Gaussian mechanisms it took part in so far (one per head per round)."""
    identities: dict[int, str] = field(default_factory=dict)
    """Node id → stable device identity (from the handshake); a node without one counts as itself."""
    starts: int = 0
    """How many times the run was (re)started with this state (mixed into a fixed seed)."""
    baseline: int = 0
    """Compositions every device is assumed to have had already (a resume without saved counts)."""

    def __post_init__(self) -> None:
        if not self.clip_norm > 0:
            raise ValueError(f"central_dp.clip_norm must be > 0, got {self.clip_norm}")
        if self.noise_multiplier < 0:
            raise ValueError(f"central_dp.noise_multiplier must be >= 0, got {self.noise_multiplier}")
        self._rng = np.random.default_rng(self.seed)

    def identity(self, node_id: int) -> Any:
        return self.identities.get(node_id, node_id)

    def state(self) -> dict[str, Any]:
        """What a resumed run needs (JSON-ready): compositions per device identity, starts."""
        return {
            "compositions": {str(k): int(v) for k, v in self.compositions.items()},
            "starts": self.starts,
            "baseline": self.baseline,
        }

    def restore(
        self, state: dict[str, Any] | None, resume_round: int, history: Sequence[dict[str, Any]] = ()
    ) -> None:
        """Continue the accounting of an earlier start; reseed so no noise of it is ever replayed.

        Without saved counts (a run directory of an older fedsd) but with rounds done, every device is
        assumed to have taken part in every head mechanism released so far (from the metrics
        ``history``, else all heads of every round): conservative, never an under-report.
        """
        if state is None and resume_round > 0:
            released = [
                len((rec.get("privacy", {}).get("central") or {}).get("senders_per_head") or {})
                for rec in history
                if int(rec.get("round", 0)) > 0
            ]
            self.baseline = sum(released) if len(released) == resume_round else resume_round * 64
        state = state or {}
        self.baseline = max(self.baseline, int(state.get("baseline", 0)))
        restored: dict[Any, int] = {}
        for key, count in dict(state.get("compositions") or {}).items():
            ident: Any = int(key) if str(key).lstrip("-").isdigit() else str(key)
            restored[ident] = int(count)
        for key, count in self.compositions.items():
            restored[key] = max(restored.get(key, 0), count)
        self.compositions = restored
        self.starts = int(state.get("starts", 0)) + 1
        if self.seed is not None:
            self._rng = np.random.default_rng(np.random.SeedSequence([self.seed, resume_round, self.starts]))
        else:
            self._rng = np.random.default_rng()

    def epsilon(self) -> float:
        """ε (at ``delta``) of the device that took part in the most mechanisms so far."""
        worst = self.baseline + max(self.compositions.values(), default=0)
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
                who = self.identity(u.node_id)
                self.compositions[who] = self.compositions.get(who, 0) + 1
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
