"""Keys and certificates for a loopback federation, made at run time with ``cryptography``.

* a certificate authority (CA) that exists only for one run;
* TLS certificates signed by it for ``127.0.0.1``: the SuperLink's (Fleet, Control and Runtime
  APIs) and one per SuperNode (its Runtime API, which the ClientApp executor connects to);
* one SuperNode authentication key pair per node (EC P-384, OpenSSH format, as
  ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` read them).

Everything is written into one directory with owner-only permissions; the caller deletes it
(:class:`loopback.Loopback` does, also on failure). Nothing here is fit for a real deployment's
PKI (no revocation, no key storage): it shows which party holds which secret.
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

LOOPBACK = "127.0.0.1"
VALID = dt.timedelta(days=1)


def _write(path: Path, data: bytes) -> Path:
    """Write ``data`` readable by the owner only (keys and certificates alike)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    return path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "PrivRec Book loopback"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class Authority:
    """A CA: its certificate file and key (kept in memory only)."""

    cert_path: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, folder: Path, name: str = "ca") -> Authority:
        """A self-signed CA, valid for one day, that may sign only end-entity certificates."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder().subject_name(_name(f"{name} (one run)"))
                .issuer_name(_name(f"{name} (one run)")).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + VALID)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        path = _write(folder / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM))
        return cls(path, cert, key)

    def server_cert(self, folder: Path, name: str) -> tuple[Path, Path]:
        """``(certificate, key)`` files of a TLS server on 127.0.0.1 / localhost."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        names = [x509.IPAddress(ipaddress.ip_address(LOOPBACK)), x509.DNSName("localhost")]
        cert = (x509.CertificateBuilder().subject_name(_name(name))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + VALID)
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        return (_write(folder / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM)),
                _write(folder / f"{name}.key", _pem_key(key)))


def node_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """``(private, public)`` OpenSSH files of a SuperNode's authentication key (EC P-384)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return (_write(folder / f"{name}_key", private),
            _write(folder / f"{name}_key.pub", public + b"\n"))


@dataclass(frozen=True)
class LoopbackPKI:
    """Every secret of one loopback federation (see the module docstring)."""

    folder: Path
    ca: Path
    superlink: tuple[Path, Path]
    runtime: list[tuple[Path, Path]]
    nodes: list[tuple[Path, Path]]

    @classmethod
    def create(cls, folder: Path, k: int) -> LoopbackPKI:
        """The CA, the SuperLink's certificate and, for ``k`` SuperNodes, a Runtime API
        certificate and an authentication key pair each."""
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca = Authority.create(folder)
        return cls(folder, ca.cert_path, ca.server_cert(folder, "superlink"),
                   [ca.server_cert(folder, f"supernode-{i}-runtime") for i in range(k)],
                   [node_keys(folder, f"supernode-{i}") for i in range(k)])
