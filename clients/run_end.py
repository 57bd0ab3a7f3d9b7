"""The ``query.done`` message: the run is over (a supervised device stops its SuperNode).

With the final global heads attached, the device measures them on its personal test speech, keeps them
as its deployable model (``--out``) and, with ``personalize-epochs`` > 0, fine-tunes a private copy on its
own training speech (``--out``/personal, clients/personal.py). Only metrics leave the device.
"""

from __future__ import annotations

import time
from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict

from fedsd.clients.assembly import LocalRound, backbone_on_demand, local_features, prepare
from fedsd.clients.device import refuse
from fedsd.clients.dp_gate import dp_in_use
from fedsd.clients.messages import MAX_ROUND, device_identity, server_config
from fedsd.clients.personal import (
    PERSONAL_DIR,
    evaluate_personal,
    model_info,
    personal_exits,
    personal_features,
    personal_metrics,
    personalize,
    write_device_model,
)
from fedsd.security.untrusted import UntrustedValueError, config_int
from fedsd.training.cached import model_crop


@backbone_on_demand
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
    r = prepare(msg, context, defaults)  # the model holds the final global heads
    epochs, rnd = _run_end_config(r, cfg)
    p_exits = personal_exits(r.plan, r.lcfg.exit)
    personal = personal_features(r.settings, r.model, p_exits, model_crop(r.model))
    metrics: dict[str, Any] = {
        "exit": r.lcfg.exit,
        "n-personal-test": len(personal.utt_ids) if personal is not None else 0,
        "personalize-epochs": epochs,
    }
    metrics |= personal_metrics("global", evaluate_personal(r.model, personal, p_exits))
    if r.settings.out is not None:
        write_device_model(r.model, r.lcfg.exit, r.settings.out, model_info(r.settings, cfg, rnd, "global"))
    if epochs > 0:
        losses = personalize(
            r.model, local_features(r.settings, r.model, r.plan), r.plan, r.lcfg, epochs,
            device_identity(r.settings, context),
        )  # fmt: skip
        metrics["personal-loss"] = float(losses.get("total", 0.0))
        metrics |= personal_metrics("personal", evaluate_personal(r.model, personal, p_exits))
        if r.settings.out is not None:
            info = model_info(r.settings, cfg, rnd, "personal") | {"personalize_epochs": epochs}
            write_device_model(r.model, r.lcfg.exit, r.settings.out / PERSONAL_DIR, info)
    metrics["seconds"] = time.perf_counter() - t0
    return Message(RecordDict({"metrics": MetricRecord(_shareable(context, cfg, metrics))}), reply_to=msg)


def _run_end_config(r: LocalRound, cfg: dict[str, Any]) -> tuple[int, int]:
    """Personalisation epochs (the device's own setting over the server's) and the run's last round."""
    try:
        epochs = r.settings.personalize_epochs
        if epochs is None:
            epochs = config_int(cfg, "personalize-epochs", 0, 0, 10_000)
        rnd = config_int(cfg, "rounds", 0, 0, MAX_ROUND)
    except UntrustedValueError as e:
        raise refuse(e) from None
    return epochs, rnd


def _shareable(context: Context, cfg: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics the reply may carry: with DP on, personal test metrics (not noised) stay on the
    device (its event log still shows them)."""
    if not dp_in_use(context, cfg):
        return metrics
    from fedsd.clients.dp_training import keep_local

    keep_local(context, metrics)
    return {k: v for k, v in metrics.items() if k in ("exit", "personalize-epochs")}
