"""Cut a multi-exit model down to what a device at exit K runs: front end, layers 1..K, heads <= K.

Why: a device deployed at exit K never executes layers above K, so shipping and loading them wastes
download size, disk and memory. The exported model is an ordinary ``MultiExitSER`` (same checkpoint
format) whose backbone config has ``num_hidden_layers = K``; its outputs at every kept exit equal the
full model's bit for bit. Its backbone fingerprint necessarily differs from the full model's, so the
parent's fingerprint and the exit are recorded in ``meta["exported_from"]``; ``parent_fingerprint``
gives the identity the federated code should compare against the server's full model.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import PreTrainedModel

from fedsd.model.backbone import ConfigError, build_backbone
from fedsd.model.multiexit import MultiExitSER

EXPORTED_FROM = "exported_from"


def parent_fingerprint(model: MultiExitSER) -> str:
    """Fingerprint of the full backbone this model was exported from (its own if it was not exported)."""
    info = model.meta.get(EXPORTED_FROM)
    if isinstance(info, dict) and isinstance(info.get("fingerprint"), str):
        return info["fingerprint"]
    return model.backbone_fingerprint()


def _truncated_backbone(backbone: PreTrainedModel, k: int, pre_ln: bool) -> PreTrainedModel:
    """A copy of ``backbone`` with only layers 1..k, holding exactly the original weights.

    Everything below the layers (CNN front end, feature projection, positional convolution, the
    encoder LayerNorm, WavLM's relative-position embedding in layer 1) is kept: post-LN encoders apply
    the LayerNorm before layer 1, and pre-LN ones keep it so the full exit's normed output stays exact.
    """
    config = copy.deepcopy(backbone.config)
    num_layers = int(config.num_hidden_layers)
    config.num_hidden_layers = k
    if pre_ln and k < num_layers:
        # For a pre-LN encoder, exit k < N sees the raw layer output; in the truncated model k is the
        # last layer, which some transformers versions report after the final LayerNorm. Pin it for
        # HF (``export_exit`` also passes the rule to the exported model explicitly).
        config.tie_last_hidden_states = False
    new = build_backbone(config, seed=0)  # random init is overwritten below; seeded to spare the RNG
    param = next(backbone.parameters())
    new = new.to(device=param.device, dtype=param.dtype)
    prefix = f"{_layers_prefix(backbone)}."
    state = {}
    for name, tensor in backbone.state_dict().items():
        if name.startswith(prefix) and int(name[len(prefix) :].split(".", 1)[0]) >= k:
            continue
        state[name] = tensor
    new.load_state_dict(state, strict=True)  # strict: every kept tensor has a home and vice versa
    frozen = {name for name, p in backbone.named_parameters() if not p.requires_grad}
    for name, p in new.named_parameters():
        p.requires_grad_(name not in frozen)
    return new.train(backbone.training)


def _layers_prefix(backbone: PreTrainedModel) -> str:
    """State-dict prefix of the transformer layers (``encoder.layers``; a WhisperEncoder's own ``layers``)."""
    encoder = getattr(backbone, "encoder", backbone)
    for name, module in backbone.named_modules():
        if module is encoder.layers:
            return name
    raise ValueError("backbone has no encoder.layers")  # pragma: no cover - every supported family has


def export_exit(model: MultiExitSER, k: int) -> MultiExitSER:
    """The model a device at exit ``k`` needs: layers 1..k, heads for exits <= k, teacher = k.

    Outputs at every kept exit equal ``model``'s exactly. ``meta["exported_from"]`` records the parent
    fingerprint (of the original full model, also when exporting an already exported one) and ``k``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k not in model.exits:
        raise ConfigError("exit", f"{k!r} is not an exit of this model; valid exits: {model.exits}")
    kept = [e for e in model.exits if e <= k]
    backbone = _truncated_backbone(model.backbone, k, model.encoder.pre_ln)
    meta: dict[str, Any] = copy.deepcopy(model.meta)
    previous = meta.get(EXPORTED_FROM)
    previous = previous if isinstance(previous, dict) else {}
    meta[EXPORTED_FROM] = {
        "fingerprint": parent_fingerprint(model),
        "exit": k,
        "num_layers": int(previous.get("num_layers", model.encoder.num_layers)),  # depth of the root
    }
    # Exit k < N of a pre-LN encoder sees the raw layer output; k = N keeps the parent's rule.
    final_norm = model.final_norm_at_last_exit and k == model.encoder.num_layers
    config = model.config.replace(num_layers=k, exits=kept, final_norm_at_last_exit=final_norm, meta=meta)
    out = MultiExitSER.from_config(backbone, config)
    head = next(model.head(kept[0]).parameters())
    out.heads.to(device=head.device, dtype=head.dtype)
    out.load_head_state_dict(model.head_state_dict(kept), strict=True)
    return out.train(model.training)


def parameter_count(module: torch.nn.Module) -> int:
    """Number of parameter elements (what the size on disk is made of, buffers aside)."""
    return sum(p.numel() for p in module.parameters())
