"""The synthetic emotional speech corpus: layout, manifest, splits, determinism, both backends, the CLI."""

from __future__ import annotations

import hashlib
import os
import shutil
import wave
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsd.data.manifest import read_manifest
from fedsd.data.synthetic import EMOTIONS, SENTENCES, SynthError, generate_corpus, speaker_splits

HAS_ESPEAK = shutil.which("espeak-ng") is not None
# `make test` installs espeak-ng and sets this: there a missing espeak-ng fails the espeak tests
# instead of skipping them silently (numbers elsewhere are pinned to the espeak backend).
REQUIRE_ESPEAK = os.environ.get("FEDSD_REQUIRE_ESPEAK") == "1"


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _check_corpus(root: Path, speakers: int, sentences: int, emotions: tuple[str, ...]) -> None:
    rows = read_manifest(root / "manifest.csv", require_labels=True)
    assert len(rows) == speakers * sentences * len(emotions)
    assert len(list((root / "wav").rglob("*.wav"))) == len(rows)
    assert {r.label for r in rows} == set(emotions)
    assert all(r.label == r.orig_label and r.dataset == "synth" for r in rows)
    assert {r.speaker for r in rows} == {f"synth:spk{i:02d}" for i in range(speakers)}
    assert {r.text_id for r in rows} == {f"s{i:02d}" for i in range(sentences)}
    # Speaker-independent: each speaker is in exactly one split, and every split is used.
    split_of: dict[str, set[str]] = {}
    for r in rows:
        split_of.setdefault(r.speaker, set()).add(r.split)
    assert all(len(s) == 1 for s in split_of.values())
    if speakers >= 3:
        assert {next(iter(s)) for s in split_of.values()} == {"train", "valid", "test"}
    for r in rows[:: max(1, len(rows) // 6)]:
        assert r.path.startswith("wav/") and r.sample_rate == 16000
        with wave.open(str(root / r.path)) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
            assert abs(w.getnframes() / 16000 - r.duration) < 1e-3
            assert 0.8 < r.duration < 8.0


@pytest.mark.parametrize(
    "backend",
    [
        "numpy",
        pytest.param(
            "espeak", marks=pytest.mark.skipif(not (HAS_ESPEAK or REQUIRE_ESPEAK), reason="no espeak-ng")
        ),
    ],
)
def test_corpus_layout_and_determinism(tmp_path: Path, backend: str) -> None:
    emos = ("neutral", "happy", "angry", "sad")
    a = generate_corpus(tmp_path / "a", speakers=3, sentences=2, seed=7, backend=backend, progress=False)
    assert (a.n_files, a.backend) == (24, backend)
    assert a.speakers_per_split == {"train": 1, "valid": 1, "test": 1}
    _check_corpus(tmp_path / "a", 3, 2, emos)
    generate_corpus(tmp_path / "b", speakers=3, sentences=2, seed=7, backend=backend, progress=False)
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")  # same seed: identical bytes everywhere
    generate_corpus(tmp_path / "c", speakers=3, sentences=2, seed=8, backend=backend, progress=False)
    ha, hc = _hashes(tmp_path / "a"), _hashes(tmp_path / "c")
    wavs = [k for k in ha if k.endswith(".wav")]
    assert all(ha[k] != hc[k] for k in wavs)  # a different seed changes every utterance


def test_all_emotions_single_speaker_and_workers_do_not_matter(tmp_path: Path) -> None:
    emos = tuple(EMOTIONS)
    assert len(emos) >= 8 and len(SENTENCES) >= 24
    generate_corpus(tmp_path / "a", speakers=1, sentences=1, emotions=emos, backend="numpy", progress=False)
    _check_corpus(tmp_path / "a", 1, 1, emos)
    assert {r.split for r in read_manifest(tmp_path / "a" / "manifest.csv")} == {"train"}
    generate_corpus(tmp_path / "b", speakers=1, sentences=1, emotions=emos, backend="numpy", progress=False,
                    workers=1)
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")


def test_backend_fallback_without_espeak(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedsd.data.synthetic as synth

    monkeypatch.setattr(synth.shutil, "which", lambda name: None)
    assert synth.resolve_backend("auto") == ("numpy", None)
    with pytest.raises(SynthError, match="needs espeak-ng"):
        synth.resolve_backend("espeak")


def test_speaker_splits() -> None:
    for n in (3, 5, 8, 24, 40):
        s = speaker_splits(n, seed=0)
        assert set(s) == {"train", "valid", "test"} and s.count("train") >= s.count("test")
    assert speaker_splits(24, 0).count("train") == 16
    assert speaker_splits(2, 0).count("train") == 1 and speaker_splits(1, 0) == ["train"]
    assert speaker_splits(24, 0) != speaker_splits(24, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"speakers": 0}, "speakers must be"),
        ({"emotions": ("neutral", "bored")}, "valid emotions: neutral, happy, angry, sad, fear"),
        ({"intensity": 1.5}, "intensity must be in [0, 1]"),
        ({"sentences": 999}, "sentences must be between 1 and"),
        ({"backend": "festival"}, "valid backends"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(SynthError, match=message.replace("[", r"\[").replace("]", r"\]")):
        generate_corpus(tmp_path, progress=False, **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "manifest.csv").exists()


def test_cli_synth(tmp_path: Path) -> None:
    from fedsd.cli.main import app

    runner = CliRunner()
    help_text = runner.invoke(app, ["data", "synth", "--help"]).output
    assert "--speakers" in help_text and "Example" in help_text
    out = tmp_path / "corpus"
    res = runner.invoke(app, ["data", "synth", "--out", str(out), "--speakers", "3", "--sentences", "1",
                              "--emotions", "neutral,sad", "--backend", "numpy", "--seed", "3", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "wrote 6 files" in res.output and "backend: numpy" in res.output
    assert "train 1, valid 1, test 1" in res.output
    _check_corpus(out, 3, 1, ("neutral", "sad"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--speakers", "0"], "--speakers must be >= 1"),
        (["--emotions", "neutral,joy"], "unknown emotion(s) joy; valid emotions:"),
        (["--intensity", "-0.1"], "--intensity must be in [0, 1]"),
    ],
)
def test_cli_bad_args(tmp_path: Path, args: list[str], message: str) -> None:
    from fedsd.cli.main import app

    res = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path / "x"), *args])
    assert res.exit_code == 2
    assert message in res.output
    assert len([line for line in res.output.splitlines() if line.strip()]) == 1
