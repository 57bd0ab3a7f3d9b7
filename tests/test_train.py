"""Centralized self-distillation: a short real run learns, reloads exactly, and the CLI tools work on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from harness import uar_from_confusion
from typer.testing import CliRunner

from fedsd.cli.main import app
from fedsd.config import ExperimentConfig, load_config
from fedsd.data.audio import CropPolicy
from fedsd.data.manifest import read_manifest
from fedsd.model.multiexit import MultiExitSER
from fedsd.training.central import evaluate_loader, make_loader, predict_loader, split_rows, train

LABELS = ["neutral", "happy", "angry", "sad"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, espeak_corpus: Path):
    """10 epochs on the generated corpus; the learning threshold below is calibrated on espeak-ng speech."""
    small_corpus = espeak_corpus
    cfg = ExperimentConfig.model_validate(
        {
            "data": {
                "root": str(small_corpus),
                "labels": LABELS,
                "crop": {"max_seconds": 1.0, "mode": "random"},
            },
            "model": {"backbone": "tiny", "pretrained": False, "exits": [1, 2, 3, 4]},
            "train": {"lr": 2e-3, "batch_size": 4, "epochs": 10, "freeze_feature_encoder": False, "seed": 0},
        }
    )
    run_dir = tmp_path_factory.mktemp("train") / "run"
    result = train(cfg, run_dir, log=lambda _: None)
    return cfg, result, small_corpus


def test_short_training_learns_the_training_set(trained) -> None:
    cfg, result, corpus = trained
    rows = split_rows(cfg, read_manifest(corpus / "manifest.csv"))["train"]
    model = MultiExitSER.from_pretrained(result.last_dir)
    loader = make_loader(rows, corpus, LABELS, CropPolicy(1.0, "center"), batch_size=8)
    reports = evaluate_loader(model, loader)
    assert reports[model.teacher_exit].uar > 0.5, {k: r.uar for k, r in reports.items()}  # chance is 0.25
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, 11))
    assert all(f"valid/exit{k}/uar" in lines[-1] for k in (1, 2, 3, 4))
    assert lines[-1]["train/total"] < lines[0]["train/total"]
    assert (result.run_dir / "config.yaml").exists() and (result.best_dir / "fedsd.json").exists()


def test_checkpoint_reloads_to_identical_predictions(trained) -> None:
    cfg, result, corpus = trained
    rows = read_manifest(corpus / "manifest.csv")[:12]
    loader = make_loader(rows, corpus, LABELS, CropPolicy(1.0, "center"), batch_size=4)
    a = MultiExitSER.from_pretrained(result.best_dir)
    b = MultiExitSER.from_pretrained(result.best_dir)
    la, _, _ = predict_loader(a, loader)
    lb, _, _ = predict_loader(b, loader)
    for k in a.exits:
        assert torch.equal(torch.from_numpy(la[k]), torch.from_numpy(lb[k]))


def test_evaluate_cli_writes_json_and_plot(trained, tmp_path: Path) -> None:
    _cfg, result, corpus = trained
    out = tmp_path / "eval.json"
    res = CliRunner().invoke(
        app,
        ["evaluate", "--model", str(result.best_dir), "--manifest", str(corpus / "manifest.csv"),
         "--root", str(corpus), "--out", str(out), "--latency-utts", "2"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert set(data["exits"]) == {"1", "2", "3", "4"}
    n_test = sum(r.split == "test" and bool(r.label) for r in read_manifest(corpus / "manifest.csv"))
    for metrics in data["exits"].values():  # UAR: its own confusion matrix over every test utterance
        assert sum(map(sum, metrics["confusion"])) == n_test > 0
        assert metrics["uar"] == pytest.approx(uar_from_confusion(metrics["confusion"]))
        assert metrics["latency_s"] > 0
        assert len(metrics["confusion"]) == 4 and set(metrics["per_class_recall"]) == set(LABELS)
    assert out.with_suffix(".png").stat().st_size > 1000


def test_evaluate_rejects_labels_the_model_lacks(trained, tmp_path: Path) -> None:
    _cfg, result, corpus = trained
    text = (corpus / "manifest.csv").read_text().replace(",sad,", ",bored,")
    bad = tmp_path / "bad.csv"
    bad.write_text(text)
    res = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--model",
            str(result.best_dir),
            "--manifest",
            str(bad),
            "--root",
            str(corpus),
            "--split",
            "all",
        ],
    )
    assert res.exit_code == 1
    assert "bored" in res.output and "label set" in res.output


def test_predict_fixed_exit_auto_exit_and_bad_file(trained, tmp_path: Path) -> None:
    _cfg, result, corpus = trained
    wavs = sorted((corpus / "wav").rglob("*.wav"))[:2]
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00not really a wav")
    runner = CliRunner()
    res = runner.invoke(
        app,
        ["predict", "--model", str(result.best_dir), "--exit", "2", "--json", *map(str, wavs), str(broken)],
    )
    assert res.exit_code == 1  # one unreadable file, reported, the others still classified
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert [line["exit"] for line in lines[:2]] == [2, 2]
    assert lines[0]["label"] in LABELS and abs(sum(lines[0]["probs"].values()) - 1) < 1e-4
    assert "error" in lines[2] and lines[2]["file"] == str(broken)
    for threshold, exit_k in (("0", 1), ("1.01", 4)):  # always confident enough / never: first, last exit
        args = ["predict", "--model", str(result.best_dir), "--exit", "auto", "--threshold", threshold]
        res = runner.invoke(app, [*args, "--json", str(wavs[0])])
        assert json.loads(res.stdout)["exit"] == exit_k, (threshold, res.output)
    bad_exit = runner.invoke(app, ["predict", "--model", str(result.best_dir), "--exit", "7", str(wavs[0])])
    assert bad_exit.exit_code == 2 and "exits [1, 2, 3, 4]" in bad_exit.output


def test_all_shipped_configs_validate() -> None:
    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert configs, "no shipped configs found next to the tests"
    for path in configs:
        cfg = load_config(path)
        assert cfg.model.exits == sorted(cfg.model.exits), path
        if cfg.federated.exits_mix:
            assert set(cfg.federated.exits_mix) <= set(cfg.model.exits), path


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    from fedsd.config import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: -1}\nmodel: {exits: [3, 0]}\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "train.lr" in str(e.value) and "model.exits" in str(e.value) and str(bad) in str(e.value)


def test_central_ce_steps_only_on_batches_with_a_label(
    tmp_path: Path, small_corpus: Path, monkeypatch
) -> None:
    """CE at 5 % labels: a batch without a labelled clip takes no AdamW step and no scheduler count (they
    did: AdamW's momentum moved the weights on a zero gradient); metrics.jsonl counts both."""
    from fedsd.data.partition import labelled_mask
    from fedsd.training.central import train_crop

    cfg = ExperimentConfig.model_validate(
        {
            "data": {"root": str(small_corpus), "labels": LABELS, "crop": {"max_seconds": 0.5, "mode": "random"}},
            "model": {"backbone": "tiny", "pretrained": False, "exits": [1, 2, 3, 4]},
            "train": {"mode": "ce", "label_fraction": 0.05, "lr": 1e-3, "batch_size": 4, "epochs": 1,
                      "lr_schedule": "linear", "lr_warmup": 0.0, "seed": 0},
        }
    )  # fmt: skip
    calls = [0]
    real = torch.optim.AdamW.step

    def step(self, *args, **kwargs):  # a spy: the real step still runs
        calls[0] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    result = train(cfg, tmp_path / "run", log=lambda _: None)
    record = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    # the same loader train() iterates (shuffled by the seed): which batches hold a labelled clip
    rows = split_rows(cfg, read_manifest(small_corpus / "manifest.csv"))["train"]
    mask = labelled_mask([r.utt_id for r in rows], [r.label for r in rows], 0.05, 0)
    loader = make_loader(
        rows, small_corpus, LABELS, train_crop(cfg), batch_size=4, train=True, labelled=mask, seed=0
    )
    loader.dataset.set_epoch(1)
    with_label = [bool((b["labels"] >= 0).any()) for b in loader]
    assert 0 < sum(with_label) < len(with_label)  # the case at hand: some batches have no label
    assert calls[0] == record["steps"] == sum(with_label)
    assert record["steps_skipped"] == len(with_label) - sum(with_label)
    # the scheduler counted real steps only: linear decay after `steps` of `len(loader)` nominal steps
    assert record["lr"] == pytest.approx(1e-3 * (1 - sum(with_label) / len(with_label)))
