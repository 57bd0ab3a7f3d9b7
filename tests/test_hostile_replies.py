"""A lying device must not crash the server's run or take it over (issue "Hostile servers, lying devices").

Deterministic tests for each hole, then property-based fuzzing (hypothesis, derandomized) of the
server's reply handling: malformed train, evaluate and handshake replies go straight into the real
validation, ``PartialFedAvg.aggregate_train``/``aggregate_evaluate`` (plain mean, median, trimmed
mean, norm-ratio outliers, central DP) and ``validate_info_reply``/``Federation._greet`` on in-memory
Flower Messages. Every malformed reply must be rejected without an exception escaping, and the
aggregate and the strategy's state must be exactly what the honest replies alone give.

Well-formed but hostile replies (issue 23) are fuzzed the same way: valid keys, shapes and dtypes,
finite but adversarial values (±3.4e38, 1e30, subnormals, ...), a plausible weight, and one thing the
server must refuse — a teacher head under ``teacher=deep``, a head above the declared exit (-1 included),
an exit the model does not have, or metrics over a cap.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fedsd.config import FederatedConfig
from fedsd.server.central_dp import CentralDP
from fedsd.server.strategy import DEFAULT_MAX_WEIGHT_RATIO, PartialFedAvg, weight_cap
from fedsd.server.validation import (
    MAX_METRIC_KEY_CHARS,
    MAX_METRIC_KEYS,
    MAX_METRIC_LIST_LEN,
    Rejection,
    validate_info_reply,
)

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
HONEST = {1: (EXIT6, 40), 2: (EXIT6, 60), 3: (EXIT3, 50), 4: (EXIT3, 30)}
"""node → (keys it trains, num-examples)."""
HOSTILE = 99
DECLARED_EXAMPLES = {1: 100.0, 2: 100.0, 3: 100.0, 4: 100.0, HOSTILE: 100.0}
DECLARED_EXITS = {1: 6, 2: 6, 3: 3, 4: 3, HOSTILE: 3}
FUZZ = settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)


@pytest.fixture(autouse=True, scope="module")
def quiet_flower():
    """The strategy logs every rejection; thousands of fuzzed rounds need no log lines."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


pytestmark = pytest.mark.usefixtures(
    "task_identity"
)  # Flower's task identity, as in a ClientApp/ServerApp process (conftest)


def make_global(seed: int = 0) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord({k: Array(rng.normal(size=s).astype(np.float32)) for k, s in SHAPES.items()})


GLOBAL = make_global()
GLOBAL_NP = {k: v.numpy() for k, v in GLOBAL.items()}


def instruction(node: int, kind: str = MessageType.TRAIN) -> Message:
    return Message(RecordDict(), dst_node_id=node, message_type=kind)


def trained(keys: list[str], seed: int, scale: float = 0.1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (GLOBAL_NP[k] + scale * rng.normal(size=SHAPES[k])).astype(np.float32) for k in keys}


def train_reply(node: int, arrays: dict[str, np.ndarray], metrics: dict[str, Any]) -> Message:
    content = RecordDict(
        {"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "metrics": MetricRecord(metrics)}
    )
    return Message(content, reply_to=instruction(node))


def honest_train_replies(dp: bool = False) -> list[Message]:
    out = []
    for node, (keys, n) in HONEST.items():
        metrics: dict[str, Any] = {"num-examples": n, "loss": 1.0 / node}
        if dp:
            metrics["dp-epsilon"] = 0.5 * node
        out.append(train_reply(node, trained(keys, seed=node), metrics))
    return out


def honest_evaluate_replies() -> list[Message]:
    return [
        Message(
            RecordDict({"metrics": MetricRecord({"num-examples": n, "exit3/uar": node / 10})}),
            reply_to=instruction(node, MessageType.EVALUATE),
        )
        for node, (_keys, n) in HONEST.items()
    ]


def make_strategy(
    aggregation: str = "mean",
    central: bool = False,
    ratio: float | None = None,
    required: tuple[str, ...] = (),
    declared: bool = True,
    teacher: str = "deep",
) -> PartialFedAvg:
    strategy = PartialFedAvg(
        min_train_nodes=2,
        min_evaluate_nodes=1,
        min_available_nodes=1,
        aggregation=aggregation,  # type: ignore[arg-type]
        trim_fraction=0.25,  # 4 honest senders of exit 3 → one cut at each end (min_senders 4)
        max_update_norm_ratio=ratio,
        central_dp=CentralDP(clip_norm=0.5, noise_multiplier=0.3, seed=1) if central else None,
        required_metrics=required,
    )
    if declared:
        strategy.declared_examples = dict(DECLARED_EXAMPLES)
        strategy.declared_exits = dict(DECLARED_EXITS)
    strategy.configure_train(1, GLOBAL, ConfigRecord({"teacher": teacher}), _NoGrid())
    return strategy


class _NoGrid:
    """configure_train samples nodes from the grid; these tests only need the record it remembers."""

    def get_node_ids(self) -> list[int]:
        return list(HONEST)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)


def as_np(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


# --------------------------------------------------------------------------------------------- B: partial heads


def test_partial_head_is_rejected_and_central_dp_round_survives() -> None:
    strategy = make_strategy(central=True)
    partial = train_reply(
        HOSTILE, {"heads.3.fc.bias": trained(EXIT3, 5)["heads.3.fc.bias"]}, {"num-examples": 10}
    )
    new, _metrics = strategy.aggregate_train(1, [*honest_train_replies(), partial])  # used to raise
    report = strategy.last_train_report
    assert report is not None and report.aggregated
    (rejection,) = report.rejections
    assert rejection.node_id == HOSTILE and "partial head" in rejection.reason
    assert "heads.3.fc.weight" in rejection.reason
    assert HOSTILE not in strategy.central_dp.compositions  # type: ignore[union-attr]
    assert set(as_np(new)) == set(SHAPES)


# --------------------------------------------------------------------------------------------- B: heads above the exit


def test_head_above_the_declared_exit_is_refused() -> None:
    strategy = make_strategy()
    hijack = trained(EXIT3, 5) | {k: np.full(SHAPES[k], 1e3, np.float32) for k in TEACHER}
    new, _ = strategy.aggregate_train(
        1, [*honest_train_replies(), train_reply(HOSTILE, hijack, {"num-examples": 10})]
    )
    (rejection,) = strategy.last_train_report.rejections  # type: ignore[union-attr]
    assert rejection.node_id == HOSTILE and "above the exit 3" in rejection.reason
    for key in TEACHER:  # nobody may set the teacher: bit-identical
        assert new[key].data == GLOBAL[key].data


def test_a_device_that_never_declared_an_exit_is_refused() -> None:
    strategy = make_strategy()
    strategy.declared_examples = dict(DECLARED_EXAMPLES) | {77: 100.0}
    stranger = train_reply(77, trained(EXIT3, 77), {"num-examples": 10})
    strategy.aggregate_train(1, [*honest_train_replies(), stranger])
    (rejection,) = strategy.last_train_report.rejections  # type: ignore[union-attr]
    assert rejection.node_id == 77 and "no declared exit" in rejection.reason


# --------------------------------------------------------------------------------------------- B: weight cap


def test_a_huge_declared_size_is_capped_by_default() -> None:
    strategy = make_strategy(declared=False)  # no handshake bound: the default cap is what remains
    liar_arrays = {k: np.full(SHAPES[k], 5.0, np.float32) for k in EXIT3}
    liar = train_reply(HOSTILE, liar_arrays, {"num-examples": 10**9, "loss": 100.0})
    new, metrics = strategy.aggregate_train(1, [*honest_train_replies(), liar])
    assert strategy.max_weight_ratio == DEFAULT_MAX_WEIGHT_RATIO == 3.0
    # weights 40, 60, 50, 30, 1e9 → lower median 50 → cap 150
    cap = weight_cap([40, 60, 50, 30, 1e9], DEFAULT_MAX_WEIGHT_RATIO)
    assert cap == 150.0 and strategy.last_train_report.weight_cap == 150.0  # type: ignore[union-attr]
    updates = [(trained(keys, node), float(n)) for node, (keys, n) in HONEST.items()]
    updates.append((liar_arrays, cap))
    for key in EXIT3:
        expected = sum(a[key].astype(np.float64) * w for a, w in updates) / sum(w for _, w in updates)
        np.testing.assert_allclose(new[key].numpy(), expected, rtol=1e-5)
    share = cap / (cap + 40 + 60 + 50 + 30)
    assert share < 0.5  # was ~100 % before the cap
    expected_loss = (sum(n / node for node, (_, n) in HONEST.items()) + cap * 100.0) / (180 + cap)
    assert metrics["loss"] == pytest.approx(expected_loss)


def test_weight_cap_can_be_switched_off_and_takes_the_lower_median() -> None:
    assert weight_cap([10, 10**9], 3.0) == 30.0  # two senders: the liar does not set the cap
    assert weight_cap([7], 3.0) == 21.0 and weight_cap([], 3.0) is None
    assert weight_cap([10, 20, 30], None) is None and weight_cap([10, 20, 30], 3.0, 25) == 25
    strategy = PartialFedAvg(max_weight_ratio=None, min_train_nodes=1)
    strategy.configure_train(1, GLOBAL, ConfigRecord(), _NoGrid())
    liar = train_reply(
        HOSTILE, {k: np.full(SHAPES[k], 5.0, np.float32) for k in EXIT3}, {"num-examples": 10**9}
    )
    new, _ = strategy.aggregate_train(1, [*honest_train_replies(), liar])
    np.testing.assert_allclose(new["heads.3.fc.bias"].numpy(), 5.0, rtol=1e-6)  # uncapped: the liar wins
    with pytest.raises(ValueError, match="max_weight_ratio"):
        PartialFedAvg(max_weight_ratio=0.5)


def test_federated_evaluation_weights_get_the_same_cap() -> None:
    strategy = make_strategy(declared=False)
    liar = Message(
        RecordDict({"metrics": MetricRecord({"num-examples": 10**9, "exit3/uar": 1.0})}),
        reply_to=instruction(HOSTILE, MessageType.EVALUATE),
    )
    metrics = strategy.aggregate_evaluate(1, [*honest_evaluate_replies(), liar])
    assert metrics is not None
    honest = sum(n * node / 10 for node, (_, n) in HONEST.items())
    assert metrics["exit3/uar"] == pytest.approx((honest + 150 * 1.0) / (180 + 150))
    assert strategy.last_evaluate_report.weight_cap == 150.0  # type: ignore[union-attr]


def test_evaluate_reply_above_its_declaration_or_with_a_nan_metric_is_rejected() -> None:
    strategy = make_strategy()
    big = Message(
        RecordDict({"metrics": MetricRecord({"num-examples": 101, "exit3/uar": 1.0})}),
        reply_to=instruction(HOSTILE, MessageType.EVALUATE),
    )
    nan = Message(
        RecordDict({"metrics": MetricRecord({"num-examples": 5, "exit3/uar": math.nan})}),
        reply_to=instruction(1, MessageType.EVALUATE),
    )
    strategy.aggregate_evaluate(1, [nan, *honest_evaluate_replies()[1:], big])
    reasons = {r.node_id: r.reason for r in strategy.last_evaluate_report.rejections}  # type: ignore[union-attr]
    assert "declared when it joined" in reasons[HOSTILE] and "not finite" in reasons[1]


# --------------------------------------------------------------------------------------------- C: config


def test_central_dp_with_norm_ratio_is_refused_at_config_validation() -> None:
    with pytest.raises(ValidationError) as err:
        FederatedConfig(central_dp={"clip_norm": 1.0, "noise_multiplier": 1.0}, max_update_norm_ratio=5.0)
    assert "max_update_norm_ratio" in str(err.value) and "central_dp" in str(err.value)
    FederatedConfig(central_dp={"clip_norm": 1.0, "noise_multiplier": 1.0})  # each alone is fine
    FederatedConfig(max_update_norm_ratio=5.0)
    with pytest.raises(ValueError, match="max_update_norm_ratio"):
        PartialFedAvg(central_dp=CentralDP(1.0, 1.0), max_update_norm_ratio=5.0)


# --------------------------------------------------------------------------------------------- B: handshake


def info_reply(node: int, info: dict[str, Any] | None, *, error: str | None = None) -> Message:
    query = instruction(node, "query.info")
    if error is not None:
        return Message(Error(2, error), reply_to=query)
    content = RecordDict() if info is None else RecordDict({"info": ConfigRecord(info)})
    return Message(content, reply_to=query)


GOOD_INFO = {
    "has-model": True,
    "exit": 3,
    "n-utterances": 40,
    "n-labelled": 8,
    "device": "cpu",
    "torch-threads": 2,
}


@pytest.mark.parametrize(
    ("info", "reason"),
    [
        (None, "without an 'info'"),
        (GOOD_INFO | {"n-utterances": "lots"}, "not a number"),
        (GOOD_INFO | {"n-utterances": math.nan}, "not a whole number"),
        (GOOD_INFO | {"n-utterances": math.inf}, "not a whole number"),
        (GOOD_INFO | {"n-utterances": 0}, "outside"),
        (GOOD_INFO | {"n-utterances": -5}, "outside"),
        (GOOD_INFO | {"n-utterances": 1e300}, "outside"),
        ({k: v for k, v in GOOD_INFO.items() if k != "n-utterances"}, "missing"),
        (GOOD_INFO | {"exit": "teacher"}, "'exit' is not a number"),
        (GOOD_INFO | {"exit": 0}, "not an exit"),
        (GOOD_INFO | {"exit": 2.5}, "whole number"),
        (GOOD_INFO | {"has-model": "yes"}, "has-model"),
        (GOOD_INFO | {"n-labelled": 41}, "n-labelled"),
    ],
)
def test_malformed_handshake_replies_are_rejected(info, reason) -> None:
    got = validate_info_reply(info_reply(5, info))
    assert isinstance(got, Rejection) and got.node_id == 5 and reason in got.reason, got


def test_handshake_reply_is_parsed_to_known_keys_and_printable_strings() -> None:
    got = validate_info_reply(info_reply(5, GOOD_INFO | {"device": "cu\x1b[2Jda", "evil": "x" * 10**5}))
    assert not isinstance(got, Rejection)
    assert set(got) == {
        "has-model",
        "exit",
        "n-utterances",
        "n-labelled",
        "device",
        "torch-threads",
        "device-id",
    }
    assert got["device-id"] is None  # none declared
    named = validate_info_reply(info_reply(5, GOOD_INFO | {"device-id": "3f2a9c"}))
    assert not isinstance(named, Rejection) and named["device-id"] == "3f2a9c"
    for bad in ("../x", "", "a" * 65, 7, "a b"):
        odd = validate_info_reply(info_reply(5, GOOD_INFO | {"device-id": bad}))
        assert not isinstance(odd, Rejection) and odd["device-id"] is None
    assert got["device"] == "cu\\x1b[2Jda" and got["n-utterances"] == 40 and got["exit"] == 3
    assert validate_info_reply(info_reply(5, GOOD_INFO | {"exit": -1, "n-utterances": 12.0}))["exit"] == -1  # type: ignore[index]
    err = validate_info_reply(info_reply(5, None, error="boom\x1b[31m"))
    assert isinstance(err, Rejection) and "\x1b" not in err.reason


class ScriptedGrid:
    """A Grid whose devices answer from a script: node → reply builder (None: no reply)."""

    def __init__(self, script: dict[int, Callable[[Message], Message | None]]) -> None:
        self.script = script

    def get_node_ids(self) -> list[int]:
        return list(self.script)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            r = self.script[msg.metadata.dst_node_id](msg)
            if r is not None:
                out.append(r)
        return out


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    from fedsd.server.federation import Federation, FederationSpec

    tmp = tmp_path_factory.mktemp("hostile-fed")
    cfg = tmp / "fed.yaml"
    cfg.write_text("name: hostile\nfederated: {min_clients: 1, round_timeout: 5}\n")
    spec = FederationSpec(
        config=str(cfg), run_dir=str(tmp / "run"), base_model=str(tiny_model_dir), deliver_model=False
    )
    return Federation(spec, log=lambda _: None)


def _answer(info: dict[str, Any] | None) -> Callable[[Message], Message]:
    def reply(msg: Message) -> Message:
        content = RecordDict() if info is None else RecordDict({"info": ConfigRecord(info)})
        return Message(content, reply_to=msg)

    return reply


def test_handshake_rejects_lying_devices_by_name_and_the_run_goes_on(federation) -> None:
    logs: list[str] = []
    federation.log = logs.append
    grid = ScriptedGrid(
        {
            11: _answer(GOOD_INFO),
            12: _answer(None),  # no info record: used to raise KeyError
            13: _answer(GOOD_INFO | {"n-utterances": "many"}),  # used to raise ValueError
            14: _answer(GOOD_INFO | {"n-utterances": math.nan}),  # used to disable the size check
            15: _answer(GOOD_INFO | {"has-model": False}),  # delivery is off: used to end the run
            16: _answer(GOOD_INFO | {"exit": 1, "n-utterances": 12}),
        }
    )
    infos = federation.handshake(grid)
    assert sorted(infos) == [11, 16]
    for node in (12, 13, 14, 15):
        assert any(line.startswith(f"device {node}: cannot take part") for line in logs), (node, logs)
    assert federation.strategy.declared_examples == {11: 40.0, 16: 12.0}
    assert federation.strategy.declared_exits == {11: 3, 16: 1}


def test_the_run_report_survives_list_metrics_from_a_device(tmp_path: Path) -> None:
    """Validated metrics may be lists; the report used to int() them and fail the finished run."""
    from types import SimpleNamespace

    from fedsd.config import ExperimentConfig
    from fedsd.server.report import write_report

    odd = {
        "exit": [1, 2],
        "n-utterances": [3.0],
        "n-labelled": 2.5,
        "seconds": [1.0],
        "exit1/uar-before": [0.1],
    }
    history = [
        {"round": 0},
        {"round": 1, "train": {"clients": [{"node_id": 5, "metrics": odd}], "rejections": []}},
    ]
    model = SimpleNamespace(exits=[1, 2], meta={})
    path = write_report(tmp_path, history, model, ExperimentConfig(), log=lambda _: None)  # type: ignore[arg-type]
    assert "| 5 " in path.read_text()


# --------------------------------------------------------------------------------------------- fuzz: train

_TEXT = st.text(st.characters(codec="utf-8"), max_size=30) | st.sampled_from(
    ["", "../../etc/passwd", "/abs", "heads.3.fc.weight\x00", "heads.3", "heads.x.fc.bias", "\u202eheads"]
)
_NUMBERS = st.sampled_from([0, -1, -1e-300, math.nan, math.inf, -math.inf, 101, 10**9, 1e300])
_BAD_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf])


def _bypass(record: Any, key: str, value: Any) -> None:
    """Store a value Flower's type checks would refuse (what a hand-made or future decoder could yield)."""
    record.__dict__["_data"][key] = value


def _pristine(arrays: dict[str, Any], key: str) -> bool:
    value = arrays.get(key)
    return isinstance(value, np.ndarray) and value.dtype == np.float32 and value.shape == SHAPES[key]


@st.composite
def hostile_train_reply(draw: st.DrawFn, required: tuple[str, ...]) -> tuple[int, Message, str]:
    """A train reply with at least one flaw; returns (sender, message, what is wrong)."""
    node = HOSTILE
    arrays: dict[str, Any] = trained(EXIT3, seed=draw(st.integers(0, 3)))
    metrics: dict[str, Any] = {"num-examples": 10, "loss": 0.5} | {k: 1.0 for k in required}
    flaws = draw(
        st.lists(
            st.sampled_from(
                [
                    "drop-key", "unknown-key", "above-exit", "dtype", "shape", "non-finite", "stype",
                    "garbage-bytes", "weight", "weight-list", "metric-non-finite", "metric-list-nan",
                    "metric-non-numeric", "no-arrays", "two-arrays", "no-metrics", "two-metrics", "error",
                    "no-content", "duplicate", "stranger", "empty-arrays", "bool-weight",
                ]
                + (["missing-required"] if required else [])
            ),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )  # fmt: skip
    key = draw(st.sampled_from(EXIT3))
    array_records = 1
    metric_records = 1
    for flaw in flaws:
        if flaw == "drop-key":
            arrays.pop(key, None)
            if not arrays:
                arrays = {k: v for k, v in trained(EXIT3, 9).items() if k != key}
        elif flaw == "unknown-key":
            arrays[draw(_TEXT.filter(lambda s: s not in SHAPES))] = np.zeros(3, np.float32)
        elif flaw == "above-exit":
            arrays |= trained(draw(st.sampled_from([TEACHER, EXIT6[2:]])), seed=3)
        elif flaw in ("dtype", "shape", "non-finite", "stype", "garbage-bytes") and not _pristine(
            arrays, key
        ):
            pass  # an earlier flaw already spoilt (or dropped) this array
        elif flaw == "dtype":
            arrays[key] = arrays[key].astype(
                draw(st.sampled_from([np.float64, np.float16, np.int32, np.uint8]))
            )
        elif flaw == "shape":
            shape = draw(st.sampled_from([(1,), (3, 4), (4, 3, 1), (0,), (12,), ()]))
            arrays[key] = np.zeros(shape, np.float32)
        elif flaw == "non-finite":
            value = arrays[key].copy()
            value.flat[draw(st.integers(0, value.size - 1))] = draw(_BAD_FLOATS)
            arrays[key] = value
        elif flaw in ("stype", "garbage-bytes"):
            ref = arrays[key]
            data = draw(st.binary(max_size=64)) if flaw == "garbage-bytes" else Array(ref).data
            stype = (
                "numpy.ndarray" if flaw == "garbage-bytes" else draw(st.sampled_from(["torch", "pickle", ""]))
            )
            arrays[key] = Array(dtype=str(ref.dtype), shape=tuple(ref.shape), stype=stype, data=data)
        elif flaw == "weight":
            metrics["num-examples"] = draw(_NUMBERS)
        elif flaw == "weight-list":
            metrics["num-examples"] = [10, 20]
        elif flaw == "bool-weight":
            metrics["num-examples"] = True
        elif flaw == "metric-non-finite":
            metrics[draw(st.sampled_from(["loss", "exit3/uar", "dp-epsilon"]))] = draw(_BAD_FLOATS)
        elif flaw == "metric-list-nan":
            metrics["per-class"] = [0.5, draw(_BAD_FLOATS)]
        elif flaw == "missing-required":
            for k in required:
                metrics.pop(k, None)
        elif flaw == "no-arrays":
            array_records = 0
        elif flaw == "two-arrays":
            array_records = 2
        elif flaw == "no-metrics":
            metric_records = 0
        elif flaw == "two-metrics":
            metric_records = 2
        elif flaw == "empty-arrays":
            arrays = {}
        elif flaw == "duplicate":
            node = draw(st.sampled_from(list(HONEST)))
        elif flaw == "stranger":
            node = 77
    # Every flaw makes the reply invalid on its own; one that finds its key gone (dtype, shape, ...)
    # follows drop-key or empty-arrays, which already did.
    if "error" in flaws:
        return node, Message(Error(2, draw(_TEXT)), reply_to=instruction(node)), "error"
    if "no-content" in flaws:
        return node, Message(RecordDict(), reply_to=instruction(node)), "no-content"
    record = ArrayRecord()
    for k, v in arrays.items():
        try:
            record[k] = v if isinstance(v, Array) else Array(np.asarray(v))
        except (TypeError, ValueError):  # a key Flower itself refuses: still an unknown key
            record["heads.3.unknown"] = Array(np.zeros(3, np.float32))
    metric_record = MetricRecord()
    for k, v in metrics.items():
        try:
            metric_record[k] = v
        except (TypeError, ValueError):
            _bypass(metric_record, k, v)
    if "metric-non-numeric" in flaws:
        _bypass(
            metric_record,
            draw(st.sampled_from(["loss", "uar", "num-examples"])),
            draw(st.sampled_from(["x", None, b"1", [1, "a"]])),
        )
    content: dict[str, Any] = {}
    for i in range(array_records):
        content[f"arrays{i or ''}"] = record
    for i in range(metric_records):
        content[f"metrics{i or ''}"] = metric_record
    return node, Message(RecordDict(content), reply_to=instruction(node)), "+".join(flaws)


def _setup(draw: st.DrawFn) -> dict[str, Any]:
    central = draw(st.booleans())
    aggregation = "mean" if central else draw(st.sampled_from(["mean", "median", "trimmed_mean"]))
    ratio = None if central else draw(st.sampled_from([None, 2.0]))
    required = draw(st.sampled_from([(), ("dp-epsilon",)]))
    return {"aggregation": aggregation, "central": central, "ratio": ratio, "required": required}


@st.composite
def train_round(draw: st.DrawFn) -> tuple[dict[str, Any], list[tuple[int, Message, str]]]:
    setup = _setup(draw)
    hostile = draw(st.lists(hostile_train_reply(setup["required"]), min_size=1, max_size=3))
    return setup, hostile


def _state(strategy: PartialFedAvg) -> Any:
    dp = strategy.central_dp
    return (
        dict(dp.compositions) if dp else None,
        ({k: dict(v) for k, v in dp.by_sigma.items()}, dict(dp.rounds), list(dp.unaccounted_rounds))
        if dp
        else None,
        {k: v.data for k, v in strategy.current_arrays.items()},  # type: ignore[union-attr]
        dict(strategy.declared_exits or {}),
        dict(strategy.declared_examples or {}),
    )


@FUZZ
@given(train_round())
def test_fuzz_malformed_train_replies_are_rejected_and_change_nothing(case) -> None:
    setup, hostile = case
    honest_replies = honest_train_replies(dp=bool(setup["required"]))
    reference = make_strategy(**setup)
    expected, expected_metrics = reference.aggregate_train(1, honest_replies)
    strategy = make_strategy(**setup)
    got, got_metrics = strategy.aggregate_train(1, [*honest_replies, *(m for _, m, _ in hostile)])
    report, ref_report = strategy.last_train_report, reference.last_train_report
    assert report is not None and ref_report is not None and report.aggregated
    assert len(report.rejections) == len(hostile) + len(ref_report.rejections), (
        [h[2] for h in hostile],
        report.rejections,
    )
    assert sorted(c.node_id for c in report.clients) == sorted(c.node_id for c in ref_report.clients)
    assert all("\x1b" not in r.reason and "\x00" not in r.reason for r in report.rejections)
    assert {k: v.data for k, v in got.items()} == {k: v.data for k, v in expected.items()}
    # every metric as without the hostile replies, except the rejection count
    assert {k: v for k, v in got_metrics.items() if k != "num-rejected"} == {
        k: v for k, v in expected_metrics.items() if k != "num-rejected"
    }
    assert got_metrics["num-rejected"] == len(hostile) + expected_metrics["num-rejected"]
    assert _state(strategy) == _state(reference)


# --------------------------------------------------------------------------------------------- fuzz: well-formed, hostile

HOSTILE_EXITS = {90: -1, 91: 12, 92: 10**6, 93: 4, 94: 6, 95: 3, 96: 13}
"""Hostile nodes and the exit each declared at the handshake (the model's exits are 3, 6 and 12)."""
_EXTREME = st.sampled_from(
    [3.4028235e38, -3.4028235e38, 1e30, -1e30, 1e-45, -1e-45, 0.0, -0.0, 1000.0, -1000.0]
) | st.floats(width=32, allow_nan=False, allow_infinity=False)
_POLICY_FLAWS = {
    "teacher-head": ("teacher's head", "above the exit"),
    "above-exit": ("above the exit",),
    "bogus-exit": ("not an exit of this model",),
    "metric-keys": ("MAX_METRIC_KEYS",),
    "metric-key-chars": ("MAX_METRIC_KEY_CHARS",),
    "metric-list": ("MAX_METRIC_LIST_LEN",),
    "metric-bytes": ("MAX_METRIC_BYTES",),
}


def _adversarial(draw: st.DrawFn, keys: list[str]) -> dict[str, np.ndarray]:
    """Arrays of the right key set, dtype and shape, holding finite values an attacker picked (a few
    drawn values scattered by a drawn seed: hypothesis' own array strategy costs 10 ms a case)."""
    pool = np.array(draw(st.lists(_EXTREME, min_size=1, max_size=4)), np.float32)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    return {k: rng.choice(pool, size=SHAPES[k]).astype(np.float32) for k in keys}


@st.composite
def well_formed_hostile_reply(
    draw: st.DrawFn, teacher: str, required: tuple[str, ...]
) -> tuple[int, Message, tuple[str, ...]]:
    """(sender, reply, reasons one of which its rejection must name)."""
    flaw = draw(st.sampled_from([f for f in _POLICY_FLAWS if teacher == "deep" or f != "teacher-head"]))
    metrics: dict[str, Any] = {"num-examples": draw(st.sampled_from([1, 37, 99.5, 100, 1e-300]))}
    metrics |= {k: draw(_EXTREME) for k in ("loss", *required)}
    if flaw == "teacher-head":
        node = draw(st.sampled_from([90, 91, 94, 95]))
        keys = (EXIT6 if HOSTILE_EXITS[node] in (-1, 12, 6) else EXIT3) + TEACHER
    elif flaw == "above-exit":
        node = draw(st.sampled_from([94, 95]))
        keys = EXIT6 + TEACHER if node == 94 else draw(st.sampled_from([EXIT6, EXIT3 + TEACHER]))
    elif flaw == "bogus-exit":
        node, keys = draw(st.sampled_from([92, 93, 96])), draw(st.sampled_from([EXIT3, EXIT6]))
    else:
        node, keys = 94, EXIT6
        if flaw == "metric-keys":
            extra = draw(st.integers(1, 40))
            metrics |= {f"exit6/m{i}": 0.5 for i in range(MAX_METRIC_KEYS + extra)}
        elif flaw == "metric-key-chars":
            metrics["x" * draw(st.integers(MAX_METRIC_KEY_CHARS + 1, 4 * MAX_METRIC_KEY_CHARS))] = 1.0
        elif flaw == "metric-list":
            metrics["per-class"] = [0.5] * draw(st.integers(MAX_METRIC_LIST_LEN + 1, 2 * MAX_METRIC_LIST_LEN))
        else:  # every list within its cap, the whole too big to keep
            metrics |= {
                f"l{i}": [-1.2345678901234567e-300] * MAX_METRIC_LIST_LEN
                for i in range(draw(st.integers(12, 14)))
            }
    reply = train_reply(node, _adversarial(draw, keys), metrics)
    return node, reply, _POLICY_FLAWS[flaw]


@st.composite
def well_formed_round(draw: st.DrawFn) -> tuple[dict[str, Any], list[tuple[int, Message, tuple[str, ...]]]]:
    setup = _setup(draw) | {"teacher": draw(st.sampled_from(["deep", "local"]))}
    hostile = draw(
        st.lists(well_formed_hostile_reply(setup["teacher"], setup["required"]), min_size=1, max_size=3)
    )
    return setup, hostile


def _with_hostile_nodes(strategy: PartialFedAvg) -> PartialFedAvg:
    strategy.declared_exits = dict(strategy.declared_exits or {}) | HOSTILE_EXITS
    strategy.declared_examples = dict(strategy.declared_examples or {}) | {n: 100.0 for n in HOSTILE_EXITS}
    return strategy


@FUZZ
@given(well_formed_round())
def test_fuzz_well_formed_hostile_replies_are_rejected_and_change_nothing(case) -> None:
    setup, hostile = case
    honest_replies = honest_train_replies(dp=bool(setup["required"]))
    reference = _with_hostile_nodes(make_strategy(**setup))
    expected, expected_metrics = reference.aggregate_train(1, honest_replies)
    strategy = _with_hostile_nodes(make_strategy(**setup))
    got, got_metrics = strategy.aggregate_train(1, [*honest_replies, *(m for _, m, _ in hostile)])
    report, ref_report = strategy.last_train_report, reference.last_train_report
    assert report is not None and ref_report is not None and report.aggregated
    assert len(report.rejections) == len(hostile) + len(ref_report.rejections)
    seen: set[int] = set()
    for (node, _, reasons), rejection in zip(
        hostile, report.rejections[len(ref_report.rejections) :], strict=True
    ):
        assert rejection.node_id == node
        named = reasons + (("duplicate reply",) if node in seen else ())
        assert any(r in rejection.reason for r in named), (named, rejection.reason)
        seen.add(node)
    assert sorted(c.node_id for c in report.clients) == sorted(c.node_id for c in ref_report.clients)
    assert {k: v.data for k, v in got.items()} == {k: v.data for k, v in expected.items()}
    assert report.held_back == ref_report.held_back and report.updated_keys == ref_report.updated_keys
    assert {k: v for k, v in got_metrics.items() if k != "num-rejected"} == {
        k: v for k, v in expected_metrics.items() if k != "num-rejected"
    }
    assert _state(strategy) == _state(reference)
    for key in TEACHER:  # nobody honest trains the teacher here: it never moves
        assert got[key].data == GLOBAL[key].data


@settings(FUZZ, max_examples=300)
@given(
    st.sampled_from(["median", "trimmed_mean"]),
    st.lists(st.sampled_from([90, 91]), min_size=1, max_size=2, unique=True),
    st.data(),
)
def test_fuzz_lone_senders_cannot_move_a_head_under_a_robust_rule(aggregation, nodes, data) -> None:
    """teacher=local: devices at the deepest exit may train the teacher head. Under median (3) or
    trimmed mean at 0.25 (4) one or two senders of it are too few: whatever values they send, it stays."""
    strategy = _with_hostile_nodes(make_strategy(aggregation=aggregation, teacher="local"))
    hostile = [train_reply(n, _adversarial(data.draw, EXIT6 + TEACHER), {"num-examples": 50}) for n in nodes]
    got, _ = strategy.aggregate_train(1, [*honest_train_replies(), *hostile])
    report = strategy.last_train_report
    assert report is not None and not report.rejections
    assert report.held_back.get("12") == len(nodes)
    for key in TEACHER:
        assert got[key].data == GLOBAL[key].data


# --------------------------------------------------------------------------------------------- fuzz: evaluate


@st.composite
def hostile_evaluate_reply(draw: st.DrawFn) -> Message:
    node = draw(st.sampled_from([HOSTILE, HOSTILE, 77, *HONEST]))  # a known honest node: a duplicate
    flaw = draw(
        st.sampled_from(
            [
                "weight",
                "weight-list",
                "nan-metric",
                "no-metrics",
                "two-metrics",
                "error",
                "non-numeric",
                "big",
            ]
        )
    )
    metrics: dict[str, Any] = {"num-examples": 5, "exit3/uar": 0.5}
    if flaw == "error":
        return Message(Error(2, draw(_TEXT)), reply_to=instruction(node, MessageType.EVALUATE))
    if flaw == "weight":
        metrics["num-examples"] = draw(_NUMBERS.filter(lambda v: not 0 < v <= 100))
    elif flaw == "weight-list":
        metrics["num-examples"] = [1.0, 2.0]
    elif flaw == "nan-metric":
        metrics[draw(st.sampled_from(["exit3/uar", "exit6/f1"]))] = draw(_BAD_FLOATS)
    elif flaw == "big":
        metrics["num-examples"] = draw(st.integers(101, 10**12))
    record = MetricRecord()
    for k, v in metrics.items():
        record[k] = v
    if flaw == "non-numeric":
        _bypass(record, "exit3/uar", draw(st.sampled_from(["0.9", None, [0.1, "x"]])))
    records = {"no-metrics": {}, "two-metrics": {"metrics": record, "more": record}}.get(
        flaw, {"metrics": record}
    )
    return Message(RecordDict(records), reply_to=instruction(node, MessageType.EVALUATE))


@settings(FUZZ, max_examples=400)
@given(st.lists(hostile_evaluate_reply(), min_size=1, max_size=3))
def test_fuzz_malformed_evaluate_replies_are_rejected_and_change_nothing(hostile) -> None:
    reference = make_strategy()
    expected = reference.aggregate_evaluate(1, honest_evaluate_replies())
    strategy = make_strategy()
    got = strategy.aggregate_evaluate(1, [*honest_evaluate_replies(), *hostile])
    report = strategy.last_evaluate_report
    assert report is not None and sorted(c.node_id for c in report.clients) == sorted(HONEST)
    assert len(report.rejections) == len(hostile)
    assert expected is not None and got is not None
    assert {k: v for k, v in got.items() if k != "num-rejected"} == {
        k: v for k, v in expected.items() if k != "num-rejected"
    }


# --------------------------------------------------------------------------------------------- fuzz: handshake

_INFO_VALUES = (
    st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | _TEXT
    | st.binary(max_size=8)
    | st.lists(st.integers(-3, 3), max_size=3)
)


@st.composite
def info_dict(draw: st.DrawFn) -> dict[str, Any] | None:
    if draw(st.integers(0, 9)) == 0:
        return None
    info = dict(GOOD_INFO)
    for key in draw(st.lists(st.sampled_from([*GOOD_INFO, "extra", "\x1b[31m"]), min_size=1, max_size=4)):
        if draw(st.booleans()):
            info.pop(key, None)
        else:
            info[key] = draw(_INFO_VALUES)
    return info


@settings(FUZZ, max_examples=600)
@given(info_dict())
def test_fuzz_handshake_replies_never_raise(info) -> None:
    try:
        msg = info_reply(5, info)
    except (TypeError, ValueError):  # Flower refuses the value itself: nothing reaches the server
        return
    got = validate_info_reply(msg)
    if isinstance(got, Rejection):
        assert got.node_id == 5 and got.reason and "\x1b" not in got.reason
        return
    assert isinstance(got["has-model"], bool)
    assert isinstance(got["n-utterances"], int) and 1 <= got["n-utterances"] <= 10**12
    assert isinstance(got["exit"], int) and (got["exit"] == -1 or got["exit"] >= 1)
    assert got["device"].isprintable()


@settings(FUZZ, max_examples=150)
@given(st.lists(info_dict(), min_size=1, max_size=4))
def test_fuzz_handshake_never_ends_the_run(federation, infos) -> None:
    script: dict[int, Callable[[Message], Message | None]] = {}
    for i, info in enumerate(infos):
        try:
            ConfigRecord(info or {})
        except (TypeError, ValueError):
            info = None
        script[100 + i] = _answer(info)
    federation.log = lambda _: None
    got = federation.handshake(ScriptedGrid(script))
    assert set(got) <= set(script)
    assert set(federation.strategy.declared_examples) == set(got) == set(federation.strategy.declared_exits)
    assert all(v >= 1 and math.isfinite(v) for v in federation.strategy.declared_examples.values())
