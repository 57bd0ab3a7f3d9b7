"""The ``evaluate`` message: per-exit UAR/WA/F1 of the received heads on the device's own held-out speech
(its personal test utterances, else its validation ones). Refused while DP is on: its metrics are not
noised."""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict

from fedsd.clients.assembly import backbone_on_demand, local_features, prepare
from fedsd.clients.device import DeviceError
from fedsd.clients.dp_gate import dp_in_use
from fedsd.clients.messages import server_config
from fedsd.clients.private_errors import EVALUATION_REFUSED
from fedsd.clients.training import ExitPlan
from fedsd.training.cached import evaluate_cached


@backbone_on_demand
def evaluate(msg: Message, context: Context, defaults: dict[str, Any] | None = None) -> Message:
    """Per-exit UAR/WA/F1 of the received heads on the device's validation utterances."""
    if dp_in_use(context, server_config(msg)):
        raise DeviceError(EVALUATION_REFUSED)
    r = prepare(msg, context, defaults)
    exits = [k for k in r.model.exits if k <= max(r.plan.needed)]
    feats = local_features(
        r.settings, r.model, ExitPlan(needed=exits, train=[], teacher=r.plan.teacher), evaluation=True
    )
    reports = evaluate_cached(r.model, feats, exits)
    metrics: dict[str, Any] = {"num-examples": max(1, int((feats.labels >= 0).sum()))}
    for k, rep in reports.items():
        if rep.n > 0:  # no labelled utterance: no metric (NaN), rather than a 0.0 the server would average in
            metrics |= {f"exit{k}/uar": rep.uar, f"exit{k}/wa": rep.wa, f"exit{k}/f1": rep.macro_f1}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
