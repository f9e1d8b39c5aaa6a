"""Shared fixtures: real InfluxDB and Mosquitto (Debian packages) on free loopback ports.

Servers live in pytest temp folders and are stopped at teardown, also when a test fails. Factories
give a test its own server when it must stop, kill or restart it; the shared session-scoped
servers are for tests that only read and write (each gets a fresh database or topic prefix).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flowline.pki import CertFiles, CertificateAuthority
from flowline.services import InfluxDServer, MosquittoServer, TlsFiles

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
EXAMPLE_SITE = REPO / "flowline" / "examples" / "north-field.yaml"

MQTT_USER = "flowline"
MQTT_PASSWORD = "test-" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def broker_cert(pki: CertificateAuthority) -> CertFiles:
    return pki.issue("mosquitto-test", stem="broker")


@pytest.fixture
def influx_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., InfluxDServer]]:
    started: list[InfluxDServer] = []

    def make(auth: bool = True) -> InfluxDServer:
        server = InfluxDServer(tmp_path_factory.mktemp("influxd"), auth=auth)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def influx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxDServer]:
    """A shared InfluxDB with authentication on; use `influx_db` for an isolated database."""
    server = InfluxDServer(tmp_path_factory.mktemp("influxd-shared"), auth=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def influx_db(influx: InfluxDServer) -> Iterator[str]:
    name = "t_" + uuid.uuid4().hex[:10]
    influx.create_database(name)
    yield name
    influx.query(f'DROP DATABASE "{name}"')


@pytest.fixture
def mosquitto_factory(
    tmp_path_factory: pytest.TempPathFactory, pki: CertificateAuthority, broker_cert: CertFiles
) -> Iterator[Callable[..., MosquittoServer]]:
    started: list[MosquittoServer] = []

    def make(tls: bool = True, users: dict[str, str] | None = None, acl: list[str] | None = None) -> MosquittoServer:
        server = MosquittoServer(
            tmp_path_factory.mktemp("mosquitto"),
            users=users if users is not None else {MQTT_USER: MQTT_PASSWORD},
            acl=acl,
            tls=TlsFiles(pki.files.cert, broker_cert.cert, broker_cert.key) if tls else None,
        )
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def mosquitto(
    tmp_path_factory: pytest.TempPathFactory, pki: CertificateAuthority, broker_cert: CertFiles
) -> Iterator[MosquittoServer]:
    """A shared broker with a plain and a TLS listener, password auth on (`MQTT_USER`/`MQTT_PASSWORD`)."""
    server = MosquittoServer(
        tmp_path_factory.mktemp("mosquitto-shared"),
        users={MQTT_USER: MQTT_PASSWORD},
        tls=TlsFiles(pki.files.cert, broker_cert.cert, broker_cert.key),
    )
    server.start()
    yield server
    server.stop()
