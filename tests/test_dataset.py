from __future__ import annotations

import numpy as np
import pytest
import torch
from audio_fixtures import write_noise, write_tone
from torch.utils.data import DataLoader

from fedsd.data.audio import CropPolicy
from fedsd.data.dataset import SpeechDataset, collate_batch, rows_by_ids
from fedsd.data.manifest import ManifestError, ManifestRow

NAMES = ["angry", "happy", "sad"]


@pytest.fixture()
def corpus(tmp_path):
    specs = [("a", 0.30, "angry"), ("b", 0.10, "happy"), ("c", 0.20, ""), ("d", 0.25, "sad")]
    rows = []
    for k, (utt, secs, label) in enumerate(specs):
        if k % 2:
            write_noise(tmp_path / f"{utt}.flac", seconds=secs, sample_rate=8000, seed=k)
            path = f"{utt}.flac"
        else:
            write_tone(tmp_path / f"{utt}.wav", seconds=secs, freq=150 + 50 * k)
            path = f"{utt}.wav"
        rows.append(ManifestRow(utt, path, label, label, f"x:{utt}", "x", secs, 16000))
    return tmp_path, rows


def test_items_labels_and_normalisation(corpus):
    root, rows = corpus
    ds = SpeechDataset(rows, root, NAMES, CropPolicy(None), labelled=[True, False, True, True])
    assert len(ds) == 4
    item = ds[0]
    assert set(item) == {"input_values", "label", "utt_id", "index"}
    x = item["input_values"]
    assert x.dtype == torch.float32 and x.shape == (4800,)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std(unbiased=False)) - 1) < 1e-3
    assert (item["label"], item["utt_id"], item["index"]) == (0, "a", 0)
    assert ds[1]["label"] == -1  # hidden by the mask
    assert ds[2]["label"] == -1  # no label in the manifest
    assert ds[3]["label"] == 2
    assert ds[1]["input_values"].shape == (1600,)  # 8 kHz flac resampled to 16 kHz
    assert ds.targets == [0, 1, -1, 2]
    raw = SpeechDataset(rows, root, NAMES, CropPolicy(None), normalize=False)[0]["input_values"]
    assert 0.2 < float(raw.abs().max()) < 0.35


def test_unknown_label_names_utterance_and_label_set(corpus):
    root, rows = corpus
    with pytest.raises(
        ValueError, match=r"utterance a: label 'angry' is not in the label set \[happy, sad\]"
    ):
        SpeechDataset(rows, root, ["happy", "sad"], CropPolicy(None))


def test_tile_policy_gives_equal_lengths(corpus):
    root, rows = corpus
    ds = SpeechDataset(rows, root, NAMES, CropPolicy(0.2, "tile"))
    assert {ds[i]["input_values"].shape[0] for i in range(len(ds))} == {3200}


def test_random_crop_only_when_training_and_reproducible(corpus):
    root, rows = corpus
    pol = CropPolicy(0.05, "random")
    ev = SpeechDataset(rows, root, NAMES, pol)
    assert torch.equal(ev[0]["input_values"], ev[0]["input_values"])
    tr = SpeechDataset(rows, root, NAMES, pol, train=True, seed=1)
    tr2 = SpeechDataset(rows, root, NAMES, pol, train=True, seed=1)
    first = [tr[0]["input_values"] for _ in range(2)]
    assert torch.equal(first[0], first[1]) and torch.equal(first[0], tr2[0]["input_values"])
    crops = set()
    for epoch in range(6):
        tr.set_epoch(epoch)
        crops.add(tuple(tr[0]["input_values"][:8].tolist()))
    assert len(crops) > 1
    assert tr[1]["input_values"].shape == (800,)


def test_collate_pads_with_mask(corpus):
    root, rows = corpus
    ds = SpeechDataset(rows, root, NAMES, CropPolicy(None))
    batch = collate_batch([ds[1], ds[0], ds[3]])
    assert batch["input_values"].shape == (3, 4800) and batch["input_values"].dtype == torch.float32
    assert batch["attention_mask"].dtype == torch.long
    assert batch["attention_mask"].sum(dim=1).tolist() == [1600, 4800, 4000]
    assert torch.all(batch["input_values"][0, 1600:] == 0)
    assert batch["labels"].tolist() == [1, 0, 2] and batch["utt_ids"] == ["b", "a", "d"]
    assert batch["indices"].tolist() == [1, 0, 3]
    loader = DataLoader(ds, batch_size=2, collate_fn=collate_batch)
    assert [b["input_values"].shape[0] for b in loader] == [2, 2]
    with pytest.raises(ValueError):
        collate_batch([])


def test_rows_by_ids(corpus):
    _, rows = corpus
    assert [r.utt_id for r in rows_by_ids(rows, ["d", "a"])] == ["d", "a"]
    with pytest.raises(ManifestError, match="2 utterance id.*zz, yy"):
        rows_by_ids(rows, ["a", "zz", "yy"])


def test_missing_file_surfaces_audio_error(corpus):
    root, rows = corpus
    bad = [ManifestRow("gone", "gone.wav", "sad", "sad", "x:g", "x", 1.0, 16000)]
    ds = SpeechDataset(bad, root, NAMES, CropPolicy(None))
    with pytest.raises(ValueError, match="gone.wav: file not found"):
        ds[0]
    assert np.isfinite(SpeechDataset(rows, root, NAMES, CropPolicy(None)).waveform(0)).all()
