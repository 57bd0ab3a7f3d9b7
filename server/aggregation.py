"""How a round's valid updates become the new global heads: per-key rules, weight caps, the server step.

Pure functions over decoded arrays (no Flower state): :class:`fedsd.server.strategy.PartialFedAvg`
calls them each round. ``mean`` weights by ``num-examples`` (capped, see :func:`weight_cap`);
``median`` and ``trimmed_mean`` are coordinate-wise and protect only a head that :func:`min_senders`
devices sent. Metrics are averaged per key over the clients that reported it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from .validation import ValidUpdate, decode_arrays

Aggregation = Literal["mean", "median", "trimmed_mean"]
AGGREGATIONS: tuple[str, ...] = ("mean", "median", "trimmed_mean")
MetricsAggrFn = Callable[[list[RecordDict], str], MetricRecord]

DEFAULT_MAX_WEIGHT_RATIO = 3.0
"""Default cap on a reply's weight, as a multiple of the round's (lower) median weight.

``num-examples`` is self-reported; the handshake declaration bounds it, but a device can declare
anything. The cap keeps one liar to ``DEFAULT_MAX_WEIGHT_RATIO`` honest devices' worth of influence
(while honest devices with up to 3× the typical data keep their full weight). ``PartialFedAvg(
max_weight_ratio=None)`` switches it off; ``federated.max_num_examples`` adds an absolute cap.
"""


def weight_cap(
    weights: Sequence[float], max_weight_ratio: float | None, max_num_examples: float | None = None
) -> float | None:
    """This round's cap on one reply's weight: ``max_weight_ratio`` × the lower median of ``weights``
    and ``max_num_examples``, whichever is smaller (None: no cap).

    The *lower* median (the smaller middle value for an even count) so that with two senders the liar
    is not the one setting the cap.
    """
    caps = [] if max_num_examples is None else [float(max_num_examples)]
    if max_weight_ratio is not None and weights:
        ordered = sorted(float(w) for w in weights)
        caps.append(max_weight_ratio * ordered[(len(ordered) - 1) // 2])
    return min(caps) if caps else None


def min_senders(aggregation: str, trim_fraction: float = 0.2) -> int:
    """Fewest senders of a head for which ``aggregation`` is robust to one lying sender.

    - ``mean``: 1 (no robustness claimed: every sender moves it; bound updates with ``max_update_norm``,
      ``max_update_norm_ratio`` or central DP),
    - ``median``: 3 (with 2 senders the median is their mean, with 1 the sender's value),
    - ``trimmed_mean``: the smallest n >= 3 with ``floor(trim_fraction · n) >= 1`` (at least one value
      cut at each end: 5 for the default 0.2, 3 for 0.34+); ``trim_fraction`` 0 cuts nothing — a plain
      mean, 1 like ``mean``.
    """
    if aggregation == "median":
        return 3
    if aggregation == "trimmed_mean" and trim_fraction > 0:
        n = 3
        while int(trim_fraction * n) < 1:
            n += 1
        return n
    return 1


def _trimmed_mean(stack: np.ndarray, trim_fraction: float) -> np.ndarray:
    """Coordinate-wise mean over axis 0 after cutting ``int(trim_fraction * n)`` values at each end."""
    n = stack.shape[0]
    cut = int(trim_fraction * n)
    if cut == 0:
        return stack.mean(axis=0)
    ordered = np.sort(stack, axis=0)
    return ordered[cut : n - cut].mean(axis=0)


def _cast_like(value: np.ndarray, reference: np.ndarray) -> np.ndarray:
    if np.issubdtype(reference.dtype, np.integer) or reference.dtype == np.bool_:
        value = np.rint(value)
    return np.ascontiguousarray(value.astype(reference.dtype, copy=False).reshape(reference.shape))


def copy_array(array: Array) -> Array:
    """A new Array sharing the (immutable) bytes: bit-identical, independent of the source record."""
    return Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype, data=array.data)


def copy_record(record: ArrayRecord) -> ArrayRecord:
    out = ArrayRecord()
    for key, array in record.items():
        out[key] = copy_array(array)
    return out


def merge_updates(
    global_record: ArrayRecord,
    updates: Sequence[ValidUpdate],
    *,
    aggregation: Aggregation = "mean",
    trim_fraction: float = 0.2,
    max_num_examples: float | None = None,
    global_arrays: dict[str, np.ndarray] | None = None,
    min_senders: int = 1,
) -> tuple[ArrayRecord, list[str]]:
    """Aggregate each key over the updates that carry it and merge into a copy of ``global_record``.

    ``mean`` weights client i by ``min(num_examples_i, max_num_examples)``; ``median`` and
    ``trimmed_mean`` are coordinate-wise and unweighted (like flwr's FedMedian/FedTrimmedAvg), over
    the clients that sent the key. A key sent by fewer than ``min_senders`` updates is kept as it is.
    Arithmetic is float64, cast back to the global dtype (integers rounded). Returns the new record
    (global key order) and the keys that were aggregated.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if global_arrays is None:
        global_arrays = decode_arrays(global_record)
    merged = ArrayRecord()
    updated: list[str] = []
    for key, array in global_record.items():
        senders = [u for u in updates if key in u.arrays]
        if not senders or len(senders) < min_senders:
            merged[key] = copy_array(array)
            continue
        stack = np.stack([u.arrays[key].astype(np.float64) for u in senders])
        if aggregation == "mean":
            weights = np.array(
                [
                    u.num_examples if max_num_examples is None else min(u.num_examples, max_num_examples)
                    for u in senders
                ],
                dtype=np.float64,
            )
            value = np.tensordot(weights / weights.sum(), stack, axes=1)
        elif aggregation == "median":
            value = np.median(stack, axis=0)
        else:
            value = _trimmed_mean(stack, trim_fraction)
        merged[key] = Array(_cast_like(np.asarray(value), global_arrays[key]))
        updated.append(key)
    return merged, updated


def server_step(
    global_arrays: dict[str, np.ndarray], merged: ArrayRecord, keys: Sequence[str], server_lr: float
) -> ArrayRecord:
    """``global + server_lr·(merged − global)`` for ``keys`` (float64 arithmetic, cast back to the global
    dtype); every other key of ``merged`` is kept as it is. Applied after clipping and noise, so with
    central DP it is post-processing and costs no privacy."""
    out = ArrayRecord()
    todo = set(keys)
    for key, array in merged.items():
        if key not in todo:
            out[key] = copy_array(array)
            continue
        g = global_arrays[key].astype(np.float64)
        value = g + server_lr * (array.numpy().astype(np.float64) - g)
        out[key] = Array(_cast_like(value, global_arrays[key]))
    return out


def aggregate_metrics(
    entries: Sequence[tuple[float, dict[str, Any]]],
    *,
    weighted_by_key: str = "num-examples",
) -> MetricRecord:
    """Weighted mean of numeric metrics, each key over the clients that reported it.

    ``entries`` are (weight, metrics). Non-finite values are skipped; list metrics are averaged
    element-wise over the clients whose list has the most common length. The weighting key itself is
    not averaged (it is summed by the caller when wanted).
    """
    sums: dict[str, Any] = {}
    totals: dict[str, float] = {}
    lengths: dict[str, dict[int, int]] = {}
    for _, metrics in entries:
        for key, value in metrics.items():
            if isinstance(value, list):
                counts = lengths.setdefault(key, {})
                counts[len(value)] = counts.get(len(value), 0) + 1
    for weight, metrics in entries:
        for key, value in metrics.items():
            if key == weighted_by_key:
                continue
            if isinstance(value, list):
                counts = lengths[key]
                if not value or len(value) != max(counts, key=lambda n: (counts[n], n)):
                    continue
                vec = np.asarray(value, dtype=np.float64)
                if not np.all(np.isfinite(vec)):
                    continue
                sums[key] = sums.get(key, 0.0) + weight * vec
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if not math.isfinite(value):
                    continue
                sums[key] = sums.get(key, 0.0) + weight * float(value)
            totals[key] = totals.get(key, 0.0) + weight
    out = MetricRecord()
    for key, total in sums.items():
        mean = total / totals[key]
        out[key] = [float(v) for v in mean] if isinstance(mean, np.ndarray) else float(mean)
    return out
