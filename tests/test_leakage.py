"""No speaker leakage (issue 22): checkpoints record what they saw, reuse checks it, evaluate warns, and the
demo's partition follows its manifest's test split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsd.checkpoint import DATA_RECORD_KEY, read_model_meta, seen_speakers, sha256_json, speaker_overlap
from fedsd.cli.main import app
from fedsd.config import ConfigError, ExperimentConfig, load_config, override_config
from fedsd.data.manifest import ManifestRow, read_manifest, write_manifest
from fedsd.server.prepare import make_run_partition, prepare_run, run_speakers
from fedsd.training.central import split_rows, train

LABELS = ["neutral", "happy", "angry", "sad"]


def _config(corpus: Path, seed: int = 0, **federated) -> ExperimentConfig:
    """The tiny model, one short epoch: enough for a real checkpoint with a record."""
    return ExperimentConfig.model_validate(
        {
            "data": {"root": str(corpus), "labels": LABELS, "crop": {"max_seconds": 0.5, "mode": "center"}},
            "model": {"backbone": "tiny", "pretrained": False, "exits": [1, 2, 3, 4]},
            "train": {"lr": 1e-3, "batch_size": 8, "epochs": 1, "seed": 0},
            "federated": {
                "num_clients": 2, "test_speakers": 1, "server_speakers": 2, "server_valid_speakers": 1,
                "rounds": 1, "local_epochs": 1, "seed": seed, **federated,
            },
        }
    )  # fmt: skip


def test_checkpoint_records_its_training_and_selection_speakers(tmp_path: Path, small_corpus: Path) -> None:
    cfg = _config(small_corpus)
    splits = split_rows(cfg, read_manifest(small_corpus / "manifest.csv"))
    result = train(cfg, tmp_path / "run", log=lambda _: None)
    for d in (result.best_dir, result.last_dir):
        record = read_model_meta(d)[DATA_RECORD_KEY]
        assert record["train_speakers"] == sorted({r.speaker for r in splits["train"]})
        assert record["select_speakers"] == sorted({r.speaker for r in splits["valid"]})
        assert record["train_utt_ids_sha256"] == sha256_json(sorted(r.utt_id for r in splits["train"]))
        assert record["n_select"] == len(splits["valid"])
    test_spk = {r.speaker for r in splits["test"]}
    assert speaker_overlap(read_model_meta(result.best_dir), test_spk) == {"status": "none", "speakers": []}


def test_a_checkpoint_without_a_record_is_unknown_not_clean(tiny_model_dir: Path) -> None:
    meta = read_model_meta(tiny_model_dir)
    assert DATA_RECORD_KEY not in meta and seen_speakers(meta) is None
    assert speaker_overlap(meta, ["synth:spk00"])["status"] == "unknown"


def _overlapping_seed(cfg: ExperimentConfig, tmp: Path, seen: set[str]) -> int:
    """A federated seed whose partition uses a speaker the first model trained or selected on."""
    for seed in range(1, 20):
        other = override_config(cfg, {"federated.seed": seed})
        part = make_run_partition(other, tmp / f"p{seed}.json", log=lambda _: None)
        if run_speakers(part) & seen:
            return seed
    raise AssertionError("no seed redraws the server pool")


def test_rerun_with_another_seed_retrains_the_central_model_and_keeps_the_old(
    tmp_path: Path, small_corpus: Path
) -> None:
    """After a seed-0 run, a rerun in the same directory whose partition meets the old model's speakers
    retrains it (atomically, the old model kept beside it); the same partition reuses it."""
    logs: list[str] = []
    run = tmp_path / "run"
    cfg = _config(small_corpus)
    first = prepare_run(cfg, run, log=logs.append)
    assert first.trained_here
    seen = seen_speakers(read_model_meta(first.base_model))
    again = prepare_run(cfg, run, log=logs.append)
    assert not again.trained_here and any("trained earlier" in line for line in logs)

    seed = _overlapping_seed(cfg, tmp_path, seen)
    other = override_config(cfg, {"federated.seed": seed})
    old_heads = (first.base_model / "heads.safetensors").read_bytes()
    logs.clear()
    redo = prepare_run(other, run, log=logs.append)
    assert redo.trained_here and redo.base_model == first.base_model  # same place, new model
    part = make_run_partition(other, tmp_path / "check.json", log=lambda _: None)
    assert speaker_overlap(read_model_meta(redo.base_model), run_speakers(part))["status"] == "none"
    kept = [p for p in run.iterdir() if p.name.startswith("central.replaced-")]
    assert len(kept) == 1 and (kept[0] / "best" / "heads.safetensors").read_bytes() == old_heads
    assert not [p for p in run.iterdir() if ".training-" in p.name]
    assert any("not reusing" in line and str(kept[0]) in " ".join(logs) for line in logs)


def test_a_central_model_without_a_record_is_retrained(
    tmp_path: Path, small_corpus: Path, tiny_model_dir: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "central" / "best")
    logs: list[str] = []
    prepared = prepare_run(_config(small_corpus), run, log=logs.append)
    assert prepared.trained_here and seen_speakers(read_model_meta(prepared.base_model)) is not None
    assert any("records no training speakers" in line for line in logs)


def test_a_given_base_model_that_saw_a_run_speaker_stops_the_run(tmp_path: Path, small_corpus: Path) -> None:
    cfg = _config(small_corpus)
    first = prepare_run(cfg, tmp_path / "a", log=lambda _: None)
    seed = _overlapping_seed(cfg, tmp_path, seen_speakers(read_model_meta(first.base_model)))
    other = override_config(cfg, {"federated.seed": seed})
    with pytest.raises(ConfigError, match=r"trained or selected on speaker\(s\) synth:spk\d+") as err:
        prepare_run(other, tmp_path / "b", base_model=first.base_model, log=lambda _: None)
    assert "leave base_model unset" in str(err.value)
    prepare_run(cfg, tmp_path / "c", base_model=first.base_model, log=lambda _: None)  # same split: fine


def test_evaluate_warns_and_records_speaker_overlap(
    tmp_path: Path, small_corpus: Path, tiny_model_dir: Path
) -> None:
    result = train(_config(small_corpus), tmp_path / "run", log=lambda _: None)
    runner = CliRunner()

    def evaluate(model: Path, split: str) -> tuple[dict, str]:
        out = tmp_path / f"{model.name}-{split}.json"
        res = runner.invoke(
            app,
            ["evaluate", "--model", str(model), "--manifest", str(small_corpus / "manifest.csv"),
             "--root", str(small_corpus), "--split", split, "--out", str(out), "--latency-utts", "1"],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        return json.loads(out.read_text())["speaker_overlap"], " ".join(res.stderr.split())

    overlap, err = evaluate(result.best_dir, "all")  # every speaker: the training ones too
    train_spk = read_model_meta(result.best_dir)[DATA_RECORD_KEY]["train_speakers"]
    assert overlap["status"] == "overlap" and set(train_spk) <= set(overlap["speakers"])
    assert "warning" in err and train_spk[0] in err and "not on unseen speakers" in err
    overlap, err = evaluate(result.best_dir, "test")  # the manifest's held-out speakers
    assert overlap == {"status": "none", "speakers": [], "evaluated_speakers": 1} and "warning" not in err
    overlap, err = evaluate(tiny_model_dir, "test")
    assert overlap["status"] == "unknown" and "records no training speakers" in err


def _demo_like_manifest(root: Path, speakers: int = 36) -> Path:
    """The demo corpus' manifest without its audio: the generator's own per-speaker split."""
    from fedsd.data.synthetic import speaker_splits

    split_of = speaker_splits(speakers, 0)
    rows = [
        ManifestRow(
            utt_id=f"synth_spk{i:02d}_s{s:02d}_{e}",
            path=f"wav/spk{i:02d}/{s}_{e}.wav",
            label=e,
            orig_label=e,
            speaker=f"synth:spk{i:02d}",
            dataset="synth",
            duration=2.0,
            sample_rate=16000,
            split=split_of[i],
        )
        for i in range(speakers)
        for s in range(12)
        for e in LABELS
    ]
    return write_manifest(rows, root / "manifest.csv")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_demo_partition_holds_out_exactly_the_manifests_test_speakers(tmp_path: Path, seed: int) -> None:
    """configs/demo.yaml on its manifest: the federated test speakers are the manifest's split=test
    speakers, and neither the server pool (the central model) nor a device holds one, at any seed."""
    manifest = _demo_like_manifest(tmp_path)
    cfg = load_config(Path(__file__).parent.parent / "configs" / "demo.yaml",
                      {"data.root": str(tmp_path), "federated.seed": seed})  # fmt: skip
    rows = read_manifest(manifest)
    declared = {r.speaker for r in rows if r.split == "test"}
    part = make_run_partition(cfg, tmp_path / "partition.json", log=lambda _: None)
    assert set(part.test_speakers) == declared and len(declared) == cfg.federated.test_speakers
    assert not declared & set(part.server_speakers)
    assert not declared & {s for c in part.clients for s in c.speakers}
    assert len(part.server_speakers) == cfg.federated.server_speakers


def test_held_out_speakers_never_reach_the_server_pool_when_fewer_are_asked(tmp_path: Path) -> None:
    """Asked for fewer test speakers than the manifest declares: the rest go to devices, never to the
    server pool the base model trains on."""
    manifest = _demo_like_manifest(tmp_path)
    cfg = load_config(Path(__file__).parent.parent / "configs" / "demo.yaml",
                      {"data.root": str(tmp_path), "federated.test_speakers": 2})  # fmt: skip
    declared = {r.speaker for r in read_manifest(manifest) if r.split == "test"}
    part = make_run_partition(cfg, tmp_path / "partition.json", log=lambda _: None)
    assert set(part.test_speakers) < declared and not declared & set(part.server_speakers)


class _Interrupt:
    """A progress display whose first update interrupts the training (as Ctrl-C would)."""

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def update(self, *args, **kwargs) -> None:
        raise KeyboardInterrupt


def test_an_interrupted_retraining_leaves_the_old_model_in_place(
    tmp_path: Path, small_corpus: Path, tiny_model_dir: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "central" / "best")  # no record: it will be retrained
    before = (run / "central" / "best" / "heads.safetensors").read_bytes()
    with pytest.raises(KeyboardInterrupt):
        prepare_run(_config(small_corpus), run, log=lambda _: None, progress=_Interrupt())
    assert (run / "central" / "best" / "heads.safetensors").read_bytes() == before
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("central")) == ["central"]
