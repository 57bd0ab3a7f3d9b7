"""Self-distillation loss: masking of unlabelled items, detached teacher, known values, CE baseline."""

from __future__ import annotations

import math

import pytest
import torch

from fedsd.model.heads import HeadOutput
from fedsd.training.distill import DistillConfig, self_distill_loss


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


def test_per_item_reduction_logs_ce_over_labelled_items_only():
    """``reduction="none"`` (DP-SGD) logs the same ``ce/k`` as "mean": unlabelled items do not dilute it."""
    o = random_outputs()
    labels = torch.tensor([0, -1, 2, -1])
    per, p_none = self_distill_loss(o, labels, 6, DistillConfig(), reduction="none")
    _, p_mean = self_distill_loss(o, labels, 6, DistillConfig())
    for k in (2, 4, 6):
        assert p_none[f"ce/{k}"] == pytest.approx(p_mean[f"ce/{k}"], rel=1e-6)
    for k in (2, 4):
        assert p_none[f"kd/{k}"] == pytest.approx(p_mean[f"kd/{k}"], rel=1e-6)
    assert per.shape == (4,)
    _, p_none = self_distill_loss(o, torch.full((4,), -1), 6, DistillConfig(), reduction="none")
    assert p_none["ce/2"] == 0.0


def _softened_kl_by_hand(teacher: list[float], student: list[float], t: float) -> float:
    p = [math.exp(v / t) for v in teacher]
    q = [math.exp(v / t) for v in student]
    p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_term_is_t_squared_times_the_kl_of_softened_distributions(temperature, reduction):
    """The KD term is T² × KL(softmax(z_T/T) ‖ softmax(z_k/T)) (at T = 2: 4 × KL), computed here by hand."""
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(5, 4, generator=g) * 3, torch.randn(5, 4, generator=g) * 3
    o = {1: HeadOutput(student, torch.zeros(5, 2)), 2: HeadOutput(teacher, torch.zeros(5, 2))}
    cfg = DistillConfig(w_ce=0.0, w_kd=1.0, w_feat=0.0, temperature=temperature)
    loss, parts = self_distill_loss(o, torch.full((5,), -1), 2, cfg, train_exits=[1], reduction=reduction)
    kls = [
        _softened_kl_by_hand(t_row, s_row, temperature)
        for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True)
    ]
    per_item = [temperature**2 * kl for kl in kls]
    assert parts["kd/1"] == pytest.approx(sum(per_item) / 5, rel=1e-5)
    assert loss.mean().item() == pytest.approx(sum(per_item) / 5, rel=1e-5)
    if reduction == "none":
        assert loss.tolist() == pytest.approx(per_item, rel=1e-5)


def test_one_kd_only_step_moves_the_student_towards_the_teacher_and_not_the_teacher():
    """w_ce = w_feat = 0: a gradient step on real heads lowers KL(teacher ‖ student); the teacher is untouched."""
    from fedsd.model.heads import build_head

    torch.manual_seed(0)
    student, teacher = build_head("stats", 16, 4), build_head("stats", 16, 4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 32, generator=g)
    student.eval(), teacher.eval()  # no dropout: the two KL measurements are comparable

    def kl() -> float:
        with torch.no_grad():
            t = torch.log_softmax(teacher.forward_precomputed(x).logits, -1)
            s = torch.log_softmax(student.forward_precomputed(x).logits, -1)
            return float((t.exp() * (t - s)).sum(-1).mean())

    before = kl()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    # one optimiser over both heads: only the loss decides who moves
    opt = torch.optim.SGD([*student.parameters(), *teacher.parameters()], lr=0.5)
    cfg = DistillConfig(w_ce=0.0, w_kd=1.0, w_feat=0.0, temperature=2.0)
    out = {1: student.forward_precomputed(x), 2: teacher.forward_precomputed(x)}
    loss, _ = self_distill_loss(out, torch.arange(32) % 4, 2, cfg, train_exits=[1])
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert kl() < before
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())


def test_batch_loss_is_the_mean_of_per_utterance_losses_with_ce_over_the_whole_batch():
    """One weighting for every trainer (issue 22): a labelled clip's CE weighs 1/B, not 1/(labelled in
    the batch), so DP (per-sample) and plain training optimise the same loss."""
    o = random_outputs()
    labels = torch.tensor([0, -1, 2, -1])
    cfg = DistillConfig()
    mean, parts = self_distill_loss(o, labels, 6, cfg)
    per, _ = self_distill_loss(o, labels, 6, cfg, reduction="none")
    assert mean.item() == pytest.approx(per.mean().item(), rel=1e-6)
    ce_only, p_ce = self_distill_loss(o, labels, 6, DistillConfig(mode="ce"), train_exits=[2])
    by_hand = torch.nn.functional.cross_entropy(
        o[2].logits.detach()[[0, 2]], torch.tensor([0, 2]), reduction="sum"
    )
    assert ce_only.item() == pytest.approx(by_hand.item() / 4, rel=1e-6)  # sum over labelled / B
    assert p_ce["ce/2"] == pytest.approx(by_hand.item() / 2, rel=1e-6)  # the log: mean over labelled


def test_loss_has_signal():
    from fedsd.training.distill import loss_has_signal

    none, some = torch.full((4,), -1), torch.tensor([-1, 1, -1, -1])
    ce, sd = DistillConfig(mode="ce"), DistillConfig()
    assert not loss_has_signal(none, 6, ce, [2, 4, 6])  # CE, no label: the phantom step of issue 22
    assert loss_has_signal(some, 6, ce, [2, 4, 6])
    assert loss_has_signal(none, 6, sd, [2, 4, 6])  # KD needs no label
    assert not loss_has_signal(none, 6, sd, [6])  # only the teacher trains: CE alone
    assert not loss_has_signal(some, 6, DistillConfig(mode="ce", w_ce=0.0), [2])
    assert not loss_has_signal(none, 6, DistillConfig(w_kd=0.0, w_feat=0.0), [2, 6])
    assert not loss_has_signal(torch.zeros(0, dtype=torch.long), 6, sd, [2])
