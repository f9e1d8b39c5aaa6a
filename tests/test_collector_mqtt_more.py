"""MQTT collector TLS: a Mosquitto requiring client certificates (mutual TLS), refusals with clear errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flowline.collectors.mqtt import MqttCollector
from flowline.core.config import FlowlineConfig
from flowline.lab.pki import CertFiles, CertificateAuthority
from flowline.lab.services import MosquittoServer, TlsFiles, wait_until
from tests.collectors_helpers import publisher, telemetry, write_config, write_site
from tests.conftest import MQTT_PASSWORD, MQTT_USER
from tests.test_collector_mqtt import _mqtt_section, _values


@pytest.fixture(autouse=True)
def _password_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWLINE_TEST_MQTT_PASSWORD", MQTT_PASSWORD)


@pytest.fixture(scope="module")
def mtls_broker(
    tmp_path_factory: pytest.TempPathFactory, pki: CertificateAuthority, broker_cert: CertFiles
) -> Iterator[MosquittoServer]:
    server = MosquittoServer(
        tmp_path_factory.mktemp("mosquitto-mtls"),
        users={MQTT_USER: MQTT_PASSWORD},
        tls=TlsFiles(pki.files.cert, broker_cert.cert, broker_cert.key),
        require_certificate=True,
    )
    server.start()
    yield server
    server.stop()


def _mtls_section(broker: MosquittoServer, ca: Path, client: CertFiles | None) -> dict[str, Any]:
    section = _mqtt_section(broker.tls_port, ca)
    if client is not None:
        section["mqtt"]["broker"]["tls"].update(cert_file=str(client.cert), key_file=str(client.key))
    return section


def test_client_certificate_connects_and_delivers(
    tmp_path: Path, mtls_broker: MosquittoServer, pki: CertificateAuthority
) -> None:
    client = pki.issue("flowline-mqtt-collector", stem="mqtt-client", server=False)
    config = write_config(tmp_path, write_site(tmp_path), _mtls_section(mtls_broker, pki.files.cert, client))
    collector = MqttCollector(config)
    collector.start()
    pub = publisher(mtls_broker.port, MQTT_USER, MQTT_PASSWORD)
    try:
        wait_until(collector.connected.is_set, 15, "collector connected over mutual TLS")
        assert collector.metrics.gauge("connected", target=collector.target) == 1
        pub.publish("plant/test-site/P-1/pressure", "12.5", qos=1).wait_for_publish(5)
        spool = config.spool_dir("mqtt")
        wait_until(lambda: _values(telemetry(spool), "pressure") == [12.5], 15, "value over mutual TLS")
        assert collector.last_error is None
    finally:
        pub.loop_stop()
        collector.stop()


def _refusal(config: FlowlineConfig) -> str:
    """Run a collector until it reports a TLS failure; the error message."""
    collector = MqttCollector(config)
    collector.start()
    try:
        wait_until(lambda: collector.last_error is not None, 15, "the TLS refusal")
        assert not collector.connected.is_set()
        message = str(collector.last_error)
        assert collector.target in message and "collectors.mqtt.broker.tls" in message, message
        return message
    finally:
        collector.stop()


def test_missing_client_certificate_is_refused_with_a_clear_error(
    tmp_path: Path, mtls_broker: MosquittoServer, pki: CertificateAuthority
) -> None:
    config = write_config(tmp_path, write_site(tmp_path), _mtls_section(mtls_broker, pki.files.cert, None))
    message = _refusal(config)
    assert "certificate required" in message and "broker.tls.cert_file" in message, message


def test_untrusted_broker_certificate_is_refused_with_a_clear_error(tmp_path: Path, mosquitto: MosquittoServer) -> None:
    other_ca = CertificateAuthority(tmp_path / "other-ca")
    config = write_config(tmp_path, write_site(tmp_path), _mqtt_section(mosquitto.tls_port, other_ca.files.cert))
    message = _refusal(config)  # refused in the handshake itself (paho's on_connect_fail path)
    assert "CERTIFICATE_VERIFY_FAILED" in message and "ca_file" in message, message


def test_plain_mqtt_is_refused_unless_the_config_says_so(tmp_path: Path) -> None:
    from flowline.core.errors import ConfigError

    section = _mqtt_section(1883)
    del section["mqtt"]["broker"]["insecure_plain"]
    with pytest.raises(ConfigError, match="insecure_plain: true"):
        write_config(tmp_path, write_site(tmp_path), section)
    section["mqtt"]["broker"]["insecure_plain"] = True
    assert write_config(tmp_path, write_site(tmp_path), section).collectors is not None


@pytest.mark.parametrize(
    ("server_name", "ok"), [("localhost", True), ("broker.elsewhere.example", False), (None, True)]
)
def test_tls_server_name_is_what_the_broker_certificate_is_checked_against(
    mosquitto: MosquittoServer, pki: CertificateAuthority, server_name: str | None, ok: bool
) -> None:
    import socket
    import ssl

    from flowline.collectors.mqtt_tls import tls_context
    from flowline.core.config import TlsClientConfig

    context = tls_context(TlsClientConfig(ca_file=pki.files.cert, server_name=server_name))
    with socket.create_connection(("127.0.0.1", mosquitto.tls_port), timeout=5) as raw:
        if ok:  # the certificate names localhost and 127.0.0.1: what paho dials is 127.0.0.1
            context.wrap_socket(raw, server_hostname="127.0.0.1").close()
        else:
            with pytest.raises(ssl.SSLCertVerificationError, match=r"broker\.elsewhere\.example"):
                context.wrap_socket(raw, server_hostname="127.0.0.1")
