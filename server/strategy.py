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
from collections.abc import Iterable, Sequence
from logging import INFO, WARNING
from typing import Literal

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from .aggregation import (
    AGGREGATIONS,
    DEFAULT_MAX_WEIGHT_RATIO,
    Aggregation,
    MetricsAggrFn,
    aggregate_metrics,
    copy_array,
    copy_record,
    merge_updates,
    min_senders,
    server_step,
    weight_cap,
)
from .central_dp import CentralDP
from .node_wait import NotEnoughDevices, wait_for_nodes
from .round_report import ClientReport, RoundReport
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
    "NotEnoughDevices",
    "PartialFedAvg",
    "RoundReport",
    "aggregate_metrics",
    "merge_updates",
    "min_senders",
    "server_step",
    "wait_for_nodes",
    "weight_cap",
]


def check_options(
    aggregation: str,
    trim_fraction: float,
    max_update_norm: float | None,
    max_num_examples: float | None,
    max_update_norm_ratio: float | None,
    max_weight_ratio: float | None,
    teacher: str,
    server_lr: float,
    central_dp: CentralDP | None,
) -> None:
    """Refuse :class:`PartialFedAvg` options that do not fit (ValueError naming the option)."""
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
        check_options(aggregation, trim_fraction, max_update_norm, max_num_examples, max_update_norm_ratio,
                      max_weight_ratio, teacher, server_lr, central_dp)  # fmt: skip
        super().__init__(
            fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes, min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes, weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key, configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn, evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )  # fmt: skip
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
        self._current_record = copy_record(arrays)
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
        updates, rejections = self._validated(replies)
        cap = weight_cap([u.num_examples for u in updates], self.max_weight_ratio, self.max_num_examples)
        report = RoundReport(server_round=server_round, kind="train", rejections=rejections, weight_cap=cap)
        report.clients = [
            ClientReport(node_id=u.node_id, num_examples=u.num_examples, metrics=u.metrics,
                         keys=sorted(u.arrays), update_norm=u.update_norm)
            for u in updates
        ]  # fmt: skip
        self.train_reports[server_round] = report
        _log_replies("aggregate_train", server_round, len(replies), len(updates), rejections)

        needed = max(self.min_train_nodes, 1)
        if len(updates) < needed:
            report.note = (
                f"{len(updates)} valid replies < {needed} required: global record left unchanged this round"
            )
            log(WARNING, "aggregate_train: round %s: %s", server_round, report.note)
            return copy_record(self._current_record), None

        if self.central_dp is not None:
            merged, updated = self._noised_merge(updates, report, server_round)
        else:
            merged, updated = self._robust_merge(updates, report, cap)
        if self.server_lr != 1.0:
            merged = server_step(self._current_arrays, merged, updated, self.server_lr)
        report.aggregated = bool(updated)
        report.updated_keys = updated
        untouched = len(self._current_record) - len(updated)
        log(INFO, "\t└──> %s: updated %s keys, %s untouched", self.aggregation, len(updated), untouched)

        return merged, self._train_metrics(updates, len(rejections), cap)

    def _validated(self, replies: list[Message]) -> tuple[list[ValidUpdate], list[Rejection]]:
        """The round's valid updates and the rejections (every check, then the norm-outlier rule)."""
        assert self._current_arrays is not None
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
        return updates, rejections

    def _noised_merge(
        self, updates: list[ValidUpdate], report: RoundReport, server_round: int
    ) -> tuple[ArrayRecord, list[str]]:
        """Central DP: the noised mean of clipped changes per head, merged into the current record."""
        assert self.central_dp is not None
        assert self._current_record is not None and self._current_arrays is not None
        noised, report.central_dp = self.central_dp.aggregate(
            self._current_arrays, updates, server_round=server_round
        )
        merged = ArrayRecord()
        for key, array in self._current_record.items():
            merged[key] = Array(noised[key]) if key in noised else copy_array(array)
        updated = [k for k in self._current_record if k in noised]
        epsilon = report.central_dp["epsilon"]
        log(INFO, "\t├──> central DP: ε = %.3f (δ = %g)", epsilon, self.central_dp.delta)
        return merged, updated

    def _robust_merge(
        self, updates: list[ValidUpdate], report: RoundReport, cap: float | None
    ) -> tuple[ArrayRecord, list[str]]:
        """The configured rule per key; heads with fewer senders than it needs are held back."""
        assert self._current_record is not None
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
        return merged, updated

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
        _log_replies("aggregate_evaluate", server_round, len(replies), len(valid), rejections)
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


def _log_replies(what: str, server_round: int, replies: int, valid: int, rejections: list[Rejection]) -> None:
    log(INFO, "%s: round %s, %s replies: %s valid, %s rejected", what, server_round, replies, valid,
        len(rejections))  # fmt: skip
    for rejection in rejections:
        log(WARNING, "\t> rejected reply from node %s: %s", rejection.node_id, rejection.reason)
