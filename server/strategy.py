"""Partial federated averaging of exit heads (DepthFL-style), with validation and robust options.

The global ``ArrayRecord`` holds exit-head weights only (``heads.<exit>.<param>``). A device deployed at
exit K trains heads ≤ K, so replies carry different key sets. :class:`PartialFedAvg` averages every key
over the clients that sent it and merges the result into the *current* global record: keys nobody
trained this round stay bit-identical.

How the current global record is known: ``Strategy.start`` (flwr 1.42) hands the current global
``ArrayRecord`` to ``configure_train(server_round, arrays, config, grid)`` every round and keeps it
unchanged when ``aggregate_train`` returns ``None`` for the arrays. ``PartialFedAvg.configure_train``
keeps a private copy of it (the same hook flwr's own ``FedOpt``/``FedAvgM`` use), so the merge never
depends on what the transport or an in-process ClientApp does to the record it was sent.

Per round, ``train_reports[server_round]`` (and ``last_train_report``) keep the accepted clients with
their metrics, the rejections and whether the global record changed; ``RoundReport.to_dict()`` is
JSON-ready for the server's metrics.jsonl. Evaluate rounds get the same in ``evaluate_reports``.

A device's weight (``num-examples``) is self-reported, so it is capped by default: no accepted reply
weighs more than ``DEFAULT_MAX_WEIGHT_RATIO`` (3) × the round's median weight (the lower median of the
accepted replies), on top of ``max_num_examples`` when that is set; federated-evaluation weights get
the same cap. One device declaring 10**9 utterances then gets at most 3 honest devices' worth of weight
instead of ~100 % (with two senders, 3/4 at most; a lone sender is the average anyway).

A robust rule only protects a head that enough devices sent (:func:`min_senders`): the median needs 3
senders (with 2 it is their mean, with 1 the sender's value), the trimmed mean needs enough senders that
at least one value is cut at each end (``floor(trim_fraction · n) >= 1``, and n >= 3). A head sent by
fewer is not aggregated that round (kept bit-identical, named in the report's ``held_back``): under
``median``/``trimmed_mean`` one device must never set a head alone.

Which heads a device may send: those of exits the model has, up to the exit it declared at the
handshake (-1 stands for the exit it then runs, see ``validation.resolve_exit``), and never the
teacher's head when the round's train config says ``teacher=deep`` (the devices' default).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, Literal

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from .central_dp import CentralDP
from .validation import (
    Rejection,
    ValidMetrics,
    ValidUpdate,
    decode_arrays,
    reject_norm_outliers,
    validate_evaluate_reply,
    validate_train_replies,
)

__all__ = [
    "AGGREGATIONS",
    "DEFAULT_MAX_WEIGHT_RATIO",
    "ClientReport",
    "PartialFedAvg",
    "RoundReport",
    "aggregate_metrics",
    "merge_updates",
    "min_senders",
    "weight_cap",
]

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


@dataclass
class ClientReport:
    """One accepted reply, as written to metrics.jsonl."""

    node_id: int
    num_examples: float
    metrics: dict[str, Any]
    keys: list[str] = field(default_factory=list)
    """Keys the client trained (train rounds only)."""
    update_norm: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "node_id": self.node_id,
            "num_examples": self.num_examples,
            "metrics": dict(self.metrics),
        }
        if self.keys:
            out["keys"] = list(self.keys)
        if self.update_norm is not None:
            out["update_norm"] = self.update_norm
        return out


@dataclass
class RoundReport:
    """What happened to one round's replies."""

    server_round: int
    kind: Literal["train", "evaluate"]
    clients: list[ClientReport] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    aggregated: bool = False
    """Train: whether the global record was updated. Evaluate: whether metrics were aggregated."""
    updated_keys: list[str] = field(default_factory=list)
    weight_cap: float | None = None
    """The largest weight one reply had this round (see :func:`weight_cap`); None: no cap."""
    note: str | None = None
    """Why nothing was aggregated, when that happened."""
    central_dp: dict[str, Any] | None = None
    """Clipping, noise and ε of the server's client-level DP this round (when on)."""
    held_back: dict[str, int] = field(default_factory=dict)
    """Exit → senders, for heads a robust rule did not aggregate (fewer than :func:`min_senders`)."""

    def to_dict(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"central_dp": self.central_dp} if self.central_dp is not None else {}
        if self.held_back:
            extra["held_back"] = dict(self.held_back)
        if self.weight_cap is not None:
            extra["weight_cap"] = self.weight_cap
        return extra | {
            "round": self.server_round,
            "kind": self.kind,
            "aggregated": self.aggregated,
            "num_clients": len(self.clients),
            "num_rejected": len(self.rejections),
            "clients": [c.to_dict() for c in self.clients],
            "rejections": [r.to_dict() for r in self.rejections],
            "updated_keys": list(self.updated_keys),
            "note": self.note,
        }


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


def _copy_array(array: Array) -> Array:
    """A new Array sharing the (immutable) bytes: bit-identical, independent of the source record."""
    return Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype, data=array.data)


def _copy_record(record: ArrayRecord) -> ArrayRecord:
    out = ArrayRecord()
    for key, array in record.items():
        out[key] = _copy_array(array)
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
            merged[key] = _copy_array(array)
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
            out[key] = _copy_array(array)
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


class NotEnoughDevices(RuntimeError):
    """Fewer devices than needed stayed connected for the whole bounded wait (``node_wait_s``)."""


def wait_for_nodes(grid: Grid, needed: int, timeout_s: float | None, what: str = "the run") -> list[int]:
    """The connected node ids once at least ``needed`` are connected; :class:`NotEnoughDevices`
    after ``timeout_s`` seconds (None: wait forever, Flower's own behaviour)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    logged = -1
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= needed:
            return nodes
        if deadline is not None and time.monotonic() >= deadline:
            raise NotEnoughDevices(
                f"only {len(nodes)} device(s) connected after waiting {timeout_s:.0f} s for {what}; "
                f"{needed} are needed (min_clients). Start more devices (`fedsd client run ...`), lower "
                "--min-clients, or wait longer with --device-wait SECONDS"
            )
        if len(nodes) != logged:
            logged = len(nodes)
            log(INFO, "waiting for devices: %d connected, %d needed", len(nodes), needed)
        time.sleep(min(1.0, max(0.05, (timeout_s or 1.0) / 20)))


class PartialFedAvg(FedAvg):
    """FedAvg over partial, heterogeneous key sets (one exit head per key group).

    Parameters beyond :class:`flwr.serverapp.strategy.FedAvg`'s:

    aggregation : "mean" | "median" | "trimmed_mean"
        Per-key rule over the clients that sent the key (see :func:`merge_updates`).
    trim_fraction : float in [0, 0.5)
        Fraction cut at each end for ``trimmed_mean``.
    max_update_norm : float or None
        Reject a reply whose change (update − current global, over its keys) has a larger L2 norm.
    max_num_examples : float or None
        Cap on a client's weight in the mean (and in the weighted metrics).
    max_weight_ratio : float or None
        Cap on a client's weight as a multiple of the round's lower-median weight (default
        ``DEFAULT_MAX_WEIGHT_RATIO`` = 3, see :func:`weight_cap`); applies to the mean and to the
        weighted train and evaluate metrics. None switches it off.
    max_update_norm_ratio : float or None
        Reject a reply whose change of some exit head exceeds this multiple of the round's median
        change of that head (needs 3+ senders of the head).
    central_dp : CentralDP or None
        Client-level DP: clip each device's change per head and add Gaussian noise (mean only).
    required_metrics : sequence of str
        Metrics every train reply must carry (e.g. ``dp-epsilon`` when devices must train with DP).

    server_lr : float
        Server learning rate η (FedOpt's, without momentum): the new global of an aggregated key is
        ``global + η·(aggregate − global)``; 1 is plain FedAvg (and leaves every value bit-identical).

    node_wait_s : float or None
        Before each train and evaluate round, wait at most this long for ``min_available_nodes``
        devices, then raise :class:`NotEnoughDevices` (Flower's ``sample_nodes`` waits forever). The
        devices of the round are sampled from the node list that wait returned: nothing waits again.
    teacher : "deep" | "local"
        Used when the round's train config names no ``teacher`` (the devices' own default, ``deep``):
        with ``deep`` the deepest head only teaches and a reply carrying it is rejected.

    ``declared_examples`` (node id → utterances it declared when it joined) may be set before a
    round: a reply whose ``num-examples`` exceeds its declaration is rejected (train and evaluate).
    ``declared_exits`` (node id → exit it declared; -1: the server's choice, i.e. the train config's
    ``default-exit`` or else the deepest exit) likewise: the exit must be one of the model's, and a
    reply that carries a head above it is rejected. Under ``median``/``trimmed_mean`` a head with fewer
    than :func:`min_senders` senders is not aggregated. ``max_update_norm_ratio`` and ``central_dp`` exclude
    each other (a rejection that depends on other devices' updates breaks DP's sensitivity bound).

    A custom ``train_metrics_aggr_fn``/``evaluate_metrics_aggr_fn`` (flwr signature
    ``(list[RecordDict], str) -> MetricRecord``) receives the contents of the *valid* replies only;
    by default metrics are averaged per key with :func:`aggregate_metrics`, which tolerates clients
    reporting different metric keys (exit-specific metrics), unlike flwr's default.
    """

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: MetricsAggrFn | None = None,
        evaluate_metrics_aggr_fn: MetricsAggrFn | None = None,
        *,
        aggregation: Aggregation = "mean",
        trim_fraction: float = 0.2,
        max_update_norm: float | None = None,
        max_num_examples: float | None = None,
        max_update_norm_ratio: float | None = None,
        central_dp: CentralDP | None = None,
        required_metrics: Sequence[str] = (),
        max_weight_ratio: float | None = DEFAULT_MAX_WEIGHT_RATIO,
        node_wait_s: float | None = None,
        server_lr: float = 1.0,
        teacher: Literal["deep", "local"] = "deep",
    ) -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        if max_update_norm is not None and not max_update_norm > 0:
            raise ValueError(f"max_update_norm must be positive or None, got {max_update_norm}")
        if max_num_examples is not None and not max_num_examples > 0:
            raise ValueError(f"max_num_examples must be positive or None, got {max_num_examples}")
        if max_update_norm_ratio is not None and not max_update_norm_ratio > 1:
            raise ValueError(f"max_update_norm_ratio must be > 1 or None, got {max_update_norm_ratio}")
        if max_weight_ratio is not None and not max_weight_ratio >= 1:
            raise ValueError(f"max_weight_ratio must be >= 1 or None, got {max_weight_ratio}")
        if teacher not in ("deep", "local"):
            raise ValueError(f"teacher must be 'deep' or 'local', got {teacher!r}")
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"server_lr must be a positive finite number, got {server_lr}")
        if central_dp is not None and aggregation != "mean":
            raise ValueError("central_dp needs aggregation='mean' (it averages clipped updates)")
        if central_dp is not None and max_update_norm_ratio is not None:
            raise ValueError(
                "central_dp cannot be combined with max_update_norm_ratio: rejecting updates relative "
                "to the other devices' breaks the sensitivity bound of the DP mechanism"
            )
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self.aggregation: Aggregation = aggregation
        self.trim_fraction = trim_fraction
        self.max_update_norm = max_update_norm
        self.max_num_examples = max_num_examples
        self.max_weight_ratio = max_weight_ratio
        self.max_update_norm_ratio = max_update_norm_ratio
        self.central_dp = central_dp
        self.required_metrics = tuple(required_metrics)
        self.node_wait_s = node_wait_s
        self.server_lr = float(server_lr)
        self.declared_examples: dict[int, float] | None = None
        self.declared_exits: dict[int, int] | None = None
        self.teacher: Literal["deep", "local"] = teacher
        self._round_teacher: str = teacher
        self._default_exit: int | None = None
        self._custom_train_metrics_fn = train_metrics_aggr_fn
        self._custom_evaluate_metrics_fn = evaluate_metrics_aggr_fn
        self._current_record: ArrayRecord | None = None
        self._current_arrays: dict[str, np.ndarray] | None = None
        self.train_reports: dict[int, RoundReport] = {}
        self.evaluate_reports: dict[int, RoundReport] = {}

    # ------------------------------------------------------------------ state

    @property
    def current_arrays(self) -> ArrayRecord | None:
        """The global record the current round was configured with (None before the first round)."""
        return self._current_record

    @property
    def last_train_report(self) -> RoundReport | None:
        return self.train_reports[max(self.train_reports)] if self.train_reports else None

    @property
    def last_evaluate_report(self) -> RoundReport | None:
        return self.evaluate_reports[max(self.evaluate_reports)] if self.evaluate_reports else None

    def summary(self) -> None:
        log(INFO, "\t├──> PartialFedAvg settings:")
        log(
            INFO,
            "\t│\t├── aggregation: %s%s",
            self.aggregation,
            f" (trim_fraction={self.trim_fraction})" if self.aggregation == "trimmed_mean" else "",
        )
        log(INFO, "\t│\t├── max_update_norm: %s", self.max_update_norm)
        log(INFO, "\t│\t├── max_num_examples: %s", self.max_num_examples)
        log(INFO, "\t│\t├── max_weight_ratio: %s", self.max_weight_ratio)
        log(INFO, "\t│\t├── max_update_norm_ratio: %s", self.max_update_norm_ratio)
        log(INFO, "\t│\t└── central_dp: %s", self.central_dp)
        super().summary()

    # ------------------------------------------------------------------ train

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the current global record and what the devices are told (``teacher``,
        ``default-exit``), wait for enough devices (bounded by ``node_wait_s``), then sample this
        round's devices from the node list that wait returned (never a second, unbounded wait)."""
        self._current_record = _copy_record(arrays)
        self._current_arrays = decode_arrays(self._current_record)
        teacher = config.get("teacher", self.teacher)
        self._round_teacher = teacher if teacher in ("deep", "local") else self.teacher
        default_exit = config.get("default-exit")
        self._default_exit = (
            default_exit if isinstance(default_exit, int) and not isinstance(default_exit, bool) else None
        )
        if self.fraction_train == 0.0:
            return []
        needed = max(self.min_available_nodes, self.min_train_nodes)
        nodes = wait_for_nodes(grid, needed, self.node_wait_s, f"train round {server_round}")
        return self._messages(server_round, arrays, config, nodes, self.fraction_train,
                              self.min_train_nodes, MessageType.TRAIN)  # fmt: skip

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Like :meth:`configure_train`: a bounded wait, then a sample of the nodes it returned."""
        if self.fraction_evaluate == 0.0:
            return []
        needed = max(self.min_available_nodes, self.min_evaluate_nodes)
        nodes = wait_for_nodes(grid, needed, self.node_wait_s, f"evaluate round {server_round}")
        return self._messages(server_round, arrays, config, nodes, self.fraction_evaluate,
                              self.min_evaluate_nodes, MessageType.EVALUATE)  # fmt: skip

    def _messages(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        nodes: Sequence[int],
        fraction: float,
        min_nodes: int,
        message_type: str,
    ) -> Iterable[Message]:
        """FedAvg's sampling (``max(fraction · n, min_nodes)`` of them) over ``nodes``, the list the
        bounded wait returned: Flower's ``sample_nodes`` would ask the grid again and, should a device
        drop in between, wait forever for it."""
        size = min(len(nodes), max(int(len(nodes) * fraction), min_nodes))
        sampled = random.sample(list(nodes), size)
        log(INFO, "configure_%s: Sampled %s nodes (out of %s)", message_type, len(sampled), len(nodes))
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, sampled, message_type)

    def _teacher_exit(self) -> int | None:
        """The head no device may send this round: the deepest, when the devices were told teacher=deep."""
        if self._round_teacher != "deep" or self._current_arrays is None:
            return None
        exits = [int(k.split(".")[1]) for k in self._current_arrays if k.split(".")[:1] == ["heads"]
                 and k.split(".")[1].isdigit()]  # fmt: skip
        return max(exits, default=None)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate replies, then average each key over its senders into the current global record.

        Returns the merged record (every key of the current global, untrained keys bit-identical) and
        the aggregated train metrics. With fewer than ``min_train_nodes`` valid replies (or none), the
        record is returned unchanged and the metrics are ``None``.
        """
        if self._current_record is None or self._current_arrays is None:
            raise RuntimeError(
                "PartialFedAvg.aggregate_train needs the current global ArrayRecord: call "
                "configure_train for this round first (Strategy.start does)."
            )
        replies = list(replies)
        updates, rejections = validate_train_replies(
            replies,
            self._current_arrays,
            weighted_by_key=self.weighted_by_key,
            max_update_norm=self.max_update_norm,
            declared_examples=self.declared_examples,
            required_metrics=self.required_metrics,
            declared_exits=self.declared_exits,
            teacher_exit=self._teacher_exit(),
            default_exit=self._default_exit,
        )
        if self.max_update_norm_ratio is not None:
            updates, outliers = reject_norm_outliers(
                updates, self._current_arrays, self.max_update_norm_ratio
            )
            rejections = [*rejections, *outliers]
        cap = weight_cap([u.num_examples for u in updates], self.max_weight_ratio, self.max_num_examples)
        report = RoundReport(server_round=server_round, kind="train", rejections=rejections, weight_cap=cap)
        report.clients = [
            ClientReport(
                node_id=u.node_id,
                num_examples=u.num_examples,
                metrics=u.metrics,
                keys=sorted(u.arrays),
                update_norm=u.update_norm,
            )
            for u in updates
        ]
        self.train_reports[server_round] = report
        log(
            INFO,
            "aggregate_train: round %s, %s replies: %s valid, %s rejected",
            server_round,
            len(replies),
            len(updates),
            len(rejections),
        )
        for rejection in rejections:
            log(WARNING, "\t> rejected reply from node %s: %s", rejection.node_id, rejection.reason)

        needed = max(self.min_train_nodes, 1)
        if len(updates) < needed:
            report.note = (
                f"{len(updates)} valid replies < {needed} required: global record left unchanged this round"
            )
            log(WARNING, "aggregate_train: round %s: %s", server_round, report.note)
            return _copy_record(self._current_record), None

        if self.central_dp is not None:
            noised, report.central_dp = self.central_dp.aggregate(
                self._current_arrays, updates, server_round=server_round
            )
            merged = ArrayRecord()
            for key, array in self._current_record.items():
                merged[key] = Array(noised[key]) if key in noised else _copy_array(array)
            updated = [k for k in self._current_record if k in noised]
            log(
                INFO,
                "\t├──> central DP: ε = %.3f (δ = %g)",
                report.central_dp["epsilon"],
                self.central_dp.delta,
            )
        else:
            fewest = min_senders(self.aggregation, self.trim_fraction)
            report.held_back = self._held_back(updates, fewest)
            for exit_k, n in report.held_back.items():
                log(
                    WARNING,
                    "\t> exit %s head not aggregated: %s sender(s), %s needs %s",
                    exit_k, n, self.aggregation, fewest,
                )  # fmt: skip
            merged, updated = merge_updates(
                self._current_record,
                updates,
                aggregation=self.aggregation,
                trim_fraction=self.trim_fraction,
                max_num_examples=cap,
                global_arrays=self._current_arrays,
                min_senders=fewest,
            )
            if not updated:
                report.note = f"no head had the {fewest} senders {self.aggregation} needs: record unchanged"
        if self.server_lr != 1.0:
            merged = server_step(self._current_arrays, merged, updated, self.server_lr)
        report.aggregated = bool(updated)
        report.updated_keys = updated
        untouched = len(self._current_record) - len(updated)
        log(INFO, "\t└──> %s: updated %s keys, %s untouched", self.aggregation, len(updated), untouched)

        return merged, self._train_metrics(updates, len(rejections), cap)

    @staticmethod
    def _held_back(updates: Sequence[ValidUpdate], fewest: int) -> dict[str, int]:
        """Exit → senders, for heads sent by fewer than ``fewest`` updates (a robust rule skips them)."""
        senders: dict[str, int] = {}
        for u in updates:
            for exit_k in {k.split(".")[1] for k in u.arrays if k.count(".") >= 2}:
                senders[exit_k] = senders.get(exit_k, 0) + 1
        return {k: n for k, n in sorted(senders.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else -1)
                if n < fewest}  # fmt: skip

    @staticmethod
    def _weight(num_examples: float, cap: float | None) -> float:
        return num_examples if cap is None else min(num_examples, cap)

    def _train_metrics(self, updates: list[ValidUpdate], rejected: int, cap: float | None) -> MetricRecord:
        if self._custom_train_metrics_fn is not None:
            contents = [u.content for u in updates if u.content is not None]
            return self._custom_train_metrics_fn(contents, self.weighted_by_key)
        metrics = aggregate_metrics(
            [(self._weight(u.num_examples, cap), u.metrics) for u in updates],
            weighted_by_key=self.weighted_by_key,
        )
        return self._add_counts(metrics, [u.num_examples for u in updates], rejected)

    def _add_counts(self, metrics: MetricRecord, weights: list[float], rejected: int) -> MetricRecord:
        total = sum(weights)
        metrics[self.weighted_by_key] = int(total) if float(total).is_integer() else float(total)
        metrics["num-clients"] = len(weights)
        metrics["num-rejected"] = rejected
        return metrics

    # ------------------------------------------------------------------ evaluate

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Weighted mean of evaluation metrics per key; invalid replies are rejected and logged."""
        replies = list(replies)
        valid: list[ValidMetrics] = []
        rejections: list[Rejection] = []
        seen: set[int] = set()
        for reply in replies:
            node_id = int(reply.metadata.src_node_id)
            if node_id in seen:
                rejections.append(Rejection(node_id, "duplicate reply from the same node this round"))
                continue
            seen.add(node_id)
            result = validate_evaluate_reply(
                reply, weighted_by_key=self.weighted_by_key, declared_examples=self.declared_examples
            )
            (rejections if isinstance(result, Rejection) else valid).append(result)
        cap = weight_cap([v.num_examples for v in valid], self.max_weight_ratio, self.max_num_examples)
        report = RoundReport(
            server_round=server_round,
            kind="evaluate",
            rejections=rejections,
            weight_cap=cap if valid else None,
            clients=[
                ClientReport(node_id=v.node_id, num_examples=v.num_examples, metrics=v.metrics) for v in valid
            ],
        )
        self.evaluate_reports[server_round] = report
        log(
            INFO,
            "aggregate_evaluate: round %s, %s replies: %s valid, %s rejected",
            server_round,
            len(replies),
            len(valid),
            len(rejections),
        )
        for rejection in rejections:
            log(WARNING, "\t> rejected reply from node %s: %s", rejection.node_id, rejection.reason)
        if not valid:
            report.note = "no valid evaluate replies"
            return None
        report.aggregated = True
        if self._custom_evaluate_metrics_fn is not None:
            contents = [v.content for v in valid if v.content is not None]
            return self._custom_evaluate_metrics_fn(contents, self.weighted_by_key)
        metrics = aggregate_metrics(
            [(self._weight(v.num_examples, cap), v.metrics) for v in valid],
            weighted_by_key=self.weighted_by_key,
        )
        return self._add_counts(metrics, [v.num_examples for v in valid], len(rejections))
