"""The pseudo-label arm (``mode: pl``): the frozen teacher's confident classes on unlabelled speech, then CE.

The baseline a reviewer asks for beside KD (Semi-FedSER, FedSTAR): labels drawn from the deep exit where
it is confident. Checked against its definition, against plain CE on the same drawn labels (bit for bit),
and end to end through the server's config and a real device in a federated round.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from harness import federation, inprocess_grid

from fedsd.clients.dp_training import train_heads_private
from fedsd.clients.messages import local_config as _local_config
from fedsd.clients.training import LocalTrainConfig, plan_exits, train_heads, with_pseudo_labels
from fedsd.model.multiexit import MultiExitSER
from fedsd.server.federation import run_federation
from fedsd.training.cached import head_outputs
from fedsd.training.distill import DistillConfig, pseudo_label, self_distill_loss
from fedsd.training.features import CachedFeatures


def test_pseudo_label_takes_confident_teacher_classes_for_unlabelled_clips_only() -> None:
    labels = torch.tensor([2, -1, -1, -1])
    logits = torch.tensor([[9.0, 0, 0], [0, 9.0, 0], [0.1, 0, 0], [0, 0, 9.0]])
    got = pseudo_label(labels, logits, threshold=0.9)
    assert got.tolist() == [2, 1, -1, 2]  # the true label stays, the unsure clip stays unlabelled
    assert pseudo_label(labels, logits, threshold=1.0).tolist() == [2, -1, -1, -1]
    assert pseudo_label(labels, logits, threshold=0.0).tolist() == [2, 1, 0, 2]
    with pytest.raises(ValueError, match="pl_threshold"):
        DistillConfig(mode="pl", pl_threshold=1.5)
    with pytest.raises(ValueError, match="pseudo-labels first"):
        self_distill_loss({1: None}, labels, 4, DistillConfig(mode="pl"))  # type: ignore[dict-item]


def _feats(model: MultiExitSER, n: int = 16) -> CachedFeatures:
    g = torch.Generator().manual_seed(1)
    dim = 2 * model.encoder.hidden_size  # stats heads cache [mean; std]
    inputs = {k: [torch.randn(dim, generator=g) for _ in range(n)] for k in model.exits}
    labels = torch.arange(n) % model.num_classes
    labels[n // 4 :] = -1  # a quarter labelled
    return CachedFeatures([f"u{i}" for i in range(n)], inputs, labels, hits=0, misses=0)


def _heads(model: MultiExitSER) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.head_state_dict().items()}


@pytest.mark.parametrize("private", [False, True])
def test_pl_is_ce_on_the_drawn_labels_and_differs_from_ce_alone(tiny_model_dir: Path, private: bool) -> None:
    base = MultiExitSER.from_pretrained(tiny_model_dir)
    feats = _feats(base)
    plan = plan_exits(base.exits, 2, LocalTrainConfig(exit=2))
    n = len(feats.utt_ids)
    with torch.no_grad():
        teacher = head_outputs(base, feats, [plan.teacher], list(range(n)))[plan.teacher].logits
    threshold = float(torch.softmax(teacher, -1).max(-1).values.median())  # half the clips confident
    drawn = pseudo_label(feats.labels, teacher, threshold)
    assert int((drawn >= 0).sum()) > int((feats.labels >= 0).sum())  # some clips gained a label

    def trained(labels: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
        model = MultiExitSER.from_pretrained(tiny_model_dir)
        cfg = LocalTrainConfig(exit=2, epochs=2, batch_size=4, seed=3,
                               distill=DistillConfig(mode=mode, pl_threshold=threshold))  # type: ignore[arg-type]  # fmt: skip
        f = replace(feats, labels=labels)
        if private:
            train_heads_private(model, f, plan, cfg, noise_multiplier=0.0, max_grad_norm=1.0, sample_rate=0.5,
                                steps=4, rng_seed=7)  # fmt: skip
        else:
            train_heads(model, f, plan, cfg)
        return _heads(model)

    pl, ce_drawn, ce_only = trained(feats.labels, "pl"), trained(drawn, "ce"), trained(feats.labels, "ce")
    assert all(torch.equal(pl[k], ce_drawn[k]) for k in pl)
    assert any(not torch.equal(pl[k], ce_only[k]) for k in pl)
    # the teacher is frozen: its head never moves, in any mode
    key = next(k for k in pl if k.startswith(f"heads.{plan.teacher}."))
    assert torch.equal(pl[key], base.head_state_dict()[key])


def test_the_server_config_reaches_the_device_and_a_pl_round_trains(
    tmp_path: Path, small_corpus: Path, tiny_model_dir: Path
) -> None:
    cfg = _local_config({"mode": "pl", "pl-threshold": 0.6}, 2)
    assert cfg.distill.mode == "pl" and cfg.distill.pl_threshold == 0.6
    feats, as_ce = with_pseudo_labels(
        MultiExitSER.from_pretrained(tiny_model_dir), _feats(MultiExitSER.from_pretrained(tiny_model_dir)),
        plan_exits([1, 2, 3, 4], 2, cfg), cfg,
    )  # fmt: skip
    assert as_ce.distill.mode == "ce"
    with pytest.raises(Exception, match="pl-threshold"):
        _local_config({"mode": "pl", "pl-threshold": 2.0}, 2)
    fed = federation(tmp_path, small_corpus, tiny_model_dir, name="pl", rounds=1, local_epochs=1, min_clients=2,
                     label_fraction=0.25, mode="pl", distill={"pl_threshold": 0.3})  # fmt: skip
    run_federation(inprocess_grid(fed.rc), fed.spec, log=lambda _: None)
    lines = [json.loads(x) for x in (Path(fed.spec.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["round"] == 1 and lines[-1]["train"]["num_clients"] == 2
