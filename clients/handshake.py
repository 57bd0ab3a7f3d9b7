"""The ``query.info`` message: the handshake. The device says what it is (its exit, how much speech it
holds, whether it has the server's model), and the server decides whether to deliver the model."""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedsd.clients.assembly import load_device_model
from fedsd.clients.device import DeviceError, DeviceSettings
from fedsd.clients.dp_gate import dp_in_use
from fedsd.clients.identity import device_id
from fedsd.clients.messages import server_config


def info(msg: Message, context: Context, defaults: dict[str, Any] | None = None) -> Message:
    """Tell the server what this device is; it decides whether to deliver the model."""
    settings = DeviceSettings.from_context(context, defaults)
    cfg = server_config(msg)
    has_model = _has_model(settings, str(cfg.get("fingerprint", "")))
    rows, labelled = settings.local_data()
    reply = ConfigRecord(
        {
            "has-model": has_model,
            "exit": settings.exit if settings.exit is not None else -1,
            "n-utterances": len(rows),
            "n-labelled": int(sum(labelled)),
            "device-id": device_id(settings),
            "name": settings.name,
            "device": settings.device,
            "torch-threads": torch.get_num_threads(),
        }
    )
    if dp_in_use(context, cfg):  # how many labels it holds is not the server's business under DP
        reply.pop("n-labelled")
    return Message(RecordDict({"info": reply}), reply_to=msg)


def _has_model(settings: DeviceSettings, fingerprint: str) -> bool:
    """Whether the device holds the server's model; the operator's own wrong ``--model`` is an error."""
    if settings.model_dir(fingerprint) is None:
        return False
    try:
        load_device_model(settings, fingerprint, weights=False)
    except DeviceError:
        if settings.model is not None:
            raise  # the operator's own --model is wrong: say so, never silently replace it
        return False
    return True
