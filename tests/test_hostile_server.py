"""A hostile server must not make a device write outside its cache (issue "Hostile servers, lying devices").

The device's real ClientApp (``make_client_app``) gets server messages with path traversal, absolute
paths, NUL bytes, overlong ids, unicode look-alikes, malformed configs, heads and model files. Every one
must end in a clean refusal — a :class:`DeviceError` whose message says what was refused, which the
Flower runtime turns into the error reply — and the filesystem of a temporary HOME (with a ``~/.ssh``
to protect) must be unchanged outside the device's cache. The last tests fuzz the same handlers with
hypothesis (derandomized).
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
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedsd.clients.client_app import make_client_app
from fedsd.clients.device import DeviceError, HostileMessage
from fedsd.clients.events import message_event as _event
from fedsd.clients.supervisor import describe_event
from fedsd.data.manifest import ManifestRow, write_manifest
from fedsd.security.untrusted import (
    UntrustedValueError,
    config_float,
    config_int,
    fingerprint,
    identifier,
    model_file,
    printable,
    sha256_hex,
)
from fedsd.security.wire import QUERY_DONE, QUERY_INFO, QUERY_MODEL, checkpoint_to_record

PWN = "/tmp/fedsd-pwn"  # 14 characters: an absolute "fingerprint" the old code kept whole
HOSTILE_IDS = [
    "../../../.ssh",
    "../../../.ssh/authorized_keys",
    f"{PWN}1",
    "/",
    "abc\x00def",
    "x" * 65,
    ".hidden",
    "..",
    "a/b",
    "a\\b",
    "ｅｖｉｌ",  # fullwidth letters: isalnum() in Python, not in [A-Za-z0-9]
    "id\u202e",  # right-to-left override
    "id\n",
    "",
]
HOSTILE_FINGERPRINTS = [
    *[x for x in HOSTILE_IDS if x],
    "A" * 64,  # upper-case hex is not what sha256().hexdigest() writes
    "０" * 64,  # fullwidth digits
    "ab" * 32 + "\n",
    "ab" * 32 + "/..",
    "ab" * 31,
]


# --------------------------------------------------------------------------------------------- the validators


@pytest.mark.parametrize("value", HOSTILE_FINGERPRINTS + [None, 123, b"ab" * 32, ["ab" * 32]])
def test_fingerprint_and_digest_must_be_sha256_hex(value) -> None:
    with pytest.raises(UntrustedValueError, match="fingerprint"):
        fingerprint(value)
    with pytest.raises(UntrustedValueError):
        sha256_hex(value)


@pytest.mark.parametrize("value", [*[x for x in HOSTILE_IDS if x], None, 7, b"abc"])
def test_identifier_is_a_plain_name(value) -> None:
    with pytest.raises(UntrustedValueError, match="federation-id") as err:
        identifier(value, "federation-id")
    assert "\x00" not in str(err.value) and "\u202e" not in str(err.value) and "\n" not in str(err.value)


def test_valid_values_pass() -> None:
    fp = hashlib.sha256(b"x").hexdigest()
    assert fingerprint(fp) == fp and fingerprint("", allow_empty=True) == ""
    assert identifier("a1b2c3d4e5f60718") == "a1b2c3d4e5f60718" and identifier("run_2.v-1") == "run_2.v-1"
    for name in (
        "fedsd.json",
        "heads.safetensors",
        "backbone/config.json",
        "backbone/model-00001-of-00002.safetensors",
    ):
        assert model_file(name) == name
    for name in (
        "../fedsd.json",
        "/etc/passwd",
        "backbone/../x",
        "run.sh",
        "fedsd.json\x00",
        "Backbone/config.json",
    ):
        with pytest.raises(UntrustedValueError):
            model_file(name)
    assert config_int({"n": 3.0}, "n", 1, 1, 5) == 3 and config_float({}, "lr", 0.1, 0, 1) == 0.1
    for bad in (math.nan, math.inf, "1", True, None, [1]):
        with pytest.raises(UntrustedValueError):
            config_float({"lr": bad}, "lr", 0.1, 0, 1)
    assert printable("a\x1b[2Jb\n\u202e") == "a\\x1b[2Jb\\n\\u202e"


# --------------------------------------------------------------------------------------------- a device at HOME


pytestmark = pytest.mark.usefixtures("task_identity")  # Flower's task identity, as in a ClientApp/ServerApp process (conftest)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    """A HOME with ~/.ssh, a file elsewhere, a working directory, and two devices caching under HOME."""
    root = tmp_path_factory.mktemp("fs")
    home = root / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "authorized_keys").write_text("ssh-ed25519 AAAA the-owner\n")
    (root / "outside").mkdir()
    (root / "outside" / "keep.txt").write_text("keep")
    (root / "work").mkdir()
    data = root / "data"
    rows = [
        ManifestRow(f"u{i}", f"wav/u{i}.wav", "happy", "happy", "dev:s1", "dev", 1.0, 16000, "train")
        for i in range(6)
    ]
    write_manifest(rows, data / "manifest.csv")
    cache = home / ".cache" / "fedsd"
    delivery = {"exit": 1, "data": str(data / "manifest.csv"), "root": str(data), "cache": str(cache)}
    owned = delivery | {"model": str(tiny_model_dir)}  # an operator's own --model
    fp = json.loads((tiny_model_dir / "fedsd.json").read_text())["fingerprint"]
    mp = pytest.MonkeyPatch()
    mp.setenv("HOME", str(home))
    mp.chdir(root / "work")
    yield {"root": root, "home": home, "cache": cache, "delivery": delivery, "owned": owned, "fp": fp,
           "model": tiny_model_dir}  # fmt: skip
    mp.undo()


APP = make_client_app()


def snapshot(root: Path) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st_ = p.lstat()
            out[str(p.relative_to(root))] = (st_.st_mode, st_.st_size, st_.st_mtime_ns)
    return out


def pwned() -> list[str]:
    return sorted(str(p) for p in Path("/tmp").glob("fedsd-pwn*"))


def changed_outside_cache(world, before: dict[str, tuple]) -> list[str]:
    """Paths created, changed or removed outside the cache (its parent folders may be created)."""
    after = snapshot(world["root"])
    cache = world["cache"].relative_to(world["root"])
    allowed = {str(cache), *(str(p) for p in cache.parents)}
    diff = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    return sorted(k for k in diff if k not in allowed and not k.startswith(str(cache) + os.sep))


def call(world, node: dict[str, Any], message_type: str, config: dict[str, Any] | None = None,
         **records: Any) -> Message | DeviceError:  # fmt: skip
    """Hand one server message to the device's ClientApp; its reply, or the DeviceError it refused with."""
    content: dict[str, Any] = dict(records)
    if config is not None:
        content["config"] = ConfigRecord(config)
    msg = Message(RecordDict(content), dst_node_id=5, message_type=message_type)
    ctx = Context(run_id=7, node_id=5, node_config=dict(node), state=RecordDict(), run_config={})
    try:
        return APP(msg, ctx)
    except DeviceError as e:
        return e


def model_records(model_dir: Path) -> dict[str, Any]:
    files, digests = checkpoint_to_record(model_dir)
    return {"files": files, "digests": digests}


def refused(result: Any, *words: str) -> str:
    assert isinstance(result, HostileMessage), result
    text = str(result)
    assert text.startswith("refused the server's message") and all(w in text for w in words), text
    assert text.isprintable(), text
    return text


@pytest.mark.parametrize("fp", HOSTILE_FINGERPRINTS)
@pytest.mark.parametrize("kind", [QUERY_MODEL, QUERY_INFO, "train", "evaluate"])
def test_hostile_fingerprint_is_refused_and_nothing_is_written(world, fp: str, kind: str) -> None:
    before = snapshot(world["root"])
    records = model_records(world["model"]) if kind == QUERY_MODEL else {}
    refused(call(world, world["delivery"], kind, {"fingerprint": fp}, **records), "fingerprint")
    assert changed_outside_cache(world, before) == [] and pwned() == []
    assert (world["home"] / ".ssh" / "authorized_keys").read_text() == "ssh-ed25519 AAAA the-owner\n"
    assert not (world["cache"] / "models").exists() or not any((world["cache"] / "models").iterdir())


@pytest.mark.parametrize("fid", [x for x in HOSTILE_IDS if x])
def test_hostile_federation_id_never_names_the_privacy_ledger(world, fid: str) -> None:
    before = snapshot(world["root"])
    config = {"fingerprint": world["fp"], "federation-id": fid, "dp-noise-multiplier": 1.0, "num-rounds": 2}
    refused(call(world, world["owned"], "train", config), "federation-id")
    assert changed_outside_cache(world, before) == [] and pwned() == []


def _files(names_and_data: dict[str, bytes], digests: dict[str, str] | None = None) -> dict[str, Any]:
    files = ArrayRecord({n: Array(np.frombuffer(d, np.uint8).copy()) for n, d in names_and_data.items()})
    sums = (
        digests
        if digests is not None
        else {n: hashlib.sha256(d).hexdigest() for n, d in names_and_data.items()}
    )
    return {"files": files, "digests": ConfigRecord(sums)}


@pytest.mark.parametrize(
    ("records", "words"),
    [
        (_files({"../../../.ssh/authorized_keys": b"ssh-rsa EVIL"}), "not a file of a fedsd model"),
        (_files({f"{PWN}3": b"x"}), "not a file of a fedsd model"),
        (_files({"backbone/../../x": b"x"}), "not a file of a fedsd model"),
        (_files({"fedsd.json\x00.sh": b"x"}), "\\x00"),
        (_files({"run.sh": b"#!/bin/sh"}), "not a file of a fedsd model"),
        (_files({"fedsd.json": b"{}"}, {"fedsd.json": "../../x"}), "sha256"),
        (_files({"fedsd.json": b"{}"}, {"fedsd.json": hashlib.sha256(b"{}").hexdigest().upper()}), "sha256"),
        (_files({"fedsd.json": b"{}"}, {"fedsd.json": 5}), "sha256"),  # type: ignore[dict-item]
        ({"files": ArrayRecord()}, "'digests'"),
    ],
)
def test_hostile_model_delivery_is_refused_before_anything_is_written(world, records, words) -> None:
    before = snapshot(world["root"])
    refused(call(world, world["delivery"], QUERY_MODEL, {"fingerprint": "ab" * 32}, **records), words)
    assert changed_outside_cache(world, before) == [] and pwned() == []
    assert not (world["cache"] / "models").exists() or not any((world["cache"] / "models").iterdir())


def test_corrupt_or_unloadable_delivery_leaves_nothing_behind(world) -> None:
    before = snapshot(world["root"])
    corrupt = _files({"fedsd.json": b"{}"}, {"fedsd.json": "0" * 64})
    got = call(world, world["delivery"], QUERY_MODEL, {"fingerprint": "ab" * 32}, **corrupt)
    assert isinstance(got, DeviceError) and "sha256 mismatch" in str(got)
    garbage = _files({"fedsd.json": b"{}", "heads.safetensors": b"\x00" * 8})  # right names and sums
    got = call(world, world["delivery"], QUERY_MODEL, {"fingerprint": "ab" * 32}, **garbage)
    assert isinstance(got, DeviceError) and "fedsd.json" in str(got)
    assert not (world["cache"] / "models" / ("ab" * 8)).exists()
    assert changed_outside_cache(world, before) == []


def test_a_genuine_delivery_is_still_stored_under_its_fingerprint(world) -> None:
    reply = call(
        world, world["delivery"], QUERY_MODEL, {"fingerprint": world["fp"]}, **model_records(world["model"])
    )
    assert isinstance(reply, Message), reply
    stored = Path(str(reply.content.config_records["info"]["stored"]))
    assert stored == world["cache"] / "models" / world["fp"][:16] and (stored / "fedsd.json").is_file()
    info = call(world, world["delivery"], QUERY_INFO, {"fingerprint": world["fp"]})
    assert isinstance(info, Message) and info.content.config_records["info"]["has-model"] is True
    import shutil

    shutil.rmtree(world["cache"] / "models")


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"lr": math.nan}, "'lr'"),
        ({"lr": "0.1"}, "'lr'"),
        ({"lr": -1.0}, "'lr'"),
        ({"local-epochs": 10**12}, "'local-epochs'"),
        ({"local-epochs": 2.5}, "'local-epochs'"),
        ({"batch-size": 0}, "'batch-size'"),
        ({"mode": "rm -rf /"}, "'mode'"),
        ({"teacher": "../deep"}, "'teacher'"),
        ({"train-exits": b"upto"}, "'train-exits'"),
        ({"temperature": math.inf}, "'temperature'"),
        ({"w-kd": -math.inf}, "'w-kd'"),
        ({"server-round": -1}, "'server-round'"),
        ({"round-offset": "1; reboot"}, "'round-offset'"),
        ({"seed": "x"}, "'seed'"),
        ({"seed": 2**70}, "'seed'"),
        ({"num-rounds": "many"}, "'num-rounds'"),
        ({"default-exit": "teacher"}, "'default-exit'"),
    ],
)
@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_hostile_training_settings_are_refused_before_the_model_loads(world, config, words, kind) -> None:
    before = snapshot(world["root"])
    refused(call(world, world["delivery"], kind, {"fingerprint": world["fp"]} | config), words)
    assert changed_outside_cache(world, before) == []


def test_hostile_dp_settings_are_refused(world) -> None:
    config = {"fingerprint": world["fp"], "dp-noise-multiplier": math.nan, "federation-id": "abc"}
    got = call(world, world["owned"], "train", config)
    assert isinstance(got, DeviceError) and "noise_multiplier" in str(got)


@pytest.mark.parametrize(
    ("arrays", "words"),
    [
        ({"heads.1.norm.weight": np.zeros(7, np.float32)}, "(7,)"),
        ({"heads.1.norm.weight": np.full(128, np.nan, np.float32)}, "non-finite"),
        ({"heads.1.norm.weight": np.zeros(128, np.float64)}, "float64"),
        ({"heads.1.evil": np.zeros(3, np.float32)}, "not a parameter"),
        ({"heads..x": np.zeros(3, np.float32)}, "heads."),
        ({"../../x": np.zeros(3, np.float32)}, "heads."),
        ({"heads.1.norm.weight\x00": np.zeros(128, np.float32)}, "\\x00"),
    ],
)
def test_hostile_heads_are_refused(world, arrays, words) -> None:
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    refused(call(world, world["owned"], "train", {"fingerprint": world["fp"]}, arrays=record), words)


def test_server_text_never_reaches_the_terminal_raw() -> None:
    cfg = {"rounds": "\x1b[2J3", "status": "../x", "kind": "train", "error": "x", "server-round": "1\x1b"}
    msg = Message(RecordDict({"config": ConfigRecord(cfg)}), dst_node_id=5, message_type=QUERY_DONE)
    ctx = Context(run_id=7, node_id=5, node_config={}, state=RecordDict(), run_config={})
    ev = _event(msg, None, ctx, 0.1)
    assert ev["kind"] == "done" and "rounds" not in ev and "status" not in ev and "round" not in ev
    assert "error" not in ev
    line = describe_event({"kind": "train", "round": 1, "error": "HostileMessage: \x1b[31mred\u202e"})
    assert line.isprintable() and "\\x1b" in line


# --------------------------------------------------------------------------------------------- fuzz

_NASTY_TEXT = st.sampled_from(
    HOSTILE_FINGERPRINTS + ["ab" * 32, "x", "fedsd.json", "heads.safetensors"]
) | st.text(st.characters(codec="utf-8"), max_size=70)
_VALUES = (
    _NASTY_TEXT
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | st.binary(max_size=16)
    | st.lists(st.integers(-2, 2), max_size=3)
)
_KEYS = st.sampled_from(
    [
        "fingerprint", "federation-id", "lr", "local-epochs", "batch-size", "mode", "teacher", "train-exits",
        "temperature", "w-ce", "seed", "server-round", "round-offset", "num-rounds", "default-exit",
        "dp-noise-multiplier", "dp-target-epsilon", "dp-delta", "dp-rounds", "dp-accountant",
    ]
) | _NASTY_TEXT  # fmt: skip


@st.composite
def server_message(draw: st.DrawFn) -> tuple[str, dict[str, Any], dict[str, Any]]:
    kind = draw(st.sampled_from([QUERY_MODEL, QUERY_INFO, "train", "evaluate"]))
    config = draw(st.dictionaries(_KEYS, _VALUES, max_size=5))
    if draw(st.booleans()):
        config["fingerprint"] = draw(st.sampled_from(["ab" * 32, "0" * 64]))
    records: dict[str, Any] = {}
    if kind == QUERY_MODEL:
        names = draw(st.lists(_NASTY_TEXT, max_size=3, unique=True))
        blobs = {n: draw(st.binary(max_size=32)) for n in names}
        sums = {
            n: hashlib.sha256(b).hexdigest() if draw(st.booleans()) else draw(_VALUES)
            for n, b in blobs.items()
        }
        try:
            records = _files(blobs, sums)
        except (TypeError, ValueError):  # Flower refuses the key or value itself: it never arrives
            records = {}
    return kind, config, records


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
@given(server_message())
def test_fuzz_server_messages_end_in_a_reply_or_a_clean_refusal(world, case) -> None:
    kind, config, records = case
    try:
        ConfigRecord(config)
    except (TypeError, ValueError):
        event("not representable on the wire")
        return
    before = snapshot(world["root"])
    try:
        got = call(world, world["delivery"], kind, config, **records)
    except Exception as e:  # anything but a DeviceError is a crash
        pytest.fail(f"{kind} {config!r}: {type(e).__name__}: {e}")
    event(f"{kind}: {type(got).__name__}")
    if isinstance(got, DeviceError):
        assert str(got).isprintable(), str(got)
    else:
        assert kind == QUERY_INFO, (kind, config)  # nothing else can succeed on a device without a model
    assert changed_outside_cache(world, before) == [] and pwned() == []
    models = world["cache"] / "models"
    assert not models.exists() or not any(models.iterdir())
