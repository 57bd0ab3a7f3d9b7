"""The self-distillation loss of Ren et al. (arXiv 2210.14636), with a correct, detached KD term.

For every trained exit k below the teacher T:

    L_k = w_ce·CE(z_k, y)                                   labelled utterances only
        + w_kd·T²·KL(softmax(z_T/T) ‖ softmax(z_k/T))       teacher detached, all utterances
        + w_feat·MSE(f_k, f_T)                               head embeddings, teacher detached

and the teacher itself (if trained) gets plain CE. The paper's public code feeds probabilities into
KLDivLoss, uses T = 1 and lets gradients reach the teacher; we do not. The KD term needs no label, which
makes it the semi-supervised signal on a device's unlabelled speech.

**One weighting everywhere** (central training, device training, DP-SGD and personal heads): each
utterance i has its own loss ``ℓ_i = Σ_k w_ce·CE_k(i)·[i labelled] + w_kd·KD_k(i) + w_feat·FEAT_k(i)``
and a batch's loss is their mean over the batch, ``Σ_i ℓ_i / B`` (DP-SGD: ``/ expected B`` under
Poisson sampling, Opacus' ``loss_reduction="mean"``). Why this and not CE averaged over the labelled
clips only: DP-SGD needs per-utterance losses that depend on their own utterance alone (a 1/L_batch
normaliser lets one utterance rescale every other's gradient, so the clipping bound no longer bounds its
influence); using the same rule without DP keeps "DP − no DP" a measure of noise and clipping, not of
a reweighting. It is also the better estimator: every labelled clip weighs 1/B, whereas a per-batch
labelled mean gives a clip in a batch with one label B times the weight of one in a fully labelled
batch. At 100 % labels both rules are identical; at a label fraction f CE weighs ≈ f as much against KD
as under the labelled mean (raise ``w_ce`` by 1/f to restore that balance). The logged ``ce/<k>`` stays
the mean over labelled clips (what a reader expects of a CE value).

**Pseudo-labels** (``mode="pl"``, the FixMatch-style arm of Semi-FedSER / FedSTAR): instead of KD, each
unlabelled utterance whose frozen teacher is confident (softmax max ≥ ``pl_threshold``) gets the
teacher's class as its label, and the students train with CE on true and pseudo-labels alike. With a
frozen teacher and cached features the teacher's output per utterance never changes, so the labels are
drawn once before training (:func:`pseudo_label`) and the trainers then run plain CE: every step, skip
and weighting rule of CE applies unchanged.

A batch can carry no loss signal at all (CE mode and no labelled clip, or no student exit):
:func:`loss_has_signal` says so, and every trainer then skips its optimiser step and its learning-rate
scheduler's count (an Adam step on a zero gradient still moves the weights by its momentum).
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
    mode: Literal["sd", "ce", "pl"] = "sd"
    """``ce``: cross-entropy at every exit, no distillation (the baseline); ``pl``: CE on labels plus the
    confident teacher's pseudo-labels on unlabelled utterances (module docstring)."""
    pl_threshold: float = 0.95
    """``pl``: the teacher's softmax confidence an unlabelled utterance needs to get a pseudo-label."""

    def __post_init__(self) -> None:
        if self.mode not in ("sd", "ce", "pl"):
            raise ValueError(f"mode: unknown value {self.mode!r}; valid values: sd, ce, pl")
        if not 0.0 <= self.pl_threshold <= 1.0:
            raise ValueError(f"pl_threshold: must be in [0, 1], got {self.pl_threshold}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")
        for name in ("w_ce", "w_kd", "w_feat"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")


def pseudo_label(labels: Tensor, teacher_logits: Tensor, threshold: float) -> Tensor:
    """``labels`` with every unlabelled entry (-1) whose teacher is confident (softmax max ≥
    ``threshold``) set to the teacher's class; true labels are never overwritten."""
    if teacher_logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{teacher_logits.shape[0]} teacher outputs for {labels.shape[0]} labels")
    conf, cls = torch.softmax(teacher_logits.detach().float(), dim=-1).max(-1)
    labels = labels.reshape(-1).to(torch.long)
    take = (labels < 0) & (conf.to(labels.device) >= threshold)
    return torch.where(take, cls.to(labels.device), labels)


def loss_has_signal(labels: Tensor, teacher_exit: int, cfg: DistillConfig, exits: Sequence[int]) -> bool:
    """True when :func:`self_distill_loss` over the trained ``exits`` has at least one term with an
    utterance in it: a labelled clip (CE, if ``w_ce`` > 0), or, in SD mode, any clip at a student exit
    below the teacher (KD/feature terms, if weighted). False: the gradient is zero by construction and a
    trainer must not step (see the module docstring)."""
    n = int(labels.numel())
    if n == 0:
        return False
    if cfg.w_ce > 0 and bool((labels.reshape(-1) >= 0).any()):
        return True
    students = cfg.mode == "sd" and any(int(k) < teacher_exit for k in exits)
    return students and (cfg.w_kd > 0 or cfg.w_feat > 0)


def per_sample_losses(
    student: HeadOutput, teacher: HeadOutput | None, labels: Tensor, cfg: DistillConfig
) -> dict[str, Tensor]:
    """The loss terms of one exit per utterance (shape ``[B]``), each depending on its own utterance only.

    DP-SGD needs this: a batch-mean CE over the *labelled* items would let one utterance's presence
    rescale every other utterance's gradient, which breaks the per-sample sensitivity bound; every
    trainer uses the same per-utterance losses (module docstring). Unlabelled items get CE 0.
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
    ``"mean"`` returns their mean over the batch (the one weighting of the module docstring). The
    components are batch means, except ``ce/<k>``: the mean over labelled items (0 if none).
    """
    if cfg.mode == "pl":
        raise ValueError("mode pl: draw the pseudo-labels first (pseudo_label), then train with mode ce")
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
        terms = per_sample_losses(out, teacher if k in students else None, labels.to(out.logits.device), cfg)
        loss = cfg.w_ce * terms["ce"]
        if "kd" in terms:
            loss = loss + cfg.w_kd * terms["kd"] + cfg.w_feat * terms["feat"]
        for name, value in terms.items():
            parts[f"{name}/{k}"] = float(value.detach().mean()) if value.numel() else 0.0
        # Logged CE means the mean over labelled items only (unlabelled items carry a 0 in the
        # per-item loss, which must not dilute the log).
        keep = labels.to(terms["ce"].device) >= 0
        parts[f"ce/{k}"] = float(terms["ce"].detach()[keep].mean()) if bool(keep.any()) else 0.0
        parts[f"loss/{k}"] = float(loss.detach().mean()) if loss.numel() else 0.0
        total = loss if total is None else total + loss
    assert total is not None
    parts["total"] = float(total.detach().mean()) if total.numel() else 0.0
    if reduction == "mean":
        total = total.mean() if total.numel() else total.sum()
    return total, parts
