"""Federated self-distillation end to end, in process (real ClientApp, real strategy, no sockets)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from harness import federation, inprocess_grid, uar_from_confusion

from fedsd.checkpoint import load_tensors
from fedsd.clients.client_app import make_client_app
from fedsd.model.multiexit import MultiExitSER
from fedsd.security.wire import heads_to_record
from fedsd.server.federation import run_federation, train_config_record
from fedsd.server.inprocess import InProcessGrid


@pytest.fixture()
def setup(tmp_path: Path, small_corpus: Path, tiny_model_dir: Path):
    fed = federation(tmp_path, small_corpus, tiny_model_dir, name="fedtest", local_epochs=2, min_clients=2)
    return fed.cfg, fed.prepared, fed.rc, fed.spec


def test_two_rounds_partial_average_is_exact(setup) -> None:
    cfg, prepared, rc, spec = setup
    result = run_federation(inprocess_grid(rc), spec, log=lambda _: None)
    run_dir = Path(spec.run_dir)
    base = MultiExitSER.from_pretrained(prepared.base_model)
    r0 = load_tensors(run_dir / "rounds" / "round_000.safetensors")
    r1 = load_tensors(run_dir / "rounds" / "round_001.safetensors")
    r2 = load_tensors(run_dir / "rounds" / "round_002.safetensors")
    for key, value in base.head_state_dict().items():
        assert torch.equal(r0[key], value)
    # Devices sit at exits 1 and 2 with the deep teacher: heads 3 and 4 are never trained.
    for key in r0:
        if key.startswith(("heads.3.", "heads.4.")):
            assert torch.equal(r2[key], r0[key]), key
    assert any(not torch.equal(r1[k], r0[k]) for k in r0 if k.startswith("heads.1."))

    # Recompute round 1 independently: call each device's ClientApp with the round-0 heads.
    grid = inprocess_grid(rc)
    app = make_client_app(rc)
    config = train_config_record(cfg, base.backbone_fingerprint(), 0)
    config["server-round"] = 1
    content = RecordDict(
        {"arrays": heads_to_record(base.head_state_dict()), "config": ConfigRecord(dict(config))}
    )
    updates = []
    for node_id, ctx in grid.contexts.items():
        msg = Message(content, node_id, "train")
        reply = app(msg, Context(ctx.run_id, node_id, ctx.node_config, RecordDict(), ctx.run_config))
        arrays = {k: v.numpy() for k, v in reply.content.array_records["arrays"].items()}
        updates.append((arrays, float(reply.content.metric_records["metrics"]["num-examples"])))
    keys1 = [k for k in r0 if k.startswith("heads.1.")]
    keys2 = [k for k in r0 if k.startswith("heads.2.")]
    assert all(k in u for u, _ in updates for k in keys1)  # both devices train exit 1
    assert sum(all(k in u for k in keys2) for u, _ in updates) == 1  # only the exit-2 device trains exit 2
    for key in keys1 + keys2:
        senders = [(u[key].astype(np.float64), n) for u, n in updates if key in u]
        expected = sum(a * n for a, n in senders) / sum(n for _, n in senders)
        np.testing.assert_allclose(r1[key].numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=key)

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [0, 1, 2]
    # every round's UAR is its confusion matrix's; heads 3 and 4 never train, so their UAR is round 0's
    for line in lines:
        for k in (1, 2, 3, 4):
            assert line[f"exit{k}/uar"] == pytest.approx(
                uar_from_confusion(line["eval"][str(k)]["confusion"])
            )
    for k in (3, 4):
        assert lines[2]["eval"][str(k)] == lines[0]["eval"][str(k)]
    assert lines[1]["train"]["num_clients"] == 2 and lines[1]["train"]["num_rejected"] == 0
    assert (run_dir / "report.md").exists() and (run_dir / "uar_per_round.png").exists()
    final = MultiExitSER.from_pretrained(result.final_dir)
    for key, value in final.head_state_dict().items():
        assert torch.equal(value, r2[key])


def test_resume_continues_after_last_completed_round(setup) -> None:
    _cfg, _prepared, rc, spec = setup
    spec.rounds = 1
    run_federation(inprocess_grid(rc), spec, log=lambda _: None)
    run_dir = Path(spec.run_dir)
    r1 = load_tensors(run_dir / "rounds" / "round_001.safetensors")
    assert json.loads((run_dir / "state.json").read_text())["completed_round"] == 1
    spec.rounds, spec.resume = 2, True
    logs: list[str] = []
    run_federation(inprocess_grid(rc), spec, log=logs.append)
    assert any("resuming after round 1" in line for line in logs)
    assert json.loads((run_dir / "state.json").read_text())["completed_round"] == 2
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [0, 1, 2]
    again = load_tensors(run_dir / "rounds" / "round_001.safetensors")
    assert all(torch.equal(again[k], r1[k]) for k in r1)


def test_device_with_another_model_is_refused(setup, tmp_path: Path, small_corpus: Path) -> None:
    _cfg, prepared, rc, spec = setup
    from fedsd.model.backbone import load_backbone

    other = MultiExitSER(
        load_backbone("tiny", family="hubert"), [1, 2, 3, 4], ["neutral", "happy", "angry", "sad"]
    )
    other.save_pretrained(tmp_path / "other")
    # Device 0 is simulated; device 1 is configured like a deployed device that brought its own model.
    nodes = [
        {"partition-id": 0, "num-partitions": 2},
        {
            "exit": 2,
            "data": str(prepared.client_manifests[1]),
            "root": str(small_corpus),
            "model": str(tmp_path / "other"),
        },
    ]
    grid = InProcessGrid(make_client_app(rc), nodes)
    victim = list(grid.contexts)[1]
    spec.min_clients, spec.rounds = 1, 1
    logs: list[str] = []
    run_federation(grid, spec, log=logs.append)
    refusal = [line for line in logs if f"device {victim}" in line]
    assert refusal and "model mismatch" in refusal[0] and "fingerprint" in refusal[0], logs
    lines = [json.loads(x) for x in (Path(spec.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["train"]["num_clients"] == 1


@pytest.mark.slow
def test_ray_simulation_two_rounds(setup) -> None:
    cfg, prepared, _rc, spec = setup
    from fedsd.server.simulation import run_simulation_engine

    # With device DP on, this also proves the privacy ledger survives rounds in Flower's simulation
    # engine (context.state of each virtual node), not only in the in-process grid.
    spec.overrides = {"federated.dp": {"noise_multiplier": 1.0, "delta": 1e-3}}
    result = run_simulation_engine(cfg, spec, prepared, engine="ray", log=lambda _: None)
    lines = [json.loads(x) for x in (Path(spec.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [0, 1, 2]
    assert lines[2]["train"]["num_clients"] == 2
    for c in lines[2]["train"]["clients"]:
        assert c["metrics"]["dp-rounds"] == 2 and c["metrics"]["dp-ledger-from-state"] == 1
    assert lines[2]["privacy"]["max_epsilon"] > lines[1]["privacy"]["max_epsilon"] > 0
    assert result.final_dir is not None and (result.final_dir / "fedsd.json").exists()


def test_federated_evaluation_on_devices(setup) -> None:
    cfg, _prepared, rc, spec = setup
    spec.rounds = 1
    spec.overrides = {"federated.federated_evaluation": True}
    grid = inprocess_grid(rc)
    run_federation(grid, spec, log=lambda _: None)
    lines = [json.loads(x) for x in (Path(spec.run_dir) / "metrics.jsonl").read_text().splitlines()]
    fed = lines[1]["federated_eval"]
    assert fed["num_clients"] == 2 and fed["num_rejected"] == 0
    # reference: each device's ClientApp asked directly to evaluate round 1's heads gives the same numbers
    heads = load_tensors(Path(spec.run_dir) / "rounds" / "round_001.safetensors")
    config = train_config_record(cfg, MultiExitSER.from_pretrained(spec.base_model).backbone_fingerprint(), 0)
    config["server-round"] = 1
    content = RecordDict({"arrays": heads_to_record(heads), "config": ConfigRecord(dict(config))})
    app = make_client_app(rc)
    for client in fed["clients"]:
        ctx = grid.contexts[client["node_id"]]
        reply = app(Message(content, ctx.node_id, "evaluate"), ctx)
        expected = dict(reply.content.metric_records["metrics"])
        assert {"exit1/uar", "exit2/uar"} <= set(client["metrics"])
        for key in ("exit1/uar", "exit2/uar"):
            assert client["metrics"][key] == pytest.approx(expected[key], abs=1e-9), (client["node_id"], key)


def test_device_that_connects_mid_run_is_greeted_and_trains_next_round(setup) -> None:
    """A restarted SuperNode comes back with a new node id: the server greets it after the round."""
    _cfg, _prepared, rc, spec = setup
    app = make_client_app(rc)
    nodes = [{"partition-id": i, "num-partitions": 2} for i in (0, 1, 1)]
    grid = InProcessGrid(app, nodes)
    late = list(grid.contexts)[2]
    grid.unavailable = {late}

    def device(msg: Message, context: Context) -> Message:
        if msg.metadata.message_type == "train":
            grid.unavailable.discard(late)  # it connects while round 1 trains
        return app(msg, context)

    grid.client_app = device  # type: ignore[assignment]
    logs: list[str] = []
    run_federation(grid, spec, log=logs.append)
    lines = [json.loads(x) for x in (Path(spec.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["train"]["num_clients"] == 2 and lines[1]["joined"] == [late]
    assert lines[2]["train"]["num_clients"] == 3 and lines[2]["train"]["num_rejected"] == 0
    assert late in {c["node_id"] for c in lines[2]["train"]["clients"]}
    assert any("joined during the run" in line for line in logs)


def test_server_scores_every_round_on_its_validation_speakers(
    tmp_path: Path, small_corpus: Path, tiny_model_dir: Path
) -> None:
    """``exit<k>/valid-uar``: the round's global heads on the server pool's validation speakers (the ones
    that chose the base model's epoch), recomputed here from the saved round heads; the server learning
    rate and the proximal μ reach the strategy and the devices."""
    from fedsd.data.manifest import read_manifest
    from fedsd.data.partition import Partition
    from fedsd.server.federation import Federation as ServerFederation
    from fedsd.server.prepare import server_pool_splits
    from fedsd.training.cached import evaluate_cached, model_crop
    from fedsd.training.features import FeatureCache

    fed = federation(tmp_path, small_corpus, tiny_model_dir, name="valid", server_speakers=3,
                     server_valid_speakers=1, server_lr=0.5, proximal_mu=0.01)  # fmt: skip
    assert ServerFederation(fed.spec, log=lambda _: None).strategy.server_lr == 0.5
    assert train_config_record(fed.cfg, "fp", 0)["proximal-mu"] == pytest.approx(0.01)
    logs: list[str] = []
    run_federation(fed.grid(), fed.spec, log=logs.append)
    part = Partition.load(fed.prepared.partition)
    valid = server_pool_splits(part, read_manifest(small_corpus / "manifest.csv"), fed.cfg.train.seed, 1)[
        "valid"
    ]
    assert len({r.speaker for r in valid}) == 1 and not {r.speaker for r in valid} & set(part.test_speakers)
    model = MultiExitSER.from_pretrained(fed.prepared.base_model)
    feats = FeatureCache(tmp_path / "check-cache", model, model_crop(model)).get(
        valid, small_corpus, model.exits, label_names=model.label_names
    )
    lines = fed.records()
    assert [r["round"] for r in lines] == [0, 1, 2]
    for line in lines:
        model.load_head_state_dict(
            load_tensors(fed.run_dir / "rounds" / f"round_{line['round']:03d}.safetensors")
        )
        reports = evaluate_cached(model, feats, model.exits)
        for k in (1, 2, 3, 4):
            assert line[f"exit{k}/valid-uar"] == pytest.approx(reports[k].uar)
    last = "/".join(f"{lines[2][f'exit{k}/valid-uar']:.3f}" for k in (1, 2, 3, 4))
    assert any(line.startswith("round 2/2") and f"validation speakers: {last}" in line for line in logs)
    report = (fed.run_dir / "report.md").read_text()
    section = report.split("## UAR on the server's validation speakers per round")[1].split("##")[0]
    assert f"| 2 | {lines[2]['exit1/valid-uar']:.3f} |" in section  # the last round's exit-1 value
