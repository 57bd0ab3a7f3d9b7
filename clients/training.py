"""Local adaptation on a device: train shallow exit heads from cached backbone features.

The backbone is frozen, so each epoch only runs the small heads over cached head inputs
(``fedsd.training.features``). The teacher is the frozen deep exit (``teacher="deep"``) or, on a device that
cannot run the whole model, its own deepest exit (``teacher="local"``, trained with CE like any head).

Cached inputs are CPU tensors while the heads sit wherever the feature cache ran the model
(``--device``): every batch goes to the heads' device here, and results come back to the CPU.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from fedsd.model.multiexit import MultiExitSER
from fedsd.training.cached import head_outputs
from fedsd.training.distill import DistillConfig, loss_has_signal, pseudo_label, self_distill_loss
from fedsd.training.features import CachedFeatures


@dataclass
class LocalTrainConfig:
    exit: int
    train_exits: Literal["upto", "only"] = "upto"
    teacher: Literal["deep", "local"] = "deep"
    epochs: int = 5
    batch_size: int = 16
    lr: float = 1e-3
    proximal_mu: float = 0.0
    """FedProx μ: gradient of μ/2·‖w − w_received‖² added to every trained head's (0: off)."""
    seed: int = 0
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass
class ExitPlan:
    """Which exits a device runs, trains, and which one teaches."""

    needed: list[int]  # exits whose head inputs must be cached (the layers this device executes)
    train: list[int]  # heads updated locally (and sent to the server)
    teacher: int


def plan_exits(model_exits: Sequence[int], device_exit: int, cfg: LocalTrainConfig) -> ExitPlan:
    exits = sorted(model_exits)
    if device_exit not in exits:
        raise ValueError(f"exit {device_exit} is not an exit of this model (exits: {exits})")
    deep = exits[-1]
    if cfg.teacher == "deep":
        teacher = deep
        candidates = [k for k in exits if k <= device_exit and k != deep]
    else:
        teacher = device_exit
        candidates = [k for k in exits if k <= device_exit]
    train = (
        candidates
        if cfg.train_exits == "upto"
        else [k for k in candidates if k == max(candidates, default=-1)]
    )
    if not train:
        raise ValueError(
            f"a device at exit {device_exit} with teacher={cfg.teacher} has no head to train "
            f"(exits {exits}); choose a shallower exit or teacher=local"
        )
    needed = sorted(set(train) | {teacher})
    return ExitPlan(needed=needed, train=train, teacher=teacher)


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed mixed deterministically from ``parts`` (run seed, round, device identity).

    Why: devices of one round must not share a seed (same shuffles, same dropout masks), yet a device's
    update must stay reproducible from what it was sent and who it is.
    """
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def add_proximal_grad(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], mu: float) -> None:
    """FedProx (Li et al., 2020): add μ·(w − w_received), the gradient of μ/2·‖w − w_received‖², to each
    trained parameter's gradient.

    Added to the gradient (not the loss) so that DP-SGD can add it *after* clipping and noise: the term
    does not depend on the device's data, so it costs no privacy and is never clipped away.
    """
    if mu <= 0:
        return
    with torch.no_grad():
        for p, a in zip(params, anchors, strict=True):
            if p.grad is None:
                p.grad = mu * (p.detach() - a)
            else:
                p.grad.add_(p.detach() - a, alpha=mu)


def set_train_modes(model: MultiExitSER, train: Sequence[int]) -> None:
    """One rule for plain and DP training: a head that is trained is in train mode, the rest in eval.

    So a frozen deep teacher gives targets without dropout noise, and a ``teacher="local"`` head, which
    is trained (CE) as well as teaching, trains with dropout like every trained head.
    """
    if model.training or model.backbone.training:  # the whole tree only when something is in train mode
        model.eval()
    for key, head in model.heads.items():
        head.train(int(key) in train)


def train_heads(
    model: MultiExitSER,
    feats: CachedFeatures,
    plan: ExitPlan,
    cfg: LocalTrainConfig,
    optimizer_factory=None,
) -> dict[str, float]:
    """Run ``cfg.epochs`` of self-distillation on the planned heads; returns loss components (means).

    Deterministic for a seed (shuffling and dropout draw from a forked, seeded RNG), so a device's
    update can be reproduced exactly.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # heads are tiny: thread synchronisation costs more than it saves
    try:
        with torch.random.fork_rng(devices=rng_devices(model)):
            torch.manual_seed(cfg.seed)
            return _train_heads(model, feats, plan, cfg, optimizer_factory)
    finally:
        torch.set_num_threads(threads)


def rng_devices(model: MultiExitSER) -> list[int]:
    """CUDA devices holding heads: their RNGs (dropout) are forked and seeded too."""
    return sorted({p.device.index or 0 for p in model.heads.parameters() if p.device.type == "cuda"})


def with_pseudo_labels(
    model: MultiExitSER, feats: CachedFeatures, plan: ExitPlan, cfg: LocalTrainConfig
) -> tuple[CachedFeatures, LocalTrainConfig]:
    """``mode="pl"``: the features with the frozen teacher's confident pseudo-labels on unlabelled
    utterances, and the config switched to CE (``fedsd.training.distill``); any other mode passes through."""
    if cfg.distill.mode != "pl":
        return feats, cfg
    n = len(feats.utt_ids)
    with torch.no_grad():
        model.eval()
        teacher = head_outputs(model, feats, [plan.teacher], list(range(n)))[plan.teacher].logits
    labels = pseudo_label(feats.labels, teacher, cfg.distill.pl_threshold)
    return replace(feats, labels=labels), replace(cfg, distill=replace(cfg.distill, mode="ce"))


def _train_heads(
    model: MultiExitSER,
    feats: CachedFeatures,
    plan: ExitPlan,
    cfg: LocalTrainConfig,
    optimizer_factory=None,
) -> dict[str, float]:
    feats, cfg = with_pseudo_labels(model, feats, plan, cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for k in plan.train:
        for p in model.heads[str(k)].parameters():
            p.requires_grad_(True)
            params.append(p)
    opt = optimizer_factory(params) if optimizer_factory else torch.optim.Adam(params, lr=cfg.lr)
    anchors = [p.detach().clone() for p in params]  # the received (global) heads, for the proximal term
    n = len(feats.utt_ids)
    sums: dict[str, float] = {}
    steps = 0
    for _ in range(cfg.epochs):
        set_train_modes(model, plan.train)
        order = torch.randperm(n, generator=g).tolist()
        for s in range(0, n, cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            out = head_outputs(model, feats, plan.train, idx)
            if plan.teacher not in out:
                with torch.no_grad():
                    out |= head_outputs(model, feats, [plan.teacher], idx)
            loss, comps = self_distill_loss(
                out, feats.labels[idx], plan.teacher, cfg.distill, train_exits=plan.train
            )
            opt.zero_grad()
            # No loss signal (CE and no labelled clip in the batch): no step at all. Adam's momentum
            # would move the heads on a zero gradient; the proximal term alone is a regulariser of
            # data steps, not a reason to step (fedsd.training.distill: one weighting, one skip rule).
            if loss.requires_grad and loss_has_signal(
                feats.labels[idx], plan.teacher, cfg.distill, plan.train
            ):
                loss.backward()
                add_proximal_grad(params, anchors, cfg.proximal_mu)
                opt.step()
            for key, v in comps.items():
                sums[key] = sums.get(key, 0.0) + float(v)
            steps += 1
    model.eval()
    return {k: v / max(steps, 1) for k, v in sums.items() if not math.isnan(v)}
