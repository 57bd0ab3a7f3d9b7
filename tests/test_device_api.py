"""`fedsd.api.Device`, the object behind `fedsd client run`: its checks (before anything starts), its
non-blocking use (start/stop). Its real loopback round (with ``out`` and personalisation) runs beside
``api.Server`` in tests/test_server_api.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from harness import Procs, TlsEcho, flat

from fedsd import api
from fedsd.clients.service import DeviceEvent, DeviceOptionError
from fedsd.clients.supervisor import EXIT_INTERRUPTED

START_TIMEOUT = 180.0
RUN_TIMEOUT = 300.0


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedsd.security.certs import create_certificates, generate_node_key

    tmp = tmp_path_factory.mktemp("tls")
    create_certificates(tmp)
    generate_node_key(tmp / "node.key")
    return tmp


def _device(corpus: Path, cache: Path, superlink: str = "127.0.0.1:9", **kw) -> api.Device:
    return api.Device(superlink, **({"data": corpus / "manifest.csv", "root": corpus, "cache": cache,
                                     "insecure": True} | kw))  # fmt: skip


# ----------------------------------------------------------------------------- checks, nothing started
def test_contradictory_or_missing_options_raise_before_anything_starts(
    small_corpus: Path, tiny_model_dir: Path, tls: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    empty = tmp_path / "empty.csv"
    empty.write_text((small_corpus / "manifest.csv").read_text().splitlines()[0] + "\n")
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    cases = [  # (options, exit code of `fedsd client run`, pieces of the message)
        ({"insecure": False}, 2, ["--root-cert CA.pem", "--insecure"]),
        ({"root_cert": tls / "ca.pem"}, 2, ["--root-cert and --insecure contradict"]),
        ({"auth_key": tls / "node.key"}, 2, ["--auth-key", "needs TLS"]),
        ({"insecure": False, "root_cert": tmp_path / "nope.pem"}, 2, ["--root-cert", "nope.pem", "not found"]),
        ({"insecure": False, "root_cert": tls / "ca.pem", "auth_key": tls / "ca.pem"}, 2, ["OpenSSH"]),
        ({"superlink": "127.0.0.1:notaport"}, 2, ["--server"]),
        ({"exit": 0}, 2, ["--exit 0", ">= 1"]),
        ({"data": tmp_path / "missing.csv"}, 1, ["--data", "missing.csv", "not found"]),
        ({"data": empty}, 1, ["--data", "no rows"]),
        ({"root": tmp_path / "nodir"}, 1, ["--root", "nodir", "directory not found"]),
        ({"root": tmp_path}, 1, ["--root", "72 of 72 audio files", "missing"]),
        ({"model": not_a_model}, 1, ["--model", "no fedsd.json"]),
        ({"model": tiny_model_dir, "exit": 7}, 2, ["--exit 7", "has exits [1, 2, 3, 4]"]),
        ({"dp_noise_multiplier": 1.0, "dp_target_epsilon": 3.0}, 2, ["contradict each other"]),
        ({"dp_rounds": 3}, 2, ["--dp-rounds only goes with --dp-target-epsilon"]),
        ({"dp_noise_multiplier": 1.0, "dp_delta": 2.0}, 2, ["--dp-*", "delta"]),
        ({"personalize_epochs": -1}, 2, ["--personalize-epochs -1"]),
        ({"server_timeout": 0}, 2, ["--server-timeout"]),
    ]
    for options, code, pieces in cases:
        with pytest.raises(DeviceOptionError) as info:
            _device(small_corpus, cache, **options)
        text = flat(str(info.value))
        assert info.value.code == code, (options, text)
        for piece in pieces:
            assert piece in text, (options, piece, text)
    assert not cache.exists()  # no session, no SuperNode


def test_a_server_on_the_other_transport_is_refused_before_a_supernode_starts(
    small_corpus: Path, tls: Path, tmp_path: Path
) -> None:
    plain, tls_server = TlsEcho(None, None), TlsEcho(tls / "server.pem", tls / "server.key")
    try:
        dev = _device(small_corpus, tmp_path / "c1", superlink=f"127.0.0.1:{tls_server.port}")
        with pytest.raises(DeviceOptionError, match="serves TLS: start this device with --root-cert"):
            dev.start()
        dev = _device(small_corpus, tmp_path / "c2", superlink=f"127.0.0.1:{plain.port}", insecure=False,
                      root_cert=tls / "ca.pem")  # fmt: skip
        with pytest.raises(DeviceOptionError, match="serves plain HTTP"):
            dev.run()
    finally:
        plain.sock.close()
        tls_server.sock.close()
    assert not (tmp_path / "c1").exists() and not (tmp_path / "c2").exists()


def test_start_then_stop_ends_the_supernode(small_corpus: Path, tmp_path: Path, procs: Procs) -> None:
    """Non-blocking use: start() returns at once, stop() ends the session (130) and its SuperNode, from
    a thread that is not the one supervising."""
    events: list[DeviceEvent] = []
    dev = _device(small_corpus, tmp_path / "cache", superlink=f"127.0.0.1:{procs.port()}", exit=1,
                  on_event=events.append)  # fmt: skip
    assert dev.start() is dev
    deadline = time.monotonic() + 60
    while not any("SuperNode started" in e.text for e in events) and time.monotonic() < deadline:
        assert dev.wait(0.2) is None, [e.text for e in events]
    node = dev._supervisor.node  # the SuperNode process of this session
    assert node is not None and node.alive()
    assert dev.stop(timeout=30) == EXIT_INTERRUPTED == dev.returncode
    assert not node.alive()
    texts = [e.text for e in events]
    assert texts[0].startswith("warning: --insecure") and any(t.startswith("connecting to ") for t in texts)
    assert any("stop requested" in t for t in texts), texts
    assert dev.session_dir is not None and (dev.session_dir / "supernode.log").is_file()
    with pytest.raises(RuntimeError, match="already been started"):
        dev.start()
