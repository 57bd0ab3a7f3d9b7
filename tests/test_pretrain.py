"""Self-supervised pretraining (fedsd.training.pretrain): targets aligned with frames, learning, a loadable checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner


@pytest.mark.parametrize("seconds", [0.3, 1.0, 1.37, 2.0])
def test_mfcc_targets_line_up_with_the_front_end_frames(seconds: float) -> None:
    from fedsd.model.backbone import TruncatedEncoder, load_backbone
    from fedsd.training.pretrain import frames_of, mfcc_frames

    n = int(seconds * 16000)
    wav = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    enc = TruncatedEncoder(load_backbone("tiny"))
    expected = int(enc.output_lengths(torch.tensor([n]))[0])
    assert mfcc_frames(wav).shape == (expected, 39)
    assert frames_of(n) == expected


@pytest.fixture(scope="module")
def pretrained(small_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    from fedsd.data.manifest import read_manifest
    from fedsd.training.pretrain import PretrainSettings, pretrain

    rows = read_manifest(small_corpus / "manifest.csv")
    out = tmp_path_factory.mktemp("ssl") / "tiny-ssl"
    settings = PretrainSettings(clusters=16, epochs=4, batch_size=4, crop_seconds=1.0, lr=2e-3, threads=1)
    res = pretrain(rows, small_corpus, out, settings, log=lambda _: None)
    return out, res


def test_pretraining_learns_the_masked_frames(pretrained) -> None:
    _, res = pretrained
    first, last = res.history[0], res.history[-1]
    assert last["loss"] < first["loss"] - 0.05
    assert last["loss"] < np.log(16)  # below a uniform guess over the clusters
    assert last["acc"] > 1 / 16
    assert "valid_acc" in last  # masked prediction is also watched on held-out speakers


def test_pretrained_encoder_loads_as_a_backbone(pretrained) -> None:
    from safetensors.torch import load_file

    from fedsd.model.backbone import load_backbone
    from fedsd.model.multiexit import MultiExitSER

    out, res = pretrained
    meta = json.loads((out / "pretrain.json").read_text())
    assert meta["history"] == res.history and meta["settings"]["clusters"] == 16
    saved = load_file(str(out / "model.safetensors"))
    model = load_backbone(str(out), pretrained=True)
    assert model.config.apply_spec_augment is False  # fine-tuning and inference never mask by surprise
    state = model.state_dict()
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    scratch = load_backbone(str(out), pretrained=False)
    assert not torch.equal(
        scratch.state_dict()["encoder.layers.0.attention.k_proj.weight"],
        state["encoder.layers.0.attention.k_proj.weight"],
    )
    net = MultiExitSER(model, [1, 2], ["a", "b"], meta={"sample_rate": 16000})
    assert net(torch.randn(2, 16000))[2].logits.shape == (2, 2)


def test_pretrain_cli_refuses_a_missing_manifest(tmp_path: Path) -> None:
    from fedsd.cli.main import app

    res = CliRunner().invoke(app, ["pretrain", "--manifest", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "nope.csv" in res.output and "Traceback" not in res.output
