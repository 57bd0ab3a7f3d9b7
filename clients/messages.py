"""The server's message as untrusted input: its config, the local training settings it asks for, its heads.

Everything in a server's message is untrusted: identifiers that name files (fingerprint,
``federation-id``), round numbers, training settings (typed, finite, bounded) and received heads (known
keys, the model's dtype and shapes, finite) are checked with ``fedsd.security.untrusted`` before they
are used; a value that fails a check raises :class:`~fedsd.clients.device.HostileMessage`, whose text
says what was refused, before anything is loaded or written.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message

from fedsd.clients.device import DeviceSettings, refuse
from fedsd.clients.training import LocalTrainConfig, mix_seed
from fedsd.model.multiexit import MultiExitSER
from fedsd.security.untrusted import (
    UntrustedValueError,
    config_choice,
    config_float,
    config_int,
    identifier,
    shown,
)
from fedsd.security.untrusted import fingerprint as check_fingerprint
from fedsd.security.wire import HEAD_PREFIX
from fedsd.training.distill import DistillConfig

MAX_ROUND = 10**9
"""Largest round number (and round offset, number of rounds) a server may send."""
_HEAD_KEY = re.compile(r"heads\.([0-9]{1,6})\.[A-Za-z0-9_.]{1,200}", re.ASCII)


def server_config(msg: Message) -> dict[str, Any]:
    """The ``config`` record of a server message, with every key that names a file or a round checked.

    Raises :class:`~fedsd.clients.device.HostileMessage` before anything is loaded or written.
    """
    if not msg.has_content():
        raise refuse(ValueError("the message has no content"))
    cfg = dict(msg.content.config_records.get("config", ConfigRecord()))
    try:
        check_fingerprint(cfg.get("fingerprint", ""), "fingerprint", allow_empty=True)
        identifier(cfg.get("federation-id", ""), "federation-id", allow_empty=True)
        config_int(cfg, "server-round", 0, 0, MAX_ROUND)
        config_int(cfg, "round-offset", 0, 0, MAX_ROUND)
        if "num-rounds" in cfg:
            config_int(cfg, "num-rounds", 1, 0, MAX_ROUND)  # 0: local-only (no federated round)
        if "default-exit" in cfg:
            config_int(cfg, "default-exit", 1, 1, 10**6)
    except UntrustedValueError as e:
        raise refuse(e) from None
    return cfg


def round_of(cfg: dict[str, Any]) -> int:
    """The run's round number of a (checked) server config: server-round + round-offset."""
    return config_int(cfg, "server-round", 0, 0, MAX_ROUND) + config_int(cfg, "round-offset", 0, 0, MAX_ROUND)


def device_identity(settings: DeviceSettings, context: Context) -> str:
    """What tells this device apart in a round's seed: its partition (simulation) or its node id."""
    if settings.partition_id is not None:
        return f"partition-{settings.partition_id}"
    return f"node-{context.node_id}"


def device_exit(settings: DeviceSettings, model: MultiExitSER, cfg: dict[str, Any]) -> int:
    """The device's own ``--exit``, else the server's ``default-exit``, else the model's deepest."""
    if settings.exit is not None:
        return settings.exit
    try:
        return config_int(cfg, "default-exit", model.exits[-1], 1, 10**6)
    except UntrustedValueError as e:
        raise refuse(e) from None


def local_config(cfg: dict[str, Any], exit_k: int, device: str = "") -> LocalTrainConfig:
    """Local training settings from the server's config; the seed mixes run seed, round and ``device``.

    Why the device: with one seed per round every device would shuffle and drop out identically.
    Every value is the server's: typed, finite and bounded here (a ``local-epochs`` of 10**12 or a
    NaN ``lr`` is refused with :class:`~fedsd.clients.device.HostileMessage`, not trained with).
    """
    try:
        return LocalTrainConfig(
            exit=exit_k,
            train_exits=config_choice(cfg, "train-exits", "upto", ("upto", "only")),  # type: ignore[arg-type]
            teacher=config_choice(cfg, "teacher", "deep", ("deep", "local")),  # type: ignore[arg-type]
            epochs=config_int(cfg, "local-epochs", 5, 1, 10_000),
            batch_size=config_int(cfg, "batch-size", 16, 1, 65_536),
            lr=config_float(cfg, "lr", 1e-3, 0.0, 100.0, lo_open=True),
            proximal_mu=config_float(cfg, "proximal-mu", 0.0, 0.0, 1e6),
            seed=mix_seed(
                config_int(cfg, "seed", 0, -(2**63), 2**63 - 1),
                config_int(cfg, "server-round", 0, 0, MAX_ROUND),
                device,
            ),
            distill=_distill_config(cfg),
        )
    except UntrustedValueError as e:
        raise refuse(e) from None


def _distill_config(cfg: dict[str, Any]) -> DistillConfig:
    """The loss settings of the server's config (raises UntrustedValueError on a bad value)."""
    return DistillConfig(
        w_ce=config_float(cfg, "w-ce", 1.0, 0.0, 1e6),
        w_kd=config_float(cfg, "w-kd", 1.0, 0.0, 1e6),
        w_feat=config_float(cfg, "w-feat", 1.0, 0.0, 1e6),
        temperature=config_float(cfg, "temperature", 2.0, 0.0, 1e3, lo_open=True),
        mode=config_choice(cfg, "mode", "sd", ("sd", "ce", "pl")),  # type: ignore[arg-type]
        pl_threshold=config_float(cfg, "pl-threshold", 0.95, 0.0, 1.0),
    )


def received_heads(arrays: ArrayRecord, model: MultiExitSER) -> dict[str, torch.Tensor]:
    """The server's head weights this device will load: keys of its own heads, same dtype and shape,
    finite values. Heads of exits this model lacks are skipped (an exported model holds fewer);
    anything else is refused with :class:`~fedsd.clients.device.HostileMessage`."""
    own = model.head_state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, array in arrays.items():
        m = _HEAD_KEY.fullmatch(key)
        if m is None:
            raise refuse(UntrustedValueError(f"head key {shown(key)} is not '{HEAD_PREFIX}<exit>.<name>'"))
        if int(m.group(1)) not in model.exits:
            continue
        if key not in own:
            raise refuse(UntrustedValueError(f"head key {shown(key)} is not a parameter of this model"))
        out[key] = _head_value(key, array, own[key])
    return out


def _head_value(key: str, array: Any, ref: torch.Tensor) -> torch.Tensor:
    """One received head tensor, decoded and checked against this model's ``ref`` (dtype, shape, finite)."""
    try:
        value = array.numpy()
    except Exception as e:  # malformed bytes: np.load raises many exception types
        raise refuse(UntrustedValueError(f"{key}: cannot decode the array ({type(e).__name__})")) from None
    if value.dtype != ref.detach().cpu().numpy().dtype or tuple(value.shape) != tuple(ref.shape):
        raise refuse(
            UntrustedValueError(
                f"{key}: {value.dtype} {tuple(value.shape)} != this model's "
                f"{str(ref.dtype).removeprefix('torch.')} {tuple(ref.shape)}"
            )
        )
    if np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value)):
        raise refuse(UntrustedValueError(f"{key}: non-finite values (NaN or inf)"))
    return torch.from_numpy(np.array(value, copy=True))
