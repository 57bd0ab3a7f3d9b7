"""Validation of client replies before they are aggregated.

A reply is checked against the *current* global record (exit-head weights only). Pure functions, no
Flower state: the strategy (``fedsd.server.strategy``) calls them once per reply and tests call them
directly.

A train reply is rejected when

- it carries an error instead of content (the ClientApp raised),
- it does not hold exactly one ArrayRecord and exactly one MetricRecord (Flower's reply convention),
- its ArrayRecord is empty, or names a key the global record does not have,
- it carries part of an exit head (a reply must carry every key of each head it sends: central DP
  clips a head's change as one vector, and half a head is no update anyone trained),
- its device declared an exit the model does not have (``-1``, "the server's choice", stands for the
  exit the device then runs: the train config's ``default-exit``, else the model's deepest exit, as
  ``fedsd.clients.messages`` resolves it), or it carries a head above that exit (an exit-1 device has no
  business sending the teacher's head: as its only sender it would set it to anything),
- it carries the teacher's head when the devices were told ``teacher=deep`` (no honest device trains
  the deepest head then: any sender of it is lying, whatever exit it declared),
- an array cannot be decoded, or its dtype or shape differ from the global array,
- an array holds NaN or ±inf,
- the weighting metric (``num-examples``) is missing, not a number, not finite, zero or negative,
  or larger than the number of utterances the device declared when it joined,
- a required metric is missing (``dp-epsilon`` when the server requires DP), or any metric is not a
  finite number,
- its metrics exceed a cap (:data:`MAX_METRIC_KEYS` keys, :data:`MAX_METRIC_KEY_CHARS` characters per
  key, :data:`MAX_METRIC_LIST_LEN` entries per list, :data:`MAX_METRIC_BYTES` bytes as JSON): a device
  must not decide how much each round writes to metrics.jsonl, memory and the report,
- the L2 norm of the change (update − current global, over the keys the reply sent) exceeds
  ``max_update_norm`` (``None`` switches this check off),
- the same node already sent a reply this round (the later one is rejected).

A handshake (``query.info``) reply is parsed by :func:`validate_info_reply`: missing ``info``, a
non-numeric, non-finite or non-positive ``n-utterances``, a malformed ``exit`` reject the device, never
the run. Everything a device sends that ends up in a reason or a log line goes through
``fedsd.security.untrusted.shown``/``printable`` (no control characters reach the server's terminal or logs).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SType

from fedsd.security.untrusted import printable, shown

from .metric_caps import (
    MAX_METRIC_BYTES,
    MAX_METRIC_KEY_CHARS,
    MAX_METRIC_KEYS,
    MAX_METRIC_LIST_LEN,
    bad_metrics,
    metric_cap_problem,
    metric_values,
    read_weight,
)

__all__ = [
    "MAX_METRIC_BYTES",
    "MAX_METRIC_KEYS",
    "MAX_METRIC_KEY_CHARS",
    "MAX_METRIC_LIST_LEN",
    "Rejection",
    "ValidUpdate",
    "metric_cap_problem",
    "resolve_exit",
    "ValidMetrics",
    "decode_arrays",
    "head_update_norms",
    "reject_norm_outliers",
    "metric_values",
    "read_weight",
    "validate_evaluate_reply",
    "validate_info_reply",
    "validate_train_replies",
    "validate_train_reply",
]


@dataclass(frozen=True)
class Rejection:
    """A reply that was left out of aggregation, and why."""

    node_id: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "reason": self.reason}


@dataclass
class ValidUpdate:
    """A train reply that passed every check, decoded."""

    node_id: int
    arrays: dict[str, np.ndarray]
    """Decoded arrays, keyed like the global record (a subset of its keys)."""
    num_examples: float
    metrics: dict[str, int | float | list[int] | list[float]] = field(default_factory=dict)
    update_norm: float = 0.0
    """L2 norm of (update − current global) over this reply's keys."""
    content: RecordDict | None = field(default=None, repr=False, compare=False)
    """The reply's content as received (for flwr-style custom metric aggregation functions)."""


@dataclass
class ValidMetrics:
    """An evaluate reply that passed every check."""

    node_id: int
    num_examples: float
    metrics: dict[str, int | float | list[int] | list[float]] = field(default_factory=dict)
    content: RecordDict | None = field(default=None, repr=False, compare=False)


def decode_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Decode every Array of a record to numpy (no pickle: Flower stores ``np.save`` bytes)."""
    return {key: array.numpy() for key, array in record.items()}


def _node_id(reply: Message) -> int:
    return int(reply.metadata.src_node_id)


def _single_record(records: Mapping[str, Any], what: str) -> Any | str:
    if len(records) != 1:
        return f"expected exactly one {what}, found {len(records)}"
    return next(iter(records.values()))


def _error_reason(reply: Message) -> str:
    err = reply.error
    return f"error reply (code {err.code}): {printable(err.reason, 300)}"


def _exit_of(key: str) -> int | None:
    """``heads.3.fc.weight`` → 3; None for a key that is not a head parameter."""
    parts = key.split(".")
    if len(parts) >= 3 and parts[0] == "heads" and parts[1].isdigit():
        return int(parts[1])
    return None


def _head_keys(global_arrays: Mapping[str, Any]) -> dict[int, set[str]]:
    """The global record's keys grouped by exit head."""
    heads: dict[int, set[str]] = {}
    for key in global_arrays:
        k = _exit_of(key)
        if k is not None:
            heads.setdefault(k, set()).add(key)
    return heads


def resolve_exit(declared: int, model_exits: Iterable[int], default_exit: int | None = None) -> int | str:
    """The exit a device runs, from the exit it declared at the handshake, or why it is unusable.

    ``-1`` ("the server's choice") is the exit such a device then runs: ``default_exit`` (the train
    config's ``default-exit``) when the server sent one, else the model's deepest exit — what
    ``fedsd.clients.messages`` picks. Any other value must be an exit of the model.
    """
    exits = sorted(set(model_exits))
    if not exits:
        return "the global record holds no exit head"
    if declared == -1:
        declared = default_exit if default_exit is not None else exits[-1]
    if declared not in exits:
        shown_exits = ", ".join(map(str, exits))
        return f"declared exit {declared} is not an exit of this model (exits: {shown_exits})"
    return declared


def _head_problem(
    keys: Iterable[str],
    heads: Mapping[int, set[str]],
    declared_exit: int | None,
    teacher_exit: int | None = None,
    default_exit: int | None = None,
) -> str | None:
    """Why a reply's key set is unusable: its device's exit is not one of the model's, it sent a head
    above that exit, the teacher's head (``teacher_exit``: the devices were told ``teacher=deep``), or
    part of a head. ``declared_exit`` None: no handshake information (no exit limit)."""
    sent: dict[int, set[str]] = {}
    for key in keys:
        k = _exit_of(key)
        if k is not None:
            sent.setdefault(k, set()).add(key)
    if declared_exit is not None:
        resolved = resolve_exit(declared_exit, heads, default_exit)
        if isinstance(resolved, str):
            return resolved
        above = sorted(k for k in sent if k > resolved)
        if above:
            how = " (it declared -1, the server's choice)" if declared_exit == -1 else ""
            return (
                f"sent head(s) of exit {', '.join(map(str, above))} above the exit {resolved} "
                f"the device declared when it joined{how}"
            )
    if teacher_exit is not None and teacher_exit in sent:
        return (
            f"sent the teacher's head (exit {teacher_exit}): with teacher=deep no device trains it, "
            "it only teaches"
        )
    for k, got in sorted(sent.items()):
        missing = heads.get(k, set()) - got
        if missing:
            return (
                f"partial head: exit {k} sent {len(got)} of its {len(heads[k])} keys "
                f"(missing {', '.join(shown(m, 60) for m in sorted(missing)[:3])}"
                f"{', ...' if len(missing) > 3 else ''})"
            )
    return None


def _check_array(key: str, array: Array, reference: np.ndarray) -> np.ndarray | str:
    """Decode one Array and compare it with the global array of the same key."""
    if array.stype != SType.NUMPY:
        return f"'{key}': unsupported serialisation type '{array.stype}'"
    if array.dtype != str(reference.dtype):
        return f"'{key}': dtype {array.dtype} != global {reference.dtype}"
    if tuple(array.shape) != reference.shape:
        return f"'{key}': shape {tuple(array.shape)} != global {reference.shape}"
    try:
        value = array.numpy()
    except Exception as exc:  # malformed bytes: np.load raises many exception types
        return f"'{key}': cannot decode array ({type(exc).__name__}: {exc})"
    # The header inside the bytes is authoritative; the Array's metadata could disagree with it.
    if value.dtype != reference.dtype:
        return f"'{key}': dtype {value.dtype} != global {reference.dtype}"
    if value.shape != reference.shape:
        return f"'{key}': shape {value.shape} != global {reference.shape}"
    if np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value)):
        return f"'{key}': non-finite values (NaN or inf)"
    return value


def _train_records(reply: Message) -> tuple[RecordDict, ArrayRecord, MetricRecord] | Rejection:
    """The content of a train reply and its single ArrayRecord and MetricRecord, or why it has none."""
    node_id = _node_id(reply)
    if reply.has_error():
        return Rejection(node_id, _error_reason(reply))
    if not reply.has_content():
        return Rejection(node_id, "reply has neither content nor error")
    content = reply.content
    record = _single_record(content.array_records, "ArrayRecord")
    if isinstance(record, str):
        return Rejection(node_id, record)
    metric_record = _single_record(content.metric_records, "MetricRecord")
    if isinstance(metric_record, str):
        return Rejection(node_id, metric_record)
    return content, record, metric_record


def _decoded_arrays(
    node_id: int, record: ArrayRecord, global_arrays: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], float] | Rejection:
    """The reply's arrays decoded and checked against the global ones, with the squared L2 norm of
    the change; or why they are unusable (empty, unknown keys, a bad array)."""
    if len(record) == 0:
        return Rejection(node_id, "empty ArrayRecord (no weights sent)")
    unknown = sorted(key for key in record if key not in global_arrays)
    if unknown:
        names = ", ".join(shown(k, 60) for k in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        return Rejection(node_id, f"unknown keys not in the global record: {names}")
    decoded: dict[str, np.ndarray] = {}
    squared = 0.0
    for key, array in record.items():
        checked = _check_array(key, array, global_arrays[key])
        if isinstance(checked, str):
            return Rejection(node_id, checked)
        decoded[key] = checked
        diff = checked.astype(np.float64) - global_arrays[key].astype(np.float64)
        squared += float(np.dot(diff.ravel(), diff.ravel()))
    return decoded, squared


def _declared_exit(node_id: int, declared_exits: Mapping[int, int] | None) -> int | None | Rejection:
    """The exit the node declared at the handshake (None: no handshake information, no exit limit)."""
    if declared_exits is None:
        return None
    if node_id not in declared_exits:
        return Rejection(node_id, "device did not join through the handshake (no declared exit)")
    return declared_exits[node_id]


def validate_train_reply(
    reply: Message,
    global_arrays: Mapping[str, np.ndarray] | ArrayRecord,
    *,
    weighted_by_key: str = "num-examples",
    max_update_norm: float | None = None,
    declared_examples: Mapping[int, float] | None = None,
    required_metrics: Iterable[str] = (),
    declared_exits: Mapping[int, int] | None = None,
    teacher_exit: int | None = None,
    default_exit: int | None = None,
) -> ValidUpdate | Rejection:
    """Check one train reply against the current global arrays.

    ``global_arrays`` may be the global ArrayRecord or its decoded form (``decode_arrays``); pass the
    decoded form when validating many replies against the same record. ``declared_examples`` maps a
    node to the number of utterances it declared when it joined: a reply may not weigh more.
    ``declared_exits`` maps a node to the exit it declared: it must be an exit of the model (the
    global record's heads), -1 standing for ``default_exit`` or else the deepest exit (see
    :func:`resolve_exit`), and a reply may not carry a head above it. A node missing from either
    mapping is rejected. ``teacher_exit`` (set when the devices were told ``teacher=deep``): no reply
    may carry that head.
    """
    node_id = _node_id(reply)
    records = _train_records(reply)
    if isinstance(records, Rejection):
        return records
    content, record, metric_record = records
    if isinstance(global_arrays, ArrayRecord):
        global_arrays = decode_arrays(global_arrays)
    checked = _metrics_and_weight(
        node_id, metric_record, weighted_by_key, required_metrics, declared_examples
    )
    if isinstance(checked, Rejection):
        return checked
    metrics, weight = checked
    arrays = _decoded_arrays(node_id, record, global_arrays)
    if isinstance(arrays, Rejection):
        return arrays
    decoded, squared = arrays
    declared_exit = _declared_exit(node_id, declared_exits)
    if isinstance(declared_exit, Rejection):
        return declared_exit
    problem = _head_problem(
        record.keys(), _head_keys(global_arrays), declared_exit, teacher_exit, default_exit
    )
    if problem is not None:
        return Rejection(node_id, problem)
    norm = math.sqrt(squared)
    if max_update_norm is not None and not norm <= max_update_norm:
        return Rejection(node_id, f"update norm {norm:.6g} exceeds max_update_norm {max_update_norm:g}")

    return ValidUpdate(
        node_id=node_id,
        arrays=decoded,
        num_examples=weight,
        metrics=metrics,
        update_norm=norm,
        content=content,
    )


def _metrics_and_weight(
    node_id: int,
    metric_record: MetricRecord,
    weighted_by_key: str,
    required: Iterable[str],
    declared_examples: Mapping[int, float] | None,
) -> tuple[dict[str, Any], float] | Rejection:
    """A reply's metrics and weight, or why they are unusable: the weight must be a usable number, every
    metric finite (``required`` present), and the weight no larger than the utterances the device
    declared when it joined (when ``declared_examples`` is given); the metrics within the caps
    (:func:`metric_cap_problem`)."""
    too_big = metric_cap_problem(metric_record)
    if too_big is not None:
        return Rejection(node_id, too_big)
    metrics = metric_values(metric_record)
    weight = read_weight(metrics, weighted_by_key)
    if isinstance(weight, str):
        return Rejection(node_id, weight)
    bad = bad_metrics(metrics, required)
    if bad:
        return Rejection(node_id, bad)
    if declared_examples is not None:
        declared = declared_examples.get(node_id)
        if declared is None:
            return Rejection(node_id, "device did not join through the handshake (no declared data size)")
        if weight > declared:
            return Rejection(
                node_id,
                f"'{weighted_by_key}' {weight:g} exceeds the {declared:g} utterances the device "
                "declared when it joined",
            )
    return metrics, weight


def validate_train_replies(
    replies: Iterable[Message],
    global_arrays: Mapping[str, np.ndarray] | ArrayRecord,
    *,
    weighted_by_key: str = "num-examples",
    max_update_norm: float | None = None,
    declared_examples: Mapping[int, float] | None = None,
    required_metrics: Iterable[str] = (),
    declared_exits: Mapping[int, int] | None = None,
    teacher_exit: int | None = None,
    default_exit: int | None = None,
) -> tuple[list[ValidUpdate], list[Rejection]]:
    """Split a round's replies into valid updates and rejections (a node's second reply is rejected)."""
    if isinstance(global_arrays, ArrayRecord):
        global_arrays = decode_arrays(global_arrays)
    valid: list[ValidUpdate] = []
    rejections: list[Rejection] = []
    seen: set[int] = set()
    for reply in replies:
        node_id = _node_id(reply)
        if node_id in seen:
            rejections.append(Rejection(node_id, "duplicate reply from the same node this round"))
            continue
        seen.add(node_id)
        result = validate_train_reply(
            reply,
            global_arrays,
            weighted_by_key=weighted_by_key,
            max_update_norm=max_update_norm,
            declared_examples=declared_examples,
            required_metrics=tuple(required_metrics),
            declared_exits=declared_exits,
            teacher_exit=teacher_exit,
            default_exit=default_exit,
        )
        (rejections if isinstance(result, Rejection) else valid).append(result)
    return valid, rejections


def validate_evaluate_reply(
    reply: Message,
    *,
    weighted_by_key: str = "num-examples",
    declared_examples: Mapping[int, float] | None = None,
) -> ValidMetrics | Rejection:
    """Check one evaluate reply: content with exactly one MetricRecord, finite numeric metrics (an
    honest device leaves out an exit it could not evaluate) and a usable weight, no larger than the
    utterances the device declared when it joined (with ``declared_examples``)."""
    node_id = _node_id(reply)
    if reply.has_error():
        return Rejection(node_id, _error_reason(reply))
    if not reply.has_content():
        return Rejection(node_id, "reply has neither content nor error")
    metric_record = _single_record(reply.content.metric_records, "MetricRecord")
    if isinstance(metric_record, str):
        return Rejection(node_id, metric_record)
    checked = _metrics_and_weight(node_id, metric_record, weighted_by_key, (), declared_examples)
    if isinstance(checked, Rejection):
        return checked
    metrics, weight = checked
    return ValidMetrics(node_id=node_id, num_examples=weight, metrics=metrics, content=reply.content)


def head_update_norms(update: ValidUpdate, global_arrays: Mapping[str, np.ndarray]) -> dict[int, float]:
    """L2 norm of the change per exit head (keys ``heads.<exit>.*``) of one update."""
    squared: dict[int, float] = {}
    for key, value in update.arrays.items():
        exit_k = int(key.split(".")[1]) if key.count(".") >= 2 else -1
        diff = value.astype(np.float64) - np.asarray(global_arrays[key], dtype=np.float64)
        squared[exit_k] = squared.get(exit_k, 0.0) + float(np.dot(diff.ravel(), diff.ravel()))
    return {k: math.sqrt(v) for k, v in squared.items()}


def reject_norm_outliers(
    updates: list[ValidUpdate],
    global_arrays: Mapping[str, np.ndarray],
    ratio: float,
    min_senders: int = 3,
) -> tuple[list[ValidUpdate], list[Rejection]]:
    """Reject updates whose change of some head exceeds ``ratio`` × that head's median change this round.

    A scale-free norm bound: no absolute threshold to tune, and a device that scales its update
    (×100) stands out however large honest updates happen to be. Heads sent by fewer than
    ``min_senders`` devices are not judged (a median of two says nothing).
    """
    norms = {u.node_id: head_update_norms(u, global_arrays) for u in updates}
    per_head: dict[int, list[float]] = {}
    for by_head in norms.values():
        for k, v in by_head.items():
            per_head.setdefault(k, []).append(v)
    medians = {k: float(np.median(v)) for k, v in per_head.items() if len(v) >= min_senders}
    kept: list[ValidUpdate] = []
    rejected: list[Rejection] = []
    for u in updates:
        worst = None
        for k, v in norms[u.node_id].items():
            m = medians.get(k)
            if m is not None and v > ratio * max(m, 1e-12):
                worst = (k, v, m)
                break
        if worst is None:
            kept.append(u)
        else:
            k, v, m = worst
            rejected.append(
                Rejection(
                    u.node_id,
                    f"exit {k} head changed by {v:.4g}, {v / max(m, 1e-12):.1f}× the round's median "
                    f"{m:.4g} (max_update_norm_ratio {ratio:g})",
                )
            )
    return kept, rejected


MAX_DECLARED_UTTERANCES = 10**12
"""Largest ``n-utterances`` a handshake may declare (the weight cap, not this bound, limits influence)."""


def _count(value: Any, name: str, lo: int, hi: int) -> int | str:
    """An integer count from a device (an integral float is accepted), or why it is unusable."""
    if value is None:
        return f"'{name}' is missing"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"'{name}' is not a number ({shown(value, 40)})"
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return f"'{name}' is not a whole number ({value})"
    if not lo <= value <= hi:
        return f"'{name}' {value:g} is outside [{lo}, {hi:g}]"
    return int(value)


DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A device's stable identity as declared at the handshake (see ``fedsd.clients.identity``)."""


def validate_info_reply(reply: Message) -> dict[str, Any] | Rejection:
    """Parse a handshake (``query.info``) reply; a malformed one rejects the device, never the run.

    Returns ``{"has-model": bool, "exit": int (-1 = the server's choice), "n-utterances": int >= 1,
    "n-labelled": int | None, "device": str, "torch-threads": int | None, "device-id": str | None}`` —
    only these keys, every string printable — or the :class:`Rejection` that says why the device
    cannot take part.
    """
    node_id = _node_id(reply)
    if reply.has_error():
        return Rejection(node_id, _error_reason(reply))
    if not reply.has_content():
        return Rejection(node_id, "reply has neither content nor error")
    info = reply.content.config_records.get("info")
    if info is None:
        return Rejection(node_id, "handshake reply without an 'info' record")
    n = _count(info.get("n-utterances"), "n-utterances", 1, MAX_DECLARED_UTTERANCES)
    if isinstance(n, str):
        return Rejection(node_id, n)
    exit_k = _count(info.get("exit", -1), "exit", -1, 10**6)
    if isinstance(exit_k, str) or exit_k == 0:
        return Rejection(node_id, exit_k if isinstance(exit_k, str) else "'exit' 0 is not an exit")
    has_model = info.get("has-model", False)
    if not isinstance(has_model, bool):
        return Rejection(node_id, f"'has-model' is not true or false ({shown(has_model, 40)})")
    n_labelled: int | None = None
    if "n-labelled" in info:
        counted = _count(info.get("n-labelled"), "n-labelled", 0, n)
        if isinstance(counted, str):
            return Rejection(node_id, counted)
        n_labelled = counted
    threads = _count(info.get("torch-threads"), "torch-threads", 1, 10**6)
    device = info.get("device", "")
    device_id = info.get("device-id")
    if not (isinstance(device_id, str) and DEVICE_ID.fullmatch(device_id)):
        device_id = None  # absent or not a plain id: the device is known by its node id only
    return {
        "device-id": device_id,
        "has-model": has_model,
        "exit": exit_k,
        "n-utterances": n,
        "n-labelled": n_labelled,
        "device": printable(device, 64) if isinstance(device, str) else shown(device, 64),
        "torch-threads": threads if isinstance(threads, int) else None,
    }
