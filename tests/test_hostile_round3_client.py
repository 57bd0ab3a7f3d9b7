"""A hostile server against a device that holds a real model (issue 23: items 1, 7 and 10, device side).

- **Forged delivery**: server B delivers its own backbone announced under server A's fingerprint, its
  fedsd.json claiming ``meta.exported_from`` = A. The device keys a delivery by the fingerprint of the
  weights it received: the delivery is refused and logged, nothing is stored under A's fingerprint, and
  a copy of A's model the device already holds stays as it was. ``exported_from`` still counts for an
  operator's own ``--model``.
- **Delivery caps**: total bytes, shards, JSON size and the dimensions a delivered config declares, each
  refused with an error naming the cap, before any model is built (an absurd config is sized on the
  meta device).
- **Fuzz**: 1,000 well-formed but hostile messages (valid shapes and keys, adversarial values, forged or
  oversized deliveries) to a device holding a delivered tiny model: every one is refused, and after each
  the device's cache (stored model, stamps, ledgers, features) and its ``context.state`` are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedsd.clients.client_app import make_client_app
from fedsd.clients.device import DeviceError, HostileMessage
from fedsd.data.manifest import ManifestRow, write_manifest
from fedsd.model.export import export_exit
from fedsd.model.multiexit import MultiExitSER
from fedsd.security.untrusted import MAX_CONFIG_INT, MAX_LAYERS, UntrustedValueError
from fedsd.security.wire import QUERY_INFO, QUERY_MODEL, DeliveryLimits, checkpoint_to_record, read_delivery

pytestmark = pytest.mark.usefixtures("task_identity")  # the ClientApp is called directly (conftest)

APP = make_client_app()


# --------------------------------------------------------------------------------------------- helpers
def _fp(model_dir: Path) -> str:
    return str(json.loads((model_dir / "fedsd.json").read_text())["fingerprint"])


def _forged(src: Path, dest: Path, exported_from: str | None, nudge: float = 1.0) -> Path:
    """Server B's own model: ``src``'s backbone with one weight changed, optionally claiming to be
    exported from ``exported_from``; saved consistently (fedsd.json's own fingerprint is B's)."""
    model = MultiExitSER.from_pretrained(src)
    with torch.no_grad():
        next(model.backbone.parameters()).add_(nudge)
    model._verified = None
    if exported_from is not None:
        model.meta["exported_from"] = {"fingerprint": exported_from, "exit": 4, "num_layers": 4}
    return model.save_pretrained(dest)


def _records(files: dict[str, bytes]) -> dict[str, Any]:
    arrays = ArrayRecord({n: Array(np.frombuffer(d, np.uint8).copy()) for n, d in files.items()})
    return {
        "files": arrays,
        "digests": ConfigRecord({n: hashlib.sha256(d).hexdigest() for n, d in files.items()}),
    }


def _files(model_dir: Path) -> dict[str, bytes]:
    files, _ = checkpoint_to_record(model_dir)
    return {n: a.numpy().tobytes() for n, a in files.items()}


def _with_json(files: dict[str, bytes], name: str, **changes: Any) -> dict[str, bytes]:
    value = json.loads(files[name]) | changes
    return files | {name: json.dumps(value).encode()}


def _send(node: dict[str, Any], kind: str, config: dict[str, Any] | None = None, state: RecordDict | None = None,
          **records: Any) -> Message | DeviceError:  # fmt: skip
    content: dict[str, Any] = dict(records)
    if config is not None:
        content["config"] = ConfigRecord(config)
    msg = Message(RecordDict(content), dst_node_id=5, message_type=kind)
    ctx = Context(run_id=7, node_id=5, node_config=dict(node), state=state if state is not None else RecordDict(),
                  run_config={})  # fmt: skip
    try:
        return APP(msg, ctx)
    except DeviceError as e:
        return e


def _tree(root: Path, contents: bool = True) -> dict[str, tuple]:
    """Every path under ``root``: files with mode, size, mtime, ctime, inode and (``contents``) content
    hash; folders with mode and inode. Any write moves a file's ctime, so the fuzz skips the hashes."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st_ = p.lstat()
            if p.is_dir():  # a folder's mtime moves with a staging folder made and removed inside it
                out[str(p.relative_to(root))] = (st_.st_mode, st_.st_ino)
                continue
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if contents else ""
            out[str(p.relative_to(root))] = (st_.st_mode, st_.st_size, st_.st_mtime_ns, st_.st_ctime_ns,
                                             st_.st_ino, digest)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    """Server A's model (the tiny one) and server B's: its own backbone, once claiming A as its parent."""
    root = tmp_path_factory.mktemp("servers")
    fp_a = _fp(tiny_model_dir)
    b_claims_a = _forged(tiny_model_dir, root / "b-claims-a", fp_a)
    b_plain = _forged(tiny_model_dir, root / "b-plain", None, nudge=2.0)
    return {"a": tiny_model_dir, "fp_a": fp_a, "b_claims_a": b_claims_a, "b_plain": b_plain,
            "fp_b": _fp(b_claims_a), "root": root}  # fmt: skip


@pytest.fixture()
def node(tmp_path: Path) -> dict[str, Any]:
    """A device without --model (it takes deliveries) and an event log."""
    rows = [
        ManifestRow(f"u{i}", f"wav/u{i}.wav", "happy", "happy", "dev:s1", "dev", 1.0, 16000, "train")
        for i in range(6)
    ]
    write_manifest(rows, tmp_path / "data" / "manifest.csv")
    return {"exit": 2, "data": str(tmp_path / "data" / "manifest.csv"), "root": str(tmp_path / "data"),
            "cache": str(tmp_path / "cache"), "events": str(tmp_path / "events.jsonl")}  # fmt: skip


def _events(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(x) for x in Path(node["events"]).read_text().splitlines()]


# --------------------------------------------------------------------------------------------- item 1
def test_a_forged_delivery_under_another_servers_fingerprint_is_refused(models, node) -> None:
    cache = Path(node["cache"])
    got = _send(node, QUERY_MODEL, {"fingerprint": models["fp_a"]}, **_records(_files(models["b_claims_a"])))
    assert isinstance(got, HostileMessage), got
    assert "exported_from" in str(got) and models["fp_b"][:12] in str(got)
    assert not (cache / "models").exists() or list((cache / "models").iterdir()) == []  # nothing kept
    assert "exported_from" in _events(node)[-1]["error"]  # logged on the device
    info = _send(node, QUERY_INFO, {"fingerprint": models["fp_a"]})
    assert isinstance(info, Message) and info.content.config_records["info"]["has-model"] is False
    # B's backbone announced as A without the exported_from claim: its weights give it away too
    got = _send(node, QUERY_MODEL, {"fingerprint": models["fp_a"]}, **_records(_files(models["b_plain"])))
    assert isinstance(got, HostileMessage) and "hash to" in str(got), got
    assert not (cache / "models").exists() or list((cache / "models").iterdir()) == []


def test_a_forged_delivery_never_replaces_the_model_a_device_holds(models, node) -> None:
    cache = Path(node["cache"])
    genuine = _send(node, QUERY_MODEL, {"fingerprint": models["fp_a"]}, **_records(_files(models["a"])))
    assert isinstance(genuine, Message), genuine
    stored = Path(str(genuine.content.config_records["info"]["stored"]))
    assert stored == cache / "models" / models["fp_a"][:16]
    before = _tree(cache)
    got = _send(node, QUERY_MODEL, {"fingerprint": models["fp_a"]}, **_records(_files(models["b_claims_a"])))
    assert isinstance(got, HostileMessage), got
    assert _tree(cache) == before  # A's copy, its stamp and everything else as they were
    # the same genuine model delivered again (heads changed by the server): the stored copy is kept
    again = _with_json(_files(models["a"]), "fedsd.json", label_names=["w", "x", "y", "z"])
    got = _send(node, QUERY_MODEL, {"fingerprint": models["fp_a"]}, **_records(again))
    assert isinstance(got, Message) and _tree(cache) == before
    loaded = MultiExitSER.from_pretrained(stored)
    assert loaded.backbone_fingerprint() == models["fp_a"] and loaded.label_names != ["w", "x", "y", "z"]


def test_exported_from_counts_for_the_operators_own_model_only(models, node, tmp_path) -> None:
    exported = export_exit(MultiExitSER.from_pretrained(models["a"]), 2).save_pretrained(tmp_path / "exp")
    assert _fp(exported) != models["fp_a"]
    own = node | {"model": str(exported)}
    info = _send(own, QUERY_INFO, {"fingerprint": models["fp_a"]})
    assert isinstance(info, Message) and info.content.config_records["info"]["has-model"] is True
    got = _send(node, QUERY_MODEL, {"fingerprint": models["fp_a"]}, **_records(_files(exported)))
    assert isinstance(got, HostileMessage) and "exported_from" in str(got), got  # delivered: refused
    cache = Path(node["cache"])
    assert not (cache / "models").exists() or list((cache / "models").iterdir()) == []


# --------------------------------------------------------------------------------------------- item 7
def test_delivery_caps_each_refused_with_the_cap_named(models, node) -> None:
    files = _files(models["a"])
    fp = {"fingerprint": models["fp_a"]}
    total = sum(len(b) for b in files.values())
    got = _send(node | {"max-model-mb": total / 2**20 / 2}, QUERY_MODEL, fp, **_records(files))
    assert isinstance(got, HostileMessage) and "DeliveryLimits.total_bytes" in str(got), got
    shards = {f"backbone/model-{i:05d}-of-00065.safetensors": b"x" for i in range(1, 66)}
    got = _send(node, QUERY_MODEL, fp, **_records(files | shards))
    assert isinstance(got, HostileMessage) and "DeliveryLimits.shards" in str(got), got
    big_json = files | {"backbone/config.json": b" " * (2**20 + 2048) + b"{}"}
    got = _send(node, QUERY_MODEL, fp, **_records(big_json))
    assert isinstance(got, HostileMessage) and "DeliveryLimits.json_bytes" in str(got), got
    record = _records(files)
    with pytest.raises(UntrustedValueError, match="DeliveryLimits.file_bytes"):
        read_delivery(record["files"], record["digests"], DeliveryLimits(file_bytes=100_000))
    cache = Path(node["cache"])
    assert not (cache / "models").exists() or list((cache / "models").iterdir()) == []


@pytest.mark.parametrize(
    ("name", "changes", "cap"),
    [
        ("backbone/config.json", {"hidden_size": 2**40}, "MAX_CONFIG_INT"),
        ("backbone/config.json", {"num_hidden_layers": 10**5}, "MAX_LAYERS"),
        ("backbone/config.json", {"conv_dim": [64] * 10_000}, "MAX_CONFIG_LIST"),
        # every number within its cap, yet petabytes in all: sized on the meta device, refused
        (
            "backbone/config.json",
            {
                "hidden_size": 2**20,
                "intermediate_size": 2**20,
                "num_hidden_layers": 256,
                "num_attention_heads": 2,
            },
            "2 x weights",
        ),  # fmt: skip
        ("fedsd.json", {"head_kwargs": {"embed_dim": 2**20}}, "2 x weights"),
        ("fedsd.json", {"label_names": [f"c{i}" for i in range(5000)]}, "MAX_CONFIG_LIST"),
        ("fedsd.json", {"exits": list(range(1, 300))}, "MAX_LAYERS"),
        ("backbone/config.json", {"hidden_size": math.inf}, "not finite"),
    ],
)
def test_absurd_config_dimensions_are_refused_before_any_allocation(models, node, name, changes, cap) -> None:
    """Were any of these built for real, torch would fail to allocate (or the OOM killer would end the
    test); the refusal names the cap instead."""
    files = _with_json(_files(models["a"]), name, **changes)
    got = _send(node, QUERY_MODEL, {"fingerprint": models["fp_a"]}, **_records(files))
    assert isinstance(got, HostileMessage) and cap in str(got), got
    assert str(got).isprintable() and len(str(got)) < 2000
    cache = Path(node["cache"])
    assert not (cache / "models").exists() or list((cache / "models").iterdir()) == []


def test_config_caps_leave_real_backbones_alone() -> None:
    """The caps sit far above any real encoder (wav2vec2/WavLM large: 1024 wide, 24 layers, 4096 FFN)."""
    assert MAX_CONFIG_INT >= 2**16 and MAX_LAYERS >= 64 and DeliveryLimits().total_bytes >= 2 * 1.3e9


class _Quiet(dict):
    """Records whose repr stays short in a falsifying example (a model delivery is megabytes)."""

    def __repr__(self) -> str:
        return f"<{sorted(self)}>"


# --------------------------------------------------------------------------------------------- item 10
@pytest.fixture(scope="module")
def held(tmp_path_factory: pytest.TempPathFactory, models, small_corpus: Path) -> dict[str, Any]:
    """A device that took A's model by delivery and trained one round: its cache holds the model, its
    stamp, its device id and cached features; its context.state is kept across the fuzz."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1  # as the task_identity fixture
    try:
        return _held(tmp_path_factory, models, small_corpus)
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _held(tmp_path_factory: pytest.TempPathFactory, models, small_corpus: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("held")
    node = {"exit": 2, "data": str(small_corpus / "manifest.csv"), "root": str(small_corpus),
            "cache": str(root / "cache")}  # fmt: skip
    state = RecordDict()
    got = _send(node, QUERY_MODEL, {"fingerprint": models["fp_a"]}, state, **_records(_files(models["a"])))
    assert isinstance(got, Message), got
    heads = MultiExitSER.from_pretrained(models["a"]).head_state_dict()
    base = {"fingerprint": models["fp_a"], "server-round": 1, "local-epochs": 1, "batch-size": 4,
            "federation-id": "run-a"}  # fmt: skip
    arrays = ArrayRecord({k: Array(v.numpy().copy()) for k, v in heads.items()})
    got = _send(node, "train", base, state, arrays=arrays)
    assert isinstance(got, Message) and not got.has_error(), got
    files = _files(models["a"])
    return _Quiet({"node": node, "state": state, "base": base, "heads": {k: v.numpy() for k, v in heads.items()},
            "cache": root / "cache", "a_files": files, "b_files": _files(models["b_claims_a"]),
            "b_plain": _files(models["b_plain"]), "fp_a": models["fp_a"]})  # fmt: skip


_BAD_VALUES: dict[str, list[Any]] = {
    "lr": [math.nan, math.inf, -math.inf, 0.0, -1e-9, 100.5, 1e308, "0.1", True],
    "local-epochs": [0, -1, 10_001, 2**62, 1.5, math.nan, "5", False],
    "batch-size": [0, -4, 65_537, 2**63 - 1, 0.5, math.inf],
    "temperature": [0.0, -1.0, 1e3 + 1, math.nan, math.inf],
    "w-ce": [-1e-9, 1e6 + 1, math.nan, -math.inf],
    "w-kd": [-0.5, math.inf, math.nan],
    "w-feat": [-2.0, 1e7, math.nan],
    "proximal-mu": [-1e-6, 1e6 + 1, math.nan, math.inf],
    "seed": [2**63, -(2**63) - 1, math.nan, 0.5, "seed"],
    "server-round": [-1, 10**9 + 1, 1.5, math.inf, "1"],
    "round-offset": [-5, 10**9 + 1, math.nan],
    "num-rounds": [-1, 10**9 + 1, math.inf, 2.5],  # 0 is valid: a local-only run
    "default-exit": [0, -1, 10**6 + 1, "deep"],
    "mode": ["", "SD", "sd ", "ce\x00", "kd"],
    "teacher": ["", "Deep", "shallow", "../deep"],
    "train-exits": ["all", "", "UPTO"],
    "fingerprint": ["ab" * 32, "0" * 64, "A" * 64, "ab" * 31, ""],
    "federation-id": ["../x", ".hidden", "a/b", "x" * 65, "id\n"],
    "dp-noise-multiplier": [math.nan, -1.0, math.inf],
}


def _bad_heads(draw: st.DrawFn, heads: dict[str, np.ndarray]) -> tuple[str, ArrayRecord]:
    """The model's own head keys with one array made hostile: valid keys, adversarial content."""
    keys = sorted(heads)
    key = draw(st.sampled_from(keys))
    good = heads[key]
    how = draw(st.sampled_from(["nan", "inf", "-inf", "dtype", "shape", "scalar", "extra-key", "empty"]))
    bad: np.ndarray = good.copy()
    if how in ("nan", "inf", "-inf"):
        flat = bad.reshape(-1)
        flat[draw(st.integers(0, flat.size - 1))] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[how]
    elif how == "dtype":
        bad = good.astype(draw(st.sampled_from([np.float64, np.float16, np.int32, np.uint8])))
    elif how == "shape":
        bad = np.zeros((*good.shape, 1) if draw(st.booleans()) else (good.size + 1,), np.float32)
    elif how == "scalar":
        bad = np.array(draw(st.floats(-1e3, 1e3)), np.float32).reshape(())
    elif how == "empty":
        bad = np.zeros((0,), np.float32)
    record = {k: Array(v.copy()) for k, v in heads.items()}
    if how == "extra-key":
        exit_k = key.split(".")[1]
        record[f"heads.{exit_k}.{draw(st.sampled_from(['evil', 'norm.bias2', 'fc', 'x.y.z']))}"] = Array(
            good.copy()
        )
    else:
        record[key] = Array(bad)
    return f"heads:{how}", ArrayRecord(record)


def _bad_delivery(draw: st.DrawFn, h: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    how = draw(st.sampled_from(["forged", "announced", "config", "meta", "digest", "shards", "exported"]))
    fp = h["fp_a"]
    files = dict(h["a_files"])
    if how == "forged":
        files = dict(h["b_files"])
    elif how == "announced":
        files = dict(h["b_plain"])
    elif how == "config":
        key = draw(st.sampled_from(["hidden_size", "intermediate_size", "num_hidden_layers", "conv_dim",
                                    "num_attention_heads", "num_conv_pos_embeddings"]))  # fmt: skip
        value = draw(st.sampled_from([2**21, 2**40, -(2**21), 10**6, [2**20] * 7, [64] * 5000]))
        if key == "num_hidden_layers" and draw(st.booleans()):
            value = draw(st.integers(MAX_LAYERS + 1, 10**6))
        files = _with_json(files, "backbone/config.json", **{key: value})
    elif how == "meta":
        change = draw(st.sampled_from([
            {"head_kwargs": {"embed_dim": 2**20}}, {"exits": list(range(1, 1000))},
            {"label_names": [str(i) for i in range(5000)]}, {"fingerprint": "0" * 64},
            {"meta": {"exported_from": {"fingerprint": "ab" * 32}}}, {"meta": {"exported_from": "ab" * 32}},
        ]))  # fmt: skip
        files = _with_json(files, "fedsd.json", **change)
    elif how == "digest":
        record = _records(files)
        name = draw(st.sampled_from(sorted(files)))
        record["digests"][name] = hashlib.sha256(files[name] + b"x").hexdigest()
        return how, {"fingerprint": fp}, record
    elif how == "shards":
        n = draw(st.integers(DeliveryLimits().shards + 1, 200))
        files |= {f"backbone/model-{i:05d}-of-{n:05d}.safetensors": b"\x00" for i in range(1, n + 1)}
    elif how == "exported":
        meta = json.loads(files["fedsd.json"])
        meta["meta"]["exported_from"] = {
            "fingerprint": draw(st.sampled_from(["ab" * 32, "0" * 64])),
            "exit": 2,
        }
        files["fedsd.json"] = json.dumps(meta).encode()
    return f"model:{how}", {"fingerprint": fp}, _records(files)


@st.composite
def hostile_message(draw: st.DrawFn, h: dict[str, Any]) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
    family = draw(st.sampled_from(["config", "config", "heads", "heads", "model"]))
    kind = draw(st.sampled_from(["train", "evaluate", "query.done"]))
    config = dict(h["base"])
    arrays = ArrayRecord({k: Array(v.copy()) for k, v in h["heads"].items()})
    if family == "model":
        label, config, records = _bad_delivery(draw, h)
        return label, QUERY_MODEL, config, _Quiet(records)
    if family == "config":
        key = draw(st.sampled_from(sorted(_BAD_VALUES)))
        config[key] = draw(st.sampled_from(_BAD_VALUES[key]))
        if key.startswith("dp-"):
            kind = "train"  # DP settings are read by train (evaluate refuses DP outright)
        label = f"config:{key}"
    else:
        label, arrays = _bad_heads(draw, h["heads"])
    return label, kind, config, _Quiet(arrays=arrays)


_SNAP: dict[str, Any] = {}


@settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)
@given(data=st.data())
def test_fuzz_hostile_messages_leave_a_real_device_unchanged(held, data) -> None:
    if "tree" not in _SNAP:
        _SNAP["tree"] = _tree(held["cache"], contents=False)
        _SNAP["contents"] = _tree(held["cache"])
        _SNAP["state"] = repr(held["state"])
    label, kind, config, records = data.draw(hostile_message(held))
    event(label)
    got = _send(held["node"], kind, config, held["state"], **records)
    assert isinstance(got, DeviceError), (label, kind, config)  # every one is refused ...
    assert str(got).isprintable() and len(str(got)) < 2000
    assert _tree(held["cache"], contents=False) == _SNAP["tree"], (
        label,
        kind,
    )  # ... and nothing of the device changed
    assert repr(held["state"]) == _SNAP["state"], (label, kind)


def test_after_the_fuzz_the_held_model_still_trains(held) -> None:
    """The control: the same device, an honest message, after everything above."""
    if "contents" in _SNAP:  # the fuzz ran: every byte of the cache is still what it was
        assert _tree(held["cache"]) == _SNAP["contents"]
    arrays = ArrayRecord({k: Array(v.copy()) for k, v in held["heads"].items()})
    got = _send(held["node"], "train", held["base"] | {"server-round": 2}, held["state"], arrays=arrays)
    assert isinstance(got, Message) and not got.has_error(), got
    stored = held["cache"] / "models" / held["fp_a"][:16]
    assert MultiExitSER.from_pretrained(stored).backbone_fingerprint() == held["fp_a"]
    assert [p.name for p in (held["cache"] / "models").iterdir()] == [held["fp_a"][:16]]  # no staging left
