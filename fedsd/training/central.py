"""Centralized self-distillation training (the paper's method) and evaluation of every exit.

The whole multi-exit model is trained at once: each batch runs the backbone once up to the teacher,
every exit head sees its layer's hidden state, and ``self_distill_loss`` combines CE on labelled
utterances, KD from the (detached) teacher and the feature loss. The learning rate warms up and decays
(``train.lr_schedule``); model selection uses the mean validation UAR over all exits
(``train.select``); the last epoch is kept too, and ``learning_curves.png`` shows every epoch.
A batch without loss signal (CE and no labelled clip) takes no optimiser step and no scheduler count
(``steps_skipped`` in metrics.jsonl; the schedule's horizon still counts every nominal step, so with
skips the rate ends slightly above its floor). Checkpoints record the speakers they were trained and
selected on (``fedsd.checkpoint.data_record``).
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from fedsd.checkpoint import DATA_RECORD_KEY, append_jsonl, atomic_write_json, atomic_write_text, data_record
from fedsd.config import ConfigError, ExperimentConfig, TrainConfig, config_to_yaml
from fedsd.data.audio import CropPolicy
from fedsd.data.dataset import SpeechDataset, collate_batch
from fedsd.data.manifest import ManifestRow, read_manifest
from fedsd.data.manifest import label_names as manifest_label_names
from fedsd.data.partition import labelled_mask
from fedsd.metrics import ClassificationReport, classification_report
from fedsd.model.backbone import load_backbone
from fedsd.model.multiexit import MultiExitSER
from fedsd.report import plot_learning_curves
from fedsd.tracking import epoch_scalars, finish_run, tracker_for
from fedsd.training.distill import DistillConfig, loss_has_signal, self_distill_loss

ProgressFn = Callable[[str, int, int], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def train_crop(cfg: ExperimentConfig) -> CropPolicy:
    c = cfg.data.crop
    return CropPolicy(max_seconds=c.max_seconds, mode=c.mode, sample_rate=cfg.data.sample_rate)


def eval_crop(cfg: ExperimentConfig) -> CropPolicy:
    """Evaluation must be deterministic: a random training crop becomes a center crop."""
    c = cfg.data.eval_crop or cfg.data.crop
    return CropPolicy.for_evaluation(c.model_dump(), cfg.data.sample_rate)


def resolve_label_names(cfg: ExperimentConfig, rows: Sequence[ManifestRow]) -> list[str]:
    present = manifest_label_names(rows)
    if cfg.data.labels is None:
        return present
    unknown = sorted(set(present) - set(cfg.data.labels))
    if unknown:
        raise ConfigError(
            f"data.labels {cfg.data.labels} does not cover the manifest's labels {unknown} "
            f"({cfg.data.manifest_path}); add them or map them with a preset"
        )
    return list(cfg.data.labels)


def split_rows(cfg: ExperimentConfig, rows: Sequence[ManifestRow]) -> dict[str, list[ManifestRow]]:
    """Train/valid/test lists, speaker-independent, as the config asks."""
    rows = [r for r in rows if r.label]
    if cfg.data.test_session:
        test = [r for r in rows if r.session == cfg.data.test_session]
        if not test:
            raise ConfigError(f"data.test_session {cfg.data.test_session!r} matches no row's session column")
        rest = [r for r in rows if r.session != cfg.data.test_session]
        return _speaker_holdout(rest, cfg.data.valid_speakers or 1, 0, cfg.train.seed) | {"test": test}
    if cfg.data.split == "manifest":
        out = {s: [r for r in rows if r.split == s] for s in ("train", "valid", "test")}
        if not out["train"]:
            raise ConfigError(
                f"{cfg.data.manifest_path}: no row has split=train; set data.split: speaker to hold out "
                "speakers by seed instead"
            )
        return out
    return _speaker_holdout(rows, cfg.data.valid_speakers, cfg.data.test_speakers, cfg.train.seed)


def _speaker_holdout(
    rows: Sequence[ManifestRow], n_valid: int, n_test: int, seed: int
) -> dict[str, list[ManifestRow]]:
    speakers = sorted({r.speaker for r in rows})
    if n_valid + n_test >= len(speakers):
        raise ConfigError(
            f"cannot hold out {n_valid} valid + {n_test} test speakers from {len(speakers)} speakers"
        )
    rng = random.Random(seed)
    rng.shuffle(speakers)
    test_s, valid_s = set(speakers[:n_test]), set(speakers[n_test : n_test + n_valid])
    return {
        "train": [r for r in rows if r.speaker not in test_s | valid_s],
        "valid": [r for r in rows if r.speaker in valid_s],
        "test": [r for r in rows if r.speaker in test_s],
    }


def build_model(cfg: ExperimentConfig, label_names: Sequence[str]) -> MultiExitSER:
    backbone = load_backbone(cfg.model.backbone, family=cfg.model.family, pretrained=cfg.model.pretrained)
    meta = {
        "sample_rate": cfg.data.sample_rate,
        "crop": cfg.data.crop.model_dump(),
        "backbone_source": cfg.model.backbone,
        "pretrained": cfg.model.pretrained,
        "normalize": "utterance",  # zero mean, unit variance per clip (SpeechDataset), for every consumer
    }
    return MultiExitSER(
        backbone,
        cfg.model.exits,
        label_names,
        head=cfg.model.head,
        head_kwargs=cfg.model.head_kwargs,
        meta=meta,
    )


def make_loader(
    rows: Sequence[ManifestRow],
    root: Path,
    label_names: Sequence[str],
    crop: CropPolicy,
    *,
    batch_size: int,
    train: bool = False,
    labelled: Sequence[bool] | None = None,
    seed: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    ds = SpeechDataset(rows, root, label_names, crop, labelled=labelled, train=train, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=train,
        collate_fn=collate_batch,
        num_workers=num_workers,
        generator=gen if train else None,
    )


@torch.no_grad()
def predict_loader(
    model: MultiExitSER, loader: DataLoader, device: str = "cpu", exits: Sequence[int] | None = None
) -> tuple[dict[int, np.ndarray], np.ndarray, list[str]]:
    """Logits per exit, labels (-1 unlabelled) and utterance ids for a whole loader."""
    model.eval()
    exits = list(exits or model.exits)
    logits: dict[int, list[np.ndarray]] = {k: [] for k in exits}
    labels: list[np.ndarray] = []
    ids: list[str] = []
    for batch in loader:
        out = model(batch["input_values"].to(device), batch["attention_mask"].to(device), exits=exits)
        for k in exits:
            logits[k].append(out[k].logits.float().cpu().numpy())
        labels.append(batch["labels"].numpy())
        ids.extend(batch["utt_ids"])
    return (
        {k: np.concatenate(v) if v else np.zeros((0, len(model.label_names))) for k, v in logits.items()},
        np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64),
        ids,
    )


def evaluate_loader(
    model: MultiExitSER, loader: DataLoader, device: str = "cpu", exits: Sequence[int] | None = None
) -> dict[int, ClassificationReport]:
    logits, labels, _ = predict_loader(model, loader, device, exits)
    keep = labels >= 0
    return {
        k: classification_report(labels[keep], z[keep].argmax(-1), model.label_names)
        for k, z in logits.items()
    }


@torch.no_grad()
def measure_exit_latency(
    model: MultiExitSER, waveforms: Sequence[torch.Tensor], device: str = "cpu", repeats: int = 1
) -> dict[int, float]:
    """Median seconds per utterance (batch 1) for each exit, running only the layers that exit needs."""
    model.eval()
    times: dict[int, list[float]] = {k: [] for k in model.exits}
    if not waveforms:
        return {k: float("nan") for k in model.exits}
    x0 = waveforms[0][None].to(device)
    for k in model.exits:  # warm-up
        model(x0, exits=[k])
    for _ in range(repeats):
        for w in waveforms:
            x = w[None].to(device)
            for k in model.exits:
                t0 = time.perf_counter()
                model(x, exits=[k])
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def lr_scheduler(
    opt: torch.optim.Optimizer, schedule: str, warmup: float, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` of the steps, then constant, cosine or linear decay to zero.

    Why: a transformer trained from scratch at a constant high learning rate collapses to one class
    after its first epoch (measured on the demo); warm-up and decay keep it learning.
    """
    total = max(int(total_steps), 1)
    warm = int(round(warmup * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if schedule == "constant":
            return 1.0
        progress = min((step - warm) / max(total - warm, 1), 1.0)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def selection_score(
    criterion: str, valid: dict[int, ClassificationReport], model: MultiExitSER, epoch: int
) -> float:
    """Validation score an epoch is selected by (higher wins; ties keep the earlier epoch).

    ``mean_uar`` averages UAR over every exit, so an epoch where the shallow exits are broken cannot
    win on a lucky teacher; without validation speech (or with ``last``) the last epoch wins.
    """
    if criterion == "last" or not valid:
        return float(epoch)
    if criterion == "teacher_uar":
        uar = valid[model.teacher_exit].uar
        return -math.inf if math.isnan(uar) else float(uar)
    values = [r.uar for r in valid.values() if not math.isnan(r.uar)]
    return float(np.mean(values)) if values else -math.inf


def add_noise(
    inputs: torch.Tensor, mask: torch.Tensor, snr_db: tuple[float, float], gen: torch.Generator
) -> torch.Tensor:
    """White noise at a per-clip SNR drawn from ``snr_db`` (inputs are unit-variance per clip)."""
    lo, hi = snr_db
    snr = lo + (hi - lo) * torch.rand(inputs.shape[0], 1, generator=gen)
    noise = torch.randn(inputs.shape, generator=gen) * (10.0 ** (-snr / 20.0))
    return inputs + noise * mask.to(inputs.dtype)


class TimeMasking:
    """SpecAugment-style time masks on the front end's output during training (off when ``prob`` is 0).

    Spans of ``length`` frames, starting at a ``prob / length`` fraction of frames, are zeroed after the
    feature projection, as wav2vec 2.0 does in fine-tuning (with zeros instead of a learned vector, so the
    parameter set stays that of the inference model). Used as a context manager around a forward pass.
    """

    def __init__(self, model: MultiExitSER, prob: float, length: int, seed: int = 0) -> None:
        self.prob, self.length, self.active = prob, length, False
        self.gen = torch.Generator().manual_seed(seed)
        self.handle = (
            model.backbone.feature_projection.register_forward_hook(self._hook) if prob > 0 else None
        )

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        if not (self.active and module.training):
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        b, t = hidden.shape[:2]
        starts = torch.rand(b, t, generator=self.gen) < self.prob / self.length
        keep = torch.ones(b, t + self.length, dtype=torch.bool)
        for offset in range(self.length):
            keep[:, offset : offset + t] &= ~starts
        hidden = hidden * keep[:, :t, None].to(hidden.device, hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def __enter__(self) -> TimeMasking:
        self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.active = False

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def _report_row(prefix: str, reports: dict[int, ClassificationReport]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for k, r in reports.items():
        row[f"{prefix}/exit{k}/uar"] = r.uar
        row[f"{prefix}/exit{k}/wa"] = r.wa
        row[f"{prefix}/exit{k}/f1"] = r.macro_f1
    return row


@dataclass
class TrainResult:
    run_dir: Path
    best_dir: Path
    last_dir: Path
    best_epoch: int
    valid: dict[int, ClassificationReport]
    test: dict[int, ClassificationReport]


@dataclass
class _Loop:
    """What the epochs of one ``train`` call share (built once, before the first epoch)."""

    model: MultiExitSER
    tc: TrainConfig
    device: str
    opt: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: DataLoader
    valid_loader: DataLoader | None
    time_mask: TimeMasking
    noise_rng: torch.Generator
    progress: Any | None = None
    task: Any = None


def _start_run(cfg: ExperimentConfig, run_dir: Path) -> Path:
    """Create ``run_dir``, seed everything, write config.yaml; the (emptied) metrics.jsonl path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)
    atomic_write_text(run_dir / "config.yaml", config_to_yaml(cfg))
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.exists():
        metrics_path.unlink()
    return metrics_path


def _model_to_train(
    cfg: ExperimentConfig, label_names: Sequence[str], splits: dict[str, list[ManifestRow]]
) -> MultiExitSER:
    """The model built from ``cfg`` on the training device, with its data record and frozen parts."""
    tc = cfg.train
    model = build_model(cfg, label_names).to(tc.device)
    # best/ and last/ record the speakers they were trained and selected on (reuse and evaluation
    # check them against their test speakers; fedsd.checkpoint.data_record)
    model.meta[DATA_RECORD_KEY] = data_record(splits["train"], splits["valid"])
    if tc.freeze_backbone:
        model.freeze_backbone()
    elif tc.freeze_feature_encoder:
        model.freeze_backbone(freeze_feature_encoder_only=True)
    return model


def _make_loop(
    cfg: ExperimentConfig,
    model: MultiExitSER,
    splits: dict[str, list[ManifestRow]],
    label_names: Sequence[str],
    labelled: Sequence[bool],
    progress: Any | None,
) -> _Loop:
    """Optimiser (heads at ``head_lr``), loaders, learning-rate schedule, augmentation state."""
    tc = cfg.train
    head_params = [p for p in model.heads.parameters() if p.requires_grad]
    body_params = [p for p in model.encoder.parameters() if p.requires_grad]
    groups = [{"params": head_params, "lr": tc.head_lr or tc.lr}]
    if body_params:
        groups.append({"params": body_params, "lr": tc.lr})
    opt = torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay)
    root = cfg.data.root
    loader = make_loader(splits["train"], root, label_names, train_crop(cfg), batch_size=tc.batch_size,
                         train=True, labelled=labelled, seed=tc.seed, num_workers=tc.num_workers)  # fmt: skip
    valid_loader = (
        make_loader(splits["valid"], root, label_names, eval_crop(cfg), batch_size=tc.batch_size)
        if splits["valid"]
        else None
    )
    steps_per_epoch = -(-len(loader) // tc.grad_accum)
    scheduler = lr_scheduler(opt, tc.lr_schedule, tc.lr_warmup, steps_per_epoch * tc.epochs)
    noise_rng = torch.Generator().manual_seed(tc.seed + 1)
    time_mask = TimeMasking(model, tc.mask_time_prob, tc.mask_time_length, seed=tc.seed + 2)
    task = progress.add_task("train", total=tc.epochs * len(loader)) if progress is not None else None
    return _Loop(model, tc, tc.device, opt, scheduler, loader, valid_loader, time_mask, noise_rng, progress, task)


def _backward(loop: _Loop, batch: dict[str, Any], dcfg: DistillConfig) -> tuple[dict[str, Any], bool]:
    """Forward one batch and backpropagate its loss if it carries a signal; (loss parts, signal)."""
    model, tc = loop.model, loop.tc
    inputs = batch["input_values"]
    if tc.noise_snr_db is not None:
        inputs = add_noise(inputs, batch["attention_mask"], tc.noise_snr_db, loop.noise_rng)
    with loop.time_mask:
        out = model(inputs.to(loop.device), batch["attention_mask"].to(loop.device))
    loss, comps = self_distill_loss(out, batch["labels"].to(loop.device), model.teacher_exit, dcfg)
    signal = loss_has_signal(batch["labels"], model.teacher_exit, dcfg, model.exits)
    if signal:
        (loss / tc.grad_accum).backward()
    return comps, signal


def _train_epoch(loop: _Loop, epoch: int) -> dict[str, Any]:
    """One pass over the training speech; the epoch's metrics record (training part)."""
    model, tc, opt = loop.model, loop.tc, loop.opt
    model.train()
    loop.loader.dataset.set_epoch(epoch)  # new random crops each epoch, reproducible per seed
    mode = "ce" if epoch <= tc.warmup_epochs else tc.mode
    dcfg = DistillConfig(**tc.distill.model_dump(), mode=mode)
    sums: dict[str, float] = {}
    n_batches = steps_taken = steps_skipped = 0
    pending = False  # a batch since the last step carried a loss signal
    opt.zero_grad()
    for step, batch in enumerate(loop.loader, start=1):
        comps, signal = _backward(loop, batch, dcfg)
        pending = pending or signal
        if step % tc.grad_accum == 0 or step == len(loop.loader):
            # no loss signal since the last step (CE and no labelled clip): no optimiser step and
            # no scheduler count, else AdamW's momentum and weight decay move the weights anyway
            if pending:
                if tc.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
                opt.step()
                loop.scheduler.step()
                steps_taken += 1
            else:
                steps_skipped += 1
            opt.zero_grad()
            pending = False
        for key, v in comps.items():
            sums[key] = sums.get(key, 0.0) + float(v)
        n_batches += 1
        if loop.progress is not None:
            loop.progress.update(
                loop.task, advance=1, description=f"epoch {epoch}/{tc.epochs} loss {float(comps['total']):.3f}"
            )
    record: dict[str, Any] = {"epoch": epoch, "mode": mode, "lr": loop.scheduler.get_last_lr()[-1],
                              "steps": steps_taken, "steps_skipped": steps_skipped}  # fmt: skip
    record.update({f"train/{k}": v / max(n_batches, 1) for k, v in sums.items()})
    return record


def _log_epoch(record: dict[str, Any], exits: Sequence[int], select: str, log: Callable[[str], None]) -> None:
    score = record["select/score"]
    uars = " ".join(f"{record[f'valid/exit{k}/uar']:.3f}" for k in exits if f"valid/exit{k}/uar" in record)
    log(
        f"epoch {record['epoch']}: loss {record.get('train/total', float('nan')):.4f}"
        + (f", valid UAR per exit {uars} ({select} {score:.3f})" if uars else "")
    )


def _run_epochs(
    loop: _Loop, run_dir: Path, metrics_path: Path, tracker: Any, log: Callable[[str], None]
) -> int:
    """Every epoch: train, validate, keep the best in best/, log; then last/ and the learning curves.
    Returns the best epoch."""
    model, tc = loop.model, loop.tc
    best_score, best_epoch = -math.inf, -1
    history: list[dict[str, Any]] = []
    for epoch in range(1, tc.epochs + 1):
        record = _train_epoch(loop, epoch)
        valid_reports: dict[int, ClassificationReport] = {}
        if loop.valid_loader is not None:
            valid_reports = evaluate_loader(model, loop.valid_loader, loop.device)
            record.update(_report_row("valid", valid_reports))
        score = selection_score(tc.select, valid_reports, model, epoch)
        record["select/score"] = score
        if score > best_score:
            best_score, best_epoch = score, epoch
            model.save_pretrained(run_dir / "best")
        record["best_epoch"] = best_epoch
        append_jsonl(metrics_path, record)
        tracker.log_metrics(epoch_scalars(record), step=epoch)
        history.append(record)
        _log_epoch(record, model.exits, tc.select, log)
    loop.time_mask.remove()
    model.save_pretrained(run_dir / "last")
    plot_learning_curves(history, model.exits, run_dir / "learning_curves.png")
    return best_epoch


def train(
    cfg: ExperimentConfig,
    run_dir: str | Path,
    *,
    splits: dict[str, list[ManifestRow]] | None = None,
    progress: Any | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train all exits centrally; write config, metrics.jsonl, best/ and last/ checkpoints to ``run_dir``.

    ``splits`` overrides the config's train/valid/test selection (the federated set-up trains on the
    server's speaker pool). ``progress`` is a ``rich.progress.Progress`` (optional).
    """
    run_dir = Path(run_dir)
    metrics_path = _start_run(cfg, run_dir)
    rows = read_manifest(cfg.data.manifest_path)
    label_names = resolve_label_names(cfg, rows)
    splits = splits if splits is not None else split_rows(cfg, rows)
    tc = cfg.train
    train_rows = splits["train"]
    labelled = labelled_mask(
        [r.utt_id for r in train_rows], [r.label for r in train_rows], tc.label_fraction, tc.seed
    )
    log(
        f"data: {len(splits['train'])} train ({sum(labelled)} labelled), {len(splits['valid'])} valid, "
        f"{len(splits['test'])} test utterances; classes {label_names}"
    )
    model = _model_to_train(cfg, label_names, splits)
    loop = _make_loop(cfg, model, splits, label_names, labelled, progress)
    tracker = tracker_for(cfg, run_dir, "central", log=log)  # log.tensorboard / log.mlflow_uri
    best_epoch = _run_epochs(loop, run_dir, metrics_path, tracker, log)
    best = MultiExitSER.from_pretrained(run_dir / "best").to(tc.device)
    valid_reports = evaluate_loader(best, loop.valid_loader, tc.device) if loop.valid_loader is not None else {}
    test_reports: dict[int, ClassificationReport] = {}
    if splits["test"]:
        test_loader = make_loader(splits["test"], cfg.data.root, label_names, eval_crop(cfg), batch_size=tc.batch_size)
        test_reports = evaluate_loader(best, test_loader, tc.device)
    summary = {
        "best_epoch": best_epoch,
        "label_names": label_names,
        "valid": {k: r.to_dict() for k, r in valid_reports.items()},
        "test": {k: r.to_dict() for k, r in test_reports.items()},
    }
    atomic_write_json(run_dir / "results.json", summary)
    finish_run(tracker, run_dir)
    return TrainResult(run_dir, run_dir / "best", run_dir / "last", best_epoch, valid_reports, test_reports)


def train_experiment(
    config: ExperimentConfig | str | Path,
    run_dir: str | Path | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    progress: Any | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """What `fedsd train` does, as one call (``fedsd.api.train``): load the config (a YAML path with
    dotted ``overrides``, or an ``ExperimentConfig``), generate the demo's synthetic corpus on first use,
    and train every exit into ``run_dir`` (default ``runs/<config name>``)."""
    from fedsd.config import load_config, override_config
    from fedsd.data.prepare import ensure_corpus

    if isinstance(config, ExperimentConfig):
        cfg = override_config(config, overrides) if overrides else config
    else:
        cfg = load_config(config, overrides)
    ensure_corpus(cfg.data, log=log)
    return train(cfg, Path(run_dir) if run_dir is not None else Path("runs") / cfg.name, progress=progress, log=log)
