"""A lighter message step on devices (issue 12, item 5): what a cached train message no longer does.

- with DP off, a message's process never imports Opacus;
- the backbone fingerprint is verified once per identity of the model's files (a stamp in the cache),
  and a weight file rewritten with the same size (even its mtime restored) is verified again;
- with every feature cached the backbone is not built, and the reply is the one the full model gives;
- within one process a loaded backbone is reused, never once its files changed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedsd.checkpoint import CheckpointError
from fedsd.clients import assembly, dp_gate, model_store, train_task
from fedsd.data.manifest import ManifestRow, write_manifest
from fedsd.model import multiexit

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["neutral", "happy", "angry", "sad"]
TRAIN = {"server-round": 2, "local-epochs": 2, "batch-size": 4, "seed": 3}


@pytest.fixture(autouse=True)
def task_identity():
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture(autouse=True)
def fresh_process():
    """Every test starts as a fresh process would: no backbone kept from another test."""
    model_store._KEPT.entries.clear()
    yield
    model_store._KEPT.entries.clear()


def make_device(tmp: Path, model_dir: Path, n: int = 8) -> dict[str, str]:
    """A real device's node config: n one-second clips (two personal test ones), its own model copy."""
    data = tmp / "data"
    (data / "wav").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        sf.write(data / "wav" / f"u{i}.wav", (0.1 * rng.standard_normal(16000)).astype("float32"), 16000)
        label = LABELS[i % 4] if i % 3 else ""  # some unlabelled
        split = "personal_test" if i >= n - 2 else "train"
        label = label or (LABELS[0] if split == "personal_test" else "")
        rows.append(ManifestRow(f"u{i}", f"wav/u{i}.wav", label, label, "dev:s1", "dev", 1.0, 16000, split))
    write_manifest(rows, data / "manifest.csv")
    model = tmp / "model"
    shutil.copytree(model_dir, model)
    return {"exit": "2", "data": str(data / "manifest.csv"), "root": str(data), "model": str(model),
            "cache": str(tmp / "cache")}  # fmt: skip


def train_message(node: dict[str, str], config: dict[str, Any] | None = None) -> Message:
    msg = Message(RecordDict({"config": ConfigRecord(dict(config or TRAIN))}), dst_node_id=5,
                  message_type="train")  # fmt: skip
    ctx = Context(run_id=7, node_id=5, node_config=dict(node), state=RecordDict(), run_config={})
    return train_task.train(msg, ctx)


def reply_of(reply: Message) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays = {k: v.numpy() for k, v in reply.content.array_records["arrays"].items()}
    metrics = {k: v for k, v in reply.content.metric_records["metrics"].items() if k != "seconds"}
    return arrays, metrics


class Counter:
    """Counts the calls of a real function (it still runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> None:
        self.calls = 0
        real = getattr(owner, name)

        def counted(*a: Any, **kw: Any) -> Any:
            self.calls += 1
            return real(*a, **kw)

        monkeypatch.setattr(owner, name, counted)


def test_the_light_dp_gate_names_the_keys_of_the_dp_modules() -> None:
    from fedsd.clients.dp_training import LOCAL_METRICS_KEY
    from fedsd.security.privacy import DP_KEYS, DPSettings, PrivacyLedger

    assert set(DP_KEYS.values()) == dp_gate.DP_RECORD_KEYS
    assert dp_gate.LEDGER_STATE_KEY == PrivacyLedger.STATE_KEY
    assert dp_gate.LOCAL_METRICS_KEY == LOCAL_METRICS_KEY
    for device, server in (({}, {}), ({"dp-delta": ""}, {"x": 1}), ({}, {"dp-noise-multiplier": 0.5})):
        assert dp_gate.dp_keys_present(device, server) == (
            DPSettings.from_records(device, server) is not None
        )


def test_a_train_message_without_dp_never_imports_opacus(tmp_path: Path, tiny_model_dir: Path) -> None:
    """As Flower runs it: a fresh process, the installed ClientApp object; twice (cold, then cached)."""
    node = make_device(tmp_path, tiny_model_dir)
    script = textwrap.dedent(
        f"""
        import json, sys
        from flwr.app import ConfigRecord, Context, Message, RecordDict
        from flwr.supercore.task_identity import TaskIdentity
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
        from fedsd.clients.client_app import app
        node = json.loads({json.dumps(json.dumps(node))})
        out = []
        for _ in range(2):
            msg = Message(RecordDict({{"config": ConfigRecord({TRAIN!r})}}), dst_node_id=5, message_type="train")
            ctx = Context(run_id=7, node_id=5, node_config=node, state=RecordDict(), run_config={{}})
            reply = app(msg, ctx)
            out.append(dict(reply.content.metric_records["metrics"]))
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("opacus", "matplotlib"))
        print(json.dumps({{"heavy": heavy, "metrics": out}}))
        """
    )
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=600, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    first, second = result["metrics"]
    assert first["cache-misses"] > 0 and second["cache-misses"] == 0


def test_the_fingerprint_is_verified_once_per_file_identity(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = make_device(tmp_path, tiny_model_dir)
    hashes = Counter(monkeypatch, multiexit, "backbone_fingerprint")
    train_message(node)
    assert hashes.calls == 1  # from_pretrained verifies fedsd.json's fingerprint; nothing hashes again
    stamps = list((tmp_path / "cache" / model_store.STAMP_DIR).glob("*.json"))
    assert (
        len(stamps) == 1
        and json.loads(stamps[0].read_text())["fingerprint"]
        == json.loads((Path(node["model"]) / "fedsd.json").read_text())["fingerprint"]
    )
    model_store._KEPT.entries.clear()  # the next message: a fresh process
    train_message(node)
    assert hashes.calls == 1  # the stamp vouches for the unchanged files

    # Rewrite a weight file with the same size and restore its mtime: the stamp no longer holds.
    weights = next((Path(node["model"]) / "backbone").glob("*.safetensors"))
    st = weights.stat()
    blob = bytearray(weights.read_bytes())
    blob[-64:] = bytes(b ^ 0x55 for b in blob[-64:])  # tensor bytes (the header is at the start)
    weights.write_bytes(bytes(blob))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_size == st.st_size and weights.stat().st_mtime_ns == st.st_mtime_ns
    model_store._KEPT.entries.clear()
    with pytest.raises(CheckpointError, match="fingerprint"):
        train_message(node)
    assert hashes.calls == 2  # verified again, and refused


def test_all_features_cached_no_backbone_same_reply(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = make_device(tmp_path, tiny_model_dir)
    first = train_message(node)  # fills the cache (the backbone runs) and writes the stamp
    assert first.content.metric_records["metrics"]["cache-misses"] > 0

    model_store._KEPT.entries.clear()  # a fresh process
    builds = Counter(monkeypatch, multiexit, "load_backbone")
    cached = train_message(node)
    assert builds.calls == 0  # heads only: no backbone weight was read
    arrays, metrics = reply_of(cached)
    assert metrics["cache-misses"] == 0 and metrics["cache-hits"] > 0

    model_store._KEPT.entries.clear()
    token = assembly.NEED_WEIGHTS.set(True)  # the same message handled with the backbone
    try:
        full = train_message(node)
    finally:
        assembly.NEED_WEIGHTS.reset(token)
    assert builds.calls == 1
    arrays_full, metrics_full = reply_of(full)
    assert metrics == metrics_full
    assert arrays.keys() == arrays_full.keys()
    for k in arrays:
        np.testing.assert_array_equal(arrays[k], arrays_full[k])


def test_a_missing_feature_falls_back_to_the_backbone(tmp_path: Path, tiny_model_dir: Path) -> None:
    node = make_device(tmp_path, tiny_model_dir)
    train_message(node)
    model_store._KEPT.entries.clear()
    shutil.rmtree(tmp_path / "cache" / "features")  # stamp still valid, features gone
    reply = train_message(node)
    assert reply.content.metric_records["metrics"]["cache-misses"] > 0


def test_a_process_reuses_a_loaded_backbone_until_its_files_change(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    cache = tmp_path / "cache"
    a = model_store.load_model(model, cache)
    b = model_store.load_model(model, cache)
    assert a.backbone is b.backbone and a.heads is not b.heads  # fresh heads every message
    with __import__("torch").no_grad():
        next(a.heads.parameters()).add_(1.0)  # a message trained its heads: the next one starts fresh
    c = model_store.load_model(model, cache)
    assert all((p == q).all() for p, q in zip(c.heads.parameters(), b.heads.parameters(), strict=True))
    meta = model / "fedsd.json"
    meta.write_text(meta.read_text())  # same content, new identity: loaded and verified again
    d = model_store.load_model(model, cache)
    assert d.backbone is not a.backbone
    assert d.backbone_fingerprint() == a.backbone_fingerprint()


def test_a_process_reuses_the_heads_only_skeleton_until_the_files_change(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """A heads-only model (a stamp vouches for the files) reuses one skeleton per process: building it was
    the costliest step of a cached message in simulation. Heads are fresh every time; new files, new one."""
    import torch

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    cache = tmp_path / "cache"
    model_store._KEPT.entries.clear()
    model_store.load_model(model, cache)  # verifies the files and writes the stamp
    model_store._KEPT.entries.clear()  # a fresh process
    a = model_store.load_model(model, cache, weights=False)
    b = model_store.load_model(model, cache, weights=False)
    assert not a.has_backbone_weights and a.backbone is b.backbone and a.heads is not b.heads
    with torch.no_grad():
        next(a.heads.parameters()).add_(1.0)
    c = model_store.load_model(model, cache, weights=False)
    assert all(torch.equal(p, q) for p, q in zip(c.heads.parameters(), b.heads.parameters(), strict=True))
    meta = model / "fedsd.json"
    meta.write_text(meta.read_text())  # a new identity: no stamp for it, so a full, verified load
    d = model_store.load_model(model, cache, weights=False)
    assert d.backbone is not a.backbone and d.has_backbone_weights
