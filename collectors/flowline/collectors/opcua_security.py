"""OPC UA client security: policies, our certificate, and an explicit trust list for server certificates.

asyncua's ``set_security`` without a pinned server certificate takes whatever certificate the
unsecured endpoint list offers, unchecked. We fetch that certificate ourselves, accept it only when
it is in the trust list (pinned) or directly issued by a trusted CA certificate and currently valid,
and then pin it. An unknown certificate is saved next to the data and refused with a message that
says how to trust it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

from asyncua import ua
from asyncua.client.client import Client
from asyncua.crypto import security_policies, uacrypto
from asyncua.ua.uaerrors import UaError
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from flowline.core.config import OpcUaEndpoint
from flowline.core.errors import FlowlineError

POLICIES: dict[str, type[security_policies.SecurityPolicy]] = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}
MODES = {"Sign": ua.MessageSecurityMode.Sign, "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt}


class OpcUaSecurityError(FlowlineError):
    """Security setup failed in a way retrying will not fix without an operator (trust, config, certs)."""


def _load_cert(path: Path) -> x509.Certificate:
    data = path.read_bytes()
    return x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)


def _first_cert(der: bytes) -> bytes:
    """The leading certificate of a DER chain (outer SEQUENCE with a two-byte length)."""
    return der[: int.from_bytes(der[2:4], "big") + 4]


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def is_trusted(cert: x509.Certificate, trusted: list[x509.Certificate]) -> bool:
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        return False
    for anchor in trusted:
        if anchor == cert:
            return True
        try:
            cert.verify_directly_issued_by(anchor)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def _untrusted(
    cert: x509.Certificate, der: bytes, url: str, server_name: str, rejected_dir: Path
) -> OpcUaSecurityError:
    """Save the refused certificate where an operator can inspect and trust it; say how."""
    rejected_dir.mkdir(parents=True, exist_ok=True)
    saved = rejected_dir / f"{server_name}-{fingerprint(cert)[:16]}.der"
    saved.write_bytes(der)
    return OpcUaSecurityError(
        f"OPC UA server {server_name!r} ({url}) presented an untrusted certificate "
        f"(subject {cert.subject.rfc4514_string()}, SHA-256 {fingerprint(cert)}); refusing to connect. "
        f"If this is the right server, trust it by adding {saved} (or its issuing CA certificate) to "
        f"collectors.opcua.servers.{server_name}.security.trusted_server_certs"
    )


async def trusted_server_certificate(
    endpoint: OpcUaEndpoint, server_name: str, rejected_dir: Path, timeout_s: float
) -> bytes:
    """Fetch the server's certificate for our policy/mode and return it (DER) if the trust list allows."""
    sec = endpoint.security
    probe = Client(endpoint.url, timeout=timeout_s)
    endpoints = await probe.connect_and_get_server_endpoints()
    policy = POLICIES[sec.policy]
    try:
        chosen = Client.find_endpoint(endpoints, MODES[sec.mode], policy.URI)
    except UaError as exc:
        offered = sorted({f"{e.SecurityPolicyUri.rsplit('#', 1)[-1]}/{e.SecurityMode.name}" for e in endpoints})
        raise OpcUaSecurityError(
            f"OPC UA server {server_name!r} ({endpoint.url}) offers no {sec.policy}/{sec.mode} endpoint; "
            f"it offers {', '.join(offered)}"
        ) from exc
    der = _first_cert(chosen.ServerCertificate)
    cert = x509.load_der_x509_certificate(der)
    trusted = [_load_cert(p) for p in sec.trusted_server_certs]
    if is_trusted(cert, trusted):
        return der
    raise _untrusted(cert, der, endpoint.url, server_name, rejected_dir)


async def apply_security(
    client: Client, endpoint: OpcUaEndpoint, server_name: str, rejected_dir: Path, timeout_s: float
) -> None:
    """Configure policy, mode, our certificate and user identity on ``client`` (before connect)."""
    sec = endpoint.security
    if (sec.policy == "None") != (sec.mode == "None"):
        raise OpcUaSecurityError(
            f"servers.{server_name}.security: policy {sec.policy} with mode {sec.mode}; "
            "'None' must be given for both or neither"
        )
    client.application_uri = sec.application_uri
    if endpoint.username is not None:
        client.set_user(endpoint.username)
        if endpoint.password is not None:
            client.set_password(endpoint.password.read())
    if sec.policy == "None":
        return
    if sec.cert_file is None or sec.key_file is None:
        raise OpcUaSecurityError(
            f"servers.{server_name}.security: {sec.policy} needs cert_file and key_file (client certificate "
            f"whose SAN URI is {sec.application_uri})"
        )
    server_der = await trusted_server_certificate(endpoint, server_name, rejected_dir, timeout_s)
    try:
        await client.set_security(
            POLICIES[sec.policy],
            _file_properties(sec.cert_file),
            _file_properties(sec.key_file),
            server_certificate=uacrypto.CertProperties(server_der, extension="der"),
            mode=MODES[sec.mode],
        )
    except (OSError, ValueError) as exc:
        raise OpcUaSecurityError(
            f"servers.{server_name}.security: cannot load client certificate {sec.cert_file} / key "
            f"{sec.key_file}: {exc}"
        ) from exc


def _file_properties(path: Path) -> uacrypto.CertProperties:
    """asyncua guesses PEM vs DER from the file extension; look at the content instead."""
    try:
        pem = b"-----BEGIN" in path.read_bytes()
    except OSError as exc:
        raise OpcUaSecurityError(f"cannot read {path}: {exc.strerror}") from exc
    return uacrypto.CertProperties(str(path), extension="pem" if pem else "der")
