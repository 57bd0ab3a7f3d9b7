from __future__ import annotations

import pickle

import numpy as np
import pytest
from audio_fixtures import (
    tone,
    write_audio,
    write_empty_wav,
    write_garbage,
    write_nonfinite_wav,
    write_tone,
)

from fedsd.checkpoint import sha256_file
from fedsd.data.audio import AudioError, CropPolicy, apply_crop, load_audio, normalize_waveform, read_audio


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".ogg"])
def test_decodes_common_containers(tmp_path, suffix):
    path = write_tone(tmp_path / f"a{suffix}", seconds=0.25)
    wav = load_audio(path)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(wav.shape[0] - 4000) <= 1
    assert 0.15 < np.abs(wav).max() < 0.35


def test_stereo_is_downmixed_by_mean(tmp_path):
    left = tone(0.1, 16000, 300.0)
    right = -0.5 * left
    path = write_audio(tmp_path / "st.wav", np.stack([left, right], axis=1), subtype="FLOAT")
    wav = load_audio(path)
    np.testing.assert_allclose(wav, 0.25 * left, atol=1e-6)


def test_resamples_to_target_rate(tmp_path):
    path = write_tone(tmp_path / "8k.flac", seconds=0.5, sample_rate=8000, freq=200.0)
    wav = load_audio(path, 16000)
    assert wav.shape[0] == 8000 and wav.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(wav))
    peak_hz = np.argmax(spectrum) * 16000 / wav.shape[0]
    assert abs(peak_hz - 200.0) < 5
    same, sr = read_audio(path)
    assert sr == 8000 and same.shape[0] == 4000


def test_input_file_is_never_modified(tmp_path):
    path = write_tone(tmp_path / "x.wav", seconds=0.1, sample_rate=22050, channels=2)
    before = sha256_file(path)
    load_audio(path, 16000)
    assert sha256_file(path) == before


def _assert_names_file(exc: pytest.ExceptionInfo, path) -> None:
    assert str(path) in str(exc.value)
    assert exc.value.path == str(path)
    assert str(exc.value) == f"{path}: {exc.value.reason}"


def test_missing_file_error_names_file(tmp_path):
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioError) as exc:
        load_audio(path)
    _assert_names_file(exc, path)
    assert "not found" in exc.value.reason


def test_undecodable_error_names_file(tmp_path):
    path = write_garbage(tmp_path / "bad.wav")
    with pytest.raises(AudioError) as exc:
        load_audio(path)
    _assert_names_file(exc, path)
    assert "decode" in exc.value.reason


def test_empty_audio_error_names_file(tmp_path):
    path = write_empty_wav(tmp_path / "empty.wav")
    with pytest.raises(AudioError) as exc:
        load_audio(path)
    _assert_names_file(exc, path)
    assert "empty" in exc.value.reason


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_error_names_file(tmp_path, value):
    path = write_nonfinite_wav(tmp_path / "nan.wav", value=value)
    with pytest.raises(AudioError) as exc:
        load_audio(path)
    _assert_names_file(exc, path)
    assert "non-finite" in exc.value.reason


def test_too_short_error_names_file(tmp_path):
    path = write_tone(tmp_path / "short.wav", seconds=0.1)
    assert load_audio(path, min_seconds=0.05).shape[0] == 1600
    with pytest.raises(AudioError) as exc:
        load_audio(path, min_seconds=0.5)
    _assert_names_file(exc, path)
    assert "shorter" in exc.value.reason


def test_audio_error_pickles():
    err = pickle.loads(pickle.dumps(AudioError("/x.wav", "boom")))
    assert err.path == "/x.wav" and err.reason == "boom" and str(err) == "/x.wav: boom"


def test_crop_policy_key_and_samples():
    assert CropPolicy().key() == "tile-96000@16000"
    assert CropPolicy(95744 / 16000, "tile").num_samples == 95744
    assert CropPolicy(None).num_samples is None and CropPolicy(None).key() == "full@16000"
    assert CropPolicy(2.0, "none").key() == "full@16000"
    assert CropPolicy(1.0, "center", 8000).key() == "center-8000@8000"
    with pytest.raises(ValueError, match="crop mode"):
        CropPolicy(1.0, "stretch")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        CropPolicy(0.0)


def test_tile_repeats_short_and_truncates_long():
    pol = CropPolicy(max_seconds=10 / 16000, mode="tile")
    short = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(apply_crop(short, pol), [0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    long = np.arange(25, dtype=np.float32)
    np.testing.assert_array_equal(apply_crop(long, pol), np.arange(10))


def test_center_and_random_keep_short_clips_short():
    short = np.arange(5, dtype=np.float32)
    for mode in ("center", "random"):
        pol = CropPolicy(max_seconds=10 / 16000, mode=mode)
        np.testing.assert_array_equal(apply_crop(short, pol, np.random.default_rng(0)), short)


def test_center_crop():
    pol = CropPolicy(max_seconds=4 / 16000, mode="center")
    np.testing.assert_array_equal(apply_crop(np.arange(10, dtype=np.float32), pol), [3, 4, 5, 6])


def test_random_crop_is_deterministic_given_rng():
    pol = CropPolicy(max_seconds=100 / 16000, mode="random")
    wav = np.arange(1000, dtype=np.float32)
    a = apply_crop(wav, pol, np.random.default_rng(7))
    b = apply_crop(wav, pol, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (100,) and np.all(np.diff(a) == 1)
    starts = {int(apply_crop(wav, pol, np.random.default_rng(s))[0]) for s in range(20)}
    assert len(starts) > 5
    # without an rng, random falls back to a deterministic center crop
    np.testing.assert_array_equal(apply_crop(wav, pol), wav[450:550])


def test_none_mode_keeps_full_length():
    wav = np.arange(1000, dtype=np.float32)
    assert apply_crop(wav, CropPolicy(0.001, "none")).shape == (1000,)
    assert apply_crop(wav, CropPolicy(None, "tile")).shape == (1000,)


def test_normalize_waveform_matches_feature_extractor_formula():
    wav = np.random.default_rng(0).normal(0.3, 0.05, 1000).astype(np.float32)
    out = normalize_waveform(wav)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (wav - wav.mean()) / np.sqrt(wav.var() + 1e-7), rtol=1e-5)
    assert np.all(normalize_waveform(np.zeros(10, dtype=np.float32)) == 0)  # silence stays finite
