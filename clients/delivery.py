"""The ``query.model`` message: the server delivers its base model to a device started without ``--model``.

A delivered model is untrusted: every file must be a fedsd model file with a matching sha256, within
the delivery caps (:class:`~fedsd.security.wire.DeliveryLimits`); it is staged apart, loaded, and stored
under the fingerprint its own weights hash to, never under one it declares (``meta.exported_from``
counts for the operator's own ``--model`` only). A refused delivery leaves the cache as it was.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedsd.checkpoint import CheckpointError
from fedsd.clients.assembly import load_device_model
from fedsd.clients.device import DeviceError, DeviceSettings, refuse
from fedsd.clients.messages import server_config
from fedsd.clients.model_store import file_identity, write_stamp
from fedsd.model.export import EXPORTED_FROM
from fedsd.model.multiexit import MultiExitSER
from fedsd.security.untrusted import UntrustedValueError, printable, shown
from fedsd.security.untrusted import fingerprint as check_fingerprint
from fedsd.security.wire import DeliveryLimits, read_delivery, write_delivery

_log = logging.getLogger(__name__)


def delivery_limits(context: Context) -> DeliveryLimits:
    """The caps on a model delivery; the device's own node config ``max-model-mb`` may lower the total."""
    value = dict(context.node_config).get("max-model-mb")
    if value in (None, ""):
        return DeliveryLimits()
    try:
        mb = float(value)
    except (TypeError, ValueError):
        raise DeviceError(f"node config max-model-mb: expected a number of MB, got {value!r}") from None
    if not 0 < mb < math.inf:
        raise DeviceError(f"node config max-model-mb: must be finite and > 0, got {value!r}")
    return DeliveryLimits(total_bytes=int(mb * 2**20))


def receive_model(msg: Message, context: Context, defaults: dict[str, Any] | None = None) -> Message:
    """Store the server's base model in the device cache, keyed by the fingerprint its weights hash to.

    Every file must be a fedsd model file with a matching sha256, within the delivery caps
    (:class:`~fedsd.security.wire.DeliveryLimits`); the model is staged apart, loaded, and its weights hashed:
    it is kept only when that fingerprint is the one the server announced and the one fedsd.json
    declares (an ``exported_from`` claim is refused). A model already stored under that fingerprint
    is kept as it is; a refused delivery leaves the cache exactly as it was.
    """
    settings = DeviceSettings.from_context(context, defaults)
    cfg = server_config(msg)
    try:
        claimed = check_fingerprint(cfg.get("fingerprint"), "fingerprint")
    except UntrustedValueError as e:
        raise refuse(e) from None
    checked = _checked_files(msg, context)
    return _stored(msg, _store(settings, checked, claimed))


def _checked_files(msg: Message, context: Context) -> dict[str, bytes]:
    """The delivery's files, each checked against its sha256 and the caps (nothing written yet)."""
    files = msg.content.array_records.get("files")
    digests = msg.content.config_records.get("digests")
    if files is None or digests is None:
        raise refuse(ValueError("a model delivery needs a 'files' ArrayRecord and a 'digests' ConfigRecord"))
    limits = delivery_limits(context)
    try:
        return read_delivery(files, digests, limits)
    except UntrustedValueError as e:
        raise refuse(e) from None
    except CheckpointError as e:
        raise DeviceError(str(e)) from None


def _store(settings: DeviceSettings, checked: dict[str, bytes], claimed: str) -> Path:
    """Stage the checked files, verify what their weights hash to, and move them into the cache."""
    models = settings.cache_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=models))
    try:
        staged = write_delivery(checked, staging / "model")
        fingerprint = _verified_delivery(staged, claimed)
        dest = settings.delivered_model_dir(fingerprint)
        if _holds(settings, dest, fingerprint):
            return dest  # the same backbone is here already: kept as it was
        identity = file_identity(staged)
        if dest.exists():  # an earlier copy that does not load: set aside, removed with the staging dir
            os.replace(dest, staging / "broken")
        os.replace(staged, dest)
        if file_identity(dest) == identity:  # the files verified above, moved: no need to hash again
            write_stamp(settings.cache_dir, dest, identity, fingerprint)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _verified_delivery(staged: Path, claimed: str) -> str:
    """The fingerprint the staged model's weights hash to; refuses a model whose declared identity
    (``exported_from``) or the server's claimed fingerprint is another one."""
    try:
        model = MultiExitSER.from_pretrained(staged)  # no stamp: hashes every backbone weight
    except Exception as e:  # whatever fails to load is not kept: a later round must not pick it up
        raise DeviceError(f"the delivered model does not load: {type(e).__name__}: {e}") from None
    computed = model.backbone_fingerprint()
    declared = model.meta.get(EXPORTED_FROM)
    if declared is not None:
        said = declared.get("fingerprint") if isinstance(declared, dict) else declared
        if said != computed:
            _log.warning(
                "refused a model delivery: its fedsd.json declares it was exported from backbone %s, "
                "its weights hash to %s", printable(said, 80), computed,
            )  # fmt: skip
            raise refuse(
                UntrustedValueError(
                    f"model delivery: fedsd.json declares meta.{EXPORTED_FROM} fingerprint "
                    f"{shown(said, 20)}, but its weights hash to {computed[:12]}; a delivered model is "
                    "known by its own weights only"
                )
            )
    if computed != claimed:
        _log.warning("refused a model delivery announced as %s: its weights hash to %s", claimed, computed)
        raise refuse(
            UntrustedValueError(
                f"model delivery: announced as backbone {claimed[:12]}, but its weights hash to "
                f"{computed[:12]}"
            )
        )
    return computed


def _stored(msg: Message, dest: Path) -> Message:
    return Message(RecordDict({"info": ConfigRecord({"stored": str(dest)})}), reply_to=msg)


def _holds(settings: DeviceSettings, dest: Path, fingerprint: str) -> bool:
    """Whether ``dest`` already holds a model that loads with ``fingerprint``."""
    if not (dest / "fedsd.json").is_file():
        return False
    try:
        load_device_model(replace(settings, model=None), fingerprint, weights=False)
    except Exception:
        return False
    return True
