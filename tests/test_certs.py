"""`flowline certs`: the files docker/compose.yaml expects, accepted by real TLS and a real OPC UA server."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from flowline.collectors.opcua import OpcUaCollector
from flowline.core.config import TlsClientConfig, TlsServerConfig
from flowline.inventory import load_site
from flowline.lab.pki import CertificateAuthority
from flowline.lab.sim.opcua_server import SimOpcUaServer, server_certificate
from flowline.relay.tls import client_context, peer_common_name, server_context
from tests.collectors_helpers import write_config, write_site
from tests.test_collector_opcua import SIM_TAGS, _opcua_section, _run, _until, _values

FLOWLINE = str(Path(sys.executable).parent / "flowline")


def _certs(*args: str) -> str:
    done = subprocess.run([FLOWLINE, "certs", *args], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_relay_ca_gateway_and_sender_certificates_make_a_mutual_tls_link(tmp_path: Path) -> None:
    offline, secrets = tmp_path / "offline", tmp_path / "secrets"
    _certs("ca", "--out", str(offline), "--key-size", "2048")
    ca = ["--ca-cert", str(offline / "relay_ca.pem"), "--ca-key", str(offline / "relay_ca.key")]
    _certs("gateway", *ca, "--host", "dmz-gateway", "--host", "localhost", "--out", str(secrets), "--key-size", "2048")
    _certs("sender", *ca, "--sender-id", "ot-north-1", "--out", str(secrets), "--key-size", "2048")
    assert sorted(p.name for p in secrets.iterdir()) == [
        "dmz_gateway_cert.pem", "dmz_gateway_key.pem", "ot_sender_cert.pem", "ot_sender_key.pem"
    ]  # fmt: skip
    assert (secrets / "ot_sender_key.pem").stat().st_mode & 0o777 == 0o600
    gateway = _load(secrets / "dmz_gateway_cert.pem")
    eku = gateway.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]

    # the relay's own TLS 1.3 contexts, the way the gateway and the sender build them
    server = server_context(TlsServerConfig(cert_file=secrets / "dmz_gateway_cert.pem",
                                            key_file=secrets / "dmz_gateway_key.pem",
                                            client_ca_file=offline / "relay_ca.pem"))  # fmt: skip
    client = client_context(TlsClientConfig(ca_file=offline / "relay_ca.pem", cert_file=secrets / "ot_sender_cert.pem",
                                            key_file=secrets / "ot_sender_key.pem"))  # fmt: skip
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[str | None] = []

    def accept() -> None:
        conn, _ = listener.accept()
        with server.wrap_socket(conn, server_side=True) as tls:
            seen.append(peer_common_name(dict(tls.getpeercert() or {})))

    thread = threading.Thread(target=accept)
    thread.start()
    with (
        socket.create_connection(listener.getsockname()) as raw,
        client.wrap_socket(raw, server_hostname="dmz-gateway"),
    ):
        pass
    thread.join(10)
    assert seen == ["ot-north-1"]  # the gateway reads the sender id from the certificate's CN


def test_opcua_client_certificate_is_accepted_by_a_secure_server(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    out = _certs("opcua-client", "--out", str(secrets), "--key-size", "2048")
    assert "SAN URI urn:flowline:collector" in out
    cert = _load(secrets / "opcua_client_cert.pem")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:flowline:collector"]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.content_commitment and usage.key_encipherment and usage.data_encipherment
    eku = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert (secrets / "opcua_client_cert.der").read_bytes() == cert.public_bytes(Encoding.DER)

    site_file = write_site(tmp_path, SIM_TAGS)
    site = load_site(site_file)
    server_ca = CertificateAuthority(tmp_path / "server-ca")
    server = SimOpcUaServer(site, policies=("basic256sha256",), cert=server_certificate(server_ca, site.site),
                            trusted=(secrets / "opcua_client_cert.pem",))  # fmt: skip
    security = {"policy": "Basic256Sha256", "mode": "SignAndEncrypt",
                "cert_file": str(secrets / "opcua_client_cert.pem"), "key_file": str(secrets / "opcua_client_key.pem"),
                "trusted_server_certs": [str(server_ca.files.cert)]}  # fmt: skip

    async def body(collector: OpcUaCollector, spool: Path) -> None:
        await _until(collector.sessions[0].connected.is_set, 20, "a secure session with the generated certificate")
        await server.set_value("U-1", "t1", 8.5)
        await _until(lambda: any(p.fields.get("value") == 8.5 for p in _values(spool, "t1")), 10, "value")

    asyncio.run(
        _run(tmp_path, server, lambda url: write_config(tmp_path, site_file, _opcua_section(url, security)), body)
    )
