"""Local head training on a device: inputs on the heads' device, one train/eval rule, per-device seeds."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fedsd.clients.device import DeviceSettings
from fedsd.clients.dp_training import train_heads_private
from fedsd.clients.messages import device_identity
from fedsd.clients.messages import local_config as _local_config
from fedsd.clients.training import (
    LocalTrainConfig,
    mix_seed,
    plan_exits,
    train_heads,
)
from fedsd.model.heads import StatsHead
from fedsd.model.multiexit import MultiExitSER
from fedsd.training.cached import batch_input, head_outputs
from fedsd.training.features import CachedFeatures


def _feats(model: MultiExitSER, n: int = 12) -> CachedFeatures:
    g = torch.Generator().manual_seed(0)
    dim = 2 * model.encoder.hidden_size  # stats heads cache [mean; std]
    inputs = {k: [torch.randn(dim, generator=g) for _ in range(n)] for k in model.exits}
    labels = torch.arange(n) % model.num_classes
    labels[::3] = -1  # some unlabelled utterances
    return CachedFeatures([f"u{i}" for i in range(n)], inputs, labels, hits=0, misses=0)


@pytest.fixture
def model(tiny_model_dir: Path) -> MultiExitSER:
    return MultiExitSER.from_pretrained(tiny_model_dir)


def test_cached_inputs_go_to_the_heads_device(model: MultiExitSER) -> None:
    """Cached features are CPU tensors; a head on another device (here "meta") must get them there."""
    feats = _feats(model)
    model.heads["1"].to("meta")  # stands in for a GPU: CPU inputs would raise a device mismatch
    x, mask = batch_input(model, feats, 1, [0, 1, 2])
    assert x.device.type == "meta" and mask is None
    assert head_outputs(model, feats, [1], [0, 1, 2])[1].logits.device.type == "meta"
    x, _ = batch_input(model, feats, 2, [0, 1, 2])  # each exit goes where its own head is
    assert x.device.type == "cpu"
    seq = CachedFeatures(["a", "b"], {1: [torch.zeros(3, 4), torch.zeros(5, 4)]}, torch.tensor([0, 1]), 0, 0)
    x, mask = batch_input(model, seq, 1, [0, 1])  # frame sequences: padded, with a mask, both moved
    assert x.device.type == "meta" and mask is not None and mask.device.type == "meta"


def _record_modes(monkeypatch: pytest.MonkeyPatch, model: MultiExitSER) -> set[tuple[int, bool]]:
    """(exit, head.training) of every head forward during training, DP copies of heads included."""
    seen: set[tuple[int, bool]] = set()
    real = StatsHead.forward_precomputed

    def spy(self, x, frame_mask=None):
        seen.add((self.probe_exit, self.training))
        return real(self, x, frame_mask)

    for k in model.exits:
        model.heads[str(k)].probe_exit = k  # copied along by deepcopy (DP twins)
    monkeypatch.setattr(StatsHead, "forward_precomputed", spy)
    return seen


@pytest.mark.parametrize(
    ("device_exit", "teacher", "expected"),
    [
        (2, "deep", {(1, True), (2, True), (4, False)}),  # frozen deep teacher: eval, no dropout noise
        (2, "local", {(1, True), (2, True)}),  # the local teacher is trained: train mode, in both paths
    ],
)
@pytest.mark.parametrize("private", [False, True])
def test_trained_heads_train_and_a_frozen_teacher_evaluates(
    model: MultiExitSER, monkeypatch: pytest.MonkeyPatch, device_exit, teacher, expected, private
) -> None:
    feats = _feats(model)
    cfg = LocalTrainConfig(exit=device_exit, teacher=teacher, epochs=1, batch_size=4)
    plan = plan_exits(model.exits, device_exit, cfg)
    seen = _record_modes(monkeypatch, model)
    if private:
        train_heads_private(
            model, feats, plan, cfg, noise_multiplier=0.5, max_grad_norm=1.0, sample_rate=0.5, steps=3,
            rng_seed=0,
        )  # fmt: skip
    else:
        train_heads(model, feats, plan, cfg)
    assert seen == expected
    assert not model.training and not any(m.training for m in model.modules())  # left in eval mode


def test_devices_of_one_round_get_different_reproducible_seeds() -> None:
    cfg = {"seed": 7, "server-round": 3}
    seeds = [_local_config(cfg, 2, f"partition-{p}").seed for p in range(4)]
    assert len(set(seeds)) == 4
    assert seeds[1] == _local_config(cfg, 2, "partition-1").seed  # deterministic
    assert _local_config({"seed": 7, "server-round": 4}, 2, "partition-1").seed != seeds[1]
    assert 0 <= mix_seed(7, 3, "node-1") < 2**63
    sim = DeviceSettings(exit=2, device="cpu", cache_dir=Path("c"), partition_id=5)
    real = DeviceSettings(exit=2, device="cpu", cache_dir=Path("c"))
    ctx = SimpleNamespace(node_id=1234)
    assert device_identity(sim, ctx) == "partition-5"  # type: ignore[arg-type]
    assert device_identity(real, ctx) == "node-1234"  # type: ignore[arg-type]


def _head_distance(model: MultiExitSER, start: dict[str, torch.Tensor], exits) -> float:
    now = model.head_state_dict()
    return (
        sum(
            float((now[k] - start[k]).pow(2).sum())
            for k in start
            if k.startswith(tuple(f"heads.{e}." for e in exits))
        )
        ** 0.5
    )


@pytest.mark.parametrize("private", [False, True], ids=["plain", "dp"])
def test_proximal_term_keeps_heads_near_what_the_device_received(tiny_model_dir: Path, private: bool) -> None:
    """FedProx: the same seed and data, a larger μ → trained heads end closer to the received heads; μ = 0
    is training without the term (bit-identical); with DP the term is added after clipping and noise, so
    it still pulls (a term inside the per-utterance loss would be clipped away)."""
    distances = {}
    finals = {}
    for mu in (0.0, 0.0, 50.0):
        model = MultiExitSER.from_pretrained(tiny_model_dir)
        start = {k: v.clone() for k, v in model.head_state_dict().items()}
        cfg = LocalTrainConfig(exit=2, epochs=4, batch_size=4, lr=0.05, proximal_mu=mu)
        plan = plan_exits(model.exits, 2, cfg)
        if private:
            train_heads_private(
                model, _feats(model), plan, cfg, noise_multiplier=0.3, max_grad_norm=1.0, sample_rate=0.5,
                steps=12, rng_seed=0,
            )  # fmt: skip
        else:
            train_heads(model, _feats(model), plan, cfg)
        finals.setdefault(mu, []).append(model.head_state_dict())
        distances[mu] = _head_distance(model, start, plan.train)
    a, b = finals[0.0]
    assert all(torch.equal(a[k], b[k]) for k in a)  # deterministic, so the comparison below is the term's
    assert distances[0.0] > 0
    assert distances[50.0] < 0.5 * distances[0.0]


def test_proximal_mu_comes_from_the_server_and_is_bounded() -> None:
    from fedsd.clients.device import HostileMessage

    assert _local_config({"proximal-mu": 0.1}, 2).proximal_mu == pytest.approx(0.1)
    assert _local_config({}, 2).proximal_mu == 0.0
    for bad in (-1.0, float("nan"), 1e9):
        with pytest.raises(HostileMessage):
            _local_config({"proximal-mu": bad}, 2)


# ------------------------------------------------------------------ no loss signal: no step (issue 22)
def _unlabelled(model: MultiExitSER, n: int = 8) -> CachedFeatures:
    f = _feats(model, n)
    return CachedFeatures(f.utt_ids, f.inputs, torch.full((n,), -1), hits=0, misses=0)


def _heads(model: MultiExitSER) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.head_state_dict().items()}


def _adam_steps(opt: torch.optim.Optimizer) -> list[float]:
    return [float(s["step"]) for s in opt.state.values()]


def _count_adam_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Spy on torch.optim.Adam.step (the real step still runs): how many steps were taken."""
    calls = [0]
    real = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        calls[0] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    return calls


def test_ce_batches_without_a_label_take_no_adam_step(model: MultiExitSER) -> None:
    """CE mode, batches holding no labelled clip: after Adam has momentum from labelled steps, the
    heads, Adam's moments and its step count do not move (they did: ~6.7e-4 at lr 1e-3)."""
    from fedsd.training.distill import DistillConfig

    cfg = LocalTrainConfig(exit=2, epochs=2, batch_size=4, lr=1e-3, distill=DistillConfig(mode="ce"))
    plan = plan_exits(model.exits, 2, cfg)
    params = [p for k in plan.train for p in model.heads[str(k)].parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    train_heads(model, _feats(model), plan, cfg, optimizer_factory=lambda _p: opt)  # momentum from labels
    steps, state = (
        _adam_steps(opt),
        {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()},
    )
    assert steps and min(steps) > 0
    before = _heads(model)
    train_heads(model, _unlabelled(model), plan, cfg, optimizer_factory=lambda _p: opt)
    assert _adam_steps(opt) == steps
    for p, s in opt.state.items():
        assert all(torch.equal(v, state[id(p)][k]) for k, v in s.items())
    after = _heads(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "heads moved on a batch without signal"


def test_personal_heads_take_no_step_without_signal(model: MultiExitSER, monkeypatch) -> None:
    """The personal-heads fine-tuning (clients.personal.personalize) follows the same rule."""
    from fedsd.clients.personal import personalize
    from fedsd.training.distill import DistillConfig

    cfg = LocalTrainConfig(exit=2, epochs=1, batch_size=4, lr=1e-3, distill=DistillConfig(mode="ce"))
    plan = plan_exits(model.exits, 2, cfg)
    calls = _count_adam_steps(monkeypatch)
    personalize(model, _unlabelled(model), plan, cfg, epochs=2, device="dev-0")
    assert calls[0] == 0
    personalize(model, _feats(model), plan, cfg, epochs=2, device="dev-0")  # control: labels, steps
    assert calls[0] > 0


def test_sd_batches_without_a_label_still_train_by_distillation(model: MultiExitSER) -> None:
    """Control: the skip is about the signal, not the labels: SD has KD on unlabelled clips."""
    cfg = LocalTrainConfig(exit=2, epochs=1, batch_size=4, lr=1e-3)
    plan = plan_exits(model.exits, 2, cfg)
    before = _heads(model)
    train_heads(model, _unlabelled(model), plan, cfg)
    after = _heads(model)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("heads.1."))


def test_dp_without_noise_skips_steps_without_signal_and_with_noise_takes_them(
    model: MultiExitSER, monkeypatch: pytest.MonkeyPatch
) -> None:
    """σ = 0 (the same-loss reference arm) skips a CE step without a labelled clip like plain training;
    σ > 0 takes every step (skipping would depend on private labels): its update is the noise."""
    from fedsd.training.distill import DistillConfig

    cfg = LocalTrainConfig(exit=2, epochs=1, batch_size=4, lr=1e-3, distill=DistillConfig(mode="ce"))
    plan = plan_exits(model.exits, 2, cfg)
    feats = _unlabelled(model)
    kw = dict(max_grad_norm=1.0, sample_rate=0.5, steps=4, rng_seed=0)
    calls = _count_adam_steps(monkeypatch)
    before = _heads(model)
    train_heads_private(model, feats, plan, cfg, noise_multiplier=0.0, **kw)
    assert calls[0] == 0 and all(torch.equal(before[k], v) for k, v in _heads(model).items())
    train_heads_private(model, feats, plan, cfg, noise_multiplier=1.0, **kw)
    assert calls[0] == 4 and any(not torch.equal(before[k], v) for k, v in _heads(model).items())


def test_dp_and_plain_training_weigh_the_loss_alike(model: MultiExitSER) -> None:
    """One weighting (fedsd.training.distill): with σ = 0, no clipping and every clip sampled (q = 1, so the
    expected batch is the batch), a DP-SGD step equals a plain step on the same batch at scarce labels
    (1 in 3 unlabelled). A CE averaged over the labelled clips only would tilt the CE:KD balance and
    with it the direction of the step."""
    feats = _feats(model, 8)
    for m in model.modules():  # no dropout: the two paths draw different masks
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    cfg = LocalTrainConfig(exit=2, epochs=1, batch_size=8, lr=1e-2)
    plan = plan_exits(model.exits, 2, cfg)
    start = _heads(model)
    train_heads(model, feats, plan, cfg)
    plain = _heads(model)
    model.load_head_state_dict(start)
    train_heads_private(model, feats, plan, cfg, noise_multiplier=0.0, max_grad_norm=1e9, sample_rate=1.0,
                        steps=1, rng_seed=0)  # fmt: skip
    private = _heads(model)
    moved = [k for k in plain if not torch.equal(plain[k], start[k])]
    assert moved
    for k in moved:
        torch.testing.assert_close(private[k], plain[k], rtol=1e-4, atol=1e-6)
