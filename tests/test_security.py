"""TLS and node authentication: key material (fast, no processes) and flag checks of the commands (fast,
CliRunner, nothing starts). The real TLS + --auth deployment and its refusals (wrong CA, unknown key, no
key, plain HTTP) are asserted in tests/test_secure_deployment.py.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from harness import TlsEcho, env, flat
from typer.testing import CliRunner

from fedsd.cli.main import app
from fedsd.process.launch import free_port, port_open, probe_transport

runner = CliRunner()


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


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_public_files_follow_the_umask_private_keys_are_0600(tmp_path: Path, umask: int) -> None:
    """Certificates and ``.pub`` files get what the umask gives (issue 23, finding 8: they were forced to
    0644, readable by everyone under umask 077); private keys are 0600 whatever the umask."""
    import os

    from fedsd.security.certs import create_certificates, generate_node_key

    old = os.umask(umask)
    try:
        files = create_certificates(tmp_path / "tls")
        key, pub = generate_node_key(tmp_path / "device.key")
    finally:
        os.umask(old)
    public = 0o666 & ~umask
    assert {p.name: _mode(p) for p in (files.ca_cert, files.server_cert, pub)} == {
        "ca.pem": public, "server.pem": public, "device.key.pub": public,
    }  # fmt: skip
    assert {p.name: _mode(p) for p in (files.ca_key, files.server_key, key)} == {
        "ca.key": 0o600, "server.key": 0o600, "device.key": 0o600,
    }  # fmt: skip


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
    from fedsd.security.certs import create_certificates, generate_node_key

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
