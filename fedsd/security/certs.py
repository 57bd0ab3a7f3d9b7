"""Transport security and device identity for deployments: TLS certificates and SuperNode keys.

Why this module exists: a federated run ships model heads and metrics between the server and the
devices. Flower 1.42 can encrypt that traffic (TLS on the SuperLink's one HTTP port) and can refuse
devices it does not know (SuperNode authentication: each device signs its requests with an EC key the
server operator registered beforehand). Both need key material in exact formats; this module makes it
with the `cryptography` library, so no `openssl`/`ssh-keygen` is needed on any machine.

- :func:`create_certificates` — a development CA (``ca.pem`` + ``ca.key``) and a server certificate
  (``server.pem`` + ``server.key``) signed by it. The SuperLink serves ``server.pem``; every device (and
  the `flwr` CLI, and Flower's own ``flower-superexec`` helper, which dials the SuperLink over
  loopback) verifies it against ``ca.pem``. So the certificate must name every address clients dial,
  and always loopback (``localhost``, ``127.0.0.1``, ``::1``).
- :func:`generate_node_key` — a device key pair: ``KEY`` (OpenSSH-format EC P-384 private key, what
  ``flower-supernode --auth-supernode-private-key`` loads) and ``KEY.pub`` (OpenSSH public key, what
  ``flwr supernode register`` loads).

Private keys are written atomically with mode 0600 whatever the umask (readers never see half a key;
other users never see it at all); certificates and public keys follow the umask. Nothing is ever overwritten unless the caller says so.

This is a *development* CA: fine for a lab, a pilot or a private deployment. A production deployment
should use certificates from the organisation's own PKI; :class:`TlsFiles` accepts any PEM files with
the same names.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsd.checkpoint import atomic_write_bytes

LOOPBACK_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
"""Always in the server certificate: Flower's superexec and the `flwr` CLI dial the SuperLink there."""

DEFAULT_DAYS = 365
PRIVATE_MODE = 0o600
PUBLIC_MODE: int | None = None
"""Certificates and ``.pub`` files get what the user's umask gives, like any file they write (0644 under
umask 022, 0600 under 077): an operator who keeps everything private keeps these private too."""

_DNS_NAME = re.compile(r"(?=.{1,253}$)(\*\.)?([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.?)+")
_NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


class SecurityError(ValueError):
    """Key material is missing, malformed or would be overwritten; the message says which file."""


# ----------------------------------------------------------------------------- files
@dataclass(frozen=True)
class TlsFiles:
    """The four files of a TLS directory (as made by ``fedsd certs create``)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> TlsFiles:
        d = Path(directory).expanduser().resolve()
        return cls(d / "ca.pem", d / "ca.key", d / "server.pem", d / "server.key")

    def all(self) -> tuple[Path, ...]:
        return (self.ca_cert, self.ca_key, self.server_cert, self.server_key)

    def server_side(self) -> tuple[Path, ...]:
        """What the SuperLink needs (the CA key is only needed to issue certificates)."""
        return (self.ca_cert, self.server_cert, self.server_key)


def _write(path: Path, data: bytes, mode: int | None) -> Path:
    """Atomic write with ``mode`` set before the rename, so a key is never world-readable, even briefly."""
    atomic_write_bytes(path, data, mode=mode)
    return path


def _refuse_overwrite(paths: Iterable[Path], force: bool, what: str) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        names = ", ".join(str(p) for p in existing)
        raise SecurityError(
            f"{names} already exist(s); refusing to overwrite {what} (pass --force to replace)"
        )


# ----------------------------------------------------------------------------- TLS
def _san(host: str) -> x509.GeneralName:
    """An IP address as IPAddress, anything else as DNSName (a clear error for URLs and ports)."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    if "://" in text or "/" in text or (":" in text) or not _DNS_NAME.fullmatch(text):
        raise SecurityError(f"--host {host!r}: give a DNS name or an IP address (no scheme, no port)")
    return x509.DNSName(text.lower())


def normalize_hosts(hosts: Sequence[str] | None) -> list[str]:
    """The hosts a server certificate names: the given ones plus loopback, deduplicated, in order."""
    out: list[str] = []
    for h in [*(hosts or []), *LOOPBACK_HOSTS]:
        name = _san(h)
        text = str(name.value)
        if text not in out:
            out.append(text)
    return out


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsd"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        ]
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates (and CRLs); a server signs its handshakes and agrees keys (ECDHE)."""
    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=ca,
        crl_sign=ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class _Validity:
    not_before: dt.datetime
    not_after: dt.datetime


def _issue_ca(name: x509.Name, validity: _Validity) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA (path length 0: it signs server certificates only)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity.not_before)
        .not_valid_after(validity.not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue_server(
    hosts: list[str], ca_key: ec.EllipticCurvePrivateKey, ca_name: x509.Name, validity: _Validity
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A server certificate for ``hosts`` (SANs; the first is the subject), signed by the CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity.not_before)
        .not_valid_after(validity.not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def create_certificates(
    out: Path, hosts: Sequence[str] | None = None, *, days: int = DEFAULT_DAYS, force: bool = False
) -> TlsFiles:
    """Write ``ca.pem``, ``ca.key``, ``server.pem``, ``server.key`` into ``out``.

    The server certificate has a SubjectAlternativeName for every host (IP addresses as IPAddress,
    names as DNSName) plus ``localhost``, ``127.0.0.1`` and ``::1``. EC P-256 keys, SHA-256 signatures, valid
    from five minutes ago (clock skew between machines) for ``days`` days. Refuses to replace any of
    the four files unless ``force``.
    """
    if days < 1:
        raise SecurityError(f"--days {days}: a certificate must be valid for at least one day")
    names = normalize_hosts(hosts)
    files = TlsFiles.in_dir(out)
    _refuse_overwrite(files.all(), force, "the TLS files")
    now = dt.datetime.now(dt.UTC)
    validity = _Validity(now - dt.timedelta(minutes=5), now + dt.timedelta(days=days))
    ca_name = _name(f"fedsd development CA {now:%Y-%m-%d %H:%M:%S}")
    ca_key, ca_cert = _issue_ca(ca_name, validity)
    server_key, server_cert = _issue_server(names, ca_key, ca_name, validity)
    # Keys first: a certificate on disk always has its key next to it.
    _write(files.ca_key, _key_pem(ca_key), PRIVATE_MODE)
    _write(files.server_key, _key_pem(server_key), PRIVATE_MODE)
    _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    _write(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    return files


def load_certificate(path: Path, what: str = "certificate") -> x509.Certificate:
    """A PEM certificate, or a SecurityError naming the file."""
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise SecurityError(f"{what} {path}: file not found") from None
    except (ValueError, OSError) as e:
        raise SecurityError(f"{what} {path}: not a PEM certificate ({e})") from None


def certificate_hosts(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for (its SubjectAlternativeName)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in ext.get_values_for_type(x509.DNSName)] + [
        str(v) for v in ext.get_values_for_type(x509.IPAddress)
    ]


def covers_host(cert: x509.Certificate, host: str) -> bool:
    """Whether a client dialling ``host`` accepts this certificate's names (exact or ``*.`` match)."""
    h = host.strip("[]").lower()
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        ip = None
    names = certificate_hosts(cert)
    if ip is not None:
        return any(_same_ip(n, ip) for n in names)
    for n in (x.lower() for x in names):
        if n == h or (n.startswith("*.") and h.endswith(n[1:]) and "." not in h[: -len(n) + 1]):
            return True
    return False


def _same_ip(name: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        return ipaddress.ip_address(name) == ip
    except ValueError:
        return False


def check_tls_dir(directory: Path) -> TlsFiles:
    """The TLS files of ``directory`` for a SuperLink; a SecurityError names the first missing or
    unreadable one and says how to make them."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise SecurityError(
            f"--tls-dir {d}: directory not found (make one with `fedsd certs create --out {d}`)"
        )
    files = TlsFiles.in_dir(d)
    for p in files.server_side():
        if not p.is_file():
            raise SecurityError(
                f"--tls-dir {d}: {p.name} is missing ({p}); the directory needs ca.pem, server.pem and "
                f"server.key (make them with `fedsd certs create --out {d}`)"
            )
    load_certificate(files.ca_cert, "CA certificate")
    load_certificate(files.server_cert, "server certificate")
    return files


# ----------------------------------------------------------------------------- SuperNode keys
def public_key_path(private_key: Path) -> Path:
    """``KEY`` → ``KEY.pub``."""
    return private_key.with_name(private_key.name + ".pub")


def generate_node_key(path: Path, *, force: bool = False, comment: str | None = None) -> tuple[Path, Path]:
    """Write a device key pair: ``path`` (OpenSSH EC P-384 private key, 0600) and ``path.pub``.

    Same formats as ``ssh-keygen -t ecdsa -b 384 -N ""``: what ``flower-supernode
    --auth-supernode-private-key`` and ``flwr supernode register`` load.
    """
    path = Path(path).expanduser().resolve()
    pub = public_key_path(path)
    _refuse_overwrite([path, pub], force, "the key pair")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if comment:
        public += b" " + re.sub(r"\s+", "_", comment).encode("utf-8")
    _write(path, private, PRIVATE_MODE)
    _write(pub, public + b"\n", PUBLIC_MODE)
    return path, pub


def load_node_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The device's private key as flower-supernode loads it; a SecurityError says what is wrong."""
    try:
        key = serialization.load_ssh_private_key(Path(path).expanduser().read_bytes(), password=None)
    except FileNotFoundError:
        raise SecurityError(
            f"{path}: key file not found (make one with `fedsd client keygen --out {path}`)"
        ) from None
    except (ValueError, UnsupportedAlgorithm, TypeError, OSError) as e:
        raise SecurityError(
            f"{path}: not an unencrypted OpenSSH private key ({e}); make one with `fedsd client keygen`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, _NIST_CURVES):
        raise SecurityError(
            f"{path}: Flower needs an EC key on a NIST curve (P-256/384/521), got {type(key).__name__}"
        )
    return key


def load_node_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """A device's public key (``KEY.pub``) as `flwr supernode register` loads it."""
    try:
        key = serialization.load_ssh_public_key(Path(path).expanduser().read_bytes())
    except FileNotFoundError:
        raise SecurityError(f"{path}: public key file not found") from None
    except (ValueError, UnsupportedAlgorithm, OSError) as e:
        raise SecurityError(
            f"{path}: not an OpenSSH public key ({e}); give the KEY.pub of `fedsd client keygen`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _NIST_CURVES):
        raise SecurityError(
            f"{path}: Flower needs an EC key on a NIST curve (P-256/384/521), got {type(key).__name__}"
        )
    return key
