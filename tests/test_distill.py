"""Self-distillation loss: masking of unlabelled items, detached teacher, known values, CE baseline."""

from __future__ import annotations

import math

import pytest
import torch

from fedsd.distill import DistillConfig, self_distill_loss
from fedsd.model.heads import HeadOutput


def out(logits, embedding, grad: bool = True) -> HeadOutput:
    return HeadOutput(
        torch.tensor(logits, dtype=torch.float32, requires_grad=grad),
        torch.tensor(embedding, dtype=torch.float32, requires_grad=grad),
    )


def random_outputs(seed: int = 0, batch: int = 4, classes: int = 3) -> dict[int, HeadOutput]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: HeadOutput(
            torch.randn(batch, classes, generator=g).requires_grad_(),
            torch.randn(batch, 8, generator=g).requires_grad_(),
        )
        for k in (2, 4, 6)
    }


def test_identical_student_and_teacher_give_zero_kd_and_feat():
    o = random_outputs()
    o[2] = HeadOutput(o[6].logits.detach().clone(), o[6].embedding.detach().clone())
    _, parts = self_distill_loss(o, torch.tensor([0, 1, 2, 0]), 6, DistillConfig())
    assert parts["kd/2"] == pytest.approx(0.0, abs=1e-6)
    assert parts["feat/2"] == pytest.approx(0.0, abs=1e-12)
    assert parts["kd/4"] > 0 and parts["feat/4"] > 0


def test_no_gradient_reaches_teacher_from_kd_or_feat():
    o = random_outputs()
    loss, parts = self_distill_loss(o, torch.tensor([0, 1, 2, 0]), 6, DistillConfig(), train_exits=[2, 4])
    loss.backward()
    assert o[6].logits.grad is None and o[6].embedding.grad is None
    assert o[2].logits.grad is not None and o[2].embedding.grad.abs().sum() > 0
    assert "ce/6" not in parts


def test_teacher_may_be_precomputed_without_grad():
    o = random_outputs()
    o[6] = HeadOutput(o[6].logits.detach(), o[6].embedding.detach())
    loss, _ = self_distill_loss(o, torch.tensor([-1, -1, 1, 0]), 6, DistillConfig(), train_exits=[2, 4])
    loss.backward()
    assert o[4].logits.grad.abs().sum() > 0


def test_ce_ignores_unlabelled_items():
    cfg = DistillConfig()
    o = random_outputs()
    labels = torch.tensor([0, -1, 2, -1])
    _, p1 = self_distill_loss(o, labels, 6, cfg)
    _, p2 = self_distill_loss(o, torch.tensor([0, -7, 2, -1]), 6, cfg)  # any negative = unlabelled
    assert p1 == p2
    # changing what the model says about an unlabelled item leaves CE unchanged (KD changes)
    o2 = {k: HeadOutput(v.logits.detach().clone(), v.embedding) for k, v in o.items()}
    o2[2].logits[1] += torch.tensor([5.0, -5.0, 0.0])
    _, p3 = self_distill_loss(o2, labels, 6, cfg)
    assert p3["ce/2"] == pytest.approx(p1["ce/2"], rel=1e-6) and p3["kd/2"] != pytest.approx(p1["kd/2"])
    expected = torch.nn.functional.cross_entropy(o[2].logits.detach()[[0, 2]], torch.tensor([0, 2]))
    assert p1["ce/2"] == pytest.approx(expected.item(), rel=1e-6)


def test_all_unlabelled_batch_has_zero_ce_but_positive_kd():
    o = random_outputs()
    loss, parts = self_distill_loss(o, torch.full((4,), -1), 6, DistillConfig())
    assert parts["ce/2"] == 0.0 and parts["ce/6"] == 0.0
    assert parts["kd/2"] > 0 and parts["total"] > 0
    loss.backward()  # still differentiable
    assert o[2].logits.grad.abs().sum() > 0


def test_known_value_by_hand():
    """Student uniform, teacher logits (ln 3, 0), T = 2, label 0, embeddings (0,0) vs (1,3)."""
    o = {1: out([[0.0, 0.0]], [[0.0, 0.0]]), 2: out([[math.log(3.0), 0.0]], [[1.0, 3.0]])}
    cfg = DistillConfig(w_ce=1.0, w_kd=0.5, w_feat=0.1, temperature=2.0)
    loss, parts = self_distill_loss(o, torch.tensor([0]), 2, cfg)
    # softmax((ln 3)/2, 0) = (√3, 1) / (√3 + 1); the student at T=2 is still uniform
    p = [math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1)]
    kl = sum(pi * math.log(pi / 0.5) for pi in p)
    ce_student = math.log(2.0)
    mse = (1.0 + 9.0) / 2
    ce_teacher = -math.log(0.75)
    assert parts["ce/1"] == pytest.approx(ce_student, rel=1e-6)
    assert parts["kd/1"] == pytest.approx(4 * kl, rel=1e-5)
    assert parts["feat/1"] == pytest.approx(mse, rel=1e-6)
    assert parts["ce/2"] == pytest.approx(ce_teacher, rel=1e-6)
    expected = ce_student + 0.5 * 4 * kl + 0.1 * mse + ce_teacher
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert parts["total"] == pytest.approx(expected, rel=1e-5)


def test_ce_mode_ignores_the_teacher():
    o = random_outputs()
    labels = torch.tensor([0, 1, 2, 0])
    loss, parts = self_distill_loss(o, labels, 6, DistillConfig(mode="ce"), train_exits=[2, 4])
    assert not any(k.startswith(("kd/", "feat/")) for k in parts)
    ce = sum(torch.nn.functional.cross_entropy(o[k].logits.detach(), labels).item() for k in (2, 4))
    assert loss.item() == pytest.approx(ce, rel=1e-6)
    del o[6]  # no teacher needed at all
    self_distill_loss(o, labels, 6, DistillConfig(mode="ce"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        DistillConfig(mode="kd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="train_exits"):
        labels = torch.zeros(4, dtype=torch.long)
        self_distill_loss(random_outputs(), labels, 6, DistillConfig(), train_exits=[3])
