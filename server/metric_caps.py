"""Caps and number checks on the metrics a device reports (train, evaluate and end-of-run replies).

A device must not decide how much each round writes to metrics.jsonl, keeps in memory or puts in the
report, nor slip a non-number into an average: these pure checks say why a reply's metrics are
unusable (a string) and :mod:`fedsd.server.validation` turns that into a rejection.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import MetricRecord

from fedsd.security.untrusted import shown

MAX_METRIC_KEYS = 256
"""Most metric keys one reply may carry (an honest train reply of a 24-exit model sends ~200)."""
MAX_METRIC_KEY_CHARS = 128
"""Longest metric key (honest keys are like ``exit12/personal-uar-before``)."""
MAX_METRIC_LIST_LEN = 256
"""Most entries of one list-valued metric (honest devices send scalars; per-class lists stay short)."""
MAX_METRIC_BYTES = 64 * 1024
"""Largest serialised size (JSON, UTF-8) of one reply's metrics: what it may add to a metrics.jsonl line."""


def metric_cap_problem(metrics: Mapping[str, Any]) -> str | None:
    """Why a reply's metrics are too big to keep, naming the cap; None when they fit.

    Checked before anything is copied or aggregated: a device must not decide how much each round
    writes to metrics.jsonl, keeps in memory or puts in the report. Cheap checks first (count, key
    length, list lengths), the serialised size last (bounded by then).
    """
    if len(metrics) > MAX_METRIC_KEYS:
        return f"metrics: {len(metrics)} keys exceed the cap of {MAX_METRIC_KEYS} (MAX_METRIC_KEYS)"
    for key, value in metrics.items():
        if len(str(key)) > MAX_METRIC_KEY_CHARS:
            return (
                f"metric key {shown(key, 40)} has {len(str(key))} characters, over the cap of "
                f"{MAX_METRIC_KEY_CHARS} (MAX_METRIC_KEY_CHARS)"
            )
        if isinstance(value, (list, tuple)) and len(value) > MAX_METRIC_LIST_LEN:
            return (
                f"metric {shown(key, 60)} is a list of {len(value)} entries, over the cap of "
                f"{MAX_METRIC_LIST_LEN} (MAX_METRIC_LIST_LEN)"
            )
    try:
        size = len(json.dumps(dict(metrics), default=str).encode("utf-8"))
    except (TypeError, ValueError) as exc:  # a value json cannot write: not a metric anyway
        return f"metrics cannot be serialised ({type(exc).__name__})"
    if size > MAX_METRIC_BYTES:
        return f"metrics: {size} bytes as JSON exceed the cap of {MAX_METRIC_BYTES} (MAX_METRIC_BYTES)"
    return None


def bad_metrics(metrics: Mapping[str, Any], required: Iterable[str]) -> str | None:
    """Why the metrics are unusable: a required one is missing, or a value is not a finite number."""
    missing = [k for k in required if k not in metrics]
    if missing:
        return f"missing metric(s) {', '.join(missing)}"
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return f"metric {shown(key, 60)} is not a number ({type(v).__name__})"
            if not math.isfinite(v):
                return f"metric {shown(key, 60)} is not finite ({v})"
    return None


def metric_values(record: MetricRecord) -> dict[str, int | float | list[int] | list[float]]:
    """A plain-dict copy of a MetricRecord (lists copied)."""
    return {key: (list(value) if isinstance(value, list) else value) for key, value in record.items()}


def read_weight(metrics: Mapping[str, Any], weighted_by_key: str) -> float | str:
    """The reply's weight, or the reason it is unusable."""
    if weighted_by_key not in metrics:
        return f"missing '{weighted_by_key}' in MetricRecord"
    value = metrics[weighted_by_key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"'{weighted_by_key}' is not a number ({type(value).__name__})"
    if not math.isfinite(value):
        return f"'{weighted_by_key}' is not finite ({value})"
    if value <= 0:
        return f"'{weighted_by_key}' must be positive (got {value})"
    return float(value)
