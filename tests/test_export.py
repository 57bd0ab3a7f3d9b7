"""Exported exit-K models hold only layers 1..K and heads <= K and reproduce the full model exactly."""

from __future__ import annotations

import json

import pytest
import torch
from harness import FAMILY_CASES, tiny_net
from typer.testing import CliRunner

from fedsd.model import ConfigError, MultiExitSER
from fedsd.model.export import export_exit, parameter_count, parent_fingerprint

pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
LABELS = ["angry", "happy", "neutral", "sad"]


def make(family: str = "wav2vec2", preln: bool = False, exits=(1, 2, 4), **overrides) -> MultiExitSER:
    return tiny_net(family, preln, exits=exits, labels=LABELS, meta={"crop": 48000}, **overrides)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6400, generator=g)
    mask = torch.ones_like(x, dtype=torch.long)
    x[1, 4000:] = 0.0
    mask[1, 4000:] = 0
    return x, mask


def assert_same_outputs(full: MultiExitSER, small: MultiExitSER) -> None:
    x, mask = batch()
    with torch.no_grad():
        ref = full(x, attention_mask=mask, exits=small.exits)
        got = small(x, attention_mask=mask)
        ref_h = full.hidden_for_exits(x, mask, small.exits)
        got_h = small.hidden_for_exits(x, mask)
    assert list(got) == small.exits
    for k in small.exits:
        assert torch.equal(got[k].logits, ref[k].logits), k
        assert torch.equal(got[k].embedding, ref[k].embedding), k
        assert torch.equal(got_h[k][0], ref_h[k][0]) and torch.equal(got_h[k][1], ref_h[k][1]), k


CASES = FAMILY_CASES


@pytest.mark.parametrize(("family", "preln", "overrides"), CASES)
def test_export_equals_full_model_exactly(tmp_path, family, preln, overrides):
    full = make(family, preln, **overrides)
    small = export_exit(full, 2)
    assert small.encoder.num_layers == 2 and len(small.backbone.encoder.layers) == 2
    assert small.exits == [1, 2] and small.teacher_exit == 2
    assert small.backbone.config.num_hidden_layers == 2 and full.encoder.num_layers == 4
    assert sorted(small.head_state_dict()) == sorted(full.head_state_dict([1, 2]))
    assert_same_outputs(full, small)
    if overrides:  # the pinned config must survive serialisation (the CLI test covers the plain case)
        small.save_pretrained(tmp_path / "m")
        assert_same_outputs(full, MultiExitSER.from_pretrained(tmp_path / "m"))


def test_export_at_the_teacher_keeps_everything():
    full = make("wav2vec2", True)
    same = export_exit(full, 4)
    assert same.exits == full.exits and same.encoder.num_layers == 4
    assert same.backbone_fingerprint() == full.backbone_fingerprint()
    assert_same_outputs(full, same)


def test_sizes_shrink_and_parent_is_recorded(tmp_path):
    full = make()
    small = export_exit(full, 1)
    assert parameter_count(small) < parameter_count(full)
    per_layer = parameter_count(full.backbone.encoder.layers[0])
    head = parameter_count(full.head(4))
    assert parameter_count(full) - parameter_count(small) == 3 * per_layer + 2 * head
    full.save_pretrained(tmp_path / "full")
    small.save_pretrained(tmp_path / "small")
    size = {
        d: sum(f.stat().st_size for f in (tmp_path / d).rglob("*") if f.is_file()) for d in ("full", "small")
    }
    assert size["small"] < size["full"]

    fp = full.backbone_fingerprint()
    assert small.backbone_fingerprint() != fp
    assert small.meta["exported_from"] == {"fingerprint": fp, "exit": 1, "num_layers": 4}
    assert small.meta["crop"] == 48000
    assert parent_fingerprint(small) == fp and parent_fingerprint(full) == fp
    loaded = MultiExitSER.from_pretrained(tmp_path / "small")
    assert parent_fingerprint(loaded) == fp
    info = json.loads((tmp_path / "small" / "fedsd.json").read_text())
    assert info["meta"]["exported_from"]["fingerprint"] == fp and info["teacher_exit"] == 1


def test_export_of_an_export_keeps_the_root_parent():
    full = make()
    mid = export_exit(full, 2)
    leaf = export_exit(mid, 1)
    assert leaf.meta["exported_from"] == {
        "fingerprint": full.backbone_fingerprint(),
        "exit": 1,
        "num_layers": 4,
    }
    assert_same_outputs(full, leaf)


def test_export_does_not_share_or_alter_the_original():
    full = make()
    before = {k: v.clone() for k, v in full.state_dict().items()}
    small = export_exit(full, 2)
    with torch.no_grad():
        for p in small.parameters():
            p.add_(1.0)
    after = full.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_invalid_exit_names_the_valid_exits():
    full = make()
    with pytest.raises(ConfigError, match=r"valid exits: \[1, 2, 4\]"):
        export_exit(full, 3)


# --- CLI ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "full"
    make().save_pretrained(path)
    return path


def test_cli_round_trip(saved, tmp_path):
    from fedsd.cli.main import app

    out = tmp_path / "exit2"
    result = CliRunner().invoke(app, ["export", "--model", str(saved), "--exit", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "before" in result.output and "after" in result.output and "MB" in result.output
    small = MultiExitSER.from_pretrained(out)
    full = MultiExitSER.from_pretrained(saved)
    assert small.exits == [1, 2] and small.encoder.num_layers == 2
    assert parent_fingerprint(small) == full.backbone_fingerprint()
    assert_same_outputs(full, small)


def flat(text: str) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(text.split())


def test_cli_errors(saved, tmp_path):
    from fedsd.cli.main import app

    runner = CliRunner()
    out = tmp_path / "o"
    bad = runner.invoke(app, ["export", "--model", str(saved), "--exit", "3", "--out", str(out)])
    assert bad.exit_code == 2 and "valid exits: [1, 2, 4]" in flat(bad.output)
    assert not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("x")
    refused = runner.invoke(app, ["export", "--model", str(saved), "--exit", "1", "--out", str(out)])
    assert refused.exit_code == 2 and "--force" in flat(refused.output)
    assert (out / "keep.txt").exists()
    forced = runner.invoke(
        app, ["export", "--model", str(saved), "--exit", "1", "--out", str(out), "--force"]
    )
    assert forced.exit_code == 0, forced.output
    assert MultiExitSER.from_pretrained(out).exits == [1]

    missing = runner.invoke(
        app, ["export", "--model", str(tmp_path / "nope"), "--exit", "1", "--out", str(tmp_path / "x")]
    )
    assert missing.exit_code == 2 and "not a directory" in flat(missing.output)
