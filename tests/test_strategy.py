"""PartialFedAvg: partial per-key averaging, validation and robust aggregation (real Flower records).

Replies are built the way a ClientApp builds them in flwr 1.42: ``Message(content, reply_to=instruction)``
where ``instruction`` is one of the Messages the strategy's ``configure_train`` produced. The only
stand-in is a loopback ``Grid`` (Flower's abstract class) that lists node ids and, for ``start``, hands
each message to a plain reply function.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedsd.server.strategy import PartialFedAvg, aggregate_metrics
from fedsd.server.validation import Rejection, ValidUpdate, validate_train_reply

SHAPES = {
    "heads.3.fc.weight": (4, 3),
    "heads.3.fc.bias": (3,),
    "heads.6.fc.weight": (4, 3),
    "heads.6.fc.bias": (3,),
    "heads.12.fc.weight": (4, 3),
    "heads.12.fc.bias": (3,),
}
EXIT3 = [k for k in SHAPES if k.startswith("heads.3.")]
EXIT6 = EXIT3 + [k for k in SHAPES if k.startswith("heads.6.")]
TEACHER = [k for k in SHAPES if k.startswith("heads.12.")]


@pytest.fixture(autouse=True)
def server_task_identity():
    """flwr 1.42 stamps instruction Messages with the process's TaskIdentity (run, node, task ids).

    The ServerApp runtime sets it (flwr/superlink/runtime/run_serverapp.py); a bare test process must.
    """
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class LoopbackGrid(Grid):
    """Flower's Grid interface over a fixed node list; messages go to ``reply_fn`` in-process."""

    def __init__(self, node_ids: Iterable[int], reply_fn: Callable[[Message], Message] | None = None):
        self.node_ids = list(node_ids)
        self.reply_fn = reply_fn
        self._run = None
        self._pending: dict[str, Message] = {}

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self):
        return list(self.node_ids)

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            key = f"{len(self._pending)}-{i}"
            self._pending[key] = self.reply_fn(msg)
            ids.append(key)
        return ids

    def pull_messages(self, message_ids):
        return [self._pending.pop(i) for i in message_ids if i in self._pending]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def make_global(seed: int = 0) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord({k: Array(rng.normal(size=s).astype(np.float32)) for k, s in SHAPES.items()})


def np_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def reply(instruction: Message, arrays: dict[str, np.ndarray], num_examples, **metrics) -> Message:
    """What a ClientApp's @app.train() returns: arrays + metrics, as a reply to the instruction."""
    if num_examples is not None:
        metrics["num-examples"] = num_examples
    metric_record = MetricRecord(metrics)
    content = RecordDict(
        {"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "metrics": metric_record}
    )
    return Message(content=content, reply_to=instruction)


def trained(global_np: dict[str, np.ndarray], keys: list[str], seed: int, scale: float = 0.1):
    rng = np.random.default_rng(seed)
    return {k: (global_np[k] + scale * rng.normal(size=global_np[k].shape)).astype(np.float32) for k in keys}


def instructions(strategy: PartialFedAvg, server_round: int, record: ArrayRecord, nodes: list[int]):
    msgs = strategy.configure_train(server_round, record, ConfigRecord({"lr": 0.01}), LoopbackGrid(nodes))
    return {m.metadata.dst_node_id: m for m in msgs}


def weighted_mean(updates: list[tuple[dict[str, np.ndarray], float]], key: str) -> np.ndarray:
    pairs = [(arrays[key].astype(np.float64), n) for arrays, n in updates if key in arrays]
    total = sum(n for _, n in pairs)
    return sum(a * n for a, n in pairs) / total


def assert_bit_identical(a: Array, b: Array) -> None:
    assert (a.dtype, tuple(a.shape), a.stype, a.data) == (b.dtype, tuple(b.shape), b.stype, b.data)


# --------------------------------------------------------------------------------------------- partial mean


def test_two_rounds_partial_weighted_average():
    strategy = PartialFedAvg(min_train_nodes=2, min_available_nodes=3, fraction_evaluate=0.0)
    record = make_global()
    # node -> (keys it trains, num-examples)
    plan = {11: (EXIT3, 10), 12: (EXIT6, 30), 13: (EXIT6, 5)}
    for server_round in (1, 2):
        before = np_arrays(record)
        sent = instructions(strategy, server_round, record, list(plan))
        assert sent[11].content["config"]["server-round"] == server_round
        updates, replies = [], []
        for node, (keys, n) in plan.items():
            arrays = trained(before, keys, seed=100 * server_round + node)
            metrics = {"loss": 1.0 / node}
            if "heads.6.fc.weight" in keys:
                metrics["uar-exit6"] = node / 100
            updates.append((arrays, n))
            replies.append(reply(sent[node], arrays, n, **metrics))
        new, metrics = strategy.aggregate_train(server_round, replies)

        assert list(new.keys()) == list(SHAPES)
        for key in TEACHER:  # nobody trained the teacher head: bit-identical
            assert_bit_identical(new[key], record[key])
        for key in EXIT6:
            expected = weighted_mean(updates, key).astype(np.float32)
            got = new[key].numpy()
            assert got.dtype == np.float32 and got.shape == SHAPES[key]
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
        # heads.6 averaged over nodes 12 and 13 only; node 11 did not send it
        np.testing.assert_allclose(
            new["heads.6.fc.bias"].numpy(),
            (
                updates[1][0]["heads.6.fc.bias"].astype(np.float64) * 30
                + updates[2][0]["heads.6.fc.bias"].astype(np.float64) * 5
            )
            / 35,
            rtol=1e-6,
        )
        assert metrics["loss"] == pytest.approx((10 / 11 + 30 / 12 + 5 / 13) / 45)
        assert metrics["uar-exit6"] == pytest.approx((30 * 0.12 + 5 * 0.13) / 35)
        assert metrics["num-examples"] == 45 and metrics["num-clients"] == 3 and metrics["num-rejected"] == 0
        report = strategy.last_train_report
        assert report.server_round == server_round and report.aggregated and not report.rejections
        assert sorted(report.updated_keys) == sorted(EXIT6)
        assert {c.node_id: c.keys for c in report.clients}[11] == sorted(EXIT3)
        record = new


def test_aggregate_train_requires_configure_train():
    with pytest.raises(RuntimeError, match="configure_train"):
        PartialFedAvg().aggregate_train(1, [])


# --------------------------------------------------------------------------------------------- validation

BAD = {
    21: "non-finite",
    22: "shape",
    23: "unknown keys",
    24: "norm",
    25: "dtype",
    26: "must be positive",
    27: "missing 'num-examples'",
    28: "must be positive",
    29: "error reply",
    30: "not a number",
    31: "empty ArrayRecord",
}


def bad_replies(sent: dict[int, Message], g: dict[str, np.ndarray]) -> dict[int, Message]:
    ok = trained(g, EXIT3, seed=7)
    nan = dict(ok)
    nan["heads.3.fc.bias"] = np.array([0.0, np.nan, 1.0], dtype=np.float32)
    shape = dict(ok)
    shape["heads.3.fc.weight"] = np.zeros((3, 4), dtype=np.float32)
    extra = {**ok, "heads.99.fc.weight": np.zeros((4, 3), dtype=np.float32)}
    big = {k: v + 10.0 for k, v in ok.items()}  # ||Δ|| = 10 * sqrt(15) ≈ 38.7
    dtype = {k: v.astype(np.float64) for k, v in ok.items()}
    return {
        21: reply(sent[21], nan, 10),
        22: reply(sent[22], shape, 10),
        23: reply(sent[23], extra, 10),
        24: reply(sent[24], big, 10),
        25: reply(sent[25], dtype, 10),
        26: reply(sent[26], ok, 0),
        27: reply(sent[27], ok, None, loss=0.5),
        28: reply(sent[28], ok, -3),
        29: Message(Error(code=0, reason="ClientApp raised ValueError"), reply_to=sent[29]),
        30: reply(sent[30], ok, [1, 2]),
        31: reply(sent[31], {}, 10),
    }


def test_invalid_replies_rejected_and_aggregate_unaffected(caplog):
    record = make_global(1)
    g = np_arrays(record)
    good_nodes = [11, 12, 13]
    nodes = good_nodes + list(BAD)
    noisy = PartialFedAvg(min_train_nodes=2, min_available_nodes=len(nodes), max_update_norm=5.0)
    sent = instructions(noisy, 1, record, nodes)
    good = {
        11: reply(sent[11], trained(g, EXIT3, 1), 10, loss=1.0),
        12: reply(sent[12], trained(g, EXIT6, 2), 20, loss=2.0),
        13: reply(sent[13], trained(g, EXIT6, 3), 40, loss=3.0),
    }
    bad = bad_replies(sent, g)
    mixed = [
        bad[21],
        good[11],
        bad[22],
        bad[23],
        good[12],
        bad[24],
        bad[25],
        bad[26],
        bad[27],
        bad[28],
        bad[29],
        good[13],
        bad[30],
        bad[31],
    ]
    # a node replying twice: the second reply is rejected
    mixed.append(reply(sent[12], trained(g, EXIT6, 99), 20, loss=9.0))

    with caplog.at_level(logging.WARNING, logger="flwr"):
        noisy_arrays, noisy_metrics = noisy.aggregate_train(1, mixed)

    clean = PartialFedAvg(min_train_nodes=2, min_available_nodes=3, max_update_norm=5.0)
    sent_clean = instructions(clean, 1, record, good_nodes)
    clean_arrays, clean_metrics = clean.aggregate_train(
        1, [Message(content=good[n].content, reply_to=sent_clean[n]) for n in good_nodes]
    )

    for key in SHAPES:
        assert_bit_identical(noisy_arrays[key], clean_arrays[key])
    assert noisy_metrics["loss"] == pytest.approx(clean_metrics["loss"])
    assert noisy_metrics["num-rejected"] == len(BAD) + 1

    rejections = noisy.last_train_report.rejections
    by_node: dict[int, list[str]] = {}
    for r in rejections:
        by_node.setdefault(r.node_id, []).append(r.reason)
    assert set(by_node) == set(BAD) | {12}
    for node, needle in BAD.items():
        assert needle in by_node[node][0], (node, by_node[node])
    assert "duplicate" in by_node[12][0]
    assert {c.node_id for c in noisy.last_train_report.clients} == set(good_nodes)
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    for node in BAD:
        assert f"node {node}:" in logged
    json.dumps(noisy.last_train_report.to_dict())  # ready for metrics.jsonl


def test_validate_train_reply_is_a_pure_function():
    record = make_global(2)
    g = np_arrays(record)
    instruction = Message(RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN)
    big = reply(instruction, {k: v + 1.0 for k, v in g.items() if k in EXIT3}, 3)
    norm = float(np.sqrt(15))
    ok = validate_train_reply(big, record)  # norm check off by default
    assert isinstance(ok, ValidUpdate) and ok.node_id == 5 and ok.num_examples == 3.0
    assert ok.update_norm == pytest.approx(norm, rel=1e-6)
    assert set(ok.arrays) == set(EXIT3)
    rejected = validate_train_reply(big, g, max_update_norm=norm * 0.99)
    assert isinstance(rejected, Rejection) and rejected.node_id == 5 and "norm" in rejected.reason
    assert isinstance(validate_train_reply(big, g, max_update_norm=norm * 1.01), ValidUpdate)
    inf = reply(instruction, {"heads.3.fc.bias": np.array([np.inf, 0, 0], dtype=np.float32)}, 3)
    assert "non-finite" in validate_train_reply(inf, g).reason


def test_too_few_valid_replies_leave_the_record_unchanged():
    record = make_global(3)
    g = np_arrays(record)
    strategy = PartialFedAvg(min_train_nodes=3, min_available_nodes=3)
    sent = instructions(strategy, 1, record, [11, 12, 13])
    nan = trained(g, EXIT3, 3)
    nan["heads.3.fc.weight"][0, 0] = np.nan
    replies = [
        reply(sent[11], trained(g, EXIT3, 1), 10),
        reply(sent[12], trained(g, EXIT6, 2), 10),
        reply(sent[13], nan, 10),
    ]
    new, metrics = strategy.aggregate_train(1, replies)
    assert metrics is None
    for key in SHAPES:
        assert_bit_identical(new[key], record[key])
    report = strategy.last_train_report
    assert not report.aggregated and "unchanged" in report.note
    assert [r.node_id for r in report.rejections] == [13] and len(report.clients) == 2


# --------------------------------------------------------------------------------------------- robust options


def _robust_round(aggregation: str, **kwargs):
    record = make_global(4)
    g = np_arrays(record)
    nodes = [11, 12, 13, 14, 15]
    strategy = PartialFedAvg(min_train_nodes=2, min_available_nodes=5, aggregation=aggregation, **kwargs)
    sent = instructions(strategy, 1, record, nodes)
    updates = {}
    for i, node in enumerate(nodes):
        keys = EXIT6 if node in (12, 14, 15) else EXIT3
        arrays = trained(g, keys, seed=node, scale=1.0)
        if node == 15:  # an outlier on every key it sends
            arrays = {k: v + 50.0 for k, v in arrays.items()}
        updates[node] = (arrays, 10 * (i + 1))
    new, _ = strategy.aggregate_train(1, [reply(sent[n], a, w) for n, (a, w) in updates.items()])
    return record, updates, new


def test_median_matches_numpy():
    record, updates, new = _robust_round("median")
    for key in EXIT6:
        stack = np.stack([a[key] for a, _ in updates.values() if key in a]).astype(np.float64)
        np.testing.assert_allclose(new[key].numpy(), np.median(stack, axis=0).astype(np.float32), rtol=1e-6)
    for key in TEACHER:
        assert_bit_identical(new[key], record[key])


def test_trimmed_mean_matches_numpy():
    record, updates, new = _robust_round("trimmed_mean", trim_fraction=0.2)
    for key in EXIT3:
        stack = np.stack([a[key] for a, _ in updates.values() if key in a]).astype(np.float64)
        cut = int(0.2 * len(stack))  # 5 senders -> 1 each end
        expected = np.sort(stack, axis=0)[cut : len(stack) - cut].mean(axis=0)
        np.testing.assert_allclose(new[key].numpy(), expected.astype(np.float32), rtol=1e-6)
    for key in EXIT6[2:]:  # 3 senders cut nothing at 0.2 (a plain mean): not aggregated, issue 23
        assert_bit_identical(new[key], record[key])
    # the outlier (+50) is trimmed away on heads.3
    assert np.abs(new["heads.3.fc.weight"].numpy() - record["heads.3.fc.weight"].numpy()).max() < 5


def test_max_num_examples_caps_the_weight():
    record, updates, new = _robust_round("mean", max_num_examples=25)
    capped = [(a, min(n, 25)) for a, n in updates.values()]
    for key in EXIT6:
        np.testing.assert_allclose(new[key].numpy(), weighted_mean(capped, key).astype(np.float32), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [{"aggregation": "mode"}, {"trim_fraction": 0.5}, {"max_update_norm": 0.0}, {"max_num_examples": -1}],
)
def test_bad_options_raise(kwargs):
    with pytest.raises(ValueError):
        PartialFedAvg(**kwargs)


def test_aggregate_metrics_per_key():
    out = aggregate_metrics(
        [
            (1.0, {"a": 1.0, "v": [1.0, 2.0], "num-examples": 1}),
            (3.0, {"a": 3.0, "b": 5, "v": [3.0, 4.0]}),
            (2.0, {"a": float("nan"), "b": 2}),
        ]
    )
    assert out["a"] == pytest.approx((1 + 9) / 4)
    assert out["b"] == pytest.approx((15 + 4) / 5)
    assert out["v"] == pytest.approx([2.5, 3.5])
    assert "num-examples" not in out


# --------------------------------------------------------------------------------------------- Strategy.start


def test_start_runs_rounds_with_heterogeneous_clients():
    exits = {1: EXIT3, 2: EXIT6, 3: EXIT6}
    initial = make_global(5)

    def client(msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        current = np_arrays(msg.content["arrays"])
        rnd = int(msg.content["config"]["server-round"])
        if msg.metadata.message_type == MessageType.TRAIN:
            arrays = trained(current, exits[node], seed=10 * rnd + node)
            return reply(msg, arrays, 10 * node, loss=float(node))
        metrics = {"uar-exit3": 0.5}
        if node > 1:
            metrics["uar-exit6"] = 0.6 + node / 100
        return reply(msg, {}, 5, **metrics)

    strategy = PartialFedAvg(min_train_nodes=3, min_evaluate_nodes=3, min_available_nodes=3)
    result = strategy.start(LoopbackGrid(exits, client), initial, num_rounds=2, timeout=10)

    assert list(result.arrays.keys()) == list(SHAPES)
    for key in TEACHER:
        assert_bit_identical(result.arrays[key], initial[key])
    changed = result.arrays["heads.6.fc.weight"].numpy()
    assert not np.array_equal(changed, initial["heads.6.fc.weight"].numpy())
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert result.train_metrics_clientapp[2]["loss"] == pytest.approx((10 + 40 + 90) / 60)
    assert result.evaluate_metrics_clientapp[2]["uar-exit6"] == pytest.approx(0.625)
    assert result.evaluate_metrics_clientapp[2]["uar-exit3"] == pytest.approx(0.5)
    assert sorted(strategy.train_reports) == [1, 2] and strategy.last_evaluate_report.aggregated
    json.dumps([r.to_dict() for r in strategy.train_reports.values()])


def test_non_finite_missing_or_inflated_metrics_reject_the_reply():
    record = make_global(3)
    g = np_arrays(record)
    instruction = Message(RecordDict(), dst_node_id=7, message_type=MessageType.TRAIN)
    arrays = {k: v + 0.1 for k, v in g.items() if k in EXIT3}
    assert isinstance(validate_train_reply(reply(instruction, arrays, 5, loss=0.3), g), ValidUpdate)
    nan = validate_train_reply(reply(instruction, arrays, 5, loss=float("nan")), g)
    assert isinstance(nan, Rejection) and "metric 'loss' is not finite" in nan.reason
    listed = validate_train_reply(reply(instruction, arrays, 5, curve=[0.1, float("inf")]), g)
    assert isinstance(listed, Rejection) and "metric 'curve' is not finite" in listed.reason
    missing = validate_train_reply(reply(instruction, arrays, 5), g, required_metrics=("dp-epsilon",))
    assert isinstance(missing, Rejection) and "missing metric(s) dp-epsilon" in missing.reason
    inflated = validate_train_reply(reply(instruction, arrays, 50), g, declared_examples={7: 40.0})
    assert isinstance(inflated, Rejection) and "exceeds the 40 utterances" in inflated.reason
    assert isinstance(
        validate_train_reply(reply(instruction, arrays, 40), g, declared_examples={7: 40.0}), ValidUpdate
    )
    stranger = validate_train_reply(reply(instruction, arrays, 5), g, declared_examples={8: 40.0})
    assert isinstance(stranger, Rejection) and "did not join through the handshake" in stranger.reason


def test_norm_ratio_rejects_the_outlier_per_head_and_keeps_the_rest():
    from fedsd.server.validation import reject_norm_outliers

    g = {"heads.1.w": np.zeros(4), "heads.2.w": np.zeros(4)}
    ups = [ValidUpdate(node_id=i, arrays={"heads.1.w": np.full(4, 0.1 * (1 + i / 10))}, num_examples=1.0)
           for i in range(4)]  # fmt: skip
    ups.append(ValidUpdate(node_id=9, arrays={"heads.1.w": np.full(4, 10.0)}, num_examples=1.0))
    ups.append(ValidUpdate(node_id=10, arrays={"heads.2.w": np.full(4, 99.0)}, num_examples=1.0))
    kept, rejected = reject_norm_outliers(ups, g, ratio=5.0)
    assert [u.node_id for u in kept] == [0, 1, 2, 3, 10]  # head 2 has one sender: not judged
    assert [r.node_id for r in rejected] == [9] and "exit 1 head" in rejected[0].reason


# --------------------------------------------------------------------------------------------- server learning rate


@pytest.mark.parametrize("aggregation", ["mean", "median"])
def test_server_learning_rate_moves_the_global_part_of_the_way(aggregation):
    """η = 0.5: every aggregated key lands half way between the old global and what η = 1 gives; keys no
    device sent stay bit-identical; η = 1 is plain FedAvg."""
    record, _, full = _robust_round(aggregation)
    _, _, half = _robust_round(aggregation, server_lr=0.5)
    g = np_arrays(record)
    moved = 0
    for key in SHAPES:
        if key in EXIT3 or key in EXIT6:
            expected = g[key].astype(np.float64) + 0.5 * (full[key].numpy().astype(np.float64) - g[key])
            np.testing.assert_allclose(half[key].numpy(), expected, rtol=1e-6, atol=1e-7, err_msg=key)
            moved += not np.array_equal(half[key].numpy(), full[key].numpy())
        else:
            assert_bit_identical(half[key], record[key])
    assert moved  # the step really is smaller than plain aggregation's


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_server_learning_rate_must_be_positive_and_finite(bad):
    with pytest.raises(ValueError, match="server_lr"):
        PartialFedAvg(server_lr=bad)
