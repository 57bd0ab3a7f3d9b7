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

A resume may change σ (issue 23): every composition is kept with the σ it was made at (``by_sigma``;
the σ of every released round is in ``rounds``), and ε composes the Gaussian mechanisms of all
settings (RDP adds up: Σ_σ n_σ·α/(2σ²) at each order α, as Opacus' ``RDPAccountant`` does). Rounds the
server released *without* central DP (central DP switched on at a resume) have no bound: ε is ∞ from
then on, and the report says which rounds (``unaccounted_rounds``). A run directory of an older fedsd
(no ``by_sigma``) is read conservatively: counts at the smallest σ its metrics name, and a round whose
σ is unknown counts as unaccounted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedsd.security.privacy import epsilon as rdp_epsilon
from fedsd.security.wire import exit_of_key

from .validation import ValidUpdate


def _sigma_key(sigma: float) -> str:
    return repr(float(sigma))


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
    by_sigma: dict[Any, dict[float, int]] = field(default_factory=dict)
    """Per device identity: mechanisms it took part in, per noise multiplier σ (what ε composes)."""
    baseline: dict[float, int] = field(default_factory=dict)
    """σ → compositions every device is assumed to have had already (a resume without saved counts)."""
    rounds: dict[int, float] = field(default_factory=dict)
    """Round → σ of the heads released that round (the σ history a resume composes over)."""
    unaccounted_rounds: list[int] = field(default_factory=list)
    """Rounds whose release ε cannot bound (no central-DP noise, or σ unknown): ε is ∞."""
    round_offset: int = 0
    """Rounds done before this start (``server_round`` of :meth:`aggregate` counts from 1 again)."""

    def __post_init__(self) -> None:
        if not self.clip_norm > 0:
            raise ValueError(f"central_dp.clip_norm must be > 0, got {self.clip_norm}")
        if self.noise_multiplier < 0:
            raise ValueError(f"central_dp.noise_multiplier must be >= 0, got {self.noise_multiplier}")
        self._rng = np.random.default_rng(self.seed)

    def identity(self, node_id: int) -> Any:
        return self.identities.get(node_id, node_id)

    def state(self) -> dict[str, Any]:
        """What a resumed run needs (JSON-ready): compositions per device identity and σ, the σ of
        every released round, the rounds ε cannot bound, starts."""
        return {
            "compositions": {str(k): int(v) for k, v in self.compositions.items()},
            "by_sigma": {
                str(k): {_sigma_key(s): int(n) for s, n in counts.items()}
                for k, counts in self.by_sigma.items()
            },
            "baseline": {_sigma_key(s): int(n) for s, n in self.baseline.items()},
            "rounds": {str(r): float(s) for r, s in sorted(self.rounds.items())},
            "unaccounted_rounds": sorted(self.unaccounted_rounds),
            "starts": self.starts,
        }

    def restore(
        self, state: dict[str, Any] | None, resume_round: int, history: Sequence[dict[str, Any]] = ()
    ) -> None:
        """Continue the accounting of an earlier start (its σ's kept); reseed so no noise is replayed.

        ``state`` is what :meth:`state` saved (None: the earlier start ran without central DP, or an
        older fedsd). Without per-σ counts the metrics ``history`` (one record per round, with
        ``privacy.central`` when central DP noised that round) says what was released: a round that
        aggregated heads without central DP, or whose σ is unknown, is unaccounted (ε = ∞); for a
        noised round without saved counts every device is assumed in every head it released —
        conservative, never an under-report.
        """
        state = dict(state or {})
        self.round_offset = resume_round
        if "by_sigma" in state:
            self._restore_saved(state)
        else:
            self._restore_from_history(state, resume_round, history)
        self.starts = int(state.get("starts", 0)) + 1
        if self.seed is not None:
            self._rng = np.random.default_rng(np.random.SeedSequence([self.seed, resume_round, self.starts]))
        else:
            self._rng = np.random.default_rng()

    @staticmethod
    def _ident(key: Any) -> Any:
        return int(key) if str(key).lstrip("-").isdigit() else str(key)

    def _restore_saved(self, state: dict[str, Any]) -> None:
        for key, counts in dict(state.get("by_sigma") or {}).items():
            mine = self.by_sigma.setdefault(self._ident(key), {})
            for sigma, n in dict(counts).items():
                mine[float(sigma)] = max(mine.get(float(sigma), 0), int(n))
        for sigma, n in dict(state.get("baseline") or {}).items():
            self.baseline[float(sigma)] = max(self.baseline.get(float(sigma), 0), int(n))
        self.rounds |= {int(r): float(s) for r, s in dict(state.get("rounds") or {}).items()}
        self.unaccounted_rounds = sorted(
            set(self.unaccounted_rounds) | set(state.get("unaccounted_rounds") or [])
        )
        for key, count in dict(state.get("compositions") or {}).items():
            ident = self._ident(key)
            self.compositions[ident] = max(self.compositions.get(ident, 0), int(count))

    def _restore_from_history(
        self, state: dict[str, Any], resume_round: int, history: Sequence[dict[str, Any]]
    ) -> None:
        """An earlier start without central DP (``state`` empty) or an older fedsd (counts without σ)."""
        by_round = {int(rec.get("round", -1)): rec for rec in history}
        released: dict[int, tuple[float, int]] = {}  # round → (σ, heads released)
        for rnd in range(1, resume_round + 1):
            rec = by_round.get(rnd)
            central = ((rec or {}).get("privacy") or {}).get("central") if rec is not None else None
            if rec is None:
                self.unaccounted_rounds.append(rnd)  # nothing says what this round released
            elif central:
                sigma = central.get("noise_multiplier")
                heads = len(central.get("senders_per_head") or {})
                if isinstance(sigma, int | float) and not isinstance(sigma, bool):
                    released[rnd] = (float(sigma), heads)
                    self.rounds[rnd] = float(sigma)
                else:
                    self.unaccounted_rounds.append(rnd)
            elif (rec.get("train") or {}).get("aggregated", True) and "train" in rec:
                self.unaccounted_rounds.append(rnd)  # heads released without central-DP noise
        saved = {self._ident(k): int(v) for k, v in dict(state.get("compositions") or {}).items()}
        old_baseline = state.get("baseline", 0)
        old_baseline = int(old_baseline) if isinstance(old_baseline, int | float) else 0
        if saved or old_baseline:  # counts of an older fedsd, σ not kept: the smallest σ it used
            smallest = min((s for s, _ in released.values()), default=None)
            if smallest is None:
                self.unaccounted_rounds.extend(range(1, resume_round + 1))
            else:
                for ident, n in saved.items():
                    mine = self.by_sigma.setdefault(ident, {})
                    mine[smallest] = mine.get(smallest, 0) + n
                    self.compositions[ident] = max(self.compositions.get(ident, 0), n)
                if old_baseline:
                    self.baseline[smallest] = self.baseline.get(smallest, 0) + old_baseline
        else:  # no per-device counts: every device in every head released
            for sigma, heads in released.values():
                self.baseline[sigma] = self.baseline.get(sigma, 0) + heads
        self.unaccounted_rounds = sorted(set(self.unaccounted_rounds))

    def steps(self) -> list[tuple[float, int]]:
        """(σ, compositions) of the device with the largest privacy loss so far, baseline included.

        For Gaussian mechanisms without sampling RDP at every order α is α/2 · Σ n_σ/σ², so the device
        with the largest Σ n_σ/σ² has the largest ε whatever the order: that device is the worst."""

        def loss(counts: dict[float, int]) -> float:
            return sum(n * (math.inf if s <= 0 else 1.0 / (s * s)) for s, n in counts.items() if n > 0)

        worst: dict[float, int] = {}
        if self.by_sigma:
            worst = max(self.by_sigma.values(), key=loss)
        merged = dict(self.baseline)
        for sigma, n in worst.items():
            merged[sigma] = merged.get(sigma, 0) + n
        return sorted((s, n) for s, n in merged.items() if n > 0)

    def epsilon(self) -> float:
        """ε (at ``delta``) of the device with the largest privacy loss so far, composed over every σ
        used (∞ when a round was released without noise, or σ = 0)."""
        if self.unaccounted_rounds:
            return math.inf
        steps = self.steps()
        if not steps:
            return 0.0
        if any(s <= 0 for s, _ in steps):
            return math.inf
        return rdp_epsilon([(s, 1.0, n) for s, n in steps], self.delta, "rdp")

    def epsilon_note(self) -> str | None:
        """Why ε is ∞, for the report (None when it is finite for a reason one can state)."""
        if self.unaccounted_rounds:
            r = self.unaccounted_rounds
            which = f"round {r[0]}" if len(r) == 1 else f"rounds {', '.join(map(str, r))}"
            return (
                f"{which} released heads without central-DP noise (or with an unknown σ): no privacy "
                "bound holds for them, ε = ∞"
            )
        if self.noise_multiplier <= 0:
            return "noise_multiplier 0: no noise, ε = ∞"
        return None

    def aggregate(
        self,
        global_arrays: dict[str, np.ndarray],
        updates: Sequence[ValidUpdate],
        server_round: int | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Noised mean of clipped changes per exit head; returns new arrays (changed keys) and a report.

        ``server_round`` (Flower's, counting from 1 at each start) records this round's σ in ``rounds``.
        """
        heads: dict[int, list[str]] = {}
        for key in global_arrays:
            heads.setdefault(exit_of_key(key), []).append(key)
        out: dict[str, np.ndarray] = {}
        clipped = 0
        senders_per_head: dict[str, int] = {}
        sigma = float(self.noise_multiplier)
        for exit_k, keys in sorted(heads.items()):
            senders = [u for u in updates if any(k in u.arrays for k in keys)]
            if not senders:
                continue
            partial = [u.node_id for u in senders if not all(k in u.arrays for k in keys)]
            if partial:
                raise ValueError(f"exit {exit_k}: devices {partial} sent only part of the head")
            total, clipped_here = self._clipped_sum(global_arrays, senders, keys, sigma)
            clipped += clipped_here
            out |= self._noised_mean(global_arrays, total, len(senders))
            senders_per_head[str(exit_k)] = len(senders)
        if senders_per_head and server_round is not None:
            self.rounds[self.round_offset + int(server_round)] = sigma
        return out, self._report(clipped, senders_per_head)

    def _clipped_sum(
        self,
        global_arrays: dict[str, np.ndarray],
        senders: Sequence[ValidUpdate],
        keys: list[str],
        sigma: float,
    ) -> tuple[dict[str, np.ndarray], int]:
        """Σ of the senders' changes of one head, each clipped to ``clip_norm``, and how many were
        clipped; counts one composition at ``sigma`` for each sender."""
        total = {k: np.zeros(global_arrays[k].shape, np.float64) for k in keys}
        clipped = 0
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
            mine = self.by_sigma.setdefault(who, {})
            mine[sigma] = mine.get(sigma, 0) + 1
        return total, clipped

    def _noised_mean(
        self, global_arrays: dict[str, np.ndarray], total: dict[str, np.ndarray], senders: int
    ) -> dict[str, np.ndarray]:
        """``global + (Σ clipped changes + N(0, σ²C²)) / senders`` per key, in the global dtype."""
        out: dict[str, np.ndarray] = {}
        std = self.noise_multiplier * self.clip_norm
        for k in total:
            noisy = total[k] + (self._rng.normal(0.0, std, total[k].shape) if std > 0 else 0.0)
            value = global_arrays[k].astype(np.float64) + noisy / senders
            out[k] = value.astype(global_arrays[k].dtype)
        return out

    def _report(self, clipped: int, senders_per_head: dict[str, int]) -> dict[str, Any]:
        """This round's clipping, noise and ε (why ε is ∞, and every σ composed, where that applies)."""
        report = {
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "delta": self.delta,
            "clipped_updates": clipped,
            "senders_per_head": senders_per_head,
            "epsilon": self.epsilon(),
        }
        note = self.epsilon_note()
        if note is not None:
            report["epsilon_note"] = note
        if len({s for counts in self.by_sigma.values() for s in counts} | set(self.baseline)) > 1:
            report["sigmas"] = sorted(
                {s for counts in self.by_sigma.values() for s in counts} | set(self.baseline)
            )
        return report
