"""The MQTT collector's TLS context: the broker's certificate checked against ``tls.server_name``.

paho-mqtt checks the certificate against the host it dials. A broker reached by address, or through
a name other than the one in its certificate, needs ``collectors.mqtt.broker.tls.server_name``: the
context then sends that name (SNI) and verifies the certificate against it, whatever host paho passes.
"""

from __future__ import annotations

import socket
import ssl

from flowline.core.config import TlsClientConfig


class _ServerNameContext(ssl.SSLContext):
    server_name: str | None = None

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        return super().wrap_socket(
            sock,
            server_side,
            do_handshake_on_connect,
            suppress_ragged_eofs,
            self.server_name or server_hostname,
            session,
        )


def tls_context(tls: TlsClientConfig) -> ssl.SSLContext:
    """TLS 1.2+, the configured CA only, hostname checked (against ``server_name`` when set)."""
    context = _ServerNameContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(tls.ca_file)
    if tls.cert_file is not None:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    context.server_name = tls.server_name
    return context
