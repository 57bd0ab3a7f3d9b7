"""What a message is handled with: the device's model (with the server's heads), its plan and its features.

A model is loaded heads-only first (``fedsd.clients.model_store``): when every feature a message needs
is cached, the backbone is never built. If one is missing (:class:`BackboneNeeded`), the handler runs
again with the full model (:func:`backbone_on_demand`); nothing is written before the features are read.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from flwr.app import Context, Message

from fedsd.clients.device import DeviceError, DeviceSettings
from fedsd.clients.messages import (
    device_exit,
    device_identity,
    local_config,
    received_heads,
    server_config,
)
from fedsd.clients.model_store import load_model
from fedsd.clients.training import ExitPlan, LocalTrainConfig, plan_exits
from fedsd.data.manifest import ManifestRow
from fedsd.model.export import parent_fingerprint
from fedsd.model.multiexit import MultiExitSER
from fedsd.training.cached import model_crop
from fedsd.training.features import BackboneNeeded, CachedFeatures, FeatureCache

Handler = Callable[[Message, Context, "dict[str, Any] | None"], Message]
"""A message handler: ``(message, context, run-config defaults) → reply``."""

NEED_WEIGHTS = contextvars.ContextVar("fedsd_need_backbone_weights", default=False)
"""Set while a message is handled again with the full model (a feature was not cached)."""


@dataclass(frozen=True)
class LocalRound:
    """What a handler works with: the device's settings, its model holding the received heads, the local
    training settings and the exits it trains, needs and distils from."""

    settings: DeviceSettings
    model: MultiExitSER
    lcfg: LocalTrainConfig
    plan: ExitPlan


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


def prepare(msg: Message, context: Context, defaults: dict[str, Any] | None) -> LocalRound:
    """Settings, model with the received heads, local training config and exit plan of this device."""
    settings = DeviceSettings.from_context(context, defaults)
    cfg = server_config(msg)
    lcfg = local_config(cfg, 0, device_identity(settings, context))  # checked before anything loads
    weights = NEED_WEIGHTS.get() or settings.out is not None  # --out exports the backbone
    model = load_device_model(settings, str(cfg.get("fingerprint", "")), weights=weights)
    lcfg = replace(lcfg, exit=device_exit(settings, model, cfg))
    try:
        plan = plan_exits(model.exits, lcfg.exit, lcfg)
    except ValueError as e:
        raise DeviceError(str(e)) from None
    if plan.teacher not in model.exits:
        raise DeviceError(f"teacher exit {plan.teacher} is not in this device's model; use teacher: local")
    arrays = msg.content.array_records.get("arrays")
    if arrays is not None and len(arrays):
        model.load_head_state_dict(received_heads(arrays, model), strict=False)
    return LocalRound(settings, model, lcfg, plan)


def backbone_on_demand(handler: Handler) -> Handler:
    """Handle a message with a heads-only model first; if a feature is not cached (BackboneNeeded),
    handle it again with the backbone. Nothing is written before the features are read."""

    @functools.wraps(handler)
    def run(msg: Message, context: Context, defaults: dict[str, Any] | None = None) -> Message:
        if NEED_WEIGHTS.get():
            return handler(msg, context, defaults)
        try:
            return handler(msg, context, defaults)
        except BackboneNeeded:
            token = NEED_WEIGHTS.set(True)
            try:
                return handler(msg, context, defaults)
            finally:
                NEED_WEIGHTS.reset(token)

    return run


def local_features(
    settings: DeviceSettings, model: MultiExitSER, plan: ExitPlan, *, evaluation: bool = False
) -> CachedFeatures:
    """Cached head inputs of the device's utterances for training, or (``evaluation``) for evaluation."""
    rows, labelled = _local_rows(settings, evaluation)
    if not rows:
        raise DeviceError(f"no local utterances for {'evaluation' if evaluation else 'training'}")
    cache = FeatureCache(settings.cache_dir, model, model_crop(model))
    return cache.get(
        rows, settings.root, plan.needed, label_names=model.label_names, labelled=labelled,
        device=settings.device,
    )  # fmt: skip


def _local_rows(settings: DeviceSettings, evaluation: bool) -> tuple[list[ManifestRow], list[bool]]:
    """The utterances to train on (or evaluate on) and which of them are labelled.

    Federated evaluation uses the device's personal test speech when it has some; a real device keeps
    its manifest's valid/test rows for evaluation (its labelled rows when it has neither)."""
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
    return rows, labelled
