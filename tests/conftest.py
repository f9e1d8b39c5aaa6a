"""Shared fixtures: real InfluxDB and Mosquitto (Debian packages) on free loopback ports.

Servers live in pytest temp folders and are stopped at teardown, also when a test fails. Factories
give a test its own server when it must stop, kill or restart it; the shared session-scoped
servers are for tests that only read and write (each gets a fresh database or topic prefix).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

import pytest

from flowline.historian.connection import Connection
from flowline.lab.pki import CertFiles, CertificateAuthority
from flowline.lab.services import InfluxDServer, ManagedProcess, MosquittoServer, TlsFiles, wait_until

if TYPE_CHECKING:
    from flowline.collectors.mqtt import MqttCollector
    from flowline.core.config import FlowlineConfig

REPO = Path(__file__).resolve().parent.parent
SCHEMAS_ENV = "FLOWLINE_SCHEMAS_DIR"
EXAMPLE_SITE = REPO / "lab" / "flowline" / "lab" / "examples" / "north-field.yaml"

MQTT_USER = "flowline"
MQTT_PASSWORD = "test-" + uuid.uuid4().hex[:8]

T = TypeVar("T", bound=ManagedProcess)


def unavailable(reason: str) -> NoReturn:
    """Skip a test that needs something this machine lacks (root, a tool); in CI that is a failure.

    CI runs as root with everything `scripts/bootstrap` installs, so there a missing prerequisite is a
    broken set-up, not a platform limit, and must not pass as a skip.
    """
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must provide it)")
    pytest.skip(reason)


def schema_file(name: str) -> Path:
    """A published third-party schema (Grafana, Compose, InfluxDB OpenAPI) from ``$FLOWLINE_SCHEMAS_DIR``.

    The schemas are not ours to ship: `.ci/run` points the variable at its copy; elsewhere, download
    the files named in the README's Development section into a folder and set it. Tests that need
    them carry the ``schemas`` marker, so without the variable they are deselected and reported.
    """
    folder = os.environ.get(SCHEMAS_ENV)
    if not folder:
        pytest.fail(f"{SCHEMAS_ENV} is not set: point it at the folder holding {name} (see README, Development)")
    path = Path(folder) / name
    if not path.is_file():
        pytest.fail(f"{path} not found: {SCHEMAS_ENV}={folder} must hold {name} (see README, Development)")
    return path


@pytest.hookimpl(trylast=True)  # after -m and -k: count only what would otherwise have run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Soak runs only when asked for (``-m soak``). Without the schemas, deselect the tests that need
    them, loudly; in CI their absence is an error."""
    if "soak" not in (config.getoption("markexpr") or ""):
        skip = pytest.mark.skip(reason="soak run (minutes): select it with -m soak")
        for item in items:
            if item.get_closest_marker("soak"):
                item.add_marker(skip)
    if os.environ.get(SCHEMAS_ENV) or os.environ.get("CI"):
        return
    needs = [item for item in items if item.get_closest_marker("schemas")]
    if needs:
        config.hook.pytest_deselected(items=needs)
        items[:] = [item for item in items if not item.get_closest_marker("schemas")]
        config.stash[_SCHEMA_DESELECTED] = len(needs)


_SCHEMA_DESELECTED = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    count = config.stash.get(_SCHEMA_DESELECTED, 0)
    if count:
        terminalreporter.write_line(
            f"NOTE: {count} schema-validation tests did not run: set {SCHEMAS_ENV} (see README, Development)",
            yellow=True,
        )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def broker_cert(pki: CertificateAuthority) -> CertFiles:
    return pki.issue("mosquitto-test", stem="broker")


def _start(pool: list[ManagedProcess], server: T) -> T:
    """Start a server a test asked for and remember it, so teardown stops it even if the test fails."""
    server.start()
    pool.append(server)
    return server


def _stop_all(pool: list[ManagedProcess]) -> None:
    for server in pool:
        server.stop()


def _broker(
    folder: Path,
    pki: CertificateAuthority,
    broker_cert: CertFiles,
    tls: bool = True,
    users: dict[str, str] | None = None,
    acl: list[str] | None = None,
) -> MosquittoServer:
    return MosquittoServer(
        folder,
        users=users if users is not None else {MQTT_USER: MQTT_PASSWORD},
        acl=acl,
        tls=TlsFiles(pki.files.cert, broker_cert.cert, broker_cert.key) if tls else None,
    )


@pytest.fixture
def influx_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., InfluxDServer]]:
    started: list[ManagedProcess] = []

    def make(auth: bool = True) -> InfluxDServer:
        return _start(started, InfluxDServer(tmp_path_factory.mktemp("influxd"), auth=auth))

    yield make
    _stop_all(started)


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
    started: list[ManagedProcess] = []

    def make(tls: bool = True, users: dict[str, str] | None = None, acl: list[str] | None = None) -> MosquittoServer:
        return _start(started, _broker(tmp_path_factory.mktemp("mosquitto"), pki, broker_cert, tls, users, acl))

    yield make
    _stop_all(started)


@pytest.fixture(scope="session")
def mosquitto(
    tmp_path_factory: pytest.TempPathFactory, pki: CertificateAuthority, broker_cert: CertFiles
) -> Iterator[MosquittoServer]:
    """A shared broker with a plain and a TLS listener, password auth on (`MQTT_USER`/`MQTT_PASSWORD`)."""
    server = _broker(tmp_path_factory.mktemp("mosquitto-shared"), pki, broker_cert)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def run_collector() -> Iterator[Callable[[FlowlineConfig], MqttCollector]]:
    """Start MQTT collectors that are stopped after the test; waits until each is connected."""
    from flowline.collectors.mqtt import MqttCollector

    started: list[MqttCollector] = []

    def start(config: FlowlineConfig) -> MqttCollector:
        collector = MqttCollector(config)
        collector.start()
        started.append(collector)
        wait_until(collector.connected.is_set, 15, "collector connected")
        return collector

    yield start
    for collector in started:
        collector.stop()


@pytest.fixture(autouse=True)
def _close_historian_connections(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Close every InfluxDB `Connection` a test opened (each holds an HTTP session), after all of
    its other fixtures: tests build them freely, and one left to the garbage collector surfaces as
    a ResourceWarning in whatever test runs next."""
    opened: list[Connection] = []
    post_init = Connection.__post_init__

    def tracked(self: Connection) -> None:
        post_init(self)
        opened.append(self)

    monkeypatch.setattr(Connection, "__post_init__", tracked)
    yield
    for conn in opened:
        conn.close()
