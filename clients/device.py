"""What a device is: its exit, its private data, its copy of the model, its cache.

Settings come from the SuperNode's ``--node-config`` in a deployment (``exit=4 device="cpu"
data="/abs/manifest.csv" root="/abs/corpus"``) or, in simulation, from the run config plus the
``partition-id`` Flower assigns each virtual node. Every message may run in a fresh process, so all
state lives on disk (model, feature cache) or in ``context.state``.

Trust: paths come from the device's own node config only. The run config is the server's (it travels
with ``flwr run``), so a deployed device (no ``partition-id`` in its node config) never reads a path
from it; only virtual devices of a local simulation do. Server-sent identifiers that name files
(fingerprints) are checked by ``fedsd.security.untrusted`` before they become a path.
"""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Context

from fedsd.config import ExperimentConfig
from fedsd.data.manifest import ManifestRow, read_manifest
from fedsd.data.partition import PERSONAL_TEST
from fedsd.security.untrusted import UntrustedValueError
from fedsd.security.untrusted import fingerprint as check_fingerprint

if TYPE_CHECKING:
    from fedsd.data.partition import ClientPartition

DEFAULT_CACHE = Path(os.environ.get("FEDSD_CACHE", Path.home() / ".cache" / "fedsd"))

# Keys a simulation run puts into the run config (see fedsd.server.simulation).
SIM_PARTITION = "sim-partition"
SIM_MANIFEST = "sim-manifest"
SIM_ROOT = "sim-root"
SIM_MODEL = "sim-model"
SIM_EXITS_MIX = "sim-exits-mix"
SIM_CACHE = "sim-cache"
SIM_DEVICE = "sim-device"
SIM_DEVICE_MODELS = "sim-device-models"
"""Directory under which each virtual device writes its deployable model (``<dir>/<client id>``)."""


def simulated_device_config(
    cfg: ExperimentConfig,
    partition: Path,
    base_model: Path,
    run_dir: Path,
    device: str = "cpu",
    device_models: Path | None = None,
) -> dict[str, Any]:
    """What every virtual device of a simulation needs to find its shard and model (absolute paths);
    with ``device_models`` each device keeps its deployable model in ``<device_models>/<client id>``."""
    mix = cfg.federated.exits_mix or [cfg.model.exits[-1]]
    return ({SIM_DEVICE_MODELS: str(device_models.resolve())} if device_models else {}) | {
        SIM_PARTITION: str(partition.resolve()),
        SIM_MANIFEST: str(cfg.data.manifest_path.resolve()),
        SIM_ROOT: str(cfg.data.root.resolve()),
        SIM_MODEL: str(base_model.resolve()),
        SIM_EXITS_MIX: ",".join(str(k) for k in mix),
        SIM_CACHE: str((run_dir / "cache").resolve()),
        SIM_DEVICE: device,
    }


def _flwr_run_defaults(run_config: dict[str, Any]) -> dict[str, Any]:
    """`flwr run .` simulations carry only the app config: find what the ServerApp prepared from it."""
    from fedsd.config import load_config

    cfg = load_config(Path(str(run_config.get("config") or "configs/demo.yaml")).resolve())
    run_dir = Path(str(run_config.get("run-dir") or f"runs/{cfg.name}-flwr")).resolve()
    base = cfg.base_model or run_dir / "central" / "best"
    return simulated_device_config(cfg, run_dir / "partition.json", Path(base), run_dir)


class DeviceError(RuntimeError):
    """A device that cannot take part; the message says what to fix on the device."""


class HostileMessage(DeviceError):
    """The server sent something this device refuses to act on (a bad id, path, config or file)."""


def _identity(path: Path) -> tuple[str, int, int, int, int]:
    """What a parsed file is keyed by: its path and inode, size and modification time — a rewritten
    file is a new key, so a cached parse never goes stale."""
    st = path.stat()  # follows links; the path is made absolute lexically (resolve() walks the tree)
    return (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _parsed_partition(identity: tuple[str, int, int, int, int]) -> Any:
    from fedsd.data.partition import Partition

    return Partition.load(identity[0])


@functools.lru_cache(maxsize=4)
def _manifest_index(identity: tuple[str, int, int, int, int]) -> dict[str, ManifestRow]:
    return {r.utt_id: r for r in read_manifest(identity[0])}


def simulated_client(partition: Path, partition_id: int) -> ClientPartition:
    """One virtual device's share of a simulation's partition, parsed once per process and file version.

    Why: a simulation's partition and manifest list every device's utterances, and a Ray actor serves
    thousands of virtual devices; parsing both files for every message made a round O(devices²).
    """
    return _parsed_partition(_identity(partition)).client(partition_id)


def simulated_rows(manifest: Path, utt_ids: list[str]) -> list[ManifestRow]:
    """Manifest rows of ``utt_ids`` in their order (copies: callers may change them), from the
    per-process parse of ``manifest``; an id the manifest lacks is a :class:`ManifestError`."""
    from fedsd.data.manifest import ManifestError

    index = _manifest_index(_identity(manifest))
    missing = [u for u in utt_ids if u not in index]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ManifestError(f"{manifest}: {len(missing)} utterance id(s) of the partition not in it: {shown}")
    return [copy.copy(index[u]) for u in utt_ids]


def refuse(err: Exception) -> HostileMessage:
    """The error a handler raises for a malformed server message (its reply to the server says why)."""
    return HostileMessage(f"refused the server's message: {err}")


@dataclass
class DeviceSettings:
    exit: int | None
    device: str
    cache_dir: Path
    model: Path | None = None
    manifest: Path | None = None
    root: Path | None = None
    partition: Path | None = None
    partition_id: int | None = None
    out: Path | None = None
    """Where this device keeps its deployable model (`fedsd client run --out`); None: nowhere."""
    personalize_epochs: int | None = None
    """The device's own choice (`--personalize-epochs`); None: the server's ``personalize-epochs``."""
    name: str = ""
    """How the server's report names this device: its partition's client id, or its manifest's name."""

    @classmethod
    def from_context(cls, context: Context, defaults: dict[str, Any] | None = None) -> DeviceSettings:
        nc: dict[str, Any] = dict(context.node_config)
        rc: dict[str, Any] = {**(defaults or {}), **dict(context.run_config)}
        if "partition-id" in nc and SIM_PARTITION not in rc and "config" in rc:
            rc |= _flwr_run_defaults(rc)
        if "partition-id" in nc and SIM_PARTITION in rc:  # a simulated device
            pid = int(nc["partition-id"])
            mix = [int(x) for x in str(rc.get(SIM_EXITS_MIX, "")).split(",") if x.strip()]
            name = simulated_client(Path(str(rc[SIM_PARTITION])), pid).client_id
            return cls(
                exit=mix[pid % len(mix)] if mix else None,
                device=str(rc.get(SIM_DEVICE, "cpu")),
                cache_dir=Path(str(rc.get(SIM_CACHE) or DEFAULT_CACHE)),
                model=Path(str(rc[SIM_MODEL])) if rc.get(SIM_MODEL) else None,
                manifest=Path(str(rc[SIM_MANIFEST])),
                root=Path(str(rc[SIM_ROOT])),
                partition=Path(str(rc[SIM_PARTITION])),
                partition_id=pid,
                out=Path(str(rc[SIM_DEVICE_MODELS])) / name if rc.get(SIM_DEVICE_MODELS) else None,
                name=name,
            )
        for key in ("data", "root"):
            if not nc.get(key):
                raise DeviceError(
                    f"node config has no '{key}': start the device with "
                    "`fedsd client run --data manifest.csv --root DIR ...`"
                )
        return cls(
            exit=int(nc["exit"]) if "exit" in nc else None,
            device=str(nc.get("device", "cpu")),
            cache_dir=Path(str(nc.get("cache") or DEFAULT_CACHE)),
            model=Path(str(nc["model"])) if nc.get("model") else None,
            manifest=Path(str(nc["data"])),
            root=Path(str(nc["root"])),
            out=Path(str(nc["out"])) if nc.get("out") else None,
            personalize_epochs=int(nc["personalize-epochs"]) if "personalize-epochs" in nc else None,
            name=str(nc.get("name") or Path(str(nc["data"])).stem),
        )

    def delivered_model_dir(self, fingerprint: str) -> Path:
        """``<cache>/models/<first 16 hex digits>``; the fingerprint must be sha256 hex (server-sent)."""
        try:
            fp = check_fingerprint(fingerprint, "backbone fingerprint")
        except UntrustedValueError as e:
            raise refuse(e) from None
        return self.cache_dir / "models" / fp[:16]

    def model_dir(self, fingerprint: str | None = None) -> Path | None:
        """The model to use: the one given at start-up, else one the server delivered earlier."""
        if self.model is not None:
            if not (self.model / "fedsd.json").exists():
                raise DeviceError(f"--model {self.model}: not a fedsd checkpoint (no fedsd.json)")
            return self.model
        if fingerprint:
            d = self.delivered_model_dir(fingerprint)
            if (d / "fedsd.json").exists():
                return d
        return None

    def local_data(self) -> tuple[list[ManifestRow], list[bool]]:
        """This device's utterances and which of them carry a label it may use — never its personal test
        rows (``split=personal_test`` in a manifest, ``personal_test_utt_ids`` in a partition)."""
        if self.partition is not None:
            assert self.manifest is not None and self.partition_id is not None
            part = simulated_client(self.partition, self.partition_id)
            return simulated_rows(self.manifest, list(part.utt_ids)), list(part.labelled)
        assert self.manifest is not None
        rows = [r for r in read_manifest(self.manifest) if r.split != PERSONAL_TEST]
        return rows, [bool(r.label) for r in rows]

    def personal_test_data(self) -> list[ManifestRow]:
        """This device's personal test utterances (labelled, held out from its training); may be empty."""
        if self.partition is not None:
            assert self.manifest is not None and self.partition_id is not None
            part = simulated_client(self.partition, self.partition_id)
            return simulated_rows(self.manifest, list(part.personal_test_utt_ids))
        assert self.manifest is not None
        return [r for r in read_manifest(self.manifest) if r.split == PERSONAL_TEST and r.label]
