"""Key material for separate sites: a private CA, the SuperLink's TLS certificate, SuperNode keys.

Everything is made with ``cryptography``. Flower's SuperLink wants a PEM CA, server certificate
and key; its SuperNode authentication wants an elliptic-curve key pair on a NIST curve in
OpenSSH format (``flwr supernode register`` refuses anything else), so that is what we write.
Private keys are created 0600 and nothing is ever overwritten unless the caller says so.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"
NODE_PRIVATE_KEY_FILE = "node_key"
NODE_PUBLIC_KEY_FILE = "node_key.pub"

PRIVATE_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
# P-384: what Flower's SuperNode authentication documents and accepts.
NODE_KEY_CURVE = ec.SECP384R1
TLS_KEY_CURVE = ec.SECP384R1
SIGNATURE_HASH = hashes.SHA384
DEFAULT_VALID_DAYS = 365
CA_VALID_DAYS = 3650


class KeyMaterialError(RuntimeError):
    """Key material that cannot be created or used as asked (exists, unreadable, wrong kind)."""


@dataclass(frozen=True)
class CertificatePaths:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeyPaths:
    private_key: Path
    public_key: Path


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start, so a secret is never briefly world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)


def _refuse_existing(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise KeyMaterialError(f"refusing to overwrite {', '.join(existing)} (pass --force to replace them)")


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _subject_alt_names(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def create_certificates(
    out_dir: Path, hosts: list[str], *, valid_days: int = DEFAULT_VALID_DAYS, force: bool = False
) -> CertificatePaths:
    """A private CA and a SuperLink certificate for ``hosts`` (DNS names or IPs), signed by it."""
    if not hosts:
        raise KeyMaterialError("at least one host name or IP address is needed for the certificate's SANs")
    paths = CertificatePaths(
        out_dir / CA_CERT_FILE, out_dir / CA_KEY_FILE, out_dir / SERVER_CERT_FILE, out_dir / SERVER_KEY_FILE
    )
    _refuse_existing([paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key], force)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(TLS_KEY_CURVE())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedguard federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, SIGNATURE_HASH())
    )
    server_key = ec.generate_private_key(TLS_KEY_CURVE())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(_subject_alt_names(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, SIGNATURE_HASH())
    )
    _write_file(paths.ca_key, _pem_private(ca_key), PRIVATE_FILE_MODE)
    _write_file(paths.server_key, _pem_private(server_key), PRIVATE_FILE_MODE)
    _write_file(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_FILE_MODE)
    # The chain file (leaf then CA) is what TLS clients need to build a path to the CA.
    chain = server_cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM)
    _write_file(paths.server_cert, chain, PUBLIC_FILE_MODE)
    return paths


def create_node_keys(out_dir: Path, name: str = NODE_PRIVATE_KEY_FILE, *, force: bool = False) -> NodeKeyPaths:
    """A SuperNode authentication key pair (P-384, OpenSSH format), as Flower expects it."""
    paths = NodeKeyPaths(out_dir / name, out_dir / f"{name}.pub")
    _refuse_existing([paths.private_key, paths.public_key], force)
    key = ec.generate_private_key(NODE_KEY_CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_file(paths.private_key, private, PRIVATE_FILE_MODE)
    _write_file(paths.public_key, public + b"\n", PUBLIC_FILE_MODE)
    return paths


def check_node_private_key(path: Path) -> None:
    """Fail early, with our words, on a key SuperNode would reject with an exit code only."""
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except (OSError, ValueError) as err:
        raise KeyMaterialError(f"cannot read SuperNode private key {path}: {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyMaterialError(f"{path} is not an elliptic-curve key; create one with `fedguard keys`")
    if path.stat().st_mode & 0o077:
        raise KeyMaterialError(f"{path} is readable by others (mode {oct(path.stat().st_mode & 0o777)}); chmod 600 it")


def check_certificate_files(*paths: Path, hint: str = "create them with `fedguard certs`") -> None:
    """Fail early on missing TLS files; ``hint`` says who makes them (a site never runs `fedguard certs`)."""
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise KeyMaterialError(f"missing TLS file(s): {', '.join(missing)}; {hint}")
