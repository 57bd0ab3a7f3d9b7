"""The on-device feature cache: computed once, reused, and never trusted when stale or corrupt."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from fedsd.data.audio import CropPolicy
from fedsd.data.manifest import read_manifest
from fedsd.model.multiexit import MultiExitSER
from fedsd.training.features import FeatureCache

LABELS = ["neutral", "happy", "angry", "sad"]


def _setup(tmp_path: Path, small_corpus: Path, tiny_model_dir: Path):
    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus, corpus)
    rows = read_manifest(corpus / "manifest.csv")[:6]
    model = MultiExitSER.from_pretrained(tiny_model_dir)
    return corpus, rows, model


def test_second_pass_hits_and_matches_a_fresh_forward(
    tmp_path: Path, small_corpus: Path, tiny_model_dir: Path
) -> None:
    corpus, rows, model = _setup(tmp_path, small_corpus, tiny_model_dir)
    crop = CropPolicy(1.0, "center")
    cache = FeatureCache(tmp_path / "cache", model, crop)
    first = cache.get(rows, corpus, [1, 4], label_names=LABELS)
    assert (first.hits, first.misses) == (0, 6)
    second = cache.get(rows, corpus, [1, 4], label_names=LABELS)
    assert (second.hits, second.misses) == (6, 0)
    for k in (1, 4):
        assert torch.equal(first.stacked(k), second.stacked(k))
    assert first.labels.tolist() == [LABELS.index(r.label) for r in rows]
    # Cached head inputs reproduce the model's own logits exactly.
    from fedsd.data.dataset import SpeechDataset, collate_batch

    ds = SpeechDataset(rows, corpus, LABELS, crop)
    batch = collate_batch([ds[i] for i in range(len(rows))])
    with torch.no_grad():
        direct = model(batch["input_values"], batch["attention_mask"], exits=[1, 4])
        from_cache = model.heads["4"].forward_precomputed(second.stacked(4))
    torch.testing.assert_close(from_cache.logits, direct[4].logits, rtol=1e-5, atol=1e-5)


def test_corrupt_and_stale_entries_are_recomputed(
    tmp_path: Path, small_corpus: Path, tiny_model_dir: Path
) -> None:
    corpus, rows, model = _setup(tmp_path, small_corpus, tiny_model_dir)
    cache = FeatureCache(tmp_path / "cache", model, CropPolicy(1.0, "center"))
    ref = cache.get(rows, corpus, [2], label_names=LABELS)
    files = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 6
    files[0].write_bytes(files[0].read_bytes()[:20])  # truncated: corrupt
    again = cache.get(rows, corpus, [2], label_names=LABELS)
    assert (again.hits, again.misses) == (5, 1)
    torch.testing.assert_close(again.stacked(2), ref.stacked(2), rtol=1e-5, atol=1e-5)  # batch of 1 vs 6

    audio = corpus / rows[3].path  # the audio changed after caching: the entry is stale
    st = audio.stat()
    os.utime(audio, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000_000))
    stale = cache.get(rows, corpus, [2], label_names=LABELS)
    assert (stale.hits, stale.misses) == (5, 1)


def test_keys_change_with_crop_and_backbone(tmp_path: Path, small_corpus: Path, tiny_model_dir: Path) -> None:
    corpus, rows, model = _setup(tmp_path, small_corpus, tiny_model_dir)
    FeatureCache(tmp_path / "cache", model, CropPolicy(1.0, "center")).get(
        rows, corpus, [1], label_names=LABELS
    )
    other_crop = FeatureCache(tmp_path / "cache", model, CropPolicy(1.5, "center"))
    assert other_crop.get(rows, corpus, [1], label_names=LABELS).misses == 6
    with torch.no_grad():
        next(model.encoder.parameters()).add_(0.01)  # another backbone: another fingerprint, another folder
    changed = FeatureCache(tmp_path / "cache", model, CropPolicy(1.0, "center"))
    assert changed.dir != other_crop.dir
    assert changed.get(rows, corpus, [1], label_names=LABELS).misses == 6


def test_cached_features_do_not_depend_on_the_cache_batch_size(
    tmp_path: Path, small_corpus: Path, tiny_model_dir: Path
) -> None:
    """Clips of different lengths computed 8 at a time (padded) equal the same clips computed one by one."""
    rows = read_manifest(small_corpus / "manifest.csv")[:8]
    assert len({round(r.duration, 3) for r in rows}) > 1  # uneven lengths: padding and masks in play
    model = MultiExitSER.from_pretrained(tiny_model_dir)  # "tiny": group-norm front end
    crop = CropPolicy(None, "none")
    batched = FeatureCache(tmp_path / "b8", model, crop).get(
        rows, small_corpus, [1, 4], label_names=LABELS, batch_size=8
    )
    single = FeatureCache(tmp_path / "b1", model, crop).get(
        rows, small_corpus, [1, 4], label_names=LABELS, batch_size=1
    )
    for k in (1, 4):
        torch.testing.assert_close(batched.stacked(k), single.stacked(k), rtol=0, atol=1e-4)
        a = model.heads[str(k)].forward_precomputed(batched.stacked(k)).logits
        b = model.heads[str(k)].forward_precomputed(single.stacked(k)).logits
        assert (a - b).abs().max().item() < 1e-4


def test_audio_rewritten_with_same_size_and_mtime_is_recomputed(
    tmp_path: Path, small_corpus: Path, tiny_model_dir: Path
) -> None:
    """``cp -p`` / ``rsync -t`` keep size and mtime: the content hash in the key still sees the change."""
    import soundfile as sf

    corpus, rows, model = _setup(tmp_path, small_corpus, tiny_model_dir)
    cache = FeatureCache(tmp_path / "cache", model, CropPolicy(1.0, "center"))
    ref = cache.get(rows, corpus, [1], label_names=LABELS)
    audio = corpus / rows[2].path
    st = audio.stat()
    wav, sr = sf.read(audio, dtype="float32")
    info = sf.info(audio)
    sf.write(audio, wav[::-1].copy() * 0.5, sr, subtype=info.subtype)  # other samples, same length and format
    os.utime(audio, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert audio.stat().st_size == st.st_size and audio.stat().st_mtime_ns == st.st_mtime_ns
    again = cache.get(rows, corpus, [1], label_names=LABELS)
    assert (again.hits, again.misses) == (5, 1)
    assert not torch.allclose(again.inputs[1][2], ref.inputs[1][2])
    torch.testing.assert_close(again.inputs[1][0], ref.inputs[1][0])


def test_content_hash_is_computed_once_per_unchanged_file(
    tmp_path: Path, small_corpus: Path, tiny_model_dir: Path, monkeypatch
) -> None:
    import fedsd.training.features as features

    corpus, rows, model = _setup(tmp_path, small_corpus, tiny_model_dir)
    opened: list[Path] = []
    real_open = Path.open

    def spy(self: Path, *args, **kwargs):
        if self.suffix == ".wav":
            opened.append(self)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(features, "_CONTENT_HASHES", {})
    monkeypatch.setattr(Path, "open", spy)
    cache = FeatureCache(tmp_path / "cache", model, CropPolicy(1.0, "center"))
    keys = [cache.entry_key(corpus / r.path, k) for r in rows for k in (1, 2)]
    assert len(opened) == len(rows)  # one read per file, however many exits and calls
    assert keys == [cache.entry_key(corpus / r.path, k) for r in rows for k in (1, 2)]
    assert len(opened) == len(rows)


def test_final_norm_rule_changes_the_cache_folder(tmp_path: Path) -> None:
    """Two pre-LN models with the same weights but another last-exit rule must not share features."""
    from fedsd.model.backbone import load_backbone

    a, b = (
        MultiExitSER(load_backbone("tiny-preln"), [2, 4], LABELS, final_norm_at_last_exit=f)
        for f in (False, True)
    )
    crop = CropPolicy(1.0, "center")
    assert FeatureCache(tmp_path, a, crop).dir != FeatureCache(tmp_path, b, crop).dir
