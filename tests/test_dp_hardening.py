"""Privacy accounting that cannot under-report (issue 11, hole 4), and DP that is *applied*.

- DP-SGD on a device: one utterance's influence on the privatised gradient is bounded by the clip
  norm, and the noise added has standard deviation σ·C (measured on the gradient Opacus hands the
  optimiser, not recomputed from reported settings);
- with DP on, a train reply carries only the DP-covered heads, ε bookkeeping and the size declared at
  the handshake; federated evaluation and the handshake's labelled count are withheld;
- a device's DP rounds are also kept in a device-wide ledger under its own identity: a server that
  changes its ``federation-id`` does not reset what ``--dp-device-budget`` bounds;
- central DP keeps counting across ``--resume`` (per stable device identity, not Flower's node id)
  and a resumed run with a fixed seed never replays the noise of an earlier start.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from harness import federation, write_config
from opacus.optimizers import DPOptimizer

from fedsd.clients.client_app import make_client_app
from fedsd.clients.device import DeviceError
from fedsd.clients.dp_training import DP_REPLY_KEYS, train_heads_private
from fedsd.clients.private_errors import PRIVATE_ERROR
from fedsd.clients.training import LocalTrainConfig, plan_exits
from fedsd.config import load_config
from fedsd.model.multiexit import MultiExitSER
from fedsd.security.privacy import central_epsilon, epsilon
from fedsd.security.wire import QUERY_INFO, heads_to_record
from fedsd.server.central_dp import CentralDP
from fedsd.server.federation import run_federation, train_config_record
from fedsd.server.inprocess import InProcessGrid
from fedsd.server.validation import ValidUpdate
from fedsd.training.features import CachedFeatures

pytestmark = pytest.mark.usefixtures("task_identity")  # the ClientApp is called directly (conftest)


# ============================================================================ DP-SGD is applied
class _Capture:
    """Records the privatised gradient DPOptimizer hands to the inner optimiser (times the expected
    batch size: the noisy *sum* of clipped per-sample gradients)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.grads: list[torch.Tensor] = []
        real = DPOptimizer.pre_step
        capture = self

        def pre_step(opt, closure=None):  # noqa: ANN001
            out = real(opt, closure)
            flat = torch.cat([p.grad.detach().flatten() for p in opt.params])
            capture.grads.append(flat * opt.expected_batch_size)
            return out

        monkeypatch.setattr(DPOptimizer, "pre_step", pre_step)


def _one_step(model_dir: Path, feats: CachedFeatures, sigma: float, clip: float, seed: int) -> None:
    model = MultiExitSER.from_pretrained(model_dir)
    lcfg = LocalTrainConfig(exit=1, batch_size=len(feats.utt_ids), lr=0.01)
    plan = plan_exits(model.exits, 1, lcfg)
    train_heads_private(
        model, feats, plan, lcfg, noise_multiplier=sigma, max_grad_norm=clip, sample_rate=1.0, steps=1,
        rng_seed=seed,
    )  # fmt: skip


def _hidden(model_dir: Path) -> int:
    model = MultiExitSER.from_pretrained(model_dir)
    return int(model.backbone.config.hidden_size)


def _feats_h(hidden: int, n: int, exits: list[int], seed: int = 0) -> CachedFeatures:
    g = torch.Generator().manual_seed(seed)
    inputs = {k: [torch.randn(2 * hidden, generator=g) for _ in range(n)] for k in exits}  # pooled
    return CachedFeatures(
        utt_ids=[f"u{i}" for i in range(n)], inputs=inputs, labels=torch.arange(n) % 4, hits=0, misses=0
    )


def test_one_utterance_moves_the_dp_gradient_by_at_most_the_clip_norm(tiny_model_dir, monkeypatch) -> None:
    """Replace one utterance by a wild one (×1000 features, another label): with σ = 0 the privatised
    gradient sum moves by at most 2C (each utterance contributes at most C); add one: at most C."""
    clip = 0.5
    exits = MultiExitSER.from_pretrained(tiny_model_dir).exits
    hidden = _hidden(tiny_model_dir)
    base = _feats_h(hidden, 12, exits)
    wild = _feats_h(hidden, 12, exits)
    for k in exits:
        wild.inputs[k][3] = wild.inputs[k][3] * 1000.0
    wild.labels[3] = (wild.labels[3] + 1) % 4
    extra = _feats_h(hidden, 13, exits)
    for k in exits:
        extra.inputs[k][:12] = base.inputs[k]
        extra.inputs[k][12] = extra.inputs[k][12] * 1000.0
    extra.labels[:12] = base.labels
    cap = _Capture(monkeypatch)
    for f in (base, wild, extra):
        _one_step(tiny_model_dir, f, sigma=0.0, clip=clip, seed=0)
    g_base, g_wild, g_extra = cap.grads
    assert float(torch.linalg.vector_norm(g_base)) > 0
    assert float(torch.linalg.vector_norm(g_wild - g_base)) <= 2 * clip + 1e-5
    assert float(torch.linalg.vector_norm(g_extra - g_base)) <= clip + 1e-5
    # the bound is not vacuous: the wild utterance's own gradient is far larger than C
    assert float(torch.linalg.vector_norm(g_wild - g_base)) > 0.5 * clip


def test_dp_noise_has_the_configured_scale(tiny_model_dir, monkeypatch) -> None:
    """Same data, σ = 1.3 against σ = 0: the difference is N(0, (σC)²) per coordinate."""
    clip, sigma = 0.7, 1.3
    exits = MultiExitSER.from_pretrained(tiny_model_dir).exits
    feats = _feats_h(_hidden(tiny_model_dir), 10, exits)
    cap = _Capture(monkeypatch)
    _one_step(tiny_model_dir, feats, sigma=0.0, clip=clip, seed=1)
    _one_step(tiny_model_dir, feats, sigma=sigma, clip=clip, seed=1)
    _one_step(tiny_model_dir, feats, sigma=sigma, clip=clip, seed=2)
    clean, noisy1, noisy2 = cap.grads
    noise = (noisy1 - clean).double()
    assert noise.numel() > 2000
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=0.06)
    assert abs(float(noise.mean())) < 4 * sigma * clip / math.sqrt(noise.numel())
    assert not torch.equal(noisy1, noisy2)  # fresh noise per run


# ============================================================================ a deployed device
@pytest.fixture()
def device(tmp_path: Path, small_corpus: Path, tiny_model_dir: Path):
    cfg = load_config(write_config(tmp_path / "fed.yaml", small_corpus, name="dphard"))
    fp = json.loads((tiny_model_dir / "fedsd.json").read_text())["fingerprint"]
    node = {
        "exit": 1, "data": str(small_corpus / "manifest.csv"), "root": str(small_corpus),
        "cache": str(tmp_path / "cache"), "model": str(tiny_model_dir), "dp-noise-multiplier": 1.0,
    }  # fmt: skip
    heads = heads_to_record(MultiExitSER.from_pretrained(tiny_model_dir).head_state_dict())
    return {"cfg": cfg, "fp": fp, "node": node, "heads": heads, "cache": tmp_path / "cache"}


APP = make_client_app()


def _send(node: dict, mtype: str, content: dict, state: RecordDict | None = None) -> Message | DeviceError:
    msg = Message(RecordDict(content), dst_node_id=5, message_type=mtype)
    ctx = Context(run_id=7, node_id=5, node_config=dict(node), state=state or RecordDict(), run_config={})
    try:
        return APP(msg, ctx)
    except DeviceError as e:
        return e


def _train(device: dict, fid: str, node: dict | None = None) -> Message | DeviceError:
    config = train_config_record(device["cfg"], device["fp"], 0, num_rounds=1, federation_id=fid)
    config["server-round"] = 1
    return _send(node or device["node"], "train", {"arrays": device["heads"], "config": config})


def test_dp_reply_carries_only_what_dp_covers(device) -> None:
    events = device["cache"].parent / "events.jsonl"
    reply = _train(device, "run-a", device["node"] | {"events": str(events)})
    assert isinstance(reply, Message) and not reply.has_error(), reply
    metrics = dict(reply.content.metric_records["metrics"])
    assert set(metrics) <= DP_REPLY_KEYS  # an allowlist: not every dp-* key
    assert "dp-epsilon" in metrics and "dp-device-epsilon" not in metrics  # ε over other federations
    info = _send(device["node"], QUERY_INFO, {"config": ConfigRecord({"fingerprint": device["fp"]})})
    assert isinstance(info, Message)
    declared = int(info.content.config_records["info"]["n-utterances"])
    # the handshake's count, not the training rows (which would reveal the held-out size)
    assert metrics["n-utterances"] == metrics["num-examples"] == declared
    for leak in ("loss", "n-labelled", "cache-hits", "seconds"):
        assert leak not in metrics
    assert not any("uar" in k or "personal" in k for k in metrics)
    logged = json.loads(events.read_text().splitlines()[-1])  # the device's own log keeps it all
    assert logged["kind"] == "train" and "loss" in logged and "n_labelled" in logged
    assert "dp_device_epsilon" in logged and logged["n_utterances"] < declared  # held-out rows exist
    info = _send(device["node"], QUERY_INFO, {"config": ConfigRecord({"fingerprint": device["fp"]})})
    assert isinstance(info, Message)
    record = dict(info.content.config_records["info"])
    assert "n-labelled" not in record and len(record["device-id"]) == 32
    evaluated = _send(device["node"], "evaluate", {"arrays": device["heads"], "config": ConfigRecord(
        {"fingerprint": device["fp"], "server-round": 1})})  # fmt: skip
    assert isinstance(evaluated, DeviceError) and "DP is on" in str(evaluated)


def test_device_budget_spans_runs_whatever_the_federation_id(device) -> None:
    first = _train(device, "run-a")
    assert isinstance(first, Message) and not first.has_error(), first
    m = dict(first.content.metric_records["metrics"])
    step = (1.0, float(m["dp-sample-rate"]), int(m["dp-steps"]))
    e2, e3 = (epsilon([step] * k, float(m["dp-delta"])) for k in (2, 3))
    ledger_file = device["cache"] / "privacy" / "device.json"

    def device_epsilon() -> float:  # the device's own ledger (never sent to a server)
        history = [tuple(h) for h in json.loads(ledger_file.read_text())["history"]]
        return epsilon(history, float(m["dp-delta"]))

    assert device_epsilon() == pytest.approx(epsilon([step], float(m["dp-delta"])))
    node = device["node"] | {"dp-device-budget": (e2 + e3) / 2}
    second = _train(device, "run-b", node)  # a "new run": the per-run ledger starts again ...
    assert isinstance(second, Message) and not second.has_error(), second
    m2 = dict(second.content.metric_records["metrics"])
    assert m2["dp-epsilon"] == pytest.approx(m["dp-epsilon"])
    assert device_epsilon() == pytest.approx(e2)  # ... the device's own does not
    third = _train(device, "run-c", node)
    assert isinstance(third, DeviceError) and "privacy budget reached" in str(third), third
    assert f"{e2:.3f}" not in str(third)  # ε over other federations is not the server's business
    ledger = json.loads(ledger_file.read_text())
    assert ledger["runs"] == {"run-a": 1, "run-b": 1} and len(ledger["history"]) == 2
    assert ledger["device-id"] == (device["cache"] / "device-id").read_text().strip()


def test_dp_error_reply_is_generic_and_the_details_stay_in_the_device_log(device, tmp_path) -> None:
    """A failure under DP (here: a manifest whose rows are all personal test ones, so nothing to
    train on) tells the server only that it failed; the reason, with local paths, stays in the log."""
    manifest = tmp_path / "held-out.csv"
    text = Path(device["node"]["data"]).read_text().splitlines()
    header = text[0].split(",")
    split = header.index("split")
    rows = [
        ",".join(c if i != split else "personal_test" for i, c in enumerate(r.split(","))) for r in text[1:]
    ]
    manifest.write_text("\n".join([text[0], *rows]) + "\n")
    events = tmp_path / "events.jsonl"
    node = device["node"] | {"data": str(manifest), "events": str(events)}
    got = _train(device, "run-a", node)
    assert isinstance(got, DeviceError) and str(got) == PRIVATE_ERROR, got
    assert str(tmp_path) not in str(got) and "utterances" not in str(got)
    logged = json.loads(events.read_text().splitlines()[-1])
    assert "no local utterances" in logged["error"]  # the device's operator still sees why
    # without DP the same failure says why (it is the operator's own run, nothing private is claimed)
    plain = {k: v for k, v in node.items() if not k.startswith("dp-")}
    config = train_config_record(device["cfg"], device["fp"], 0, num_rounds=1, federation_id="run-a")
    got = _send(plain, "train", {"arrays": device["heads"], "config": config})
    assert isinstance(got, DeviceError) and "no local utterances" in str(got), got
    # a refusal of the server's own message still says what was refused, even under DP
    hostile = ConfigRecord(dict(config) | {"lr": float("nan")})
    got = _send(node, "train", {"arrays": device["heads"], "config": hostile})
    assert isinstance(got, DeviceError) and "'lr'" in str(got), got


# ============================================================================ central DP and resume
def _update(node: int, arrays: dict[str, np.ndarray]) -> ValidUpdate:
    return ValidUpdate(node_id=node, arrays=arrays, num_examples=10.0)


def test_central_dp_counts_per_device_identity_and_never_replays_noise() -> None:
    g = {"heads.1.w": np.zeros(1000, np.float32)}
    dp = CentralDP(clip_norm=1.0, noise_multiplier=1.0, seed=3)
    dp.identities = {1: "dev-a"}
    dp.aggregate(g, [_update(1, {"heads.1.w": np.zeros(1000, np.float32)})])
    first_noise, _ = CentralDP(clip_norm=1.0, noise_multiplier=1.0, seed=3).aggregate(
        g, [_update(1, {"heads.1.w": np.zeros(1000, np.float32)})]
    )
    saved = dp.state()
    again = CentralDP(clip_norm=1.0, noise_multiplier=1.0, seed=3)
    again.restore(saved, 1)
    again.identities = {42: "dev-a"}  # the SuperNode restarted: a new node id, the same device
    out, report = again.aggregate(g, [_update(42, {"heads.1.w": np.zeros(1000, np.float32)})])
    assert again.compositions == {"dev-a": 2}
    assert report["epsilon"] == pytest.approx(central_epsilon(1.0, 2, 1, 1e-5))
    assert not np.allclose(out["heads.1.w"], first_noise["heads.1.w"])  # not the same noise again
    twice = CentralDP(clip_norm=1.0, noise_multiplier=1.0, seed=3)
    twice.restore(again.state(), 1)  # resumed from the same round a second time
    out2, _ = twice.aggregate(g, [_update(42, {"heads.1.w": np.zeros(1000, np.float32)})])
    assert not np.allclose(out2["heads.1.w"], out["heads.1.w"])
    legacy = CentralDP(clip_norm=1.0, noise_multiplier=1.0)
    central = {"noise_multiplier": 1.0, "senders_per_head": {"1": 2, "2": 1}}
    legacy.restore(None, 2, [{"round": 1, "privacy": {"central": central}},
                             {"round": 2, "privacy": {"central": central | {"senders_per_head": {"1": 2}}}}])  # fmt: skip
    assert legacy.epsilon() == pytest.approx(central_epsilon(1.0, 3, 1, 1e-5))
    unknown = CentralDP(clip_norm=1.0, noise_multiplier=1.0)  # σ of the earlier rounds not recorded
    unknown.restore(None, 1, [{"round": 1, "privacy": {"central": {"senders_per_head": {"1": 2}}}}])
    assert unknown.epsilon() == math.inf and unknown.unaccounted_rounds == [1]


def test_central_dp_keeps_counting_across_resume(tmp_path, small_corpus, tiny_model_dir) -> None:
    central = {"clip_norm": 0.5, "noise_multiplier": 1.0, "seed": 0}
    fed = federation(
        tmp_path, small_corpus, tiny_model_dir, name="dphard",
        spec={"rounds": 1, "overrides": {"federated.central_dp": central}},
    )  # fmt: skip
    spec, run_dir = fed.spec, fed.run_dir

    def grid(first_node: int) -> InProcessGrid:
        g = fed.grid(2)
        contexts = {}  # a restarted SuperLink gives the devices new node ids
        for i, ctx in enumerate(g.contexts.values()):
            ctx.node_id = first_node + i
            contexts[first_node + i] = ctx
        g.contexts = contexts
        return g

    run_federation(grid(1), spec, log=lambda _: None)
    spec.resume, spec.rounds = True, 3
    run_federation(grid(100), spec, log=lambda _: None)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [0, 1, 2, 3]
    eps = [lines[r]["privacy"]["central"]["epsilon"] for r in (1, 2, 3)]
    # the exit-2 device sends heads 1 and 2: two mechanisms per round, counted on after the resume
    assert eps == pytest.approx([central_epsilon(1.0, r, 2, 1e-5) for r in (1, 2, 3)])
    state = json.loads((run_dir / "state.json").read_text())
    assert state["central_dp"]["starts"] == 1
    assert set(state["central_dp"]["compositions"]) == {"sim-0", "sim-1"}
