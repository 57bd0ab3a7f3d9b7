"""The central training recipe: learning-rate schedule, model selection, augmentation, and that it learns.

The last test is the one that matters: a short run of the tiny recipe on generated speech must reach a
teacher UAR on *held-out speakers* well above chance (the recipe it replaces collapsed to one class).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedsd.config import ExperimentConfig
from fedsd.metrics import classification_report
from fedsd.model.backbone import load_backbone
from fedsd.model.multiexit import MultiExitSER
from fedsd.training.central import TimeMasking, add_noise, lr_scheduler, selection_score, train

LABELS = ["neutral", "happy", "angry", "sad"]


def _lrs(schedule: str, warmup: float, total: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = lr_scheduler(opt, schedule, warmup, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_lr_warms_up_linearly_then_decays() -> None:
    cos = _lrs("cosine", 0.2, 20)
    assert cos[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # 4 warm-up steps reach the peak
    assert all(a >= b for a, b in zip(cos[3:], cos[4:], strict=False))  # then never rises
    assert cos[-1] < 0.02  # and ends near zero
    lin = _lrs("linear", 0.0, 10)
    assert lin == pytest.approx([1 - i / 10 for i in range(10)])
    assert _lrs("constant", 0.5, 4) == pytest.approx([0.5, 1.0, 1.0, 1.0])


def _reports(uars: dict[int, float]) -> dict:
    """Reports with the given UARs (2 classes, 10 items: UAR 0.5 * (r0 + r1))."""
    out = {}
    for k, u in uars.items():
        if math.isnan(u):
            out[k] = classification_report([], [], ["a", "b"])
            continue
        hits = round(u * 10)  # recall of class 0 = hits/10, class 1 perfect when u = 1 ...
        y = [0] * 10 + [1] * 10
        p = [0] * hits + [1] * (10 - hits) + [1] * hits + [0] * (10 - hits)
        out[k] = classification_report(y, p, ["a", "b"])
    return out


def test_selection_uses_every_exit_and_never_a_nan() -> None:
    model = MultiExitSER(load_backbone("tiny"), [1, 2, 4], LABELS)
    broken_shallow = _reports({1: 0.5, 2: 0.5, 4: 0.9})  # only the teacher looks good
    healthy = _reports({1: 0.7, 2: 0.7, 4: 0.8})
    assert selection_score("mean_uar", healthy, model, 1) > selection_score("mean_uar", broken_shallow, model, 2)
    assert selection_score("teacher_uar", broken_shallow, model, 2) > selection_score(
        "teacher_uar", healthy, model, 1
    )
    assert selection_score("teacher_uar", _reports({1: 0.7, 2: 0.7, 4: math.nan}), model, 1) == -math.inf
    assert selection_score("mean_uar", _reports({1: 0.6, 2: math.nan, 4: 0.8}), model, 1) == pytest.approx(0.7)
    assert selection_score("last", healthy, model, 7) == 7.0
    assert selection_score("mean_uar", {}, model, 3) == 3.0  # no validation speech: the last epoch wins


def test_noise_has_the_drawn_snr_and_spares_padding() -> None:
    x = torch.randn(2, 32000)
    x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)
    mask = torch.ones(2, 32000, dtype=torch.long)
    mask[1, 16000:] = 0
    x[1, 16000:] = 0
    noisy = add_noise(x, mask, (10.0, 10.0), torch.Generator().manual_seed(0))
    noise = noisy - x
    assert float(noise[0].pow(2).mean()) == pytest.approx(0.1, rel=0.05)  # 10 dB below unit power
    assert bool((noise[1, 16000:] == 0).all())


def test_time_masking_only_in_training_and_removable() -> None:
    torch.manual_seed(0)
    model = MultiExitSER(load_backbone("tiny"), [1, 2], LABELS)
    x = torch.randn(1, 16000)
    model.eval()
    with torch.no_grad():
        ref = model(x)[2].logits
    masking = TimeMasking(model, 0.5, 5, seed=0)
    with torch.no_grad(), masking:
        assert torch.equal(model(x)[2].logits, ref)  # eval mode: no masking
    model.train()
    model.backbone.encoder.dropout.p = 0.0
    for layer in model.backbone.encoder.layers:
        layer.attention.dropout = 0.0
        layer.dropout.p = 0.0
        layer.feed_forward.intermediate_dropout.p = 0.0
        layer.feed_forward.output_dropout.p = 0.0
    seen: list[torch.Tensor] = []
    hook = model.backbone.feature_projection.register_forward_hook(
        lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).detach())
    )
    with torch.no_grad():
        model(x)
        with masking:
            model(x)
    hook.remove()
    zero_frames = (seen[1].abs().sum(-1) == 0).float().mean()
    assert 0.2 < float(zero_frames) < 0.7  # about half the frames masked
    assert float((seen[0].abs().sum(-1) == 0).float().mean()) == 0.0
    masking.remove()
    with torch.no_grad():
        seen.clear()
        hook = model.backbone.feature_projection.register_forward_hook(
            lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).detach())
        )
        with masking:
            model(x)
        hook.remove()
    assert float((seen[0].abs().sum(-1) == 0).float().mean()) == 0.0  # removed: no effect


@pytest.fixture(scope="module")
def held_out_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 espeak-ng speakers × 4 sentences × 4 emotions (160 clips); the backend is pinned."""
    from fedsd.data.synthetic import generate_corpus

    out = tmp_path_factory.mktemp("recipe-corpus")
    generate_corpus(out, speakers=10, sentences=4, seed=0, backend="espeak", progress=False)
    return out


def test_tiny_recipe_learns_held_out_speakers(held_out_corpus: Path, tmp_path: Path) -> None:
    """The demo's recipe (lr warm-up + cosine decay, mean-UAR selection), shortened: well above chance
    on two speakers it never trained on, every exit, with learning curves on disk."""
    cfg = ExperimentConfig.model_validate(
        {
            "data": {
                "root": str(held_out_corpus),
                "labels": LABELS,
                "crop": {"max_seconds": 1.0, "mode": "random"},
                "split": "speaker",
                "valid_speakers": 2,
                "test_speakers": 2,
            },
            "model": {"backbone": "tiny", "pretrained": False, "exits": [1, 2, 3, 4]},
            "train": {
                "lr": 1e-3,
                "lr_schedule": "cosine",
                "lr_warmup": 0.1,
                "select": "mean_uar",
                "batch_size": 8,
                "epochs": 8,
                "freeze_feature_encoder": False,
                "seed": 0,
            },
        }
    )
    result = train(cfg, tmp_path / "run", log=lambda _: None)
    uars = {k: r.uar for k, r in result.test.items()}
    assert uars[4] >= 0.45, uars  # chance is 0.25 (32 clips of 2 unseen speakers)
    assert min(uars.values()) >= 0.35, uars
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["lr"] < lines[0]["lr"]  # decayed
    assert all("select/score" in r for r in lines)
    assert (result.run_dir / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((result.best_dir / "fedsd.json").read_text())
    assert meta["meta"]["normalize"] == "utterance"
