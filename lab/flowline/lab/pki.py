"""Certificates for mutual TLS (relay, MQTT) and OPC UA application instances.

Used by tests and by ``flowline demo`` to make a throw-away CA; real sites bring their own PKI and
only point the config at the files.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertFiles:
    cert: Path  # PEM
    key: Path  # PEM, unencrypted, mode 0600
    der: Path  # the same certificate in DER (OPC UA stacks want DER)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Flowline"),
        ]
    )


def _write(cert: x509.Certificate, key: rsa.RSAPrivateKey, folder: Path, stem: str) -> CertFiles:
    folder.mkdir(parents=True, exist_ok=True)
    files = CertFiles(folder / f"{stem}.pem", folder / f"{stem}.key", folder / f"{stem}.der")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.der.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    files.key.chmod(0o600)
    return files


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: rsa.RSAPublicKey, days: int, ca: bool
) -> x509.CertificateBuilder:
    """The parts every certificate shares; a CA signs certificates, a leaf signs and encrypts."""
    now = dt.datetime.now(dt.UTC)
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=not ca,
        key_encipherment=not ca,
        data_encipherment=not ca,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(usage, critical=True)
    )


class CertificateAuthority:
    def __init__(self, folder: Path, name: str = "Flowline test CA", key_size: int = 2048) -> None:
        self.folder = Path(folder)
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
        self.cert = _builder(_name(name), _name(name), self.key.public_key(), 3650, ca=True).sign(
            self.key, hashes.SHA256()
        )
        self.files = _write(self.cert, self.key, self.folder, "ca")

    def issue(
        self,
        common_name: str,
        stem: str | None = None,
        dns: tuple[str, ...] = ("localhost",),
        ips: tuple[str, ...] = ("127.0.0.1",),
        uri: str | None = None,
        server: bool = True,
        client: bool = True,
        self_signed: bool = False,
        days: int = 825,
    ) -> CertFiles:
        """Issue (or self-sign) a leaf certificate. ``uri`` is the SAN URI an OPC UA application needs."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        san: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        san += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if uri:
            san.append(x509.UniformResourceIdentifier(uri))
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
            [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        )
        issuer_name, signing_key = (_name(common_name), key) if self_signed else (self.cert.subject, self.key)
        cert = (
            _builder(_name(common_name), issuer_name, key.public_key(), days, ca=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .sign(signing_key, hashes.SHA256())
        )
        return _write(cert, key, self.folder, stem or common_name)
