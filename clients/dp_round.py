"""One DP train round on a device: its settings, this run's privacy ledger, and the ε budget check.

The run's ledger lives in ``context.state`` (and, on a real device, mirrored on disk under the
``federation-id``: a restarted SuperNode must not forget what it spent). A round that would push ε past
the run's budget is refused before it trains; the device-wide ledger (every run, ``--dp-device-budget``)
is written before training, so a crash over-counts, never under-counts.

Opacus is imported only here, inside the functions, and only once DP is known to be on
(``fedsd.clients.dp_gate``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context

from fedsd.checkpoint import atomic_write_text
from fedsd.clients.assembly import LocalRound
from fedsd.clients.device import DeviceError, DeviceSettings, refuse
from fedsd.clients.dp_gate import dp_keys_present
from fedsd.clients.messages import MAX_ROUND
from fedsd.clients.private_errors import RunBudgetReached
from fedsd.security.untrusted import UntrustedValueError, config_int, identifier
from fedsd.training.features import CachedFeatures

if TYPE_CHECKING:  # imported where used: Opacus only on the DP path
    from fedsd.security.privacy import DPSettings, PrivacyLedger


def dp_settings(context: Context, train_config: dict[str, Any]) -> DPSettings | None:
    """This round's DP settings: the device's own ``dp-*`` node config over the server's; None = off."""
    if not dp_keys_present(dict(context.node_config), train_config):
        return None  # DP off: Opacus is never imported
    from fedsd.security.privacy import DPSettings, PrivacyError

    try:
        dp = DPSettings.from_records(dict(context.node_config), train_config)
    except PrivacyError as e:
        if not dp_keys_present(dict(context.node_config)):  # the server's settings alone: its mistake
            raise refuse(e) from None
        raise DeviceError(str(e)) from None
    if dp is not None and dp.target_epsilon is not None and dp.rounds is None:
        if train_config.get("num-rounds") is None:
            raise DeviceError("--dp-target-epsilon needs the number of rounds it covers: add --dp-rounds")
        try:
            dp = replace(dp, rounds=config_int(train_config, "num-rounds", 1, 1, MAX_ROUND))
        except UntrustedValueError as e:
            raise refuse(e) from None
    return dp


def _ledger_file(settings: DeviceSettings, train_config: dict[str, Any]) -> Path | None:
    """A real device mirrors its ledger on disk: a restarted SuperNode must not forget what it spent.

    The file is named by the server's ``federation-id``, which must be a plain id (never a path).
    """
    try:
        fid = identifier(train_config.get("federation-id", ""), "federation-id", allow_empty=True)
    except UntrustedValueError as e:
        raise refuse(e) from None
    if settings.partition is not None or not fid:
        return None
    return settings.cache_dir / "privacy" / f"{fid}.json"


def load_ledger(
    context: Context, settings: DeviceSettings, train_config: dict[str, Any]
) -> tuple[PrivacyLedger, str]:
    """The ledger of this run from ``context.state`` (or the disk mirror), and where it came from."""
    from fedsd.security.privacy import PrivacyLedger

    fid = str(train_config.get("federation-id", ""))
    record = context.state.config_records.get(PrivacyLedger.STATE_KEY)
    ledger, source = PrivacyLedger(), "new"
    if record is not None and str(record.get("federation-id", "")) == fid:
        ledger, source = PrivacyLedger.from_json(str(record["ledger"])), "state"
    path = _ledger_file(settings, train_config)
    if path is not None and path.is_file():
        on_disk = PrivacyLedger.from_json(path.read_text(encoding="utf-8"))
        if on_disk.rounds > ledger.rounds:  # the SuperNode restarted: its memory is gone, the disk is not
            ledger, source = on_disk, "disk"
    return ledger, source


def save_ledger(
    context: Context, settings: DeviceSettings, train_config: dict[str, Any], ledger: PrivacyLedger
) -> None:
    """Keep ``ledger`` in ``context.state`` and, on a real device, in its disk mirror."""
    from fedsd.security.privacy import PrivacyLedger

    fid = str(train_config.get("federation-id", ""))
    context.state[PrivacyLedger.STATE_KEY] = ConfigRecord({"ledger": ledger.to_json(), "federation-id": fid})
    path = _ledger_file(settings, train_config)
    if path is not None:
        atomic_write_text(path, ledger.to_json())


def _noise_multiplier(ledger: PrivacyLedger, dp: DPSettings, sample_rate: float, steps: int) -> float:
    """σ of this run: fixed at its first DP round, given or calibrated to the target ε over every round."""
    from fedsd.security.privacy import calibrate_noise

    if ledger.noise_multiplier is not None:
        return ledger.noise_multiplier
    if dp.noise_multiplier is not None:
        return dp.noise_multiplier
    assert dp.target_epsilon is not None and dp.rounds is not None
    return calibrate_noise(dp.target_epsilon, dp.delta, sample_rate, steps * dp.rounds, dp.accountant)


def train_private(
    context: Context, r: LocalRound, feats: CachedFeatures, dp: DPSettings, train_config: dict[str, Any]
) -> tuple[dict[str, float], dict[str, Any]]:
    """One round of DP-SGD, refused when it would push ε past the budget; returns losses, dp metrics."""
    from fedsd.clients.dp_training import spend_device_round, train_heads_private
    from fedsd.security.privacy import local_schedule

    ledger, source = load_ledger(context, r.settings, train_config)
    q, steps = local_schedule(len(feats.utt_ids), r.lcfg.batch_size, r.lcfg.epochs)
    sigma = _noise_multiplier(ledger, dp, q, steps)
    spent = ledger.epsilon(dp)
    after = ledger.with_round(sigma, q, steps)
    eps = after.epsilon(dp)
    if dp.budget is not None and eps > dp.budget:
        ledger.stopped = True
        save_ledger(context, r.settings, train_config, ledger)
        raise RunBudgetReached(
            f"privacy budget reached: this round would raise ε from {spent:.3f} to {eps:.3f} "
            f"(budget {dp.budget:g}, δ = {dp.delta:g}, after {ledger.rounds} DP round(s)); "
            "this device stops training"
        )
    try:  # the device-wide ledger (its own identity, every run) first: a crash over-counts, never under
        device_metrics = spend_device_round(context, r.settings, dp, sigma, q, steps, train_config)
    except ValueError as e:
        raise DeviceError(str(e)) from None
    losses = train_heads_private(
        r.model, feats, r.plan, r.lcfg, noise_multiplier=sigma, max_grad_norm=dp.max_grad_norm,
        sample_rate=q, steps=steps,
    )  # fmt: skip
    save_ledger(context, r.settings, train_config, after)
    return losses, _dp_metrics(dp, after, eps, sigma, q, source, device_metrics)


def _dp_metrics(
    dp: DPSettings,
    after: PrivacyLedger,
    eps: float,
    sigma: float,
    sample_rate: float,
    source: str,
    device_metrics: dict[str, float],
) -> dict[str, Any]:
    """This run's accounting after the round, then the device-wide ε (``device_metrics``); which of
    them leave the device is ``fedsd.clients.dp_training.DP_REPLY_KEYS``'s decision."""
    metrics: dict[str, Any] = {
        "dp-epsilon": eps,
        "dp-delta": dp.delta,
        "dp-noise-multiplier": sigma,
        "dp-max-grad-norm": dp.max_grad_norm,
        "dp-sample-rate": sample_rate,
        "dp-steps": after.steps(),
        "dp-rounds": after.rounds,
        "dp-ledger-from-state": int(source == "state"),
    } | device_metrics
    if dp.budget is not None:
        metrics["dp-epsilon-budget"] = dp.budget
    return metrics
