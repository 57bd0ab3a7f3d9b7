"""MultiExitConfig: the model's settings as one checked object; fedsd.json stays what it was."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fedsd.checkpoint import CheckpointError
from fedsd.model import ConfigError, MultiExitConfig, MultiExitSER, load_backbone

LABELS = ["angry", "happy", "neutral", "sad"]
# The key order save_pretrained wrote before the config object existed (and still writes).
OLD_KEYS = [
    "format_version", "family", "num_layers", "final_norm_at_last_exit", "exits", "teacher_exit", "head",
    "head_kwargs", "label_names", "sample_rate", "crop", "fingerprint", "meta", "heads", "heads_sha256",
]  # fmt: skip


def make(builtin: str = "tiny", head: str = "stats") -> MultiExitSER:
    torch.manual_seed(0)
    meta = {"crop": {"max_seconds": 3.0, "mode": "tile"}, "backbone_source": builtin, "sample_rate": 16000}
    return MultiExitSER(load_backbone(builtin), [4, 1, 2], LABELS, head=head, meta=meta).eval()


def valid(**changes) -> dict:
    base = {"family": "wav2vec2", "num_layers": 4, "exits": [1, 2, 4], "label_names": LABELS}
    return {**base, **changes}


def test_model_config_holds_the_settings():
    m = make()
    c = m.config
    assert isinstance(c, MultiExitConfig)
    assert (c.family, c.num_layers, c.exits, c.teacher_exit, c.head) == ("wav2vec2", 4, [1, 2, 4], 4, "stats")
    assert c.head_kwargs == {"embed_dim": 256, "dropout": 0.1}  # every option, defaults included
    assert c.final_norm_at_last_exit is False and c.label_names == LABELS and c.num_classes == 4
    assert c.sample_rate == 16000 and c.crop == {"max_seconds": 3.0, "mode": "tile"}
    assert c.backbone_source == "tiny"
    assert (m.exits, m.label_names, m.head_kind, m.head_kwargs, m.meta) == (
        c.exits, c.label_names, c.head, c.head_kwargs, c.meta,
    )  # fmt: skip
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.exits = [1]  # type: ignore[misc]


def test_round_trip_through_dict_and_from_config():
    m = make(head="gru")
    again = MultiExitConfig.from_dict(json.loads(json.dumps(m.config.to_dict())))
    assert again == m.config
    rebuilt = MultiExitSER.from_config(load_backbone("tiny"), again)
    assert rebuilt.config == m.config
    assert rebuilt.head_state_dict().keys() == m.head_state_dict().keys()


def test_meta_is_mutable_and_assignable_and_checked():
    m = make()
    m.meta["round"] = 3
    assert m.config.meta["round"] == 3
    m.meta = {**m.meta, "device_model": {"heads": "global"}}
    assert m.config.meta["device_model"] == {"heads": "global"} and m.meta["round"] == 3
    with pytest.raises(ConfigError, match=r"^meta: "):
        m.meta = ["not", "a", "mapping"]  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"family": "conformer"}, "family"),
        ({"num_layers": 0}, "num_layers"),
        ({"num_layers": True}, "num_layers"),
        ({"exits": [0, 2]}, "exits"),
        ({"exits": [5]}, "exits"),
        ({"exits": []}, "exits"),
        ({"exits": "3"}, "exits"),
        ({"label_names": ["only"]}, "label_names"),
        ({"label_names": ["a", "a"]}, "label_names"),
        ({"head": "mlp"}, "head"),
        ({"head_kwargs": {"width": 3}}, "head_kwargs"),
        ({"head_kwargs": [1]}, "head_kwargs"),
        ({"final_norm_at_last_exit": "yes"}, "final_norm_at_last_exit"),
        ({"meta": "x"}, "meta"),
        ({"format_version": 2}, "format_version"),
    ],
)
def test_a_bad_setting_names_its_field(changes, field):
    with pytest.raises(ConfigError, match=rf"^{field}: ") as err:
        MultiExitConfig.from_dict(valid(**changes))
    assert err.value.field == field


@pytest.mark.parametrize("field", ["family", "num_layers", "exits", "label_names"])
def test_a_missing_setting_names_its_field(field):
    data = valid()
    del data[field]
    with pytest.raises(ConfigError, match=rf"^{field}: missing"):
        MultiExitConfig.from_dict(data)


def test_from_config_refuses_another_backbone():
    with pytest.raises(ConfigError, match=r"^family: "):
        MultiExitSER.from_config(load_backbone("tiny"), MultiExitConfig(**valid(family="hubert")))
    with pytest.raises(ConfigError, match=r"^num_layers: "):
        MultiExitSER.from_config(load_backbone("tiny"), MultiExitConfig(**valid(num_layers=6)))


def test_saved_file_keeps_its_layout(tmp_path):
    m = make()
    m.save_pretrained(tmp_path / "ckpt")
    info = json.loads((tmp_path / "ckpt" / "fedsd.json").read_text())
    assert list(info) == OLD_KEYS
    assert MultiExitSER.from_pretrained(tmp_path / "ckpt").config == m.config


def _old_describe(m: MultiExitSER, with_final_norm: bool) -> dict:
    """fedsd.json exactly as ``describe()`` built it before the config object (no hashes)."""
    info = {
        "format_version": 1,
        "family": m.family,
        "num_layers": m.encoder.num_layers,
        "final_norm_at_last_exit": m.final_norm_at_last_exit,
        "exits": list(m.exits),
        "teacher_exit": m.teacher_exit,
        "head": m.head_kind,
        "head_kwargs": dict(m.head_kwargs),
        "label_names": list(m.label_names),
        "sample_rate": int(m.meta.get("sample_rate", 16000)),
        "crop": m.meta.get("crop"),
        "fingerprint": m.backbone_fingerprint(),
        "meta": m.meta,
    }
    if not with_final_norm:  # the oldest checkpoints recorded no decision
        del info["final_norm_at_last_exit"]
    return info


@pytest.mark.parametrize(
    ("builtin", "with_final_norm"), [("tiny", True), ("tiny-preln", True), ("tiny", False)]
)
def test_checkpoint_written_the_old_way_loads(tmp_path, builtin, with_final_norm):
    m = make(builtin)
    path = m.save_pretrained(tmp_path / "ckpt")
    written = json.loads((path / "fedsd.json").read_text())
    old = _old_describe(m, with_final_norm)
    old.update(heads=written["heads"], heads_sha256=written["heads_sha256"])
    (path / "fedsd.json").write_text(json.dumps(old, indent=2))
    again = MultiExitSER.from_pretrained(path)
    assert again.config == m.config
    x = torch.randn(1, 8000)
    with torch.no_grad():
        a, b = m(x), again(x)
    assert all(torch.equal(a[k].logits, b[k].logits) for k in m.exits)


def test_a_bad_setting_in_fedsd_json_is_a_checkpoint_error_naming_the_file_and_field(tmp_path):
    path = make().save_pretrained(tmp_path / "ckpt")
    info = json.loads((path / "fedsd.json").read_text())
    info["label_names"] = ["one"]
    (path / "fedsd.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=r"fedsd\.json: label_names: "):
        MultiExitSER.from_pretrained(path)
