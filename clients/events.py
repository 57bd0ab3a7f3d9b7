"""The device's event log: one JSON line per handled message, in the file the node config names
(``events``; `fedsd client run` sets it and prints each line, clients/supervisor.py)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord

from fedsd.clients.dp_gate import pop_local_metrics
from fedsd.clients.messages import MAX_ROUND
from fedsd.security.untrusted import UntrustedValueError, config_int, identifier
from fedsd.security.wire import QUERY_DONE, exit_of_key


def message_event(msg: Message, reply: Message | None, context: Context, seconds: float) -> dict[str, Any]:
    """One event-log line: what this message did, from the request's config and the reply.

    The request is the server's: only checked values of known keys enter the line (never raises).
    """
    ev = _request_fields(msg, context, seconds)
    if reply is None or reply.has_error():
        return ev
    return _with_reply(ev, reply, context, str(msg.metadata.message_type))


def _request_fields(msg: Message, context: Context, seconds: float) -> dict[str, Any]:
    """The message's kind, run, node, time taken, and the checked round numbers of its config."""
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
    return ev


def _with_reply(ev: dict[str, Any], reply: Message, context: Context, mtype: str) -> dict[str, Any]:
    """``ev`` with the reply's info and metrics (those DP kept off the wire too), per exit where keyed so."""
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
