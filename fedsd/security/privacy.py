"""Differential-privacy bookkeeping: settings, noise calibration and ε accounting (Opacus accountants).

Two mechanisms use it:

- **sample-level DP on a device** (DP-SGD on its exit heads, ``fedsd.clients.dp_training``): every
  round adds ``(σ, q, steps)`` to the device's :class:`PrivacyLedger`, which lives in the Flower
  ``context.state`` between rounds, so the ε a device reports is cumulative over the whole run;
- **client-level DP at the server** (``fedsd.server.central_dp``): one Gaussian mechanism per exit
  head and round, accounted with :func:`central_epsilon`.

The history format is Opacus' own (``accountant.history``: ``(noise_multiplier, sample_rate,
steps)``), so anyone can recompute a reported ε with ``opacus.accountants.RDPAccountant``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

Step = tuple[float, float, int]
"""One accountant history entry: (noise multiplier σ, sample rate q, number of steps)."""

# Keys of the train config (server → device) and of a device's node config (its own flags).
DP_KEYS = {
    "noise_multiplier": "dp-noise-multiplier",
    "target_epsilon": "dp-target-epsilon",
    "max_grad_norm": "dp-max-grad-norm",
    "delta": "dp-delta",
    "rounds": "dp-rounds",
    "epsilon_budget": "dp-epsilon-budget",
    "accountant": "dp-accountant",
}


class PrivacyError(ValueError):
    """DP settings that cannot work; the message names the setting."""


@dataclass(frozen=True)
class DPSettings:
    """Sample-level DP of one device's training (see :class:`fedsd.config.DPConfig`)."""

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    rounds: int | None = None
    epsilon_budget: float | None = None
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise PrivacyError("DP needs exactly one of noise_multiplier (--dp-noise-multiplier) "
                               "or target_epsilon (--dp-target-epsilon)")  # fmt: skip
        # NaN/inf settings (a server's train config is untrusted) would silently void the guarantee
        if self.noise_multiplier is not None and not 0 <= self.noise_multiplier < math.inf:
            raise PrivacyError(f"dp noise_multiplier must be finite and >= 0, got {self.noise_multiplier}")
        if self.target_epsilon is not None and not 0 < self.target_epsilon < math.inf:
            raise PrivacyError(f"dp target_epsilon must be finite and > 0, got {self.target_epsilon}")
        if not 0 < self.max_grad_norm < math.inf:
            raise PrivacyError(f"dp max_grad_norm must be finite and > 0, got {self.max_grad_norm}")
        if not 0 < self.delta < 1:
            raise PrivacyError(f"dp delta must be in (0, 1), got {self.delta}")
        if self.rounds is not None and self.rounds < 1:
            raise PrivacyError(f"dp rounds must be >= 1, got {self.rounds}")
        if self.epsilon_budget is not None and not self.epsilon_budget > 0:
            raise PrivacyError(f"dp epsilon_budget must be > 0, got {self.epsilon_budget}")
        if self.accountant not in ("rdp", "prv", "gdp"):
            raise PrivacyError(f"dp accountant must be rdp, prv or gdp, got {self.accountant!r}")

    @property
    def budget(self) -> float | None:
        """The ε a device refuses to exceed (explicit budget, else the target)."""
        return self.epsilon_budget if self.epsilon_budget is not None else self.target_epsilon

    def to_record(self) -> dict[str, float | int | str]:
        """Flat ``dp-*`` keys for a Flower ConfigRecord (absent values left out)."""
        return {DP_KEYS[k]: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_config(cls, cfg: Any, default_rounds: int | None = None) -> DPSettings:
        """From a :class:`fedsd.config.DPConfig`."""
        values = cfg.model_dump()
        if values.get("rounds") is None:
            values["rounds"] = default_rounds
        return cls(**values)

    @classmethod
    def from_records(cls, device: Mapping[str, Any], server: Mapping[str, Any]) -> DPSettings | None:
        """The device's own ``dp-*`` node config over the server's train config; None = no DP.

        A device that sets its own noise or target keeps it whatever the server asks: the device,
        not the server, decides how much its speech may reveal. Other fields fall back to the server.
        """
        mine = {f: device[k] for f, k in DP_KEYS.items() if k in device and device[k] not in ("", None)}
        theirs = {f: server[k] for f, k in DP_KEYS.items() if k in server and server[k] not in ("", None)}
        if not mine and not theirs:
            return None
        merged = dict(theirs)
        if "noise_multiplier" in mine or "target_epsilon" in mine:
            merged.pop("noise_multiplier", None)
            merged.pop("target_epsilon", None)
        merged |= mine
        if "noise_multiplier" not in merged and "target_epsilon" not in merged:
            raise PrivacyError(
                "DP settings without a noise multiplier or a target ε: give --dp-noise-multiplier "
                "or --dp-target-epsilon"
            )
        casts = {"rounds": int, "accountant": str}
        try:
            return cls(**{f: casts.get(f, float)(v) for f, v in merged.items()})
        except (TypeError, ValueError, OverflowError) as e:
            if isinstance(e, PrivacyError):
                raise
            raise PrivacyError(f"unreadable DP setting: {e}") from None


def local_schedule(num_examples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """Poisson sample rate and number of DP-SGD steps of one round, as Opacus' DPDataLoader does.

    ``q = 1 / ceil(n / B)`` (expected batch size ≈ B) and ``epochs · ceil(n / B)`` steps.
    """
    if num_examples < 1:
        raise PrivacyError("DP training needs at least one utterance")
    batches = math.ceil(num_examples / max(1, batch_size))
    return 1.0 / batches, epochs * batches


def epsilon(history: list[Step], delta: float, accountant: str = "rdp") -> float:
    """ε spent by ``history`` at ``delta`` (0 for an empty history)."""
    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    with warnings.catch_warnings():  # "optimal order is the largest alpha": Opacus' default orders, kept
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(acc.get_epsilon(delta=delta))


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The smallest σ (to Opacus' tolerance) with ε(σ, q, steps) ≤ ``target_epsilon``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )


@dataclass
class PrivacyLedger:
    """What a device has spent so far in this run; survives rounds in ``context.state``."""

    history: list[Step] = field(default_factory=list)
    noise_multiplier: float | None = None
    """σ fixed at the first DP round (calibrated once when a target ε is set)."""
    rounds: int = 0
    stopped: bool = False
    """True once the device refused a round because of its budget."""

    STATE_KEY = "fedsd-dp"

    def epsilon(self, settings: DPSettings) -> float:
        return epsilon(self.history, settings.delta, settings.accountant)

    def steps(self) -> int:
        return sum(int(n) for _, _, n in self.history)

    def with_round(self, noise_multiplier: float, sample_rate: float, steps: int) -> PrivacyLedger:
        """A copy with one more round of ``steps`` DP-SGD steps (nothing is spent until it is kept)."""
        return replace(
            self,
            history=[*self.history, (float(noise_multiplier), float(sample_rate), int(steps))],
            noise_multiplier=float(noise_multiplier),
            rounds=self.rounds + 1,
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "history": [list(h) for h in self.history],
                "noise_multiplier": self.noise_multiplier,
                "rounds": self.rounds,
                "stopped": self.stopped,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        raw = json.loads(text)
        return cls(
            history=[(float(s), float(q), int(n)) for s, q, n in raw.get("history", [])],
            noise_multiplier=raw.get("noise_multiplier"),
            rounds=int(raw.get("rounds", 0)),
            stopped=bool(raw.get("stopped", False)),
        )


def central_epsilon(noise_multiplier: float, rounds: int, mechanisms_per_round: int, delta: float) -> float:
    """ε of client-level central DP after ``rounds`` rounds (RDP, no sampling amplification).

    Each round releases one Gaussian mechanism per exit head a device contributed to, each with L2
    sensitivity ``clip_norm`` and noise ``σ·clip_norm``: ``mechanisms_per_round`` compositions per
    round. Device sampling is not counted as amplification (Flower samples without replacement,
    not by Poisson), which makes the figure conservative.
    """
    if rounds <= 0 or mechanisms_per_round <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    return epsilon([(noise_multiplier, 1.0, rounds * mechanisms_per_round)], delta, "rdp")
