"""The self-distillation loss of Ren et al. (arXiv 2210.14636), with a correct, detached KD term.

For every trained exit k below the teacher T:

    L_k = w_ce·CE(z_k, y)                                   labelled utterances only
        + w_kd·T²·KL(softmax(z_T/T) ‖ softmax(z_k/T))       teacher detached, all utterances
        + w_feat·MSE(f_k, f_T)                               head embeddings, teacher detached

and the teacher itself (if trained) gets plain CE. The paper's public code feeds probabilities into
KLDivLoss, uses T = 1 and lets gradients reach the teacher; we do not (DESIGN.md §1). The KD term needs
no label, which makes it the semi-supervised signal on a device's unlabelled speech.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fedsd.model.heads import HeadOutput


@dataclass
class DistillConfig:
    w_ce: float = 1.0
    w_kd: float = 1.0
    w_feat: float = 1.0
    temperature: float = 2.0
    mode: Literal["sd", "ce"] = "sd"  # "ce": cross-entropy at every exit, no distillation (the baseline)

    def __post_init__(self) -> None:
        if self.mode not in ("sd", "ce"):
            raise ValueError(f"mode: unknown value {self.mode!r}; valid values: sd, ce")
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")
        for name in ("w_ce", "w_kd", "w_feat"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")


def labelled_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over items with a label (>= 0); 0 (still in the graph) if there are none."""
    keep = labels >= 0
    if not bool(keep.any()):
        return logits.sum() * 0.0  # keeps backward() valid for a batch without labels
    return F.cross_entropy(logits[keep], labels[keep])


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T²·KL(softmax(z_T/T) ‖ softmax(z_k/T)) averaged over the batch; the teacher gets no gradient."""
    t = temperature
    teacher = F.log_softmax(teacher_logits.detach().to(student_logits) / t, dim=-1)
    student = F.log_softmax(student_logits / t, dim=-1)
    return (t * t) * F.kl_div(student, teacher, reduction="batchmean", log_target=True)


def feat_loss(student_embedding: Tensor, teacher_embedding: Tensor) -> Tensor:
    """MSE between the heads' penultimate embeddings; the teacher gets no gradient."""
    return F.mse_loss(student_embedding, teacher_embedding.detach().to(student_embedding))


def per_sample_losses(
    student: HeadOutput, teacher: HeadOutput | None, labels: Tensor, cfg: DistillConfig
) -> dict[str, Tensor]:
    """The loss terms of one exit per utterance (shape ``[B]``), each depending on its own utterance only.

    DP-SGD needs this: a batch-mean CE over the *labelled* items (``labelled_ce``) would let one
    utterance's presence rescale every other utterance's gradient, which breaks the per-sample
    sensitivity bound. Unlabelled items get CE 0.
    """
    keep = labels >= 0
    ce = F.cross_entropy(student.logits, labels.clamp_min(0), reduction="none") * keep
    out = {"ce": ce}
    if teacher is not None:
        t = cfg.temperature
        log_t = F.log_softmax(teacher.logits.detach().to(student.logits) / t, dim=-1)
        log_s = F.log_softmax(student.logits / t, dim=-1)
        out["kd"] = (t * t) * (log_t.exp() * (log_t - log_s)).sum(-1)
        diff = student.embedding - teacher.embedding.detach().to(student.embedding)
        out["feat"] = diff.pow(2).mean(-1)
    return out


def self_distill_loss(
    outputs: Mapping[int, HeadOutput],
    labels: Tensor,
    teacher_exit: int,
    cfg: DistillConfig,
    train_exits: Sequence[int] | None = None,
    reduction: Literal["mean", "none"] = "mean",
) -> tuple[Tensor, dict[str, float]]:
    """Total loss over the trained exits (sum of per-exit losses) and its components as floats.

    ``outputs[teacher_exit]`` may be precomputed (cached teacher logits/embedding without grad).
    Component keys: ``ce/<k>``, ``kd/<k>``, ``feat/<k>``, ``loss/<k>`` and ``total``.
    ``reduction="none"`` returns one loss per utterance (``[B]``, see :func:`per_sample_losses`);
    its components are batch means, except ``ce/<k>``: the mean over labelled items, as with "mean".
    """
    exits = sorted(outputs) if train_exits is None else sorted({int(k) for k in train_exits})
    if not exits:
        raise ValueError("train_exits: no exit to train")
    absent = [k for k in exits if k not in outputs]
    if absent:
        raise ValueError(f"train_exits: {absent} have no outputs (got exits {sorted(outputs)})")
    deeper = [k for k in exits if k > teacher_exit]
    if deeper and cfg.mode == "sd":
        raise ValueError(f"train_exits: {deeper} are deeper than the teacher exit {teacher_exit}")
    labels = labels.reshape(-1).to(torch.long)
    students = [k for k in exits if k < teacher_exit] if cfg.mode == "sd" else []
    teacher = None
    if students:
        if teacher_exit not in outputs:
            raise ValueError(f"teacher_exit: no outputs for teacher exit {teacher_exit}")
        teacher = outputs[teacher_exit]
    parts: dict[str, float] = {}
    total: Tensor | None = None
    for k in exits:
        out = outputs[k]
        if out.logits.shape[0] != labels.shape[0]:
            raise ValueError(f"exit {k}: {out.logits.shape[0]} logits for {labels.shape[0]} labels")
        if reduction == "none":
            terms = per_sample_losses(
                out, teacher if k in students else None, labels.to(out.logits.device), cfg
            )
            loss = (
                cfg.w_ce * terms["ce"] + cfg.w_kd * terms.get("kd", 0.0) + cfg.w_feat * terms.get("feat", 0.0)
            )
            for name, value in terms.items():
                parts[f"{name}/{k}"] = float(value.detach().mean()) if value.numel() else 0.0
            # Logged CE means what it means with reduction="mean": the mean over labelled items only
            # (unlabelled items carry a 0 in the per-item loss, which must not dilute the log).
            keep = labels.to(terms["ce"].device) >= 0
            parts[f"ce/{k}"] = float(terms["ce"].detach()[keep].mean()) if bool(keep.any()) else 0.0
            parts[f"loss/{k}"] = float(loss.detach().mean()) if loss.numel() else 0.0
            total = loss if total is None else total + loss
            continue
        ce = labelled_ce(out.logits, labels.to(out.logits.device))
        loss = cfg.w_ce * ce
        parts[f"ce/{k}"] = float(ce.detach())
        if teacher is not None and k in students:
            kd = kd_loss(out.logits, teacher.logits, cfg.temperature)
            feat = feat_loss(out.embedding, teacher.embedding)
            loss = loss + cfg.w_kd * kd + cfg.w_feat * feat
            parts[f"kd/{k}"] = float(kd.detach())
            parts[f"feat/{k}"] = float(feat.detach())
        parts[f"loss/{k}"] = float(loss.detach())
        total = loss if total is None else total + loss
    assert total is not None
    parts["total"] = float(total.detach().mean()) if total.numel() else 0.0
    return total, parts
