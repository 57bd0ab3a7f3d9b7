"""The truncated forward must reproduce Hugging Face's hidden_states[k] while running only layers 1..k."""

from __future__ import annotations

import math

import pytest
import torch

from fedsd.model.backbone import (
    FAMILIES,
    BackboneError,
    ConfigError,
    TruncatedEncoder,
    backbone_fingerprint,
    build_backbone,
    builtin_config,
    load_backbone,
)

pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
# The families whose HF model takes the raw waveform at any length: HF parity on clips of a few thousand
# samples is checked here. Whisper's HF encoder takes a log-mel of exactly 3,000 frames, so its parity
# (and batched = alone) is in test_whisper.py; the family-generic tests below still run on it.
WAVEFORM_FAMILIES = tuple(f for f in FAMILIES if f != "whisper")
LENGTHS = (8000, 5600, 3100)  # three clips of different length -> padding + attention mask


def batch(lengths=LENGTHS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(len(lengths), max(lengths))
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        x[i, :n] = torch.randn(n, generator=g)
        mask[i, :n] = 1
    return x, mask


def frames(n: int) -> int:
    """Frames the wav2vec 2.0 front end makes from n samples (conv output length, layer by layer)."""
    for kernel, stride in zip((10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2), strict=True):
        n = (n - kernel) // stride + 1
    return n


def tiny(family: str, preln: bool, **overrides) -> torch.nn.Module:
    config = builtin_config("tiny-preln" if preln else "tiny", family)
    for key, value in overrides.items():
        setattr(config, key, value)
    return build_backbone(config)


def count_layer_calls(encoder: TruncatedEncoder) -> list[int]:
    calls = [0] * encoder.num_layers
    layers = encoder.model.layers if encoder.family == "whisper" else encoder.model.encoder.layers
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def test_every_family_is_covered():
    """A new family must be placed: waveform-input (HF parity here) or given its own parity tests."""
    assert set(FAMILIES) == {*WAVEFORM_FAMILIES, "whisper"}


CASES = [(f, p, {}) for f in WAVEFORM_FAMILIES for p in (False, True)] + [
    ("wav2vec2", False, {"feat_extract_norm": "layer"}),
    ("wav2vec2", True, {"feat_extract_norm": "group"}),
    ("hubert", False, {"feat_proj_layer_norm": False}),
]


@pytest.mark.parametrize(("family", "preln", "overrides"), CASES)
def test_exit_hidden_equals_hf_hidden_states(family, preln, overrides):
    """Each clip of a padded batch matches HF on that clip alone; layer-norm front ends also batched.

    HF's group-norm front end normalises over the padded batch, so its batched output depends on the
    batch-mates; the truncated forward deliberately does not (it runs that front end per clip).
    """
    model = tiny(family, preln, **overrides)
    model.eval()
    enc = TruncatedEncoder(model)
    x, mask = batch()
    with torch.no_grad():
        alone = [
            model(x[i : i + 1, :n], output_hidden_states=True).hidden_states for i, n in enumerate(LENGTHS)
        ]
        batched = model(x, attention_mask=mask, output_hidden_states=True).hidden_states
        assert len(batched) == enc.num_layers + 1
        for k in range(0, enc.num_layers + 1):
            state = enc(x, attention_mask=mask, upto=k)
            assert state.layer == k
            got = enc.exit_hidden(state)
            valid = state.frame_mask
            assert valid.sum(1).tolist() == [frames(n) for n in LENGTHS]
            for i, n in enumerate(LENGTHS):
                f = frames(n)
                torch.testing.assert_close(got[i, :f], alone[i][k][0, :f], atol=1e-5, rtol=0)
            if not enc.group_norm_front_end:
                torch.testing.assert_close(got[valid], batched[k][valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", WAVEFORM_FAMILIES)
def test_no_attention_mask_matches_hf(family):
    model = tiny(family, preln=False)
    enc = TruncatedEncoder(model)
    x, _ = batch((4000, 4000))
    with torch.no_grad():
        ref = model(x, output_hidden_states=True).hidden_states
        for k in (1, enc.num_layers):
            torch.testing.assert_close(enc.exit_hidden(enc(x, upto=k)), ref[k], atol=1e-5, rtol=0)


def test_pre_ln_last_exit_follows_tie_last_hidden_states():
    """If the config asks HF to report the final-normed last layer, the teacher exit sees that too."""
    model = tiny("wav2vec2", preln=True)
    model.config.tie_last_hidden_states = True
    enc = TruncatedEncoder(model)
    x, mask = batch()
    with torch.no_grad():
        out = model(x, attention_mask=mask, output_hidden_states=True)
        state = enc(x, attention_mask=mask)
        valid = state.frame_mask
        torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)
        got = enc.exit_hidden(state)
        torch.testing.assert_close(got[valid], out.last_hidden_state[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_incremental_advance_equals_one_pass_and_runs_each_layer_once(family):
    enc = TruncatedEncoder(tiny(family, preln=False))
    x, mask = batch()
    with torch.no_grad():
        full = enc(x, attention_mask=mask, upto=4)
        calls = count_layer_calls(enc)
        s0 = enc.start(x, attention_mask=mask)
        assert calls == [0, 0, 0, 0]
        s2 = enc.advance(s0, 2)
        assert calls == [1, 1, 0, 0]
        s4 = enc.advance(s2, 4)
        assert calls == [1, 1, 1, 1]
    assert torch.equal(s4.hidden, full.hidden)
    assert s2.layer == 2 and s4.layer == 4
    if family == "wavlm":
        assert s2.position_bias is not None and torch.equal(s2.position_bias, s4.position_bias)
    with pytest.raises(ValueError):
        enc.advance(s4, 2)


def test_truncated_forward_runs_only_needed_layers():
    enc = TruncatedEncoder(tiny("wavlm", preln=True))
    calls = count_layer_calls(enc)
    x, mask = batch()
    with torch.no_grad():
        enc(x, attention_mask=mask, upto=1)
    assert calls == [1, 0, 0, 0]


def test_tiny_keeps_real_front_end_strides():
    config = builtin_config("tiny")
    assert math.prod(config.conv_stride) == 320 and config.num_hidden_layers >= 4
    enc = TruncatedEncoder(load_backbone("tiny"))
    assert enc.output_lengths(torch.tensor([16000])).item() == 49  # 20 ms frames at 16 kHz
    base = builtin_config("base")
    assert (base.num_hidden_layers, base.hidden_size, base.do_stable_layer_norm) == (12, 768, False)


def test_too_short_clip_is_a_clear_error():
    enc = TruncatedEncoder(load_backbone("tiny"))
    with pytest.raises(ValueError, match="too short"):
        enc(torch.zeros(1, 300))


@pytest.mark.parametrize("family", ["wav2vec2", "wavlm"])
def test_save_and_load_backbone_reproduces_outputs(tmp_path, family):
    model = load_backbone("tiny-preln", family=family)
    model.save_pretrained(tmp_path / "bb")
    again = load_backbone(tmp_path / "bb")
    assert type(again) is type(model)
    assert backbone_fingerprint(again) == backbone_fingerprint(model)
    x, mask = batch()
    with torch.no_grad():
        a = TruncatedEncoder(model)(x, attention_mask=mask, upto=3).hidden
        b = TruncatedEncoder(again)(x, attention_mask=mask, upto=3).hidden
    assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="family"):
        load_backbone(tmp_path / "bb", family="hubert" if family != "hubert" else "wavlm")


def test_unknown_family_names_field_and_values():
    with pytest.raises(ConfigError, match=r"^family: .*'conformer'.*wav2vec2, hubert, wavlm"):
        load_backbone("tiny", family="conformer")
    with pytest.raises(ConfigError, match="backbone"):
        builtin_config("huge")


def test_hub_id_offline_is_a_helpful_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BackboneError) as info:
        load_backbone("fedsd-tests/no-such-model")
    msg = str(info.value)
    assert "fedsd-tests/no-such-model" in msg and "offline" in msg
    assert "huggingface-cli download" in msg and "save_pretrained" in msg


def test_missing_local_directory_is_reported_as_such(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone(str(tmp_path / "nope" / "model"))


def test_fingerprint_is_deterministic_and_weight_sensitive():
    a, b = load_backbone("tiny"), load_backbone("tiny")
    fa = backbone_fingerprint(a)
    assert fa == backbone_fingerprint(b) and len(fa) == 64
    assert fa != backbone_fingerprint(load_backbone("tiny", family="hubert"))
    with torch.no_grad():
        b.encoder.layers[2].feed_forward.output_dense.bias[0] += 1e-3
    assert backbone_fingerprint(b) != fa


def test_pretrained_false_rebuilds_the_architecture_with_seeded_random_weights(tmp_path):
    trained = load_backbone("tiny-preln", family="hubert")
    with torch.no_grad():
        trained.encoder.layers[0].attention.q_proj.bias.add_(1.0)
    trained.save_pretrained(tmp_path / "bb")
    scratch = load_backbone(tmp_path / "bb", pretrained=False)
    assert type(scratch) is type(trained) and scratch.config.do_stable_layer_norm
    assert backbone_fingerprint(scratch) != backbone_fingerprint(trained)
    again = load_backbone(tmp_path / "bb", pretrained=False)
    assert backbone_fingerprint(scratch) == backbone_fingerprint(again)


def test_errors_share_the_project_hierarchy():
    import fedsd.config

    assert issubclass(ConfigError, fedsd.config.ConfigError) and issubclass(BackboneError, ValueError)


@pytest.mark.parametrize("family", ["wav2vec2", "wavlm"])
def test_frame_counts_ignore_the_adapter_like_hf_frame_masks(family):
    """With ``add_adapter`` the encoder still sees the front end's frames (HF masks them with add_adapter=False)."""
    model = tiny(family, preln=False, add_adapter=True)
    model.eval()
    enc = TruncatedEncoder(model)
    assert enc.output_lengths(torch.tensor([16000])).item() == 49
    x, mask = batch()
    with torch.no_grad():
        state = enc(x, attention_mask=mask, upto=2)
        alone = model(x[:1, : LENGTHS[0]], output_hidden_states=True).hidden_states[2]
    assert state.lengths.tolist() == [frames(n) for n in LENGTHS] == state.frame_mask.sum(1).tolist()
    torch.testing.assert_close(state.hidden[0, : frames(LENGTHS[0])], alone[0], atol=1e-5, rtol=0)
