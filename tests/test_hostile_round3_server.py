"""Hostile peers, round 3 (issue 23): the server-side holes, each reproduced as an attacker would.

- Finding 2: one device set the teacher head alone (declared exit -1, the teacher's exit or 10**6; one
  sender → mean, median and trimmed mean all took its value). Now a head is accepted only for exits
  the model has, up to the device's resolved exit, never the teacher's under ``teacher=deep``, and a
  robust rule leaves a head with too few senders alone.
- Finding 4: central-DP ε after ``--resume`` used the new σ for every round, and switching central DP
  on after un-noised rounds reported ε 0. Now σ is kept per round and ε composes over all of them
  (checked against Opacus' RDPAccountant); un-noised rounds make ε ∞, said in the report.
- Finding 6: a node that dropped between the bounded wait and Flower's ``sample_nodes`` made the round
  wait forever. Now the wait's node list is the one sampled.
- Finding 7 (metrics): any number of metric keys / list entries / bytes reached metrics.jsonl. Now a
  reply over a cap is rejected with a reason naming the cap.

Real Flower records and Messages throughout; the grids are Flower ``Grid`` subclasses (as in
``test_strategy.py``) or the in-process grid running the real ClientApp.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from harness import federation
from opacus.accountants import RDPAccountant
from test_hostile_replies import EXIT3, EXIT6, SHAPES, TEACHER  # noqa: E402  (the same 3-exit model)

from fedsd.server.central_dp import CentralDP
from fedsd.server.federation import run_federation
from fedsd.server.strategy import PartialFedAvg, min_senders
from fedsd.server.validation import (
    MAX_METRIC_BYTES,
    MAX_METRIC_KEY_CHARS,
    MAX_METRIC_KEYS,
    MAX_METRIC_LIST_LEN,
    ValidUpdate,
    resolve_exit,
)

pytestmark = pytest.mark.usefixtures("task_identity")

ATTACKER = 99
HONEST = {1: (EXIT6, 40), 2: (EXIT6, 60), 3: (EXIT3, 50), 4: (EXIT3, 30), 5: (EXIT3, 20)}
"""node → (keys it trains, num-examples): exit 3 has 5 senders, exit 6 two, the teacher none."""
GLOBAL = ArrayRecord(
    {k: Array(np.random.default_rng(0).normal(size=s).astype(np.float32)) for k, s in SHAPES.items()}
)
GLOBAL_NP = {k: v.numpy() for k, v in GLOBAL.items()}


@pytest.fixture(autouse=True, scope="module")
def quiet_flower():
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


class FixedGrid(Grid):
    """Flower's Grid over a node list that may change between calls (``lists``: one list per call, the
    last repeated). ``max_calls``: more calls than that means someone is polling for a node that will
    never come back — raise instead of hanging the test."""

    def __init__(self, *lists: list[int], max_calls: int | None = None) -> None:
        self.lists = [list(x) for x in lists]
        self.calls = 0
        self.max_calls = max_calls
        self._run = None

    def set_run(self, run):  # noqa: ANN001
        self._run = run

    @property
    def run(self):  # noqa: ANN201
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        if self.max_calls is not None and self.calls > self.max_calls:
            raise RuntimeError(
                f"get_node_ids called {self.calls} times: the strategy is waiting again for a node that "
                "dropped after the bounded wait (it would wait forever)"
            )
        return list(self.lists[min(self.calls - 1, len(self.lists) - 1)])

    def push_messages(self, messages):  # noqa: ANN001
        raise NotImplementedError

    def pull_messages(self, message_ids):  # noqa: ANN001
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001
        raise NotImplementedError


def trained(keys: list[str], seed: int, scale: float = 0.1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (GLOBAL_NP[k] + scale * rng.normal(size=SHAPES[k])).astype(np.float32) for k in keys}


def train_reply(node: int, arrays: dict[str, np.ndarray], metrics: dict[str, Any]) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict(
        {"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "metrics": MetricRecord(metrics)}
    )
    return Message(content, reply_to=instruction)


def honest_replies(nodes: dict[int, tuple[list[str], int]] = HONEST) -> list[Message]:
    return [
        train_reply(n, trained(keys, n), {"num-examples": w, "loss": 1.0}) for n, (keys, w) in nodes.items()
    ]


def make_strategy(
    aggregation: str = "mean",
    teacher: str | None = "deep",
    attacker_exit: int = 3,
    ratio: float | None = None,
    config: dict[str, Any] | None = None,
) -> PartialFedAvg:
    strategy = PartialFedAvg(
        min_train_nodes=2, min_available_nodes=1, aggregation=aggregation,  # type: ignore[arg-type]
        max_update_norm_ratio=ratio,
    )  # fmt: skip
    exits = {n: (6 if keys == EXIT6 else 3) for n, (keys, _) in HONEST.items()}
    strategy.declared_exits = exits | {ATTACKER: attacker_exit}
    strategy.declared_examples = {n: 100.0 for n in strategy.declared_exits}
    cfg = ({"teacher": teacher} if teacher else {}) | (config or {})
    strategy.configure_train(1, GLOBAL, ConfigRecord(cfg), FixedGrid(list(HONEST)))
    return strategy


def bits(record: ArrayRecord) -> dict[str, bytes]:
    return {k: v.data for k, v in record.items()}


# ============================================================================ finding 2: the teacher head


def _hijack() -> dict[str, np.ndarray]:
    """Honest-looking exit-6 heads, and the teacher's head with its bias set to 1000."""
    return trained(EXIT6, 7) | trained(TEACHER, 7) | {"heads.12.fc.bias": np.full(3, 1000.0, np.float32)}


@pytest.mark.parametrize("aggregation", ["mean", "median", "trimmed_mean"])
@pytest.mark.parametrize("declared", [-1, 12, 10**6], ids=["exit-1", "teacher-exit", "exit-1e6"])
def test_one_device_cannot_set_the_teacher_head(aggregation: str, declared: int) -> None:
    strategy = make_strategy(aggregation, "deep", attacker_exit=declared)
    new, _ = strategy.aggregate_train(
        1, [*honest_replies(), train_reply(ATTACKER, _hijack(), {"num-examples": 50})]
    )
    report = strategy.last_train_report
    assert report is not None
    reasons = {r.node_id: r.reason for r in report.rejections}
    assert ATTACKER in reasons, f"the teacher's head was accepted from a device declaring exit {declared}"
    assert ATTACKER not in {c.node_id for c in report.clients}
    for key in TEACHER:  # nobody trains the teacher under teacher=deep: bit-identical
        assert new[key].data == GLOBAL[key].data
    assert float(new["heads.12.fc.bias"].numpy().max()) < 1000
    if declared == 10**6:
        assert "not an exit of this model (exits: 3, 6, 12)" in reasons[ATTACKER]
    else:
        assert "teacher's head (exit 12)" in reasons[ATTACKER]


def test_declared_exit_must_be_one_the_model_has() -> None:
    strategy = make_strategy(attacker_exit=4)  # between 3 and 6: an exit-3 key set looked fine
    strategy.aggregate_train(
        1, [*honest_replies(), train_reply(ATTACKER, trained(EXIT3, 9), {"num-examples": 10})]
    )
    (rejection,) = strategy.last_train_report.rejections  # type: ignore[union-attr]
    assert (
        rejection.node_id == ATTACKER and "declared exit 4 is not an exit of this model" in rejection.reason
    )
    assert resolve_exit(-1, [3, 6, 12]) == 12 and resolve_exit(-1, [3, 6, 12], default_exit=6) == 6
    assert resolve_exit(6, [3, 6, 12]) == 6
    assert "not an exit" in str(resolve_exit(0, [3, 6, 12])) and "not an exit" in str(
        resolve_exit(-2, [3, 6])
    )


def test_minus_one_is_the_exit_the_device_then_runs() -> None:
    """teacher=local: the deepest head is trained (by devices at the deepest exit). A -1 device runs the
    config's default-exit, else the deepest exit: its heads are checked against that exit."""
    deep = make_strategy("mean", "local", attacker_exit=-1)
    new, _ = deep.aggregate_train(
        1, [*honest_replies(), train_reply(ATTACKER, _hijack(), {"num-examples": 50})]
    )
    assert not deep.last_train_report.rejections  # type: ignore[union-attr]
    np.testing.assert_allclose(new["heads.12.fc.bias"].numpy(), 1000.0)  # its only (honest) trainer
    shallow = make_strategy("mean", "local", attacker_exit=-1, config={"default-exit": 6})
    shallow.aggregate_train(1, [*honest_replies(), train_reply(ATTACKER, _hijack(), {"num-examples": 50})])
    (rejection,) = shallow.last_train_report.rejections  # type: ignore[union-attr]
    assert "above the exit 6" in rejection.reason and "declared -1" in rejection.reason
    no_word = make_strategy("mean", None, attacker_exit=-1)  # no teacher in the config: the devices' default
    no_word.aggregate_train(1, [*honest_replies(), train_reply(ATTACKER, _hijack(), {"num-examples": 50})])
    assert "teacher's head" in no_word.last_train_report.rejections[0].reason  # type: ignore[union-attr]


def test_min_senders_per_rule() -> None:
    assert min_senders("mean") == 1 and min_senders("median") == 3
    assert min_senders("trimmed_mean", 0.2) == 5 and min_senders("trimmed_mean", 0.25) == 4
    assert min_senders("trimmed_mean", 0.34) == 3 and min_senders("trimmed_mean", 0.45) == 3
    assert min_senders("trimmed_mean", 0.0) == 1  # cuts nothing: a plain mean
    for trim in (0.05, 0.1, 0.2, 0.3, 0.49):  # the stated rule: at least one value cut at each end
        n = min_senders("trimmed_mean", trim)
        assert int(trim * n) >= 1 and (n == 3 or int(trim * (n - 1)) == 0)


@pytest.mark.parametrize("aggregation", ["median", "trimmed_mean"])
def test_a_lone_sender_cannot_set_a_head_under_a_robust_rule(aggregation: str) -> None:
    """Exit 6 has 2 honest senders (fewer than median's 3 / trimmed mean's 5): one liar more makes 3,
    and alone among those it could drag the median; a lone teacher-less head would be its value."""
    only3 = {n: (EXIT3, w) for n, (_, w) in HONEST.items()}  # nobody honest at exit 6
    strategy = make_strategy(aggregation, attacker_exit=6)
    lie = trained(EXIT3, 11) | {k: np.full(SHAPES[k], 1000.0, np.float32) for k in EXIT6[2:]}
    new, _ = strategy.aggregate_train(
        1, [*honest_replies(only3), train_reply(ATTACKER, lie, {"num-examples": 30})]
    )
    report = strategy.last_train_report
    assert report is not None and report.held_back == {"6": 1}
    assert report.to_dict()["held_back"] == {"6": 1}
    for key in EXIT6[2:]:
        assert new[key].data == GLOBAL[key].data
    assert set(report.updated_keys) == set(EXIT3)  # 6 senders: aggregated


# ============================================================================ finding 4: σ across resume


def _one_round(dp: CentralDP, node: int, server_round: int) -> dict[str, Any]:
    g = {"heads.1.w": np.zeros(8, np.float32)}
    _, report = dp.aggregate(
        g, [ValidUpdate(node, {"heads.1.w": np.full(8, 0.1, np.float32)}, 10.0)], server_round
    )
    return report


def _opacus(steps: list[tuple[float, int]], delta: float = 1e-5) -> float:
    acc = RDPAccountant()
    for sigma, n in steps:
        for _ in range(n):
            acc.step(noise_multiplier=sigma, sample_rate=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta))


def test_resume_with_another_sigma_composes_epsilon_like_opacus() -> None:
    first = CentralDP(clip_norm=1.0, noise_multiplier=0.5, seed=0)
    first.identities = {1: "dev-a"}
    eps3 = [_one_round(first, 1, r)["epsilon"] for r in (1, 2, 3)][-1]
    assert eps3 == pytest.approx(_opacus([(0.5, 3)]))
    saved = json.loads(json.dumps(first.state()))  # through state.json
    resumed = CentralDP(clip_norm=1.0, noise_multiplier=4.0, seed=0)  # the operator raised σ at resume
    resumed.restore(saved, 3)
    resumed.identities = {42: "dev-a"}  # a new node id, the same device
    reports = [_one_round(resumed, 42, r) for r in (1, 2)]
    expected = _opacus([(0.5, 3), (4.0, 2)])
    assert reports[-1]["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert reports[-1]["epsilon"] > eps3  # ε never goes down (it used to drop from 21 to 1.9)
    assert reports[-1]["sigmas"] == [0.5, 4.0]
    assert resumed.state()["rounds"] == {"1": 0.5, "2": 0.5, "3": 0.5, "4": 4.0, "5": 4.0}
    # a device that joined after the resume (σ 4 only) is not the worst one: ε stays dev-a's
    resumed.identities[7] = "dev-b"
    assert _one_round(resumed, 7, 3)["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert resumed.steps() == [(0.5, 3), (4.0, 2)]


def test_central_dp_switched_on_after_unnoised_rounds_reports_infinity() -> None:
    history = [{"round": 0}] + [{"round": r, "train": {"aggregated": True}} for r in (1, 2, 3)]
    dp = CentralDP(clip_norm=1.0, noise_multiplier=1.0, seed=0)
    dp.restore(None, 3, history)  # state.json of a run without central DP
    report = _one_round(dp, 1, 1)
    assert report["epsilon"] == math.inf, "un-noised rounds were released: no ε bounds them"
    assert "rounds 1, 2, 3 released heads without central-DP noise" in report["epsilon_note"]
    again = CentralDP(clip_norm=1.0, noise_multiplier=1.0)
    again.restore(json.loads(json.dumps(dp.state())), 4)  # and it stays ∞ across later resumes
    assert again.epsilon() == math.inf and again.unaccounted_rounds == [1, 2, 3]


def _grid(fed, first_node: int):  # noqa: ANN001, ANN202
    g = fed.grid(2)
    contexts = {}
    for i, ctx in enumerate(g.contexts.values()):
        ctx.node_id = first_node + i
        contexts[first_node + i] = ctx
    g.contexts = contexts
    return g


def test_resume_that_changes_central_dp_reports_the_composed_epsilon(
    tmp_path: Path, small_corpus: Path, tiny_model_dir: Path
) -> None:
    """A real federation: round 1 at σ 0.5, then --resume with σ 4; then a run without central DP
    resumed with it on. The exit-2 device sends heads 1 and 2: two mechanisms per round."""
    central = {"clip_norm": 0.5, "noise_multiplier": 0.5, "seed": 0}
    fed = federation(tmp_path / "a", small_corpus, tiny_model_dir, name="sigma",
                     spec={"rounds": 1, "overrides": {"federated.central_dp": central}})  # fmt: skip
    run_federation(_grid(fed, 1), fed.spec, log=lambda _: None)
    fed.spec.resume, fed.spec.rounds = True, 2
    fed.spec.overrides = {"federated.central_dp": central | {"noise_multiplier": 4.0}}
    run_federation(_grid(fed, 100), fed.spec, log=lambda _: None)
    lines = fed.records()
    eps = [lines[r]["privacy"]["central"]["epsilon"] for r in (1, 2)]
    assert eps[0] == pytest.approx(_opacus([(0.5, 2)]))
    assert eps[1] == pytest.approx(_opacus([(0.5, 2), (4.0, 2)]))
    state = json.loads((fed.run_dir / "state.json").read_text())
    assert state["central_dp"]["rounds"] == {"1": 0.5, "2": 4.0}

    off = federation(tmp_path / "b", small_corpus, tiny_model_dir, name="dpon", spec={"rounds": 1})
    run_federation(_grid(off, 1), off.spec, log=lambda _: None)
    off.spec.resume, off.spec.rounds = True, 2
    off.spec.overrides = {"federated.central_dp": central}
    run_federation(_grid(off, 100), off.spec, log=lambda _: None)
    last = off.records()[2]["privacy"]["central"]
    assert last["epsilon"] == math.inf and "round 1 released heads without" in last["epsilon_note"]
    assert "Central ε is ∞" in (off.run_dir / "report.md").read_text()


# ============================================================================ finding 6: no second wait


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_a_node_dropping_after_the_bounded_wait_does_not_hang_the_round(kind: str) -> None:
    strategy = PartialFedAvg(min_train_nodes=3, min_evaluate_nodes=3, min_available_nodes=3, node_wait_s=2)
    # the wait sees 3 devices; then node 3 drops: any later look at the grid finds 2 (< 3 needed)
    grid = FixedGrid([1, 2, 3], [1, 2], max_calls=2)
    configure = strategy.configure_train if kind == "train" else strategy.configure_evaluate
    msgs = list(configure(1, GLOBAL, ConfigRecord({"lr": 0.1}), grid))
    assert sorted(m.metadata.dst_node_id for m in msgs) == [1, 2, 3]  # the wait's list, sampled
    assert grid.calls == 1  # nothing asked the grid again
    assert all(m.content["config"]["server-round"] == 1 for m in msgs)
    assert {m.metadata.message_type for m in msgs} == {
        MessageType.TRAIN if kind == "train" else MessageType.EVALUATE
    }


def test_fraction_samples_from_the_waited_list() -> None:
    strategy = PartialFedAvg(fraction_train=0.5, min_train_nodes=2, min_available_nodes=2, node_wait_s=2)
    msgs = list(
        strategy.configure_train(1, GLOBAL, ConfigRecord(), FixedGrid(list(range(1, 11)), max_calls=1))
    )
    assert len(msgs) == 5 and len({m.metadata.dst_node_id for m in msgs}) == 5


# ============================================================================ finding 7: metric caps


@pytest.mark.parametrize(
    ("extra", "cap"),
    [
        ({f"m{i}": 0.5 for i in range(MAX_METRIC_KEYS + 1)}, "MAX_METRIC_KEYS"),
        ({"x" * (MAX_METRIC_KEY_CHARS + 1): 1.0}, "MAX_METRIC_KEY_CHARS"),
        ({"per-class": [0.1] * (MAX_METRIC_LIST_LEN + 1)}, "MAX_METRIC_LIST_LEN"),
        ({f"l{i}": [1.2345678901234567e-300] * 200 for i in range(40)}, "MAX_METRIC_BYTES"),
    ],
    ids=["keys", "key-chars", "list-len", "bytes"],
)
def test_a_reply_over_a_metric_cap_is_rejected_and_never_kept(extra: dict[str, Any], cap: str) -> None:
    strategy = make_strategy()
    big = train_reply(ATTACKER, trained(EXIT3, 9), {"num-examples": 10} | extra)
    new, metrics = strategy.aggregate_train(1, [*honest_replies(), big])
    report = strategy.last_train_report
    assert report is not None
    (rejection,) = report.rejections
    assert rejection.node_id == ATTACKER and cap in rejection.reason, rejection.reason
    line = json.dumps(report.to_dict())  # what metrics.jsonl gets for this round's train part
    assert len(line) < 4096 and all(k not in c.metrics for c in report.clients for k in extra)
    assert not any(k in metrics for k in extra)
    reference = make_strategy()
    expected, _ = reference.aggregate_train(1, honest_replies())
    assert bits(new) == bits(expected)
    # evaluate replies: the same caps
    ev = Message(
        RecordDict({"metrics": MetricRecord({"num-examples": 5} | extra)}),
        reply_to=Message(RecordDict(), dst_node_id=ATTACKER, message_type=MessageType.EVALUATE),
    )
    strategy.aggregate_evaluate(1, [ev])
    (rejection,) = strategy.last_evaluate_report.rejections  # type: ignore[union-attr]
    assert cap in rejection.reason


def test_an_honest_reply_of_a_deep_model_fits_the_caps() -> None:
    """What a device at the deepest exit of a 24-exit model sends (fedsd.clients.train_task.train)."""
    metrics: dict[str, Any] = {k: 1 for k in ("num-examples", "exit", "n-labelled", "n-utterances",
                               "n-personal-test", "loss", "cache-hits", "cache-misses", "seconds")}  # fmt: skip
    for k in range(1, 25):
        metrics |= {f"exit{k}/train-uar-{t}": 0.123456789 for t in ("before", "after")}
        metrics |= {
            f"exit{k}/personal-{m}-{t}": 0.123456789 for m in ("uar", "wa", "f1") for t in ("before", "after")
        }
    metrics |= {"dp-epsilon": 1.5, "dp-delta": 1e-5, "dp-noise-multiplier": 1.1, "dp-epsilon-budget": 8.0}
    assert len(metrics) > 200
    strategy = make_strategy()
    strategy.aggregate_train(
        1, [*honest_replies(), train_reply(ATTACKER, trained(EXIT3, 3), metrics | {"num-examples": 50})]
    )
    assert not strategy.last_train_report.rejections  # type: ignore[union-attr]


def test_end_of_run_metrics_over_a_cap_are_left_out(tmp_path: Path, tiny_model_dir: Path) -> None:
    from fedsd.server.federation import Federation, FederationSpec

    cfg = tmp_path / "fed.yaml"
    cfg.write_text("name: caps\nfederated: {min_clients: 1, round_timeout: 5}\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    logs: list[str] = []
    fed = Federation(
        FederationSpec(config=str(cfg), run_dir=str(run_dir), base_model=str(tiny_model_dir)), logs.append
    )
    fed.history = [{"round": 1}]
    done = lambda n: Message(RecordDict(), dst_node_id=n, message_type="query.done")  # noqa: E731
    fine = Message(
        RecordDict({"metrics": MetricRecord({"exit1/personal-uar-global": 0.5})}), reply_to=done(1)
    )
    huge = Message(
        RecordDict({"metrics": MetricRecord({f"k{i}": 0.5 for i in range(MAX_METRIC_KEYS * 4)})}),
        reply_to=done(2),
    )
    fed._note_final([1, 2], [fine, huge])
    final = fed.history[-1]["final"]
    assert set(final["devices"]) == {"1"}
    assert any("device 2: end-of-run metrics left out" in x and "MAX_METRIC_KEYS" in x for x in logs)
    assert len((run_dir / "metrics.jsonl").read_text()) < MAX_METRIC_BYTES


def test_a_resume_that_changes_central_dp_says_what_that_means() -> None:
    from fedsd.config import ExperimentConfig
    from fedsd.server.service import central_dp_change

    on = ExperimentConfig.model_validate(
        {"federated": {"central_dp": {"clip_norm": 1.0, "noise_multiplier": 4.0}}}
    )
    off = ExperimentConfig()
    noised = {"completed_round": 3, "central_dp": {"rounds": {"1": 0.5, "2": 0.5, "3": 0.5}}}
    plain = {"completed_round": 3, "central_dp": None}
    message, level = central_dp_change(noised, on)  # type: ignore[misc]
    assert level == "info" and "σ 4 after σ 0.5" in message and "composes" in message
    message, level = central_dp_change(plain, on)  # type: ignore[misc]
    assert level == "warn" and "ε is ∞" in message
    message, level = central_dp_change(noised, off)  # type: ignore[misc]
    assert level == "warn" and "not noised" in message
    assert central_dp_change(plain, off) is None and central_dp_change({"completed_round": 0}, on) is None
    same = {"completed_round": 3, "central_dp": {"rounds": {"1": 4.0}}}
    assert central_dp_change(same, on) is None
