"""DP-SGD on a device's exit heads with Opacus (sample-level differential privacy).

Only the heads train, on features the frozen backbone computed without gradients, so per-sample
gradients (Opacus ``GradSampleModule``) are needed for a few small layers only. What makes the
guarantee hold, and how this module keeps each condition:

- **Poisson sampling**: every step draws each utterance independently with probability ``q``
  (batches vary in size and may be empty; an empty step still adds noise and is accounted);
- **per-sample losses**: each utterance's loss depends on that utterance only
  (``self_distill_loss(reduction="none")``), summed, then clipped per sample to ``max_grad_norm``
  and noised with ``σ · max_grad_norm`` by ``DPOptimizer``, which divides by the expected batch size
  (``loss_reduction="mean"``). That is the weighting plain training uses too (``fedsd.training.distill``: CE of a
  labelled clip + KD, averaged over the batch), so DP − no DP measures noise and clipping only;
- **no data-dependent skip**: with σ > 0 every step is taken and accounted, even one whose sampled
  batch has no loss signal (CE mode and no labelled clip, or an empty batch): skipping it would release
  whether the batch held a label, which the accountant does not cover. Its update is noise alone, the
  price of DP; in SD mode every sampled clip has a KD term, so only CE-mode batches pay it. At σ = 0 (no
  privacy: the same-loss reference arm of ``benchmarks/privacy.py``) such steps are skipped as in plain
  training;
- **secret randomness**: sampling, noise and dropout draw from OS entropy, never from the seed the
  server sends (a server that knew the noise could subtract it);
- the ``gru`` head trains through Opacus' ``DPGRU`` (same parameters, same state-dict names as
  ``nn.GRU``), copied back into the model afterwards.
"""

from __future__ import annotations

import copy
import json
import math
import secrets
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.layers import DPGRU
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn

from fedsd.checkpoint import atomic_write_json
from fedsd.clients.training import (
    ExitPlan,
    LocalTrainConfig,
    add_proximal_grad,
    rng_devices,
    set_train_modes,
    with_pseudo_labels,
)
from fedsd.model.heads import ExitHead, HeadOutput
from fedsd.model.multiexit import MultiExitSER
from fedsd.security.privacy import DPSettings, epsilon
from fedsd.training.cached import batch_input, head_outputs
from fedsd.training.distill import loss_has_signal, self_distill_loss
from fedsd.training.features import CachedFeatures


def dp_compatible(head: ExitHead) -> ExitHead:
    """A trainable copy of ``head`` whose layers all have Opacus per-sample gradients."""
    twin = copy.deepcopy(head)
    for name, module in list(twin.named_children()):
        if isinstance(module, nn.GRU):
            if module.num_layers != 1 or module.bidirectional:
                raise ValueError(f"head {head.kind}: only single-layer, unidirectional GRUs are supported")
            dp = DPGRU(
                module.input_size, module.hidden_size, batch_first=module.batch_first, bias=module.bias
            )
            dp.load_state_dict(module.state_dict())
            setattr(twin, name, dp)
    twin.train()  # Opacus validates training-mode modules
    errors = ModuleValidator.validate(twin, strict=False)
    if errors:
        raise ValueError(f"head {head.kind} cannot be trained with DP: {errors}")
    return twin


def plain_state_dict(twin: nn.Module) -> dict[str, torch.Tensor]:
    """``twin``'s weights under the original head's names (Opacus renames DPGRU's only at its own level)."""
    out = {
        f"{name}.{key}": value
        for name, child in twin.named_children()
        for key, value in child.state_dict().items()
    }
    out |= {name: p for name, p in twin.named_parameters(recurse=False)}
    out |= {name: b for name, b in twin.named_buffers(recurse=False)}
    return out


def _outputs(
    model: MultiExitSER,
    trained: dict[int, ExitHead],
    feats: CachedFeatures,
    plan: ExitPlan,
    idx: list[int],
) -> dict[int, HeadOutput]:
    """Outputs of the DP copies for the trained exits, the frozen teacher without gradient."""

    out = {}
    for k, head in trained.items():
        x, mask = batch_input(model, feats, k, idx)
        out[k] = head.forward_precomputed(x, mask)
    if plan.teacher not in out:
        with torch.no_grad():
            out |= head_outputs(model, feats, [plan.teacher], idx)
    return out


def train_heads_private(
    model: MultiExitSER,
    feats: CachedFeatures,
    plan: ExitPlan,
    cfg: LocalTrainConfig,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    steps: int,
    rng_seed: int | None = None,
) -> dict[str, float]:
    """``steps`` DP-SGD steps on the planned heads (Poisson rate ``sample_rate``); loss means.

    ``rng_seed`` is for tests only: a device must leave it None (OS entropy).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    seed = rng_seed if rng_seed is not None else secrets.randbits(63)
    try:
        with torch.random.fork_rng(devices=rng_devices(model)):
            torch.manual_seed(seed)
            feats, cfg = with_pseudo_labels(model, feats, plan, cfg)  # mode pl → CE on drawn labels
            return _train(model, feats, plan, cfg, noise_multiplier, max_grad_norm, sample_rate, steps, seed)
    finally:
        torch.set_num_threads(threads)


@dataclass
class _PrivateHeads:
    """The DP copies of the trained heads, wrapped for per-sample gradients, and their DP optimizer."""

    trained: dict[int, ExitHead]
    container: nn.ModuleDict
    gsm: GradSampleModule
    params: list[torch.Tensor]
    anchors: list[torch.Tensor]
    """The received heads' values (the proximal term pulls towards them)."""
    optimizer: DPOptimizer


def _private_heads(
    model: MultiExitSER,
    plan: ExitPlan,
    cfg: LocalTrainConfig,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    g: torch.Generator,
) -> _PrivateHeads:
    """Freeze the model, make DP copies of the planned heads and the optimizer that clips and noises."""
    for p in model.parameters():
        p.requires_grad_(False)
    trained = {k: dp_compatible(model.heads[str(k)]) for k in plan.train}
    container = nn.ModuleDict({str(k): h for k, h in trained.items()})
    for p in container.parameters():
        p.requires_grad_(True)
    gsm = GradSampleModule(container, loss_reduction="sum")
    params = [p for p in container.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params]  # the received heads (proximal term)
    device = params[0].device
    # Opacus draws the noise on the parameters' device, so its generator must live there too.
    noise_g = g
    if device.type != "cpu":
        noise_g = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=g)))
    optimizer = DPOptimizer(
        torch.optim.Adam(params, lr=cfg.lr),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=noise_g,
    )
    return _PrivateHeads(trained, container, gsm, params, anchors, optimizer)


def _backward(
    model: MultiExitSER,
    trained: dict[int, ExitHead],
    feats: CachedFeatures,
    plan: ExitPlan,
    cfg: LocalTrainConfig,
    idx: list[int],
) -> dict[str, Any]:
    """Per-utterance losses of the sampled batch, summed and backpropagated; returns the loss components."""
    out = _outputs(model, trained, feats, plan, idx)
    losses, comps = self_distill_loss(
        out,
        feats.labels[idx],
        plan.teacher,
        cfg.distill,
        train_exits=plan.train,
        reduction="none",
    )
    with warnings.catch_warnings():  # cached inputs need no gradient; the hook is right anyway
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        losses.sum().backward()
    return comps


def _train(
    model: MultiExitSER,
    feats: CachedFeatures,
    plan: ExitPlan,
    cfg: LocalTrainConfig,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    steps: int,
    seed: int,
) -> dict[str, float]:
    n = len(feats.utt_ids)
    g = torch.Generator().manual_seed(seed)
    dp = _private_heads(model, plan, cfg, noise_multiplier, max_grad_norm, max(1, round(n * sample_rate)), g)
    sums: dict[str, float] = {}
    counted = 0
    try:
        set_train_modes(model, plan.train)  # the same rule as plain training (the DP copies below train)
        dp.container.train()
        for _ in range(steps):
            dp.optimizer.zero_grad(set_to_none=True)
            idx = torch.nonzero(torch.rand(n, generator=g) < sample_rate).flatten().tolist()
            signal = bool(idx) and loss_has_signal(feats.labels[idx], plan.teacher, cfg.distill, plan.train)
            if idx:
                for key, v in _backward(model, dp.trained, feats, plan, cfg, idx).items():
                    sums[key] = sums.get(key, 0.0) + float(v)
                counted += 1
            else:  # an empty Poisson batch: still a noisy step (the accountant counts it)
                for p in dp.params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            # clip per utterance, add noise: the gradient is private from here; σ = 0 skips a step
            # without signal like plain training (no privacy to keep, see the module docstring)
            if dp.optimizer.pre_step() and (signal or noise_multiplier > 0):
                add_proximal_grad(dp.params, dp.anchors, cfg.proximal_mu)  # data-independent: no privacy cost
                dp.optimizer.original_optimizer.step()
    finally:
        dp.gsm._close()
    for k, head in dp.trained.items():
        model.heads[str(k)].load_state_dict(plain_state_dict(head))
    model.eval()
    return {k: v / max(counted, 1) for k, v in sums.items()}


# ----------------------------------------------------------------------------- what a DP reply may carry
DP_REPLY_KEYS = frozenset(
    {
        "num-examples",
        "exit",
        "n-utterances",
        "dp-epsilon",
        "dp-delta",
        "dp-noise-multiplier",
        "dp-max-grad-norm",
        "dp-sample-rate",
        "dp-steps",
        "dp-rounds",
        "dp-epsilon-budget",
        "dp-ledger-from-state",
    }
)
"""The only metrics a train reply carries when DP is on (an allowlist: a new metric stays home until it
is added here). ``num-examples`` and ``n-utterances`` are the size the device declared at the handshake
(every utterance it holds but its personal test ones, not protected by DP: the server weights the update
by it), never the number it trained on (that would reveal how many it holds out). The ``dp-*`` keys are
this run's accounting (ε and what it was computed from; the sample rate and steps follow from the
batch size and ``ceil(n / batch)``, which ε reveals anyway). Left out: everything data-dependent
(loss, local UAR, labelled counts, personal metrics, cache hits, timing) and ``dp-device-epsilon``,
the device's ε over every federation it took part in, which is no business of this server."""


def dp_reply_metrics(metrics: Mapping[str, Any], declared: int) -> dict[str, Any]:
    """The train-reply metrics that DP covers or that the handshake revealed (``DP_REPLY_KEYS``);
    ``declared`` is the handshake's ``n-utterances``."""
    out = {k: v for k, v in metrics.items() if k in DP_REPLY_KEYS}
    out["n-utterances"] = out["num-examples"] = int(declared)
    return out


def dp_in_use(context: Any, config: Mapping[str, Any]) -> bool:
    """True when this device trains (or trained) with DP: its own ``dp-*`` flags, the server's DP
    settings in ``config``, or a privacy ledger in its state."""
    from fedsd.security.privacy import DP_KEYS, PrivacyLedger

    keys = set(DP_KEYS.values())
    node = dict(context.node_config)
    if any(k in node and node[k] not in ("", None) for k in keys):
        return True
    if any(k in config and config[k] not in ("", None) for k in keys):
        return True
    return PrivacyLedger.STATE_KEY in context.state.config_records


# ----------------------------------------------------------------------------- device-wide ledger
DEVICE_BUDGET_KEY = "dp-device-budget"
"""Node config (the device's own flag, never the server's): ε this device may spend over every run."""


def device_ledger_path(settings: Any) -> Path | None:
    """``<cache>/privacy/device.json`` on a real device (a simulated one keeps no files)."""
    if getattr(settings, "partition", None) is not None:
        return None
    return Path(settings.cache_dir) / "privacy" / "device.json"


def _read_device_ledger(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {"history": [], "runs": {}}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        history = [(float(s), float(q), int(n)) for s, q, n in raw.get("history", [])]
        runs = {str(k): int(v) for k, v in dict(raw.get("runs", {})).items()}
    except (OSError, ValueError, TypeError) as e:
        # never start from zero silently: an unreadable ledger stops DP training until it is fixed
        raise ValueError(f"device privacy ledger {path} is unreadable ({e}); fix or remove it") from None
    return {"history": history, "runs": runs, "device-id": raw.get("device-id")}


def device_budget(context: Any) -> float | None:
    value = dict(context.node_config).get(DEVICE_BUDGET_KEY)
    if value in (None, ""):
        return None
    budget = float(value)
    if not 0 < budget < math.inf:
        raise ValueError(f"{DEVICE_BUDGET_KEY} must be finite and > 0, got {value!r}")
    return budget


def check_device_budget(
    context: Any, settings: Any, dp: DPSettings, sigma: float, sample_rate: float, steps: int
) -> str | None:
    """Why this round would exceed the device-wide budget (over every run this device took part in,
    whatever federation id each server chose), or None when it fits / no budget is set."""
    budget = device_budget(context)
    if budget is None:
        return None
    ledger = _read_device_ledger(device_ledger_path(settings))
    spent = epsilon(ledger["history"], dp.delta, dp.accountant)
    after = epsilon([*ledger["history"], (sigma, sample_rate, steps)], dp.delta, dp.accountant)
    if after > budget:
        return (
            f"privacy budget reached: this round would raise this device's ε over all its runs from "
            f"{spent:.3f} to {after:.3f} (device budget {budget:g}, δ = {dp.delta:g}); this device stops "
            "training"
        )
    return None


def record_device_round(
    settings: Any, dp: DPSettings, sigma: float, sample_rate: float, steps: int, federation_id: str
) -> dict[str, float]:
    """Add one DP round to the device-wide ledger (keyed by this device's own identity, not by the
    server's federation id); returns ``{"dp-device-epsilon": ε over every run so far}``."""
    from fedsd.clients.identity import device_id

    path = device_ledger_path(settings)
    if path is None:
        return {}
    ledger = _read_device_ledger(path)
    ledger["history"].append((float(sigma), float(sample_rate), int(steps)))
    runs = ledger["runs"]
    runs[federation_id] = runs.get(federation_id, 0) + 1
    atomic_write_json(
        path,
        {"device-id": device_id(settings), "history": [list(h) for h in ledger["history"]], "runs": runs},
    )
    return {"dp-device-epsilon": epsilon(ledger["history"], dp.delta, dp.accountant)}


def spend_device_round(
    context: Any,
    settings: Any,
    dp: DPSettings,
    sigma: float,
    sample_rate: float,
    steps: int,
    train_config: Mapping[str, Any],
) -> dict[str, float]:
    """Before a DP round trains: refuse it if it would exceed the device-wide budget
    (``--dp-device-budget``), else record it in the device-wide ledger first (a crash after this
    over-counts, never under-counts). Raises ValueError with the reason; returns the reply metrics."""
    refusal = check_device_budget(context, settings, dp, sigma, sample_rate, steps)
    if refusal is not None:
        raise ValueError(refusal)
    fid = str(train_config.get("federation-id", ""))[:64]
    return record_device_round(settings, dp, sigma, sample_rate, steps, fid)


# ----------------------------------------------------------------------------- the device's own log
LOCAL_METRICS_KEY = "fedsd-local-metrics"
"""Metrics withheld from a DP reply, kept in ``context.state`` (which never leaves the device: Flower
pushes it to the local SuperNode only) until the device's own event log has recorded them."""


def keep_local(context: Any, metrics: Mapping[str, Any]) -> None:
    from flwr.app import MetricRecord

    numeric = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    context.state[LOCAL_METRICS_KEY] = MetricRecord(numeric)


def pop_local_metrics(context: Any) -> dict[str, Any]:
    record = context.state.metric_records.get(LOCAL_METRICS_KEY)
    if record is None:
        return {}
    del context.state[LOCAL_METRICS_KEY]
    return dict(record)
