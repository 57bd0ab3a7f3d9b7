"""Multi-exit model: only needed layers run, early exit never recomputes, checkpoints exact and checked."""

from __future__ import annotations

import json

import pytest
import torch

from fedsd.checkpoint import CheckpointError, save_tensors, sha256_file
from fedsd.model import ConfigError, MultiExitSER, load_backbone

pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
LABELS = ["angry", "happy", "neutral", "sad"]


def make(family: str = "wav2vec2", exits=(1, 2, 4), head: str = "stats", seed: int = 0) -> MultiExitSER:
    torch.manual_seed(seed)
    return MultiExitSER(
        load_backbone("tiny", family=family), exits, LABELS, head=head, meta={"crop": 48000}
    ).eval()


def batch(lengths=(6400, 4000), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(len(lengths), max(lengths))
    mask = torch.zeros_like(x, dtype=torch.long)
    for i, n in enumerate(lengths):
        x[i, :n] = torch.randn(n, generator=g)
        mask[i, :n] = 1
    return x, mask


def layer_calls(model: MultiExitSER) -> list[int]:
    calls = [0] * model.encoder.num_layers
    for i, layer in enumerate(model.backbone.encoder.layers):
        layer.register_forward_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.fixture(scope="module")
def model() -> MultiExitSER:
    return make()


def test_structure(model):
    assert model.exits == [1, 2, 4] and model.teacher_exit == 4
    assert list(model.heads.keys()) == ["1", "2", "4"] and model.num_classes == 4
    assert MultiExitSER(load_backbone("tiny"), [4, 2, 2], LABELS).exits == [2, 4]


def test_forward_runs_only_layers_up_to_the_deepest_requested_exit():
    m = make()
    calls = layer_calls(m)
    x, mask = batch()
    with torch.no_grad():
        out = m(x, attention_mask=mask, exits=[2])
    assert list(out) == [2] and out[2].logits.shape == (2, 4) and out[2].embedding.shape == (2, 256)
    assert calls == [1, 1, 0, 0]
    with torch.no_grad():
        m(x, attention_mask=mask)
    assert calls == [2, 2, 1, 1]


def test_exit_outputs_match_heads_on_hf_hidden_states(model):
    """Each clip's exit logits equal the head on HF's hidden states of that clip run alone."""
    lengths = (6400, 4000)
    x, mask = batch(lengths)
    with torch.no_grad():
        out = model(x, attention_mask=mask)
        for i, n in enumerate(lengths):
            hs = model.backbone(x[i : i + 1, :n], output_hidden_states=True).hidden_states
            for k in model.exits:
                ref = model.head(k)(hs[k], None)
                torch.testing.assert_close(out[k].logits[i : i + 1], ref.logits, atol=1e-5, rtol=1e-5)


def test_precompute_then_heads_equals_forward(model):
    x, mask = batch()
    with torch.no_grad():
        direct = model(x, attention_mask=mask, exits=[1, 4])
        cached = model.forward_precomputed(model.precompute(x, attention_mask=mask, exits=[1, 4]))
    for k in (1, 4):
        torch.testing.assert_close(direct[k].logits, cached[k].logits, atol=1e-6, rtol=1e-6)


def test_early_exit_threshold_zero_uses_first_exit():
    m = make()
    calls = layer_calls(m)
    x, mask = batch((6400,))
    k, probs = m.predict_early_exit(x, mask, threshold=0.0)
    assert k == 1 and calls == [1, 0, 0, 0]
    assert probs.shape == (4,) and float(probs.sum()) == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        ref = torch.softmax(m(x, mask, exits=[1])[1].logits[0], -1)
    torch.testing.assert_close(probs, ref)


def test_early_exit_above_one_uses_teacher_without_recomputing():
    m = make()
    m.train()
    calls = layer_calls(m)
    head_calls = {k: 0 for k in m.exits}
    for k in m.exits:
        m.head(k).register_forward_hook(lambda *_a, k=k: head_calls.__setitem__(k, head_calls[k] + 1))
    x, _ = batch((6400,))
    k, probs = m.predict_early_exit(x[0], threshold=1.01)
    assert k == 4 and calls == [1, 1, 1, 1] and head_calls == {1: 1, 2: 1, 4: 1}
    assert m.training  # mode restored
    m.eval()
    with torch.no_grad():
        ref = torch.softmax(m(x, exits=[4])[4].logits[0], -1)
    torch.testing.assert_close(probs, ref)
    k, _ = m.predict_early_exit(x, threshold=1.01, max_exit=3)
    assert k == 2
    with pytest.raises(ConfigError, match="max_exit"):
        m.predict_early_exit(x, max_exit=0)


def test_head_state_dict_roundtrip_and_checks(model):
    sd = model.head_state_dict()
    assert "heads.1.proj.weight" in sd and all(k.startswith("heads.") for k in sd)
    assert set(model.head_state_dict(exits=[2])) == {k for k in sd if k.startswith("heads.2.")}
    other = make(seed=5)
    assert not torch.equal(other.head_state_dict()["heads.1.proj.weight"], sd["heads.1.proj.weight"])
    other.load_head_state_dict(sd)
    assert all(torch.equal(v, sd[k]) for k, v in other.head_state_dict().items())
    part = {k: v for k, v in sd.items() if k.startswith("heads.1.")}
    with pytest.raises(CheckpointError, match="missing"):
        other.load_head_state_dict(part)
    missing, unexpected = other.load_head_state_dict(part, strict=False)
    assert missing and not unexpected
    bad = dict(sd, **{"heads.1.proj.weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match="shape"):
        other.load_head_state_dict(bad, strict=False)


@pytest.mark.parametrize(("family", "head"), [("wav2vec2", "stats"), ("wavlm", "gru")])
def test_save_load_reproduces_outputs_exactly(tmp_path, family, head):
    m = make(family=family, head=head)
    m.save_pretrained(tmp_path / "ckpt")
    info = json.loads((tmp_path / "ckpt" / "fedsd.json").read_text())
    assert info["exits"] == [1, 2, 4] and info["teacher_exit"] == 4 and info["head"] == head
    assert info["label_names"] == LABELS and info["crop"] == 48000 and info["family"] == family
    assert info["fingerprint"] == m.backbone_fingerprint() and info["sample_rate"] == 16000
    assert (tmp_path / "ckpt" / "backbone" / "config.json").is_file()
    again = MultiExitSER.from_pretrained(tmp_path / "ckpt")
    x, mask = batch()
    with torch.no_grad():
        a, b = m(x, attention_mask=mask), again(x, attention_mask=mask)
    for k in m.exits:
        assert torch.equal(a[k].logits, b[k].logits) and torch.equal(a[k].embedding, b[k].embedding)
    assert again.meta == {"crop": 48000} and again.head_kwargs == m.head_kwargs


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "ckpt"
    make().save_pretrained(path)
    return path


def test_corrupt_heads_file_is_a_checkpoint_error(saved):
    heads = saved / "heads.safetensors"
    heads.write_bytes(heads.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="heads.safetensors"):
        MultiExitSER.from_pretrained(saved)
    # unreadable even when the recorded hash is made to match
    info = json.loads((saved / "fedsd.json").read_text())
    info["heads_sha256"] = sha256_file(heads)
    (saved / "fedsd.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="heads.safetensors.*safetensors"):
        MultiExitSER.from_pretrained(saved)


def test_heads_keys_not_matching_fedsd_json(saved):
    heads = saved / "heads.safetensors"
    sd = make().head_state_dict()
    del sd["heads.4.classifier.bias"]
    save_tensors(heads, sd)
    info = json.loads((saved / "fedsd.json").read_text())
    info["heads_sha256"] = sha256_file(heads)
    (saved / "fedsd.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=r"heads\.safetensors.*heads\.4\.classifier\.bias"):
        MultiExitSER.from_pretrained(saved)


def test_fingerprint_mismatch_and_missing_files(saved, tmp_path):
    info = json.loads((saved / "fedsd.json").read_text())
    info["fingerprint"] = "0" * 64
    (saved / "fedsd.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="fingerprint"):
        MultiExitSER.from_pretrained(saved)
    (saved / "fedsd.json").unlink()
    with pytest.raises(CheckpointError, match="fedsd.json"):
        MultiExitSER.from_pretrained(saved)
    with pytest.raises(CheckpointError, match="fedsd.json"):
        MultiExitSER.from_pretrained(tmp_path / "nowhere")


def test_bad_settings_name_the_field():
    bb = load_backbone("tiny")
    for exits in ([0, 2], [5], [], "3"):
        with pytest.raises(ConfigError, match=r"^exits: "):
            MultiExitSER(bb, exits, LABELS)
    with pytest.raises(ConfigError, match=r"^head: "):
        MultiExitSER(bb, [2, 4], LABELS, head="mlp")
    with pytest.raises(ConfigError, match=r"^label_names: "):
        MultiExitSER(bb, [2, 4], ["only"])
    with pytest.raises(ConfigError, match=r"^family: "):
        load_backbone("tiny", family="conformer")  # not a family fedsd knows
    with pytest.raises(ConfigError, match=r"^exits: "):
        MultiExitSER(bb, [2, 4], LABELS)(torch.zeros(1, 4000), exits=[3])


def test_freeze_backbone():
    m = make()
    m.freeze_backbone(freeze_feature_encoder_only=True)
    assert not any(p.requires_grad for p in m.backbone.feature_extractor.parameters())
    assert all(p.requires_grad for p in m.backbone.encoder.parameters())
    m.freeze_backbone()
    assert not any(p.requires_grad for p in m.backbone.parameters())
    assert all(p.requires_grad for p in m.heads.parameters())


# "tiny": post-LN, group-norm front end; "tiny-preln": pre-LN, layer-norm front end
@pytest.mark.parametrize("builtin", ["tiny", "tiny-preln"])
@pytest.mark.parametrize("family", ["wav2vec2", "hubert", "wavlm"])
def test_exit_logits_do_not_depend_on_batch_mates(family, builtin):
    """A clip batched with longer clips (zero-padded, attention mask) gets the logits it gets alone."""
    torch.manual_seed(0)
    m = MultiExitSER(load_backbone(builtin, family=family), [1, 2, 3, 4], LABELS).eval()
    lengths = (8000, 5600, 3100)
    x, mask = batch(lengths)
    with torch.no_grad():
        together = m(x, attention_mask=mask)
        for i, n in enumerate(lengths):
            alone = m(x[i : i + 1, :n])
            for k in m.exits:
                delta = (together[k].logits[i] - alone[k].logits[0]).abs().max().item()
                assert delta < 1e-4, f"exit {k}, clip {i} ({n} samples): max |Δlogit| {delta:.2e}"


def test_evaluation_logits_do_not_depend_on_the_loader_batch_size(small_corpus, tiny_model_dir):
    """predict_loader / evaluate_loader give the same logits and metrics with batch size 1 and 8."""
    from fedsd.data.audio import CropPolicy
    from fedsd.data.manifest import read_manifest
    from fedsd.training.central import evaluate_loader, make_loader, predict_loader

    rows = read_manifest(small_corpus / "manifest.csv")[:8]
    model = MultiExitSER.from_pretrained(tiny_model_dir)
    labels = model.label_names
    crop = CropPolicy(None, "none")  # natural, uneven lengths
    runs = [make_loader(rows, small_corpus, labels, crop, batch_size=bs) for bs in (1, 8)]
    (one, y1, ids1), (eight, y8, ids8) = (predict_loader(model, loader) for loader in runs)
    assert ids1 == ids8 and (y1 == y8).all()
    for k in model.exits:
        assert abs(one[k] - eight[k]).max() < 1e-4, f"exit {k}"
    r1, r8 = (evaluate_loader(model, loader) for loader in runs)
    assert {k: r.to_dict() for k, r in r1.items()} == {k: r.to_dict() for k, r in r8.items()}


@pytest.mark.parametrize("decided", [True, False])
def test_final_norm_rule_is_saved_and_survives_another_transformers(tmp_path, monkeypatch, decided):
    """A pre-LN model keeps its last-exit LayerNorm rule across reloads, whatever the library would guess."""
    import fedsd.model.backbone as backbone_mod

    torch.manual_seed(0)
    m = MultiExitSER(load_backbone("tiny-preln"), [2, 4], LABELS, final_norm_at_last_exit=decided).eval()
    assert m.final_norm_at_last_exit is decided
    m.save_pretrained(tmp_path / "ckpt")
    info = json.loads((tmp_path / "ckpt" / "fedsd.json").read_text())
    assert info["final_norm_at_last_exit"] is decided
    # Another transformers version would guess the opposite: the checkpoint's decision wins.
    monkeypatch.setattr(backbone_mod, "hidden_states_end_with_final_norm", lambda _config: not decided)
    again = MultiExitSER.from_pretrained(tmp_path / "ckpt")
    assert again.final_norm_at_last_exit is decided
    assert again.backbone_fingerprint() == m.backbone_fingerprint() == info["fingerprint"]
    x, mask = batch()
    with torch.no_grad():
        a, b = m(x, attention_mask=mask), again(x, attention_mask=mask)
    for k in m.exits:
        assert torch.equal(a[k].logits, b[k].logits)


def test_final_norm_rule_is_part_of_the_fingerprint():
    pre = [MultiExitSER(load_backbone("tiny-preln"), [4], LABELS, final_norm_at_last_exit=f) for f in (0, 1)]
    assert pre[0].backbone_fingerprint() != pre[1].backbone_fingerprint()
    with torch.no_grad():  # and it changes what the teacher exit computes
        x, mask = batch()
        assert not torch.allclose(pre[0](x, mask)[4].logits, pre[1](x, mask)[4].logits)
    post = MultiExitSER(load_backbone("tiny"), [4], LABELS)
    assert post.final_norm_at_last_exit is False  # post-LN: the LayerNorm comes before layer 1
    with pytest.raises(ConfigError, match="^final_norm_at_last_exit: "):
        MultiExitSER(load_backbone("tiny"), [4], LABELS, final_norm_at_last_exit=True)


def test_checkpoint_without_final_norm_key_loads_with_the_installed_default(tmp_path):
    """Checkpoints written before the key existed: fingerprint of config and weights, rule guessed."""
    from fedsd.model.backbone import backbone_fingerprint, hidden_states_end_with_final_norm

    m = MultiExitSER(load_backbone("tiny-preln"), [2, 4], LABELS)
    m.save_pretrained(tmp_path / "old")
    meta = tmp_path / "old" / "fedsd.json"
    info = json.loads(meta.read_text())
    del info["final_norm_at_last_exit"]
    info["fingerprint"] = backbone_fingerprint(m.backbone)  # what the old code recorded
    meta.write_text(json.dumps(info))
    old = MultiExitSER.from_pretrained(tmp_path / "old")
    assert old.final_norm_at_last_exit is hidden_states_end_with_final_norm(old.backbone.config)
    info["final_norm_at_last_exit"] = "yes"
    meta.write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="final_norm_at_last_exit"):
        MultiExitSER.from_pretrained(tmp_path / "old")


def test_one_clip_with_a_1d_attention_mask(model):
    x, mask = batch((6400,))
    with torch.no_grad():
        ref = model(x, attention_mask=mask)
        flat = model(x[0], attention_mask=mask[0])
    for k in model.exits:
        torch.testing.assert_close(flat[k].logits, ref[k].logits)
    assert model.predict_early_exit(x[0], mask[0], threshold=0.0)[0] == model.exits[0]
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(x, attention_mask=mask[:, :100])


def test_frozen_backbone_stays_in_eval_mode_when_the_model_trains():
    """``model.train()`` (every epoch of a training loop) must not turn on a frozen backbone's dropout."""
    m = make()
    m.train()
    assert m.backbone.training and m.heads.training  # trainable backbone: ordinary train mode
    m.freeze_backbone(freeze_feature_encoder_only=True)
    assert m.train().backbone.training  # only the CNN front end is frozen: the layers still train
    m.freeze_backbone()
    assert m.train() is m and m.backbone_frozen
    assert not any(mod.training for mod in m.backbone.modules())
    assert all(mod.training for mod in m.heads.modules())
    x, mask = batch()
    with torch.no_grad():  # no dropout noise in what the heads see
        a, b = (m.hidden_for_exits(x, mask, [4])[4][0] for _ in range(2))
    assert torch.equal(a, b)
    m.eval()
    assert not m.training and not m.heads.training
    m.backbone.requires_grad_(True)
    assert m.train().backbone.training


@pytest.mark.parametrize("builtin", ["tiny", "tiny-preln"])
def test_trained_model_reloads_to_the_logits_of_the_model_that_saved_it(tmp_path, builtin):
    """Compared with the in-memory model (not a second reload): nothing trained is lost on the way."""
    from fedsd.training.distill import DistillConfig, self_distill_loss

    torch.manual_seed(0)
    m = MultiExitSER(load_backbone(builtin), [1, 2, 4], LABELS, meta={"crop": 48000})
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    x, mask = batch()
    m.train()
    for _ in range(2):  # every parameter moves: backbone (incl. norms) and heads
        loss, _ = self_distill_loss(m(x, mask), torch.tensor([0, 3]), m.teacher_exit, DistillConfig())
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    fresh = MultiExitSER(load_backbone(builtin), [1, 2, 4], LABELS)
    assert m.backbone_fingerprint() != fresh.backbone_fingerprint()
    m.save_pretrained(tmp_path / "ckpt")
    again = MultiExitSER.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        a, b = m(x, attention_mask=mask), again(x, attention_mask=mask)
    for k in m.exits:
        assert torch.equal(a[k].logits, b[k].logits) and torch.equal(a[k].embedding, b[k].embedding)


def test_kd_only_step_on_the_model_moves_students_to_the_teacher_and_not_the_teacher():
    from fedsd.training.distill import DistillConfig, self_distill_loss

    m = make()
    m.freeze_backbone()
    x, mask = batch()

    def kls() -> dict[int, float]:
        """KL(teacher ‖ student) per student exit, of the distributions softened at T = 2 (the objective)."""
        m.eval()
        with torch.no_grad():
            out = m(x, mask)
        t = torch.log_softmax(out[4].logits / 2, -1)
        return {
            k: float((t.exp() * (t - torch.log_softmax(out[k].logits / 2, -1))).sum(-1).mean())
            for k in (1, 2)
        }

    before = kls()
    teacher_before = {k: v.clone() for k, v in m.head(4).state_dict().items()}
    opt = torch.optim.SGD(m.heads.parameters(), lr=0.05)  # the teacher head is in the optimiser too
    m.eval()  # dropout off so the step and the measurements agree
    cfg = DistillConfig(w_ce=0.0, w_kd=1.0, w_feat=0.0)
    loss, _ = self_distill_loss(m(x, mask), torch.tensor([0, 1]), 4, cfg, train_exits=[1, 2])
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = kls()
    assert after[1] < before[1] and after[2] < before[2]
    assert all(torch.equal(v, teacher_before[k]) for k, v in m.head(4).state_dict().items())
