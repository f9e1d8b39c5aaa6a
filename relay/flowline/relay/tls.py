"""TLS 1.3 contexts for the relay link: the gateway requires client certificates from its CA."""

from __future__ import annotations

import ssl

from flowline.core.config import TlsClientConfig, TlsServerConfig


def server_context(cfg: TlsServerConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    ctx.load_verify_locations(cfg.client_ca_file)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(cfg: TlsClientConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cfg.ca_file)
    if cfg.cert_file is not None:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    return ctx


def peer_common_name(cert: dict[str, object] | None) -> str | None:
    """The CN of a peer certificate as returned by ``SSLSocket.getpeercert()``."""
    if not cert:
        return None
    for rdn in cert.get("subject", ()):  # type: ignore[attr-defined]
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
