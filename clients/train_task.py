"""The ``train`` message: fine-tune the device's shallow heads from cached backbone features by
self-distillation (with DP-SGD when DP is on) and reply with those heads, ``num-examples`` and metrics.
Nothing else leaves the device; under DP only what DP covers does (``dp_training.DP_REPLY_KEYS``)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Message, MetricRecord, RecordDict

from fedsd.clients.assembly import LocalRound, backbone_on_demand, local_features, prepare
from fedsd.clients.device import DeviceError
from fedsd.clients.dp_round import dp_settings, train_private
from fedsd.clients.messages import round_of, server_config
from fedsd.clients.personal import (
    evaluate_personal,
    model_info,
    personal_exits,
    personal_features,
    personal_metrics,
    write_device_model,
)
from fedsd.clients.training import train_heads
from fedsd.metrics import ClassificationReport
from fedsd.security.wire import heads_to_record
from fedsd.training.cached import evaluate_cached, model_crop
from fedsd.training.features import CachedFeatures

if TYPE_CHECKING:  # imported where used: Opacus only on the DP path
    from fedsd.security.privacy import DPSettings

Reports = dict[int, ClassificationReport]


@dataclass(frozen=True)
class RoundData:
    """The utterances of a round: those it trains on (``feats``, ``n_labelled`` of them labelled) and the
    personal test ones it never trains on (``personal``, measured at ``personal_exits``)."""

    feats: CachedFeatures
    n_labelled: int
    personal: CachedFeatures | None
    personal_exits: list[int]


@backbone_on_demand
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
    r = prepare(msg, context, defaults)
    if r.settings.out is not None:
        done = max(0, round_of(cfg) - 1)
        write_device_model(r.model, r.lcfg.exit, r.settings.out, model_info(r.settings, cfg, done, "global"))
    data = _round_data(r)
    p_before = evaluate_personal(r.model, data.personal, data.personal_exits)
    before = evaluate_cached(r.model, data.feats, r.plan.train) if data.n_labelled else {}
    dp_metrics: dict[str, Any] = {}
    if dp is None:
        losses = train_heads(r.model, data.feats, r.plan, r.lcfg)
    else:
        losses, dp_metrics = train_private(context, r, data.feats, dp, cfg)
    after = evaluate_cached(r.model, data.feats, r.plan.train) if data.n_labelled else {}
    p_after = evaluate_personal(r.model, data.personal, data.personal_exits)
    metrics = _round_metrics(r, data, losses, time.perf_counter() - t0)
    metrics |= _uar_metrics("train-uar-before", before) | _uar_metrics("train-uar-after", after) | dp_metrics
    metrics |= personal_metrics("before", p_before) | personal_metrics("after", p_after)
    return _reply(msg, context, r, metrics, dp)


def _round_data(r: LocalRound) -> RoundData:
    """The round's training features (refused in CE mode without a label) and personal test features."""
    feats = local_features(r.settings, r.model, r.plan)
    n_labelled = int((feats.labels >= 0).sum())
    if r.lcfg.distill.mode == "ce" and n_labelled == 0:
        raise DeviceError("mode=ce needs labelled utterances and this device has none")
    p_exits = personal_exits(r.plan, r.lcfg.exit)
    personal = personal_features(r.settings, r.model, p_exits, model_crop(r.model))
    return RoundData(feats, n_labelled, personal, p_exits)


def _round_metrics(
    r: LocalRound, data: RoundData, losses: dict[str, float], seconds: float
) -> dict[str, Any]:
    """What the round did: its size, loss, cache use and time (``num-examples`` weights the update)."""
    # CE-only training learns from labelled utterances only: weight the update by what it used.
    n = len(data.feats.utt_ids)
    return {
        "num-examples": data.n_labelled if r.lcfg.distill.mode == "ce" else n,
        "exit": r.lcfg.exit,
        "n-labelled": data.n_labelled,
        "n-utterances": n,
        "n-personal-test": len(data.personal.utt_ids) if data.personal is not None else 0,
        "loss": float(losses.get("total", 0.0)),
        "cache-hits": data.feats.hits,
        "cache-misses": data.feats.misses,
        "seconds": seconds,
    }


def _uar_metrics(prefix: str, reports: Reports) -> dict[str, float]:
    """UAR per exit; an exit evaluated on no utterance has none (NaN) and is left out, never sent as 0."""
    return {f"exit{k}/{prefix}": float(r.uar) for k, r in reports.items() if r.n > 0 and math.isfinite(r.uar)}


def _reply(
    msg: Message, context: Context, r: LocalRound, metrics: dict[str, Any], dp: DPSettings | None
) -> Message:
    """The trained heads and the metrics; under DP only what DP covers (or the handshake revealed)."""
    if dp is not None:
        from fedsd.clients.dp_training import dp_reply_metrics, keep_local

        keep_local(context, metrics)  # ... the device's own event log still shows everything
        metrics = dp_reply_metrics(metrics, declared=len(r.settings.local_data()[0]))  # as at the handshake
    state = r.model.head_state_dict(r.plan.train)
    content = RecordDict({"arrays": heads_to_record(state), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)
