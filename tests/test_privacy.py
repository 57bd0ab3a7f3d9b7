"""Differential privacy: device DP-SGD (Opacus), cumulative accounting across rounds, budget stop,
and the server's client-level DP. Real ClientApp, real strategy, in process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import federation, inprocess_grid
from opacus.accountants import RDPAccountant

from fedsd.checkpoint import load_tensors
from fedsd.clients.dp_training import dp_compatible, plain_state_dict, train_heads_private
from fedsd.clients.training import LocalTrainConfig, plan_exits
from fedsd.config import ConfigError, load_config
from fedsd.model.heads import GRUHead, HeadOutput
from fedsd.security.privacy import DPSettings, PrivacyError, PrivacyLedger, central_epsilon, epsilon
from fedsd.server.central_dp import CentralDP
from fedsd.server.federation import FederationSpec, run_federation
from fedsd.server.validation import ValidUpdate
from fedsd.training.distill import DistillConfig, self_distill_loss
from fedsd.training.features import CachedFeatures


@pytest.fixture()
def setup(tmp_path: Path, small_corpus: Path, tiny_model_dir: Path):
    fed = federation(tmp_path, small_corpus, tiny_model_dir, name="dptest", rounds=3, local_epochs=2)
    return fed.cfg, fed.rc, fed.spec


def _lines(spec: FederationSpec) -> list[dict]:
    return [json.loads(x) for x in (Path(spec.run_dir) / "metrics.jsonl").read_text().splitlines()]


def _opacus_epsilon(noise: float, n: int, batch_size: int, epochs: int, rounds: int, delta: float) -> float:
    """What Opacus' RDP accountant says for `rounds` rounds of Poisson DP-SGD like a DPDataLoader's."""
    batches = math.ceil(n / batch_size)
    acc = RDPAccountant()
    for _ in range(rounds * epochs * batches):
        acc.step(noise_multiplier=noise, sample_rate=1.0 / batches)
    return acc.get_epsilon(delta=delta)


# ----------------------------------------------------------------------------- settings


def test_dp_settings_device_flags_override_server_and_errors_name_the_setting() -> None:
    server = {"dp-noise-multiplier": 0.5, "dp-max-grad-norm": 2.0, "dp-delta": 1e-4}
    assert DPSettings.from_records({}, {}) is None
    merged = DPSettings.from_records({"dp-target-epsilon": 3.0, "dp-rounds": 4}, server)
    assert merged is not None
    assert merged.noise_multiplier is None and merged.target_epsilon == 3.0  # the device's choice wins
    assert merged.max_grad_norm == 2.0 and merged.delta == 1e-4 and merged.budget == 3.0
    with pytest.raises(PrivacyError, match="exactly one of noise_multiplier"):
        DPSettings(noise_multiplier=1.0, target_epsilon=2.0)
    with pytest.raises(PrivacyError, match="delta"):
        DPSettings(noise_multiplier=1.0, delta=1.5)
    with pytest.raises(PrivacyError, match="no(?:t)? .*noise multiplier|--dp-noise-multiplier"):
        DPSettings.from_records({"dp-delta": 1e-5}, {})


def test_config_dp_section_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("federated: {dp: {noise_multiplier: 1.0, target_epsilon: 3.0}}\n")
    with pytest.raises(ConfigError, match="federated.dp"):
        load_config(path)
    path.write_text("federated: {aggregation: median, central_dp: {clip_norm: 1.0, noise_multiplier: 1.0}}\n")
    with pytest.raises(ConfigError, match="central_dp"):
        load_config(path)


# ----------------------------------------------------------------------------- device DP-SGD


def test_per_sample_losses_match_batch_losses_when_all_are_labelled() -> None:
    g = torch.Generator().manual_seed(0)
    outs = {k: HeadOutput(torch.randn(6, 4, generator=g), torch.randn(6, 8, generator=g)) for k in (1, 4)}
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    cfg = DistillConfig()
    mean, _ = self_distill_loss(outs, labels, 4, cfg, train_exits=[1])
    per, parts = self_distill_loss(outs, labels, 4, cfg, train_exits=[1], reduction="none")
    assert per.shape == (6,)
    torch.testing.assert_close(per.mean(), mean)
    # An utterance's loss does not depend on what else is in the batch (DP-SGD's requirement).
    alone, _ = self_distill_loss(
        {k: HeadOutput(o.logits[:1], o.embedding[:1]) for k, o in outs.items()},
        labels[:1].clone().fill_(-1), 4, cfg, train_exits=[1], reduction="none",
    )  # fmt: skip
    with_others, _ = self_distill_loss(
        outs, torch.cat([labels[:1].clone().fill_(-1), labels[1:]]), 4, cfg, train_exits=[1], reduction="none"
    )
    torch.testing.assert_close(alone[0], with_others[0])


def test_gru_head_trains_through_opacus_dpgru(tiny_model_dir: Path) -> None:
    from fedsd.model.multiexit import MultiExitSER

    model = MultiExitSER.from_pretrained(tiny_model_dir)
    hidden = model.heads["1"].hidden_size
    for k in ("1", "4"):
        model.heads[k] = GRUHead(hidden, 4)
    twin = dp_compatible(model.heads["1"])
    assert type(twin.gru).__name__ == "DPGRU"
    assert set(plain_state_dict(twin)) == set(model.heads["1"].state_dict())
    g = torch.Generator().manual_seed(0)
    n = 12
    inputs = {
        k: [torch.randn(int(t), hidden, generator=g) for t in torch.randint(3, 9, (n,))] for k in (1, 4)
    }
    feats = CachedFeatures(
        utt_ids=[f"u{i}" for i in range(n)], inputs=inputs, labels=torch.arange(n) % 4, hits=0, misses=0
    )
    before = {k: v.clone() for k, v in model.heads["1"].state_dict().items()}
    teacher_before = {k: v.clone() for k, v in model.heads["4"].state_dict().items()}
    lcfg = LocalTrainConfig(exit=1, batch_size=4, lr=0.01)
    plan = plan_exits(model.exits, 1, lcfg)
    losses = train_heads_private(
        model, feats, plan, lcfg, noise_multiplier=0.5, max_grad_norm=1.0, sample_rate=1 / 3, steps=6,
        rng_seed=0,
    )  # fmt: skip
    assert math.isfinite(losses["total"])
    after = model.heads["1"].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(teacher_before[k], v) for k, v in model.heads["4"].state_dict().items())


def test_reported_epsilon_is_cumulative_and_equals_opacus_rdp_accountant(setup) -> None:
    _cfg, rc, spec = setup
    noise, delta = 1.1, 1e-3
    spec.overrides = {"federated.dp": {"noise_multiplier": noise, "max_grad_norm": 1.0, "delta": delta}}
    run_federation(inprocess_grid(rc), spec, log=lambda _: None)
    lines = _lines(spec)
    assert [r["round"] for r in lines] == [0, 1, 2, 3]
    for rnd in (1, 2, 3):
        clients = lines[rnd]["train"]["clients"]
        assert len(clients) == 2
        for c in clients:
            m = c["metrics"]
            expected = _opacus_epsilon(noise, int(m["n-utterances"]), 8, 2, rnd, delta)
            assert m["dp-epsilon"] == pytest.approx(expected, rel=1e-9)
            assert m["dp-rounds"] == rnd and m["dp-noise-multiplier"] == noise
            assert m["dp-ledger-from-state"] == (1 if rnd > 1 else 0)  # the history came from context.state
        privacy = lines[rnd]["privacy"]
        assert privacy["max_epsilon"] == pytest.approx(max(c["metrics"]["dp-epsilon"] for c in clients))
        assert set(privacy["device_epsilon"]) == {str(c["node_id"]) for c in clients}
    assert lines[3]["privacy"]["max_epsilon"] > lines[1]["privacy"]["max_epsilon"]
    report = (Path(spec.run_dir) / "report.md").read_text()
    assert "## Privacy" in report and "max ε" in report
    assert "epsilon_per_round.png" in report and (Path(spec.run_dir) / "epsilon_per_round.png").stat().st_size > 0


def test_dp_round_changes_only_the_trained_heads(setup) -> None:
    _cfg, rc, spec = setup
    spec.rounds = 1
    spec.overrides = {"federated.dp": {"noise_multiplier": 1.0}}
    run_federation(inprocess_grid(rc), spec, log=lambda _: None)
    r0 = load_tensors(Path(spec.run_dir) / "rounds" / "round_000.safetensors")
    r1 = load_tensors(Path(spec.run_dir) / "rounds" / "round_001.safetensors")
    for key in r0:
        changed = not torch.equal(r0[key], r1[key])
        trained = key.startswith(("heads.1.", "heads.2."))  # devices at exits 1 and 2, teacher 4 frozen
        assert changed == trained, key


def test_target_epsilon_is_met_and_the_budget_stops_training(setup) -> None:
    _cfg, rc, spec = setup
    spec.overrides = {"federated.dp": {"target_epsilon": 4.0, "rounds": 2, "delta": 1e-3}}
    logs: list[str] = []
    run_federation(inprocess_grid(rc), spec, log=logs.append)
    lines = _lines(spec)
    eps2 = [c["metrics"]["dp-epsilon"] for c in lines[2]["train"]["clients"]]
    assert len(eps2) == 2 and all(3.9 <= e <= 4.0 for e in eps2)  # σ calibrated for exactly 2 rounds
    third = lines[3]
    assert third["train"]["num_clients"] == 0 and third["train"]["aggregated"] is False
    reasons = [r["reason"] for r in third["train"]["rejections"]]
    assert len(reasons) == 2 and all("privacy budget reached" in r and "budget 4" in r for r in reasons)
    assert sorted(third["privacy"]["budget_stopped"]) == sorted(
        int(n) for n in third["privacy"]["device_epsilon"]
    )
    r2 = load_tensors(Path(spec.run_dir) / "rounds" / "round_002.safetensors")
    r3 = load_tensors(Path(spec.run_dir) / "rounds" / "round_003.safetensors")
    assert all(torch.equal(r2[k], r3[k]) for k in r2)  # nothing trained after the budget was spent
    assert "stopped training at their ε budget" in (Path(spec.run_dir) / "report.md").read_text()


def test_ledger_round_trip_and_epsilon_of_empty_history() -> None:
    ledger = PrivacyLedger().with_round(1.0, 0.25, 8).with_round(1.0, 0.25, 8)
    again = PrivacyLedger.from_json(ledger.to_json())
    assert again == ledger and again.steps() == 16 and again.rounds == 2
    assert epsilon([], 1e-5) == 0.0
    acc = RDPAccountant()
    acc.history = [(1.0, 0.25, 16)]
    assert again.epsilon(DPSettings(noise_multiplier=1.0)) == pytest.approx(acc.get_epsilon(1e-5))


# ----------------------------------------------------------------------------- server, client-level


def _update(node: int, arrays: dict[str, np.ndarray]) -> ValidUpdate:
    return ValidUpdate(node_id=node, arrays=arrays, num_examples=10.0)


def test_central_dp_clips_each_device_per_head_and_accounts() -> None:
    g = {"heads.1.w": np.zeros(50, np.float32), "heads.2.w": np.zeros(50, np.float32)}
    honest = [_update(i, {"heads.1.w": np.full(50, 0.01, np.float32)}) for i in range(3)]
    attacker = _update(9, {"heads.1.w": np.full(50, 100.0, np.float32), "heads.2.w": np.ones(50, np.float32)})
    dp = CentralDP(clip_norm=1.0, noise_multiplier=0.0)
    new, report = dp.aggregate(g, [*honest, attacker])
    # Without noise the change of head 1 is the mean of clipped changes: its norm is at most C.
    assert np.linalg.norm(new["heads.1.w"].astype(np.float64)) <= 1.0 + 1e-6
    assert report["clipped_updates"] == 2 and report["senders_per_head"] == {"1": 4, "2": 1}
    assert dp.compositions == {0: 1, 1: 1, 2: 1, 9: 2}
    assert report["epsilon"] == math.inf  # no noise, no privacy
    noisy = CentralDP(clip_norm=1.0, noise_multiplier=2.0, delta=1e-5, seed=0)
    wide = {"heads.1.w": np.zeros(20000, np.float32)}
    ups = [_update(i, {"heads.1.w": np.zeros(20000, np.float32)}) for i in range(4)]
    out, rep = noisy.aggregate(wide, ups)
    assert np.std(out["heads.1.w"]) == pytest.approx(2.0 * 1.0 / 4, rel=0.03)  # σC / senders
    acc = RDPAccountant()
    acc.history = [(2.0, 1.0, 1)]
    assert rep["epsilon"] == pytest.approx(acc.get_epsilon(1e-5))
    assert central_epsilon(2.0, 3, 2, 1e-5) == pytest.approx(epsilon([(2.0, 1.0, 6)], 1e-5))


def test_central_dp_run_reports_epsilon_per_round(setup) -> None:
    _cfg, rc, spec = setup
    spec.rounds = 2
    spec.overrides = {"federated.central_dp": {"clip_norm": 0.5, "noise_multiplier": 1.0, "seed": 0}}
    run_federation(inprocess_grid(rc), spec, log=lambda _: None)
    lines = _lines(spec)
    eps = [lines[r]["privacy"]["central"]["epsilon"] for r in (1, 2)]
    # The exit-2 device sends heads 1 and 2: two mechanisms per round.
    assert eps[0] == pytest.approx(central_epsilon(1.0, 1, 2, 1e-5))
    assert eps[1] == pytest.approx(central_epsilon(1.0, 2, 2, 1e-5)) and eps[1] > eps[0]
    assert "central ε" in (Path(spec.run_dir) / "report.md").read_text()


def test_client_run_dp_flags_are_checked_before_joining(small_corpus: Path) -> None:
    from typer.testing import CliRunner

    from fedsd.cli.main import app

    base = ["client", "run", "--server", "127.0.0.1:9", "--insecure", "--data", str(small_corpus / "manifest.csv"),
            "--root", str(small_corpus)]  # fmt: skip
    runner = CliRunner()
    both = runner.invoke(app, [*base, "--dp-noise-multiplier", "1", "--dp-target-epsilon", "3"])
    assert both.exit_code == 2 and "contradict" in " ".join(both.output.split())
    rounds = runner.invoke(app, [*base, "--dp-noise-multiplier", "1", "--dp-rounds", "3"])
    assert rounds.exit_code == 2 and "--dp-rounds only goes with --dp-target-epsilon" in " ".join(
        rounds.output.split()
    )
