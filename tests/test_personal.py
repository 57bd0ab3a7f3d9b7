"""Personal test speech, personal heads and a deployable model on every device (issue 10).

Real partitions, the real ClientApp and strategy over the in-process grid (Flower messages serialised
both ways), real CLI commands on the device's model.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from harness import federation, inprocess_grid, write_config
from test_partition import CLASSES, corpus
from typer.testing import CliRunner

from fedsd.checkpoint import load_tensors
from fedsd.clients.assembly import local_features as _features
from fedsd.clients.client_app import make_client_app
from fedsd.clients.device import DeviceSettings
from fedsd.clients.training import LocalTrainConfig, plan_exits
from fedsd.data.manifest import read_manifest
from fedsd.data.partition import PERSONAL_TEST, Partition, make_partition, write_device_manifests
from fedsd.model.multiexit import MultiExitSER
from fedsd.security.wire import heads_to_record
from fedsd.server.federation import run_federation, train_config_record

PERSONAL = {"local_epochs": 2, "min_clients": 2, "personal_test_fraction": 0.25, "personalize_epochs": 3}


# ------------------------------------------------------------------------------------ the partition
def test_personal_split_is_disjoint_stratified_and_deterministic() -> None:
    rows = corpus(n_speakers=10, per_class=6)
    kw = dict(num_clients=4, by="speaker", label_fraction=0.2, test_speakers=2, server_speakers=1,
              personal_test_fraction=0.2)  # fmt: skip
    p = make_partition(rows, seed=3, **kw)
    label = {r.utt_id: r.label for r in rows}
    held_out = set(p.test_utt_ids) | set(p.server_utt_ids)
    everything = set()
    for c in p.clients:
        train, personal = set(c.utt_ids), set(c.personal_test_utt_ids)
        assert personal and not personal & train and not personal & held_out
        everything |= train | personal
        # stratified: per class round(0.2 n) (>= 1, < n) of the device's own utterances of that class
        whole = Counter(label[u] for u in train | personal)
        got = Counter(label[u] for u in personal)
        for cls, n in whole.items():
            assert got[cls] == min(n - 1, max(1, math.floor(0.2 * n + 0.5))), (c.client_id, cls)
        assert sum(c.class_histogram.values()) == len(c.utt_ids) == len(c.labelled)
        assert not {label[u] for u in c.labelled_utt_ids()} ^ set(CLASSES)  # labels only among training
    assert everything | held_out == {r.utt_id for r in rows}
    assert make_partition(rows, seed=3, **kw) == p  # deterministic per seed
    other = make_partition(rows, seed=4, **kw)
    assert [c.personal_test_utt_ids for c in other.clients] != [c.personal_test_utt_ids for c in p.clients]
    # the personal test set does not depend on the label fraction; labelled sets stay nested
    more = make_partition(rows, seed=3, **(kw | {"label_fraction": 0.5}))
    for a, b in zip(p.clients, more.clients, strict=True):
        assert a.personal_test_utt_ids == b.personal_test_utt_ids and a.utt_ids == b.utt_ids
        assert set(a.labelled_utt_ids()) <= set(b.labelled_utt_ids())
    none = make_partition(rows, seed=3, **(kw | {"personal_test_fraction": 0.0}))
    assert all(not c.personal_test_utt_ids for c in none.clients)


def test_a_class_seen_once_stays_for_training() -> None:
    rows = [r for r in corpus(n_speakers=2, per_class=3) if r.label != "sad" or r.utt_id.endswith("_00")]
    p = make_partition(rows, num_clients=None, personal_test_fraction=0.5, seed=0)
    label = {r.utt_id: r.label for r in rows}
    for c in p.clients:
        assert "sad" not in {label[u] for u in c.personal_test_utt_ids}
        assert "sad" in {label[u] for u in c.utt_ids}


def test_device_manifests_mark_personal_rows_and_devices_never_train_on_them(tmp_path: Path) -> None:
    rows = corpus(n_speakers=4, per_class=5)
    p = make_partition(rows, num_clients=2, label_fraction=0.5, personal_test_fraction=0.2, seed=1)
    paths = write_device_manifests(p, rows, tmp_path / "devices")
    for c, path in zip(p.clients, paths, strict=True):
        got = read_manifest(path)
        personal = [r for r in got if r.split == PERSONAL_TEST]
        assert [r.utt_id for r in personal] == c.personal_test_utt_ids and all(r.label for r in personal)
        settings = DeviceSettings(exit=1, device="cpu", cache_dir=tmp_path, manifest=path, root=tmp_path)
        train_rows, labelled = settings.local_data()
        assert [r.utt_id for r in train_rows] == c.utt_ids and labelled == c.labelled
        assert [r.utt_id for r in settings.personal_test_data()] == c.personal_test_utt_ids


# ------------------------------------------------------------------------------------ a federated run
@pytest.fixture()
def run(tmp_path: Path, small_corpus: Path, tiny_model_dir: Path):
    fed = federation(
        tmp_path,
        small_corpus,
        tiny_model_dir,
        name="personal",
        device_models=tmp_path / "device-models",
        **PERSONAL,
    )
    return fed.cfg, fed.prepared, fed.rc, fed.spec


def test_devices_train_only_on_their_training_utterances(run) -> None:
    _cfg, prepared, rc, _spec = run
    part = Partition.load(prepared.partition)
    model = MultiExitSER.from_pretrained(prepared.base_model)
    grid = inprocess_grid(rc)
    for pid, ctx in enumerate(grid.contexts.values()):
        settings = DeviceSettings.from_context(ctx, rc)
        plan = plan_exits(model.exits, settings.exit, LocalTrainConfig(exit=settings.exit))
        feats = _features(settings, model, plan)  # what `train` trains on
        client = part.client(pid)
        assert feats.utt_ids == client.utt_ids
        assert not set(feats.utt_ids) & set(client.personal_test_utt_ids)
        assert not set(feats.utt_ids) & (set(part.test_utt_ids) | set(part.server_utt_ids))
        assert settings.name == client.client_id


def test_personal_metrics_personal_heads_and_device_models(run, small_corpus: Path) -> None:
    cfg, prepared, rc, spec = run
    logs: list[str] = []
    result = run_federation(inprocess_grid(rc), spec, log=logs.append)
    run_dir = Path(spec.run_dir)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [0, 1, 2]
    for rec in lines[1:]:
        personal = rec["personal"]
        assert set(personal) == {"before", "after"}
        # exit 1 is run by both devices, exit 2 by one; mean ± std over devices per exit
        assert personal["before"]["1"]["uar"]["n"] == 2 and personal["before"]["2"]["uar"]["n"] == 1
        for tag in ("before", "after"):
            for metric in ("uar", "wa", "f1"):
                s = personal[tag]["1"][metric]
                assert 0.0 <= s["mean"] <= 1.0 and s["std"] >= 0.0
                assert rec[f"exit1/personal-{metric}-{tag}"] == s["mean"]
                assert rec[f"exit1/personal-{metric}-{tag}-std"] == s["std"]
        assert "exit1/uar" in rec  # beside the global metric on unseen speakers
        for c in rec["train"]["clients"]:  # training accuracy is named as such
            assert any(k.endswith("/train-uar-after") for k in c["metrics"])
            assert not any(k.endswith("/uar-after") and "personal" not in k and "train" not in k
                           for k in c["metrics"])  # fmt: skip
    assert "final" in lines[-1], logs
    final = lines[-1]["final"]
    assert set(final["personal"]) == {"global", "personal"}
    assert final["personal"]["global"]["1"]["uar"]["n"] == 2
    names = {d["name"] for d in final["devices"].values()}
    assert names == {"client-000", "client-001"}
    for d in final["devices"].values():
        assert d["metrics"]["personalize-epochs"] == 3
        assert "exit1/personal-uar-global" in d["metrics"] and "exit1/personal-uar-personal" in d["metrics"]
    assert any("personal heads" in line for line in logs)

    # the report: personal section with mean ± std, devices named by partition id, the per-device plot
    report = (run_dir / "report.md").read_text()
    assert "Personal test speech" in report and " ± " in report
    assert "| client-000 |" in report and "| client-001 |" in report
    assert "personal_uar_per_device.png" in report
    assert (run_dir / "personal_uar_per_device.png").stat().st_size > 1000

    # every device holds the exported slice for its exit with the final global heads, plus personal heads
    final_heads = MultiExitSER.from_pretrained(result.final_dir).head_state_dict()
    models = Path(rc["sim-device-models"])
    for name, exit_k in (("client-000", 1), ("client-001", 2)):
        dev = MultiExitSER.from_pretrained(models / name)
        assert dev.exits == [k for k in (1, 2, 3, 4) if k <= exit_k]
        assert dev.meta["device_model"]["heads"] == "global" and dev.meta["device_model"]["round"] == 2
        got = dev.head_state_dict()
        assert set(got) == {k for k in final_heads if int(k.split(".")[1]) <= exit_k}
        assert all(torch.equal(v, final_heads[k]) for k, v in got.items())
        mine = MultiExitSER.from_pretrained(models / name / "personal")
        assert mine.meta["device_model"]["heads"] == "personal"
        assert any(not torch.equal(v, final_heads[k]) for k, v in mine.head_state_dict().items())


def test_done_reply_carries_metrics_only_and_the_device_model_loads_in_the_cli(
    run, small_corpus: Path, tmp_path: Path
) -> None:
    cfg, prepared, rc, _spec = run
    base = MultiExitSER.from_pretrained(prepared.base_model)
    app = make_client_app(rc)
    grid = inprocess_grid(rc)
    node, ctx = next(iter(grid.contexts.items()))
    config = dict(train_config_record(cfg, base.backbone_fingerprint(), 0, num_rounds=2))
    config |= {"rounds": 2, "status": "completed", "personalize-epochs": 4}
    content = RecordDict({"arrays": heads_to_record(base.head_state_dict()), "config": ConfigRecord(config)})
    reply = app(Message(content, node, "query.done"), Context(ctx.run_id, node, ctx.node_config, RecordDict(),
                                                               ctx.run_config))  # fmt: skip
    assert not reply.has_error(), reply.error if reply.has_error() else None
    assert len(reply.content.array_records) == 0  # personal heads never leave the device
    metrics = reply.content.metric_records["metrics"]
    assert metrics["personalize-epochs"] == 4 and metrics["n-personal-test"] > 0
    assert 0.0 <= metrics["exit1/personal-uar-personal"] <= 1.0
    out = Path(rc["sim-device-models"]) / "client-000"
    personal = MultiExitSER.from_pretrained(out / "personal").head_state_dict()
    assert any(not torch.equal(v, base.head_state_dict()[k]) for k, v in personal.items())

    from fedsd.cli.main import app as cli

    runner = CliRunner()
    device_manifest = prepared.client_manifests[0]
    for model_dir in (out, out / "personal"):
        res = runner.invoke(
            cli,
            ["evaluate", "--model", str(model_dir), "--manifest", str(device_manifest), "--root",
             str(small_corpus), "--split", PERSONAL_TEST, "--out", str(tmp_path / "eval.json"),
             "--latency-utts", "1"],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        assert set(json.loads((tmp_path / "eval.json").read_text())["exits"]) == {"1"}
    wav = small_corpus / read_manifest(device_manifest)[0].path
    res = runner.invoke(cli, ["predict", "--model", str(out), "--json", str(wav)])
    assert res.exit_code == 0, res.output
    line = json.loads(next(x for x in res.stdout.splitlines() if x.startswith("{")))
    assert line["exit"] == 1 and abs(sum(line["probs"].values()) - 1) < 1e-4


def test_an_interrupted_device_keeps_the_last_completed_round(run) -> None:
    _cfg, _prepared, rc, spec = run
    spec.rounds = 2
    grid = inprocess_grid(rc)
    app = grid.client_app
    calls: list[str] = []

    def device(msg: Message, context: Context) -> Message:
        calls.append(str(msg.metadata.message_type))
        if msg.metadata.message_type == "query.done":
            raise RuntimeError("the device was switched off")  # it never hears the end of the run
        return app(msg, context)

    grid.client_app = device  # type: ignore[assignment]
    run_federation(grid, spec, log=lambda _: None)
    round1 = load_tensors(Path(spec.run_dir) / "rounds" / "round_001.safetensors")
    dev = MultiExitSER.from_pretrained(Path(rc["sim-device-models"]) / "client-000")
    assert dev.meta["device_model"]["round"] == 1  # written at round 2's train message
    assert all(torch.equal(v, round1[k]) for k, v in dev.head_state_dict().items())
    assert not (Path(rc["sim-device-models"]) / "client-000" / "personal").exists()
    assert np.isclose(len(calls), 2 + 2 * 2 + 2)  # info ×2, train ×2 ×2 rounds, done ×2


def test_a_deployed_device_reads_out_personalize_epochs_and_its_name(tmp_path: Path) -> None:
    nc = {"data": str(tmp_path / "client-007.csv"), "root": str(tmp_path), "out": str(tmp_path / "model"),
          "personalize-epochs": 5}  # fmt: skip
    ctx = Context(run_id=1, node_id=9, node_config=nc, state=RecordDict(), run_config={})
    s = DeviceSettings.from_context(ctx)
    assert s.out == tmp_path / "model" and s.personalize_epochs == 5 and s.name == "client-007"
    bare = DeviceSettings.from_context(
        Context(1, 9, {**nc, "name": "kitchen"} | {"out": ""}, RecordDict(), {})
    )
    assert bare.out is None and bare.name == "kitchen"
    del nc["personalize-epochs"]
    assert DeviceSettings.from_context(Context(1, 9, nc, RecordDict(), {})).personalize_epochs is None


def test_data_partition_cli_writes_personal_rows_into_device_manifests(tmp_path: Path) -> None:
    from fedsd.cli.main import app as cli
    from fedsd.data.manifest import write_manifest

    rows = corpus(n_speakers=6, per_class=5)
    manifest = write_manifest(rows, tmp_path / "m.csv")
    res = CliRunner().invoke(
        cli,
        ["data", "partition", str(manifest), "--clients", "3", "--label-fraction", "0.2", "--test-speakers", "1",
         "--out", str(tmp_path / "part.json"), "--device-manifests", str(tmp_path / "devices")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "personal test" in res.output
    part = Partition.load(tmp_path / "part.json")
    assert part.config["personal_test_fraction"] == 0.2  # the command's default
    for c in part.clients:
        got = read_manifest(tmp_path / "devices" / f"{c.client_id}.csv")
        assert [r.utt_id for r in got if r.split == PERSONAL_TEST] == c.personal_test_utt_ids
        assert [r.utt_id for r in got if r.split == "train"] == c.utt_ids
        assert sum(bool(r.label) for r in got if r.split == "train") == c.num_labelled


def test_simulate_cli_device_models_and_personalize_epochs(
    tmp_path: Path, small_corpus: Path, tiny_model_dir: Path
) -> None:
    from fedsd.cli.main import app as cli

    cfg_path = write_config(
        tmp_path / "fed.yaml", small_corpus, name="personal", **(PERSONAL | {"personalize_epochs": 0})
    )
    out = tmp_path / "sim"
    res = CliRunner().invoke(
        cli,
        ["simulate", "--config", str(cfg_path), "--base-model", str(tiny_model_dir), "--engine", "inprocess",
         "--rounds", "1", "--out", str(out), "--device-models", "--personalize-epochs", "2"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["final"]
    assert {d["metrics"]["personalize-epochs"] for d in final["devices"].values()} == {2}
    for name in ("client-000", "client-001"):
        assert (out / "device-models" / name / "fedsd.json").is_file()
        assert (out / "device-models" / name / "personal" / "fedsd.json").is_file()
