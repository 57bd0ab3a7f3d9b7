"""TLS and node authentication: key material (fast, no processes), flag checks of the commands (fast,
CliRunner, nothing starts), and one real loopback deployment that exercises every refusal at once.

The slow test runs ONE federated run (1 round, tiny model, server started with --tls-dir --auth) and
points five devices at it: one registered device with the right CA (trains; the run completes) and four
that must stay out — the wrong CA, a key the server does not know, no key at all, and plain HTTP.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from harness import Procs, TlsEcho, env, flat, write_config
from typer.testing import CliRunner

from fedsd.cli import app
from fedsd.launch import free_port, port_open, probe_transport

runner = CliRunner()

START_TIMEOUT = 300.0  # no base-model training (--base-model): data prep + SuperLink start
RUN_TIMEOUT = 600.0  # handshake + 1 round + done; generous: a failure timeout, not a benchmark


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _handshake(port: int, ca: Path, server_hostname: str) -> None:
    ctx = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        assert tls.version() is not None


# ----------------------------------------------------------------------------- fast: key material
def test_certs_create_makes_a_chain_that_verifies(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    result = runner.invoke(
        app,
        ["certs", "create", "--out", str(out), "--host", "server.lan", "--host", "10.1.2.3", "--days", "30"],
    )
    assert result.exit_code == 0, result.output
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer does not match
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"server.lan", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    days = (server.not_valid_after_utc - server.not_valid_before_utc).days
    assert 30 <= days <= 31
    assert _mode(out / "ca.key") == 0o600 and _mode(out / "server.key") == 0o600
    assert _mode(out / "ca.pem") == 0o644 and _mode(out / "server.pem") == 0o644
    key = serialization.load_pem_private_key((out / "server.key").read_bytes(), password=None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # atomic writes left no temp file

    # Python's ssl (uvicorn's server side, httpx's client side) accepts the chain for loopback names
    # and refuses it with another CA.
    echo = TlsEcho(out / "server.pem", out / "server.key")
    try:
        _handshake(echo.port, out / "ca.pem", "127.0.0.1")
        _handshake(echo.port, out / "ca.pem", "localhost")
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            _handshake(echo.port, out / "ca.pem", "elsewhere.lan")
        other = tmp_path / "other"
        assert runner.invoke(app, ["certs", "create", "--out", str(other)]).exit_code == 0
        with pytest.raises(ssl.SSLCertVerificationError):
            _handshake(echo.port, other / "ca.pem", "127.0.0.1")
        assert probe_transport("127.0.0.1", echo.port) == "tls"
    finally:
        echo.close()
    plain = TlsEcho(None, None)
    try:
        assert probe_transport("127.0.0.1", plain.port) == "plain"
    finally:
        plain.close()
    assert probe_transport("127.0.0.1", free_port()) is None


def test_certs_create_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    assert runner.invoke(app, ["certs", "create", "--out", str(out)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = runner.invoke(app, ["certs", "create", "--out", str(out)])
    assert result.exit_code == 1, result.output
    text = flat(result.output)
    assert "already exist" in text and "--force" in text and "ca.key" in text, text
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    result = runner.invoke(app, ["certs", "create", "--out", str(out), "--force"])
    assert result.exit_code == 0, result.output
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(after) == sorted(before) and all(after[k] != before[k] for k in before)


@pytest.mark.parametrize("host", ["https://server.lan", "server.lan:8000", "bad host", ""])
def test_certs_create_rejects_a_host_that_is_not_a_name_or_ip(tmp_path: Path, host: str) -> None:
    result = runner.invoke(app, ["certs", "create", "--out", str(tmp_path / "tls"), "--host", host])
    assert result.exit_code == 2, result.output
    assert "--host" in flat(result.output)
    assert not (tmp_path / "tls").exists()


def test_client_keygen_writes_an_openssh_ec_key_flower_loads(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    key_path = tmp_path / "keys" / "device.key"
    result = runner.invoke(app, ["client", "keygen", "--out", str(key_path)])
    assert result.exit_code == 0, result.output
    pub_path = tmp_path / "keys" / "device.key.pub"
    assert _mode(key_path) == 0o600
    assert key_path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert pub_path.read_text().startswith("ecdsa-sha2-nistp384 ")
    # exactly how flower-supernode loads --auth-supernode-private-key (flower_supernode.py)
    private = serialization.load_ssh_private_key(key_path.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    # and how `flwr supernode register` loads the public key: the same key
    assert try_load_public_key(pub_path) == public_key_to_bytes(private.public_key())

    again = runner.invoke(app, ["client", "keygen", "--out", str(key_path)])
    assert again.exit_code == 1 and "already exist" in flat(again.output), again.output
    assert (
        serialization.load_ssh_private_key(key_path.read_bytes(), None).public_key() == private.public_key()
    )
    assert runner.invoke(app, ["client", "keygen", "--out", str(key_path), "--force"]).exit_code == 0
    assert (
        serialization.load_ssh_private_key(key_path.read_bytes(), None).public_key() != private.public_key()
    )


# ----------------------------------------------------------------------------- fast: flag checks
@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from fedsd.security import create_certificates, generate_node_key

    tmp = tmp_path_factory.mktemp("material")
    create_certificates(tmp / "tls")
    create_certificates(tmp / "other")
    generate_node_key(tmp / "good.key")
    generate_node_key(tmp / "stranger.key")
    generate_node_key(tmp / "spare.key")
    return {
        "tmp": tmp,
        "tls": tmp / "tls",
        "other": tmp / "other",
        "good": tmp / "good.key",
        "stranger": tmp / "stranger.key",
        "spare": tmp / "spare.key",
    }


def _server_start(args: list[str], tmp_path: Path) -> tuple[int, str, Path, int]:
    out = tmp_path / "run"
    port = free_port()
    result = runner.invoke(
        app,
        [
            "server",
            "start",
            "--config",
            str(tmp_path / "unused.yaml"),
            "--out",
            str(out),
            "--port",
            str(port),
            *args,
        ],
        env=env(),
    )
    return result.exit_code, flat(result.output), out, port


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], ["--tls-dir", "fedsd certs create", "--insecure"]),
        (["--tls-dir", "{tls}", "--insecure"], ["contradict"]),
        (["--insecure", "--auth"], ["--auth", "needs TLS", "--tls-dir"]),
        (["--tls-dir", "{tls}", "--node-key", "{good}.pub"], ["--node-key", "add --auth"]),
        (
            ["--tls-dir", "{tls}", "--auth", "--node-key", "{good}"],
            ["--node-key", "not an OpenSSH public key"],
        ),
        (["--tls-dir", "{nowhere}"], ["directory not found", "fedsd certs create"]),
        (["--tls-dir", "{tmp}"], ["server.pem is missing"]),
        (["--tls-dir", "{tls}", "--host", "10.9.9.9"], ["10.9.9.9", "--host 10.9.9.9"]),
    ],
)
def test_server_start_security_flags_are_checked_before_anything_starts(
    material: dict[str, Path], tmp_path: Path, args: list[str], expected: list[str]
) -> None:
    names = {k: str(v) for k, v in material.items()} | {"nowhere": str(tmp_path / "nowhere")}
    (material["tmp"] / "ca.pem").write_bytes((material["tls"] / "ca.pem").read_bytes())  # only a CA
    code, text, out, port = _server_start([a.format(**names) for a in args], tmp_path)
    assert code == 2, text
    for piece in expected:
        assert piece in text, (piece, text)
    assert not out.exists()
    assert not port_open("127.0.0.1", port, timeout=0.5)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], ["--root-cert", "--insecure"]),
        (["--root-cert", "{tls}/ca.pem", "--insecure"], ["contradict"]),
        (["--insecure", "--auth-key", "{good}"], ["--auth-key", "needs TLS", "--root-cert"]),
        (["--root-cert", "{tmp}/missing.pem"], ["missing.pem", "not found"]),
        (["--root-cert", "{good}.pub"], ["not a PEM certificate"]),
        (
            ["--root-cert", "{tls}/ca.pem", "--auth-key", "{good}.pub"],
            ["not an unencrypted OpenSSH private key"],
        ),
        (["--root-cert", "{tls}/ca.pem", "--auth-key", "{tls}/ca.key"], ["OpenSSH private key"]),
    ],
)
def test_client_run_security_flags_are_checked_before_anything_starts(
    material: dict[str, Path], tmp_path: Path, args: list[str], expected: list[str]
) -> None:
    names = {k: str(v) for k, v in material.items()}
    result = runner.invoke(
        app,
        ["client", "run", "--server", "127.0.0.1:9", "--data", str(tmp_path / "m.csv"), "--root", str(tmp_path),
         "--cache", str(tmp_path / "cache"), *[a.format(**names) for a in args]],
        env=env(),
    )  # fmt: skip
    text = flat(result.output)
    assert result.exit_code == 2, text
    for piece in expected:
        assert piece in text, (piece, text)
    assert not (tmp_path / "cache").exists()  # no session, no SuperNode


def test_register_node_needs_a_server_and_a_valid_key(material: dict[str, Path], tmp_path: Path) -> None:
    pub = str(material["good"]) + ".pub"
    cases = [
        ([pub], 2, ["--out RUNDIR", "--tls-dir"]),
        ([pub, "--out", str(tmp_path), "--port", "8000"], 2, ["either --out", "not both"]),
        ([pub, "--out", str(tmp_path)], 1, ["no server connection", "config.toml"]),
        ([str(material["good"]), "--out", str(tmp_path)], 2, ["not an OpenSSH public key"]),
        ([pub, "--tls-dir", str(tmp_path)], 2, ["ca.pem is missing"]),
        ([pub, "--tls-dir", str(material["tls"]), "--port", str(free_port())], 1, ["no server is listening"]),
    ]
    for args, code, expected in cases:
        result = runner.invoke(app, ["server", "register-node", *args], env=env())
        text = flat(result.output)
        assert result.exit_code == code, (args, text)
        for piece in expected:
            assert piece in text, (args, piece, text)


def test_supervisor_explains_each_refusal() -> None:
    from fedsd.clients.supervisor import diagnose_refusal

    tls = diagnose_refusal(
        "ERROR : SSL/TLS handshake error detected.\nFailed to initialize the connection to the SuperLink.\n"
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer "
        "certificate (_ssl.c:1006)\n",
        root_certificates=Path("/x/ca.pem"),
        server="h:1",
    )
    assert (
        tls is not None
        and tls[0] == "tls"
        and "/x/ca.pem" in tls[1]
        and "CERTIFICATE_VERIFY_FAILED" in tls[1]
    )
    plain = diagnose_refusal("[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)", server="h:1")
    assert plain is not None and plain[0] == "tls" and "--insecure" in plain[1]
    unknown = diagnose_refusal("[code: 2004] Failed to activate SuperNode.", auth_key=Path("/k/dev.key"))
    assert unknown is not None and unknown[0] == "not-registered" and "/k/dev.key.pub" in unknown[1]
    nokey = diagnose_refusal("[code: 2001] SuperNode authentication is enabled.")
    assert nokey is not None and nokey[0] == "auth-required" and "fedsd client keygen" in nokey[1]
    assert diagnose_refusal("INFO : SuperNode ID: 123\nConnection attempt failed, retrying") is None


# ----------------------------------------------------------------------------- slow: a real deployment
def _events(cache: Path) -> list[dict]:
    files = list((cache / "sessions").glob("*/events.jsonl"))
    return [json.loads(x) for f in files for x in f.read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_tls_and_node_auth_admit_only_the_registered_device(
    procs: Procs, material: dict[str, Path], small_corpus: Path, tiny_model_dir: Path
) -> None:
    """One TLS run with node authentication: the registered device (right CA, registered key) trains and
    the run completes; wrong CA, unknown key, no key and plain HTTP are each refused and never train."""
    tmp, tls = procs.root, material["tls"]
    run = tmp / "run"
    config = write_config(
        tmp / "secure.yaml", small_corpus, name="secure-test", server_speakers=1, rounds=1,
        exits_mix=[1], round_timeout=120,
    )  # fmt: skip
    port = procs.port()
    server_addr = f"127.0.0.1:{port}"
    t0 = time.monotonic()
    server = procs.fedsd(
        "server", "server", "start", "--config", config, "--tls-dir", tls, "--auth", "--rounds", "1",
        "--min-clients", "1", "--out", run, "--port", port, "--device-wait", "180",
        "--base-model", tiny_model_dir, "--node-key", f"{material['spare']}.pub",
    )  # fmt: skip
    server.wait_for("SuperLink listening on", START_TIMEOUT)
    started = time.monotonic() - t0
    # --- the device key is registered with the running server, through its run directory
    reg = runner.invoke(
        app, ["server", "register-node", f"{material['good']}.pub", "--out", str(run)], env=env()
    )
    assert reg.exit_code == 0, reg.output
    good_id = int(flat(reg.output).split("node id ")[1].split(";")[0])
    # ... or through its port and CA (a working TLS connection to the Control API: it answers that
    # the key is already registered)
    twice = runner.invoke(
        app,
        [
            "server",
            "register-node",
            f"{material['good']}.pub",
            "--port",
            str(port),
            "--tls-dir",
            str(tls),
        ],
        env=env(),
    )
    assert twice.exit_code == 1 and "already registered" in flat(twice.output), twice.output

    manifests = sorted((run / "devices").glob("*.csv"))
    assert len(manifests) == 2, manifests

    # --- plain HTTP gets nowhere: the TLS port answers no HTTP, and a device with --insecure stops
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        raw.settimeout(5)
        try:
            reply = raw.recv(64)
        except (TimeoutError, ConnectionResetError):
            reply = b""
    assert not reply.startswith(b"HTTP/"), reply
    common = ["client", "run", "--server", server_addr, "--root", str(small_corpus), "--exit", "1",
              "--model", str(tiny_model_dir), "--server-timeout", "60"]  # fmt: skip
    insecure = runner.invoke(
        app,
        [*common, "--insecure", "--data", str(manifests[1]), "--cache", str(tmp / "c-insecure")],
        env=env(),
    )
    assert insecure.exit_code == 2, insecure.output
    assert "serves TLS" in flat(insecure.output) and "--root-cert" in flat(insecure.output)

    # --- four devices: one admitted, three refused by Flower (TLS, unknown key, no key)
    ca = str(tls / "ca.pem")
    devices = {
        "good": [*common, "--root-cert", ca, "--auth-key", str(material["good"]), "--data", str(manifests[0])],
        # the registered key, but it does not trust the server's certificate
        "wrong-ca": [*common, "--root-cert", str(material["other"] / "ca.pem"), "--auth-key",
                     str(material["good"]), "--data", str(manifests[1])],
        "stranger": [*common[:-1], "8", "--root-cert", ca, "--auth-key", str(material["stranger"]),
                     "--data", str(manifests[1])],
        "no-key": [*common, "--root-cert", ca, "--data", str(manifests[1])],
    }  # fmt: skip
    dev = {name: procs.fedsd(name, *args, "--cache", tmp / f"c-{name}") for name, args in devices.items()}
    codes = procs.wait_all_exit(RUN_TIMEOUT)
    assert codes == {"server": 0, "good": 0, "wrong-ca": 4, "stranger": 4, "no-key": 4}, procs.report()
    elapsed = time.monotonic() - t0

    # --- the run completed over TLS, with the registered device only
    server_out = server.out()
    assert "finished: completed" in server_out, server_out[-3000:]
    assert "--root-cert" in server_out and "--auth-key KEY" in server_out, server_out[:3000]
    assert f"registered device key {material['spare']}.pub (node id" in server_out, server_out[:3000]
    assert (run / "final" / "fedsd.json").is_file()
    config_toml = (run / ".flwr" / "config.toml").read_text()
    assert (
        f'root-certificates = "{(tls / "ca.pem").resolve()}"' in config_toml and "insecure" not in config_toml
    )
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["round"] for r in recs] == [0, 1]
    trained = [c["node_id"] for c in recs[1]["train"]["clients"]]
    assert trained == [good_id], recs[1]["train"]
    superlink_log = (run / ".flwr" / "superlink.log").read_text()
    assert "Uvicorn running on https://" in superlink_log
    assert f"Activated node_id={good_id}" in superlink_log
    assert superlink_log.count("Activated node_id=") == 1, superlink_log[-3000:]
    assert "[ApiError:2004]" in superlink_log and "[ApiError:2001]" in superlink_log

    # --- what each device reported, and that only the admitted one trained
    good_out = dev["good"].out()
    assert "round 1: trained exit(s)" in good_out and "the server says the run is over" in good_out, good_out
    assert [e["kind"] for e in _events(tmp / "c-good")][-1] == "done"
    assert any(e["kind"] == "train" for e in _events(tmp / "c-good"))
    reasons = {
        "wrong-ca": ["TLS certificate was not accepted", "CERTIFICATE_VERIFY_FAILED"],
        "stranger": ["does not know this device's key", f"{material['stranger']}.pub", "trying again"],
        "no-key": ["only admits registered devices", "fedsd client keygen"],
    }
    for name, pieces in reasons.items():
        out = dev[name].out()
        for piece in pieces:
            assert piece in out, (name, piece, out)
        assert "the server refused this device" in out, out
        assert _events(tmp / f"c-{name}") == [], name  # its ClientApp never ran: no handshake, no training
    assert not (tmp / "c-insecure").exists()  # refused before any SuperNode started
    print(f"security deployment test: SuperLink up after {started:.0f} s, total {elapsed:.0f} s")

    assert not port_open("127.0.0.1", port, timeout=0.5)  # the procs fixture checks for processes left
