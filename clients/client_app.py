"""The Flower ClientApp of a device: train (local head adaptation), evaluate, and two queries.

- ``query.info``  → the device's exit, data size and whether it holds the server's model.
- ``query.model`` → receives the base model once (a device started without ``--model``).
- ``train``       → fine-tunes its shallow heads from cached backbone features by self-distillation
                    and replies with those heads, ``num-examples`` and metrics. Nothing else leaves.
- ``evaluate``    → per-exit metrics on its personal test utterances (else its validation ones).
- ``query.done``  → the run is over (a supervised device stops its SuperNode); with the final global
                    heads attached: personal-test metrics, personal heads and ``--out`` (clients/personal.py).

When the node config names an ``events`` file (`fedsd client run` does), every handled message appends
one JSON line to it — what `fedsd client run` prints per round.

Everything in a server's message is untrusted: identifiers that name files (fingerprint,
``federation-id``), training settings (typed, finite, bounded), received heads (known keys, the
model's dtype and shapes, finite) and delivered model files (known names, sha256) are checked with
``fedsd.security.untrusted`` before they are used; a message that fails a check gets an error reply that says
why (:class:`~fedsd.clients.device.HostileMessage`), and nothing is written. A delivered model is
bounded (:class:`~fedsd.security.wire.DeliveryLimits`), staged apart and stored under the fingerprint its own
weights hash to, never under one it declares (``meta.exported_from`` counts for the operator's own
``--model`` only). Under DP an error reply says only that the device failed (or that its budget is
spent, or what of the server's message it refused); the details stay in the device's event log.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsd.checkpoint import CheckpointError, atomic_write_text
from fedsd.clients.device import DeviceError, DeviceSettings, HostileMessage, refuse
from fedsd.clients.dp_gate import dp_in_use, dp_keys_present, pop_local_metrics
from fedsd.clients.identity import device_id
from fedsd.clients.model_store import file_identity, load_model, write_stamp
from fedsd.clients.personal import (
    PERSONAL_DIR,
    evaluate_personal,
    personal_exits,
    personal_features,
    personal_metrics,
    personalize,
    write_device_model,
)
from fedsd.clients.training import (
    ExitPlan,
    LocalTrainConfig,
    mix_seed,
    plan_exits,
    train_heads,
)
from fedsd.model.export import EXPORTED_FROM, parent_fingerprint
from fedsd.model.multiexit import MultiExitSER
from fedsd.security.untrusted import (
    UntrustedValueError,
    config_choice,
    config_float,
    config_int,
    identifier,
    printable,
    shown,
)
from fedsd.security.untrusted import fingerprint as check_fingerprint
from fedsd.security.wire import (
    HEAD_PREFIX,
    QUERY_DONE,
    DeliveryLimits,
    exit_of_key,
    heads_to_record,
    read_delivery,
    write_delivery,
)
from fedsd.training.cached import evaluate_cached, model_crop
from fedsd.training.distill import DistillConfig
from fedsd.training.features import BackboneNeeded, CachedFeatures, FeatureCache

if TYPE_CHECKING:  # imported where used: Opacus only on the DP path
    from fedsd.security.privacy import DPSettings, PrivacyLedger

_log = logging.getLogger(__name__)

MAX_ROUND = 10**9
"""Largest round number (and round offset, number of rounds) a server may send."""
_HEAD_KEY = re.compile(r"heads\.([0-9]{1,6})\.[A-Za-z0-9_.]{1,200}", re.ASCII)

PRIVATE_ERROR = "this device could not handle the message (DP is on: the reason stays in its own log)"
"""What a server hears of a failure under DP, unless the failure is about its own message."""
BUDGET_STOP = "privacy budget reached: this device stops training (the figures stay in its own log)"
"""What a server hears when the device-wide budget (ε over every federation) stops a round."""
EVALUATION_REFUSED = "federated evaluation is refused while DP is on: its metrics are not noised"


class RunBudgetReached(DeviceError):
    """This run's ε budget is spent: the text holds only this run's ε, which the replies carry anyway."""


def load_device_model(settings: DeviceSettings, fingerprint: str, *, weights: bool = True) -> MultiExitSER:
    """The device's model; refuses one whose backbone differs from the server's.

    Its fingerprint is verified once per identity of its files (``fedsd.clients.model_store``). The
    ``exported_from`` fingerprint of an exported model counts only for the operator's own ``--model``;
    ``weights=False`` may give a heads-only model (for heads on cached features)."""
    path = settings.model_dir(fingerprint)
    if path is None:
        raise DeviceError(
            "this device has no model: start it with --model DIR, or let the server deliver it "
            f"(expected backbone fingerprint {fingerprint[:12]})"
        )
    model = load_model(path, settings.cache_dir, weights=weights)
    # An exported model (fewer layers) names the full backbone it came from; that claim is the
    # operator's own only for --model. A delivered model is what its weights hash to, nothing else.
    mine = parent_fingerprint(model) if settings.model is not None else model.backbone_fingerprint()
    if fingerprint and mine != fingerprint:
        raise DeviceError(
            f"model mismatch: this device has {path} (backbone fingerprint {mine[:12]}), "
            f"the server federates backbone {fingerprint[:12]}; use the server's base model"
        )
    return model


def _device_exit(settings: DeviceSettings, model: MultiExitSER, cfg: dict[str, Any]) -> int:
    if settings.exit is not None:
        return settings.exit
    try:
        return config_int(cfg, "default-exit", model.exits[-1], 1, 10**6)
    except UntrustedValueError as e:
        raise refuse(e) from None


def server_config(msg: Message) -> dict[str, Any]:
    """The ``config`` record of a server message, with every key that names a file or a round checked.

    Raises :class:`~fedsd.clients.device.HostileMessage` before anything is loaded or written.
    """
    if not msg.has_content():
        raise refuse(ValueError("the message has no content"))
    cfg = dict(msg.content.config_records.get("config", ConfigRecord()))
    try:
        check_fingerprint(cfg.get("fingerprint", ""), "fingerprint", allow_empty=True)
        identifier(cfg.get("federation-id", ""), "federation-id", allow_empty=True)
        config_int(cfg, "server-round", 0, 0, MAX_ROUND)
        config_int(cfg, "round-offset", 0, 0, MAX_ROUND)
        if "num-rounds" in cfg:
            config_int(cfg, "num-rounds", 1, 0, MAX_ROUND)  # 0: local-only (no federated round)
        if "default-exit" in cfg:
            config_int(cfg, "default-exit", 1, 1, 10**6)
    except UntrustedValueError as e:
        raise refuse(e) from None
    return cfg


def device_identity(settings: DeviceSettings, context: Context) -> str:
    """What tells this device apart in a round's seed: its partition (simulation) or its node id."""
    if settings.partition_id is not None:
        return f"partition-{settings.partition_id}"
    return f"node-{context.node_id}"


def _local_config(cfg: dict[str, Any], exit_k: int, device: str = "") -> LocalTrainConfig:
    """Local training settings from the server's config; the seed mixes run seed, round and ``device``.

    Why the device: with one seed per round every device would shuffle and drop out identically.
    Every value is the server's: typed, finite and bounded here (a ``local-epochs`` of 10**12 or a
    NaN ``lr`` is refused with :class:`~fedsd.clients.device.HostileMessage`, not trained with).
    """
    try:
        return LocalTrainConfig(
            exit=exit_k,
            train_exits=config_choice(cfg, "train-exits", "upto", ("upto", "only")),  # type: ignore[arg-type]
            teacher=config_choice(cfg, "teacher", "deep", ("deep", "local")),  # type: ignore[arg-type]
            epochs=config_int(cfg, "local-epochs", 5, 1, 10_000),
            batch_size=config_int(cfg, "batch-size", 16, 1, 65_536),
            lr=config_float(cfg, "lr", 1e-3, 0.0, 100.0, lo_open=True),
            proximal_mu=config_float(cfg, "proximal-mu", 0.0, 0.0, 1e6),
            seed=mix_seed(
                config_int(cfg, "seed", 0, -(2**63), 2**63 - 1),
                config_int(cfg, "server-round", 0, 0, MAX_ROUND),
                device,
            ),
            distill=DistillConfig(
                w_ce=config_float(cfg, "w-ce", 1.0, 0.0, 1e6),
                w_kd=config_float(cfg, "w-kd", 1.0, 0.0, 1e6),
                w_feat=config_float(cfg, "w-feat", 1.0, 0.0, 1e6),
                temperature=config_float(cfg, "temperature", 2.0, 0.0, 1e3, lo_open=True),
                mode=config_choice(cfg, "mode", "sd", ("sd", "ce", "pl")),  # type: ignore[arg-type]
                pl_threshold=config_float(cfg, "pl-threshold", 0.95, 0.0, 1.0),
            ),
        )
    except UntrustedValueError as e:
        raise refuse(e) from None


def received_heads(arrays: ArrayRecord, model: MultiExitSER) -> dict[str, torch.Tensor]:
    """The server's head weights this device will load: keys of its own heads, same dtype and shape,
    finite values. Heads of exits this model lacks are skipped (an exported model holds fewer);
    anything else is refused with :class:`~fedsd.clients.device.HostileMessage`."""
    own = model.head_state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, array in arrays.items():
        m = _HEAD_KEY.fullmatch(key)
        if m is None:
            raise refuse(UntrustedValueError(f"head key {shown(key)} is not '{HEAD_PREFIX}<exit>.<name>'"))
        if int(m.group(1)) not in model.exits:
            continue
        if key not in own:
            raise refuse(UntrustedValueError(f"head key {shown(key)} is not a parameter of this model"))
        try:
            value = array.numpy()
        except Exception as e:  # malformed bytes: np.load raises many exception types
            raise refuse(
                UntrustedValueError(f"{key}: cannot decode the array ({type(e).__name__})")
            ) from None
        ref = own[key]
        if value.dtype != ref.detach().cpu().numpy().dtype or tuple(value.shape) != tuple(ref.shape):
            raise refuse(
                UntrustedValueError(
                    f"{key}: {value.dtype} {tuple(value.shape)} != this model's "
                    f"{str(ref.dtype).removeprefix('torch.')} {tuple(ref.shape)}"
                )
            )
        if np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value)):
            raise refuse(UntrustedValueError(f"{key}: non-finite values (NaN or inf)"))
        out[key] = torch.from_numpy(np.array(value, copy=True))
    return out


def _features(
    settings: DeviceSettings, model: MultiExitSER, plan: ExitPlan, *, evaluation: bool = False
) -> CachedFeatures:
    rows, labelled = settings.local_data()  # never the personal test rows
    held_out = {"valid", "test"}
    personal = settings.personal_test_data() if evaluation else []
    if personal:  # federated evaluation: on the device's own held-out speech
        rows, labelled = personal, [True] * len(personal)
    elif settings.partition is None:  # a real device: its manifest's valid/test rows are for evaluation
        keep = [(r.split in held_out) == evaluation for r in rows]
        if evaluation and not any(keep):  # no validation split: evaluate on the labelled rows
            keep = [bool(r.label) for r in rows]
        rows = [r for r, k in zip(rows, keep, strict=True) if k]
        labelled = [m for m, k in zip(labelled, keep, strict=True) if k]
    if not rows:
        raise DeviceError(f"no local utterances for {'evaluation' if evaluation else 'training'}")
    cache = FeatureCache(settings.cache_dir, model, model_crop(model))
    return cache.get(
        rows, settings.root, plan.needed, label_names=model.label_names, labelled=labelled,
        device=settings.device,
    )  # fmt: skip


def _prepare(
    msg: Message, context: Context, defaults: dict[str, Any] | None
) -> tuple[DeviceSettings, MultiExitSER, LocalTrainConfig, ExitPlan]:
    """Settings, model with the received heads, local training config and exit plan of this device."""
    settings = DeviceSettings.from_context(context, defaults)
    cfg = server_config(msg)
    lcfg = _local_config(cfg, 0, device_identity(settings, context))  # checked before anything loads
    weights = _NEED_WEIGHTS.get() or settings.out is not None  # --out exports the backbone
    model = load_device_model(settings, str(cfg.get("fingerprint", "")), weights=weights)
    lcfg = replace(lcfg, exit=_device_exit(settings, model, cfg))
    try:
        plan = plan_exits(model.exits, lcfg.exit, lcfg)
    except ValueError as e:
        raise DeviceError(str(e)) from None
    if plan.teacher not in model.exits:
        raise DeviceError(f"teacher exit {plan.teacher} is not in this device's model; use teacher: local")
    arrays = msg.content.array_records.get("arrays")
    if arrays is not None and len(arrays):
        model.load_head_state_dict(received_heads(arrays, model), strict=False)
    return settings, model, lcfg, plan


_NEED_WEIGHTS = contextvars.ContextVar("fedsd_need_backbone_weights", default=False)
"""Set while a message is handled again with the full model (a feature was not cached)."""


def _backbone_on_demand(handler):
    """Handle a message with a heads-only model first; if a feature is not cached (BackboneNeeded),
    handle it again with the backbone. Nothing is written before the features are read."""

    @functools.wraps(handler)
    def run(msg: Message, context: Context, defaults: dict[str, Any] | None = None) -> Message:
        if _NEED_WEIGHTS.get():
            return handler(msg, context, defaults)
        try:
            return handler(msg, context, defaults)
        except BackboneNeeded:
            token = _NEED_WEIGHTS.set(True)
            try:
                return handler(msg, context, defaults)
            finally:
                _NEED_WEIGHTS.reset(token)

    return run


def _uar_metrics(prefix: str, reports: dict) -> dict[str, float]:
    """UAR per exit; an exit evaluated on no utterance has none (NaN) and is left out, never sent as 0."""
    return {f"exit{k}/{prefix}": float(r.uar) for k, r in reports.items() if r.n > 0 and math.isfinite(r.uar)}


@_backbone_on_demand
def train(msg: Message, context: Context, defaults: dict[str, Any] | None = None) -> Message:
    """Adapt the shallow heads on local speech; reply with those heads and metrics only.

    Metrics: ``train-uar-before/after`` on the utterances it trains on (training accuracy), and
    ``personal-{uar,wa,f1}-before/after`` on its personal test speech (never trained on): the received
    global heads, then its locally adapted ones. With ``--out`` it first keeps the received global heads
    (those of the last completed round) as its deployable model.
    """
    t0 = time.perf_counter()
    cfg = server_config(msg)
    dp = dp_settings(context, cfg)  # checked before anything loads
    settings, model, lcfg, plan = _prepare(msg, context, defaults)
    if settings.out is not None:
        done = max(0, _round_of(cfg) - 1)
        write_device_model(model, lcfg.exit, settings.out, _model_info(settings, cfg, done, "global"))
    feats = _features(settings, model, plan)
    n_labelled = int((feats.labels >= 0).sum())
    if lcfg.distill.mode == "ce" and n_labelled == 0:
        raise DeviceError("mode=ce needs labelled utterances and this device has none")
    p_exits = personal_exits(plan, lcfg.exit)
    personal = personal_features(settings, model, p_exits, model_crop(model))
    p_before = evaluate_personal(model, personal, p_exits)
    before = evaluate_cached(model, feats, plan.train) if n_labelled else {}
    dp_metrics: dict[str, Any] = {}
    if dp is None:
        losses = train_heads(model, feats, plan, lcfg)
    else:
        losses, dp_metrics = _train_private(context, settings, model, feats, plan, lcfg, dp, cfg)
    after = evaluate_cached(model, feats, plan.train) if n_labelled else {}
    p_after = evaluate_personal(model, personal, p_exits)
    # CE-only training learns from labelled utterances only: weight the update by what it used.
    num_examples = n_labelled if lcfg.distill.mode == "ce" else len(feats.utt_ids)
    metrics: dict[str, Any] = {
        "num-examples": num_examples,
        "exit": lcfg.exit,
        "n-labelled": n_labelled,
        "n-utterances": len(feats.utt_ids),
        "n-personal-test": len(personal.utt_ids) if personal is not None else 0,
        "loss": float(losses.get("total", 0.0)),
        "cache-hits": feats.hits,
        "cache-misses": feats.misses,
        "seconds": time.perf_counter() - t0,
    }
    metrics |= _uar_metrics("train-uar-before", before) | _uar_metrics("train-uar-after", after) | dp_metrics
    metrics |= personal_metrics("before", p_before) | personal_metrics("after", p_after)
    if dp is not None:  # only what DP covers (or the handshake revealed) leaves the device
        from fedsd.clients.dp_training import dp_reply_metrics, keep_local

        keep_local(context, metrics)  # ... the device's own event log still shows everything
        metrics = dp_reply_metrics(metrics, declared=len(settings.local_data()[0]))  # as at the handshake
    state = model.head_state_dict(plan.train)
    content = RecordDict({"arrays": heads_to_record(state), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


def _round_of(cfg: dict[str, Any]) -> int:
    """The run's round number of a (checked) server config: server-round + round-offset."""
    return config_int(cfg, "server-round", 0, 0, MAX_ROUND) + config_int(cfg, "round-offset", 0, 0, MAX_ROUND)


def _model_info(settings: DeviceSettings, cfg: dict[str, Any], rnd: int, heads: str) -> dict[str, Any]:
    return {
        "round": rnd, "heads": heads, "device": settings.name,
        "federation_id": str(cfg.get("federation-id", "")), "time": time.time(),
    }  # fmt: skip


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
    from fedsd.security.privacy import PrivacyLedger

    fid = str(train_config.get("federation-id", ""))
    context.state[PrivacyLedger.STATE_KEY] = ConfigRecord({"ledger": ledger.to_json(), "federation-id": fid})
    path = _ledger_file(settings, train_config)
    if path is not None:
        atomic_write_text(path, ledger.to_json())


def _train_private(
    context: Context,
    settings: DeviceSettings,
    model: MultiExitSER,
    feats: CachedFeatures,
    plan: ExitPlan,
    lcfg: LocalTrainConfig,
    dp: DPSettings,
    train_config: dict[str, Any],
) -> tuple[dict[str, float], dict[str, Any]]:
    """One round of DP-SGD, refused when it would push ε past the budget; returns losses, dp metrics."""
    from fedsd.clients.dp_training import spend_device_round, train_heads_private
    from fedsd.security.privacy import calibrate_noise, local_schedule

    ledger, source = load_ledger(context, settings, train_config)
    n = len(feats.utt_ids)
    q, steps = local_schedule(n, lcfg.batch_size, lcfg.epochs)
    sigma = ledger.noise_multiplier
    if sigma is None:
        if dp.noise_multiplier is not None:
            sigma = dp.noise_multiplier
        else:
            assert dp.target_epsilon is not None and dp.rounds is not None
            sigma = calibrate_noise(dp.target_epsilon, dp.delta, q, steps * dp.rounds, dp.accountant)
    spent = ledger.epsilon(dp)
    after = ledger.with_round(sigma, q, steps)
    eps = after.epsilon(dp)
    if dp.budget is not None and eps > dp.budget:
        ledger.stopped = True
        save_ledger(context, settings, train_config, ledger)
        raise RunBudgetReached(
            f"privacy budget reached: this round would raise ε from {spent:.3f} to {eps:.3f} "
            f"(budget {dp.budget:g}, δ = {dp.delta:g}, after {ledger.rounds} DP round(s)); "
            "this device stops training"
        )
    try:  # the device-wide ledger (its own identity, every run) first: a crash over-counts, never under
        device_metrics = spend_device_round(context, settings, dp, sigma, q, steps, train_config)
    except ValueError as e:
        raise DeviceError(str(e)) from None
    losses = train_heads_private(
        model, feats, plan, lcfg, noise_multiplier=sigma, max_grad_norm=dp.max_grad_norm,
        sample_rate=q, steps=steps,
    )  # fmt: skip
    save_ledger(context, settings, train_config, after)
    metrics: dict[str, Any] = {
        "dp-epsilon": eps,
        "dp-delta": dp.delta,
        "dp-noise-multiplier": sigma,
        "dp-max-grad-norm": dp.max_grad_norm,
        "dp-sample-rate": q,
        "dp-steps": after.steps(),
        "dp-rounds": after.rounds,
        "dp-ledger-from-state": int(source == "state"),
    } | device_metrics
    if dp.budget is not None:
        metrics["dp-epsilon-budget"] = dp.budget
    return losses, metrics


@_backbone_on_demand
def evaluate(msg: Message, context: Context, defaults: dict[str, Any] | None = None) -> Message:
    """Per-exit UAR/WA/F1 of the received heads on the device's validation utterances."""
    if dp_in_use(context, server_config(msg)):
        raise DeviceError(EVALUATION_REFUSED)
    settings, model, _lcfg, plan = _prepare(msg, context, defaults)
    exits = [k for k in model.exits if k <= max(plan.needed)]
    feats = _features(
        settings, model, ExitPlan(needed=exits, train=[], teacher=plan.teacher), evaluation=True
    )
    reports = evaluate_cached(model, feats, exits)
    metrics: dict[str, Any] = {"num-examples": max(1, int((feats.labels >= 0).sum()))}
    for k, r in reports.items():
        if r.n > 0:  # no labelled utterance: no metric (NaN), rather than a 0.0 the server would average in
            metrics |= {f"exit{k}/uar": r.uar, f"exit{k}/wa": r.wa, f"exit{k}/f1": r.macro_f1}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def info(msg: Message, context: Context, defaults: dict[str, Any] | None = None) -> Message:
    """Tell the server what this device is; it decides whether to deliver the model."""
    settings = DeviceSettings.from_context(context, defaults)
    cfg = server_config(msg)
    fingerprint = str(cfg.get("fingerprint", ""))
    path = settings.model_dir(fingerprint)
    has_model = False
    if path is not None:
        try:
            load_device_model(settings, fingerprint, weights=False)
            has_model = True
        except DeviceError:
            if settings.model is not None:
                raise  # the operator's own --model is wrong: say so, never silently replace it
    rows, labelled = settings.local_data()
    reply = ConfigRecord(
        {
            "has-model": has_model,
            "exit": settings.exit if settings.exit is not None else -1,
            "n-utterances": len(rows),
            "n-labelled": int(sum(labelled)),
            "device-id": device_id(settings),
            "name": settings.name,
            "device": settings.device,
            "torch-threads": torch.get_num_threads(),
        }
    )
    if dp_in_use(context, cfg):  # how many labels it holds is not the server's business under DP
        reply.pop("n-labelled")
    return Message(RecordDict({"info": reply}), reply_to=msg)


def delivery_limits(context: Context) -> DeliveryLimits:
    """The caps on a model delivery; the device's own node config ``max-model-mb`` may lower the total."""
    value = dict(context.node_config).get("max-model-mb")
    if value in (None, ""):
        return DeliveryLimits()
    try:
        mb = float(value)
    except (TypeError, ValueError):
        raise DeviceError(f"node config max-model-mb: expected a number of MB, got {value!r}") from None
    if not 0 < mb < math.inf:
        raise DeviceError(f"node config max-model-mb: must be finite and > 0, got {value!r}")
    return DeliveryLimits(total_bytes=int(mb * 2**20))


def _verified_delivery(staged: Path, claimed: str) -> str:
    """The fingerprint the staged model's weights hash to; refuses a model whose declared identity
    (``exported_from``) or the server's claimed fingerprint is another one."""
    try:
        model = MultiExitSER.from_pretrained(staged)  # no stamp: hashes every backbone weight
    except Exception as e:  # whatever fails to load is not kept: a later round must not pick it up
        raise DeviceError(f"the delivered model does not load: {type(e).__name__}: {e}") from None
    computed = model.backbone_fingerprint()
    declared = model.meta.get(EXPORTED_FROM)
    if declared is not None:
        said = declared.get("fingerprint") if isinstance(declared, dict) else declared
        if said != computed:
            _log.warning(
                "refused a model delivery: its fedsd.json declares it was exported from backbone %s, "
                "its weights hash to %s", printable(said, 80), computed,
            )  # fmt: skip
            raise refuse(
                UntrustedValueError(
                    f"model delivery: fedsd.json declares meta.{EXPORTED_FROM} fingerprint "
                    f"{shown(said, 20)}, but its weights hash to {computed[:12]}; a delivered model is "
                    "known by its own weights only"
                )
            )
    if computed != claimed:
        _log.warning("refused a model delivery announced as %s: its weights hash to %s", claimed, computed)
        raise refuse(
            UntrustedValueError(
                f"model delivery: announced as backbone {claimed[:12]}, but its weights hash to "
                f"{computed[:12]}"
            )
        )
    return computed


def receive_model(msg: Message, context: Context, defaults: dict[str, Any] | None = None) -> Message:
    """Store the server's base model in the device cache, keyed by the fingerprint its weights hash to.

    Every file must be a fedsd model file with a matching sha256, within the delivery caps
    (:class:`~fedsd.security.wire.DeliveryLimits`); the model is staged apart, loaded, and its weights hashed:
    it is kept only when that fingerprint is the one the server announced and the one fedsd.json
    declares (an ``exported_from`` claim is refused). A model already stored under that fingerprint
    is kept as it is; a refused delivery leaves the cache exactly as it was.
    """
    settings = DeviceSettings.from_context(context, defaults)
    cfg = server_config(msg)
    try:
        claimed = check_fingerprint(cfg.get("fingerprint"), "fingerprint")
    except UntrustedValueError as e:
        raise refuse(e) from None
    files = msg.content.array_records.get("files")
    digests = msg.content.config_records.get("digests")
    if files is None or digests is None:
        raise refuse(ValueError("a model delivery needs a 'files' ArrayRecord and a 'digests' ConfigRecord"))
    limits = delivery_limits(context)
    try:
        checked = read_delivery(files, digests, limits)
    except UntrustedValueError as e:
        raise refuse(e) from None
    except CheckpointError as e:
        raise DeviceError(str(e)) from None
    models = settings.cache_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=models))
    try:
        staged = write_delivery(checked, staging / "model")
        fingerprint = _verified_delivery(staged, claimed)
        dest = settings.delivered_model_dir(fingerprint)
        if _holds(settings, dest, fingerprint):
            return _stored(msg, dest)  # the same backbone is here already: kept as it was
        identity = file_identity(staged)
        if dest.exists():  # an earlier copy that does not load: set aside, removed with the staging dir
            os.replace(dest, staging / "broken")
        os.replace(staged, dest)
        if file_identity(dest) == identity:  # the files verified above, moved: no need to hash again
            write_stamp(settings.cache_dir, dest, identity, fingerprint)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _stored(msg, dest)


def _stored(msg: Message, dest: Path) -> Message:
    return Message(RecordDict({"info": ConfigRecord({"stored": str(dest)})}), reply_to=msg)


def _holds(settings: DeviceSettings, dest: Path, fingerprint: str) -> bool:
    """Whether ``dest`` already holds a model that loads with ``fingerprint``."""
    if not (dest / "fedsd.json").is_file():
        return False
    try:
        load_device_model(replace(settings, model=None), fingerprint, weights=False)
    except Exception:
        return False
    return True


@_backbone_on_demand
def done(msg: Message, context: Context, defaults: dict[str, Any] | None = None) -> Message:
    """The server's last word: the run is over (the event log records it for the supervisor).

    When it carries the final global heads (and the run's config), the device measures them on its
    personal test speech, keeps them as its deployable model (``--out``), and with personalize-epochs > 0
    fine-tunes a private copy on its own training speech (``--out``/personal). The reply holds metrics
    only: ``personal-*-global`` and ``personal-*-personal`` per exit; personal heads never leave.
    """
    arrays = msg.content.array_records.get("arrays") if msg.has_content() else None
    if arrays is None or not len(arrays):
        return Message(RecordDict(), reply_to=msg)
    t0 = time.perf_counter()
    cfg = server_config(msg)
    settings, model, lcfg, plan = _prepare(msg, context, defaults)  # model holds the final global heads
    try:
        epochs = settings.personalize_epochs
        if epochs is None:
            epochs = config_int(cfg, "personalize-epochs", 0, 0, 10_000)
        rnd = config_int(cfg, "rounds", 0, 0, MAX_ROUND)
    except UntrustedValueError as e:
        raise refuse(e) from None
    p_exits = personal_exits(plan, lcfg.exit)
    personal = personal_features(settings, model, p_exits, model_crop(model))
    metrics: dict[str, Any] = {
        "exit": lcfg.exit,
        "n-personal-test": len(personal.utt_ids) if personal is not None else 0,
        "personalize-epochs": epochs,
    }
    metrics |= personal_metrics("global", evaluate_personal(model, personal, p_exits))
    if settings.out is not None:
        write_device_model(model, lcfg.exit, settings.out, _model_info(settings, cfg, rnd, "global"))
    if epochs > 0:
        feats = _features(settings, model, plan)
        losses = personalize(model, feats, plan, lcfg, epochs, device_identity(settings, context))
        metrics["personal-loss"] = float(losses.get("total", 0.0))
        metrics |= personal_metrics("personal", evaluate_personal(model, personal, p_exits))
        if settings.out is not None:
            info = _model_info(settings, cfg, rnd, "personal") | {"personalize_epochs": epochs}
            write_device_model(model, lcfg.exit, settings.out / PERSONAL_DIR, info)
    metrics["seconds"] = time.perf_counter() - t0
    if dp_in_use(context, cfg):  # personal test metrics are not noised: with DP on they stay here
        from fedsd.clients.dp_training import keep_local

        keep_local(context, metrics)
        metrics = {k: v for k, v in metrics.items() if k in ("exit", "personalize-epochs")}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def _event(msg: Message, reply: Message | None, context: Context, seconds: float) -> dict[str, Any]:
    """One event-log line: what this message did, from the request's config and the reply.

    The request is the server's: only checked values of known keys enter the line (never raises).
    """
    mtype = str(msg.metadata.message_type)
    cfg = dict(msg.content.config_records.get("config", ConfigRecord())) if msg.has_content() else {}
    ev: dict[str, Any] = {
        "time": time.time(),
        "kind": mtype.removeprefix("query."),
        "run": context.run_id,
        "node": context.node_id,
        "seconds": round(seconds, 3),
    }
    with contextlib.suppress(UntrustedValueError):
        if "server-round" in cfg:
            rnd = config_int(cfg, "server-round", 0, 0, MAX_ROUND)
            ev["round"] = rnd + config_int(cfg, "round-offset", 0, 0, MAX_ROUND)
    if mtype == QUERY_DONE:
        with contextlib.suppress(UntrustedValueError):
            ev["rounds"] = config_int(cfg, "rounds", 0, 0, MAX_ROUND) if "rounds" in cfg else None
        with contextlib.suppress(UntrustedValueError):
            ev["status"] = identifier(cfg["status"], "status") if "status" in cfg else None
        ev = {k: v for k, v in ev.items() if v is not None}
    if reply is None or reply.has_error():
        return ev
    content = reply.content
    if "info" in content.config_records:
        ev |= {k.replace("-", "_"): v for k, v in content.config_records["info"].items()}
    metrics = dict(content.metric_records.get("metrics", MetricRecord())) | pop_local_metrics(context)
    for key, value in metrics.items():
        if "/" in key:  # exit3/personal-uar-before → personal_uar_before: {3: ...}
            exit_part, name = key.split("/", 1)
            ev.setdefault(name.replace("-", "_"), {})[exit_part.removeprefix("exit")] = value
        else:
            ev[key.replace("-", "_")] = value
    for when in ("before", "after"):  # the console's "local UAR": on the device's own held-out speech
        if f"personal_uar_{when}" in ev:
            ev[f"uar_{when}"] = ev[f"personal_uar_{when}"]
    arrays = content.array_records.get("arrays")
    if arrays is not None and mtype == "train":
        ev["trained_exits"] = sorted({exit_of_key(k) for k in arrays})
    return ev


def log_event(context: Context, event: dict[str, Any]) -> None:
    """Append ``event`` to the node config's ``events`` file; no-op without one, never raises."""
    path = dict(context.node_config).get("events")
    if not path:
        return
    line = (json.dumps(event, default=str) + "\n").encode("utf-8")
    try:
        Path(str(path)).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write on an O_APPEND file: lines never interleave
        finally:
            os.close(fd)
    except OSError:
        pass  # the event log is for the operator's eyes; it must never fail a round


def _private(msg: Message, context: Context) -> bool:
    """Whether DP is on for this message (never raises: it decides what an error reply may say)."""
    try:
        cfg = dict(msg.content.config_records.get("config", ConfigRecord())) if msg.has_content() else {}
        return dp_in_use(context, cfg)
    except Exception:
        return True


def private_reason(err: BaseException) -> str:
    """The error text a server gets under DP: a refusal of its own message says what was refused (its
    own values only); a reached budget says so (the server stops asking), without ε; anything else
    is generic, as exception text may hold local paths, label counts or ε over other federations."""
    if isinstance(err, (HostileMessage, RunBudgetReached)) or str(err) == EVALUATION_REFUSED:
        return str(err)
    if str(err).startswith("privacy budget reached"):  # the device-wide budget: ε over other federations
        return BUDGET_STOP
    return PRIVATE_ERROR


def make_client_app(run_config_defaults: dict[str, Any] | None = None) -> ClientApp:
    """A ClientApp with our handlers. ``run_config_defaults`` complete the (read-only) run config:
    simulation runs, whose engine passes no run config to virtual nodes, carry their data paths this way."""
    client_app = ClientApp()
    defaults = dict(run_config_defaults or {})

    def wrap(handler):
        def handle(msg: Message, context: Context) -> Message:
            t0 = time.perf_counter()
            try:
                reply = handler(msg, context, defaults)
            except Exception as e:
                ev = _event(msg, None, context, time.perf_counter() - t0)
                log_event(context, ev | {"error": f"{type(e).__name__}: {e}"})
                reason = private_reason(e) if _private(msg, context) else str(e)
                if reason != str(e):  # under DP the server learns that it failed, the details stay here
                    raise DeviceError(reason) from e
                raise
            log_event(context, _event(msg, reply, context, time.perf_counter() - t0))
            return reply

        handle.__name__ = handler.__name__
        return handle

    client_app.train()(wrap(train))
    client_app.evaluate()(wrap(evaluate))
    client_app.query("info")(wrap(info))
    client_app.query("model")(wrap(receive_model))
    client_app.query("done")(wrap(done))
    return client_app


app = make_client_app()
