"""Each failure that used to be silent now says what fails, where, and what happens next.

Real servers throughout (Mosquitto, influxd, a plain HTTP server standing in for "not Grafana"),
and the real ``flowline`` command in a subprocess where the message a person sees is the point.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from flowline.core.status import read_all, status_dir
from flowline.lab.services import InfluxDServer, MosquittoServer, free_port, wait_until
from tests.collectors_helpers import plain_broker, write_config, write_site
from tests.conftest import EXAMPLE_SITE, MQTT_PASSWORD, MQTT_USER

# Every log line: "2026-12-02T01:44:16.303Z LEVEL logger: message" (UTC).
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


def _flowline(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "flowline.core", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
    )  # fmt: skip


def _status(data_dir: Path, process: str) -> dict[str, Any]:
    docs = [d for d in read_all(data_dir) if d.get("process") == process]
    return docs[0] if docs else {}


def _link(doc: dict[str, Any]) -> dict[str, Any]:
    links = doc.get("links") or {}
    return next(iter(links.values()), {})


# --- MQTT collector ----------------------------------------------------------------------------


def test_mqtt_collector_against_a_dead_port_says_so_and_counts_every_attempt(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here
    config = write_config(tmp_path, write_site(tmp_path), {"mqtt": {"broker": plain_broker(port)}})
    target = f"mqtt://127.0.0.1:{port}"
    proc = _flowline("collect", "mqtt", "--config", str(tmp_path / "flowline.yaml"))
    try:
        # paho's back-off: attempts at 0, 1, 3 s (1 s doubling to 30 s)
        wait_until(lambda: _link(_status(config.data_dir, "collector-mqtt")).get("connect_attempts", 0) >= 3, 20,
                   "three connection attempts in the status file")  # fmt: skip
        shown = subprocess.run(
            [sys.executable, "-m", "flowline.core", "status", "--config", str(tmp_path / "flowline.yaml")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"READY collector-mqtt spool {config.spool_dir('mqtt')}" in out

    failures = [line for line in err.splitlines() if "cannot connect" in line]
    assert len(failures) >= 3, err
    assert failures[0].endswith(
        f"ERROR flowline.collectors.mqtt: cannot connect to MQTT broker {target} (collectors.mqtt.broker): "
        "connection refused (ECONNREFUSED); retrying with back-off (1 s doubling to 30 s between attempts; "
        "attempt 1 failed)"
    ), failures[0]
    assert failures[1].endswith("attempt 2 failed)") and failures[2].endswith("attempt 3 failed)")
    assert all(LOG_LINE.match(line) for line in err.splitlines() if line.strip()), err

    text = " ".join(shown.stdout.split())
    assert shown.returncode == 0, shown.stderr
    assert re.search(
        rf"collector-mqtt (DEGRADED|STOPPED) .* source {re.escape(target)} disconnected since \d\d:\d\d:\d\d UTC "
        r"\(\d+ s ago\), \d+ attempts: connection refused \(ECONNREFUSED\)",
        text,
    ), text
    doc = _status(config.data_dir, "collector-mqtt")
    assert doc["state"] == "stopped" and _link(doc)["connect_failures"] == _link(doc)["connect_attempts"] >= 3


def test_mqtt_collector_status_follows_a_broker_outage(
    tmp_path: Path, mosquitto_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connected, broker stopped (disconnected since, attempts counted), broker back (connected, reconnect)."""
    from flowline.collectors.cli import status_line
    from flowline.collectors.mqtt import MqttCollector

    monkeypatch.setenv("FLOWLINE_TEST_MQTT_PASSWORD", MQTT_PASSWORD)
    broker: MosquittoServer = mosquitto_factory(tls=False)
    password = {"env": "FLOWLINE_TEST_MQTT_PASSWORD"}
    client_id = "c-" + os.urandom(3).hex()
    section = {"broker": plain_broker(broker.port, username=MQTT_USER, password=password, client_id=client_id)}
    collector = MqttCollector(write_config(tmp_path, write_site(tmp_path), {"mqtt": section}))
    target = collector.target
    collector.start()
    collector.status.start()
    try:
        wait_until(collector.connected.is_set, 15, "connected")
        line = status_line("mqtt", collector.metrics, collector.status)
        assert line.startswith(f"mqtt: {target} connected since ") and "reconnects 0 connect attempts 1" in line

        broker.stop()
        wait_until(lambda: collector.metrics.counter("connect_failures_total", target=target) >= 2, 20, "2 failures")
        line = status_line("mqtt", collector.metrics, collector.status)
        assert re.match(rf"mqtt: {re.escape(target)} disconnected since .* \d+ attempts: connection refused", line), (
            line
        )
        doc = json.loads(collector.status.path.read_text())
        assert doc["state"] == "degraded" and _link(doc)["connected"] is False

        broker.start()
        wait_until(collector.connected.is_set, 40, "reconnected after the broker came back")
        assert collector.metrics.counter("reconnects_total", target=target) == 1
        attempts = collector.metrics.counter("connect_attempts_total", target=target)
        assert attempts == collector.metrics.counter("connect_failures_total", target=target) + 2
        collector.status.write()
        doc = json.loads(collector.status.path.read_text())
        assert doc["state"] == "running" and _link(doc)["connected"] is True and _link(doc)["reconnects"] == 1
    finally:
        collector.stop()
        collector.status.stop()


def test_opcua_collector_against_a_dead_port_counts_attempts_and_says_it_retries(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from flowline.collectors.opcua import OpcUaCollectorProcess

    url = f"opc.tcp://127.0.0.1:{free_port()}"
    section = {"servers": {"plc": {"url": url, "security": {"policy": "None", "mode": "None"}}},
               "reconnect_min_s": 0.2, "reconnect_max_s": 1}  # fmt: skip
    opcua_tag = [{"name": "t", "source": {"opcua": {"server": "plc", "node": "ns=2;s=t"}}}]
    process = OpcUaCollectorProcess(write_config(tmp_path, write_site(tmp_path, opcua_tag), {"opcua": section}))
    process.start()
    process.status.start()
    try:
        wait_until(lambda: process.metrics.counter("connect_failures_total", target=url) >= 3, 30, "3 failures")
    finally:
        process.stop()
        process.status.stop()
    doc = json.loads(process.status.path.read_text())
    link = doc["links"][url]
    assert link["connected"] is False and link["connect_attempts"] >= link["connect_failures"] >= 3
    assert "ConnectionRefusedError" in link["last_error"] or "OSError" in link["last_error"], link
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert re.match(rf"OPC UA plc \({re.escape(url)}\): retrying in \d\.\d s \(back-off up to 1 s; attempt 1 failed\)",
                    retries[0]), retries  # fmt: skip


# --- relay writer --------------------------------------------------------------------------------


def _writer_config(tmp_path: Path, url: str, user: str, password_env: str) -> Path:
    doc = {
        "site_file": str(write_site(tmp_path)),
        "data_dir": str(tmp_path / "data"),
        "historian": {"url": url, "database": "flowline", "username": user, "password": {"env": password_env}},
    }
    path = tmp_path / "dmz.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def influx_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxDServer]:
    server = InfluxDServer(tmp_path_factory.mktemp("influxd-writer"), auth=True)
    server.start()
    server.create_database("flowline")
    yield server
    server.stop()


def test_relay_writer_with_a_wrong_password_exits_2_with_one_clear_line(
    tmp_path: Path, influx_auth: InfluxDServer
) -> None:
    config = _writer_config(tmp_path, influx_auth.url, influx_auth.admin.name, "FLOWLINE_TEST_PW")
    proc = _flowline("relay", "writer", "--config", str(config), env={"FLOWLINE_TEST_PW": "wrong"})
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert "READY" not in out and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"Error: relay writer: InfluxDB at {influx_auth.url} refused user '{influx_auth.admin.name}' while trying "
        "to write (401: authorization failed); check the historian username/password or token in the config"
    )
    doc = _status(tmp_path / "data", "relay-writer")
    assert doc["state"] == "failed" and "401: authorization failed" in doc["last_error"]["message"]


def test_relay_writer_starts_degraded_and_loud_when_influxdb_is_unreachable(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    config = _writer_config(tmp_path, url, "writer", "FLOWLINE_TEST_PW")
    proc = _flowline("relay", "writer", "--config", str(config), env={"FLOWLINE_TEST_PW": "x"})
    try:
        wait_until(lambda: _link(_status(tmp_path / "data", "relay-writer")).get("connect_failures", 0) >= 2, 30,
                   "two failed checks")  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"READY relay-writer -> {url}" in out
    lines = [line for line in err.splitlines() if "not reachable" in line]
    assert len(lines) >= 2 and all(LOG_LINE.match(line) for line in lines), err
    assert re.search(
        rf"ERROR flowline.relay.writer: InfluxDB at {re.escape(url)} is not reachable \(ConnectionError: connection "
        r"refused\); running degraded: data stays in the DMZ spool \(0 bytes waiting\), retrying in \d+\.\d s$",
        lines[0],
    ), lines[0]
    doc = _status(tmp_path / "data", "relay-writer")
    link = doc["links"][url]
    assert (link["kind"], link["connected"]) == ("sink", False) and link["since"]


def test_relay_writer_with_good_credentials_reports_connected(tmp_path: Path, influx_auth: InfluxDServer) -> None:
    config = _writer_config(tmp_path, influx_auth.url, influx_auth.admin.name, "FLOWLINE_TEST_PW")
    proc = _flowline("relay", "writer", "--config", str(config), env={"FLOWLINE_TEST_PW": influx_auth.admin.password})
    try:
        wait_until(lambda: _link(_status(tmp_path / "data", "relay-writer")).get("connected") is True, 30, "connected")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "READY relay-writer" in out and f"InfluxDB at {influx_auth.url} accepts writes" in err


# --- dashboards provision ------------------------------------------------------------------------


@pytest.fixture
def not_grafana(tmp_path: Path) -> Iterator[str]:
    """A plain web server (directory listing, HTML errors), as when --url points at the wrong service."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: Quiet(*a, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("case", ["unreachable", "not-grafana"])
def test_dashboards_provision_failures_are_one_line(tmp_path: Path, not_grafana: str, case: str) -> None:
    token = tmp_path / "token"
    token.write_text("glsa_x")
    url = f"http://127.0.0.1:{free_port()}" if case == "unreachable" else not_grafana
    # With a site, as deployed: without one the command first warns what the dashboards lack (a second line).
    proc = _flowline("dashboards", "provision", "--url", url, "--token-file", str(token), "--site", str(EXAMPLE_SITE))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    expected = {
        "unreachable": f"Error: cannot reach Grafana at {url} (to read the folder): connection refused; "
        "check --url and that Grafana is running",
        "not-grafana": f"Error: {url} does not look like Grafana: asked to read the folder, it answered HTTP 404 "
        "with a non-JSON body ('<!DOCTYPE HTML> <html lang=\"en\"> <head> '...); check --url (Grafana's base "
        "URL, e.g. https://grafana.example:3000)",
    }
    assert err.strip() == expected[case]


# --- analytics: a skipped pass is not good news -------------------------------------------------


def test_analyze_with_no_history_says_nothing_was_assessed(tmp_path: Path, influx_auth: InfluxDServer) -> None:
    """Every series skipped (no data yet): analyze, its status file and the PNG report say so."""
    database = "empty_" + os.urandom(3).hex()
    influx_auth.create_database(database)
    doc = {
        "site_file": str(EXAMPLE_SITE),
        "data_dir": str(tmp_path / "data"),
        "historian": {"url": influx_auth.url, "database": database, "username": influx_auth.admin.name,
                      "password": {"env": "FLOWLINE_TEST_PW"}},
    }  # fmt: skip
    (tmp_path / "it.yaml").write_text(yaml.safe_dump(doc))
    proc = _flowline(
        "analyze", "--config", str(tmp_path / "it.yaml"), "--once", "--workers", "1",
        "--report", str(tmp_path / "r.png"),
        env={"FLOWLINE_TEST_PW": influx_auth.admin.password},
    )  # fmt: skip
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    text = " ".join(out.split())
    assert "No asset at WATCH or worse (" not in text
    found = re.search(r"WARNING: (\d+) of (\d+) series not assessed \(0 failed, (\d+) skipped\)", text)
    assert found and found.group(1) == found.group(2) == found.group(3) and int(found.group(1)) > 0, text
    assert "No assessed series at WATCH or worse, but" in text
    last_pass = _status(tmp_path / "data", "analytics")["extra"]["last_pass"]
    assert last_pass["ok"] == 0 and last_pass["not_assessed"].startswith(f"{found.group(1)} of {found.group(1)}")
    assert (tmp_path / "r.png").stat().st_size > 1000

    from flowline.lab.demo import analytics_incomplete

    class Stack:  # the demo reads the same status file under its data_dir
        data_dir = tmp_path / "data"

    assert analytics_incomplete(Stack()) == last_pass["not_assessed"]  # type: ignore[arg-type]
    Stack.data_dir = tmp_path / "nothing"
    assert analytics_incomplete(Stack()) == "the analytics pass left no result (did it run?)"  # type: ignore[arg-type]
    assert status_dir(tmp_path / "data").is_dir()


def test_mqtt_collector_with_a_wrong_password_says_the_broker_refused(
    tmp_path: Path, mosquitto: MosquittoServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flowline.collectors.mqtt import MqttCollector

    monkeypatch.setenv("FLOWLINE_TEST_MQTT_PASSWORD", "wrong")
    section = {"broker": plain_broker(mosquitto.port, username=MQTT_USER,
                                      password={"env": "FLOWLINE_TEST_MQTT_PASSWORD"})}  # fmt: skip
    collector = MqttCollector(write_config(tmp_path, write_site(tmp_path), {"mqtt": section}))
    collector.start()
    try:
        wait_until(lambda: collector.metrics.counter("connect_failures_total", target=collector.target) >= 1, 20,
                   "a refused connection")  # fmt: skip
    finally:
        collector.stop()
    refused = [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]
    assert refused and refused[0].startswith(
        f"cannot connect to MQTT broker {collector.target} (collectors.mqtt.broker): the broker refused the "
        "connection: Not authorized; retrying with back-off"
    ), refused
    link = collector.status.document()["links"][collector.target]
    assert link["connected"] is False and link["last_error"] == "the broker refused the connection: Not authorized"


# --- relay: OT sender and DMZ gateway ----------------------------------------------------------


def test_relay_status_files_follow_the_gateway_coming_up(tmp_path: Path, pki: Any) -> None:
    """OT sender first (gateway down: disconnected, attempts counted), then the gateway: both connected."""
    from tests.relay_helpers import SENDER, RelayRig

    rig = RelayRig(tmp_path / "rig", pki)
    ot_dir, dmz_dir = rig.ot.data_dir, rig.dmz.data_dir
    target = f"127.0.0.1:{rig.port}"
    try:
        with rig.ot_spool() as spool:
            spool.append([b"{}"])
        rig.start("ot", "--config", str(rig.ot_path))
        wait_until(lambda: (_status(ot_dir, "relay-ot").get("links") or {}).get(target, {}).get("connect_failures", 0)
                   >= 2, 30, "failed attempts to reach the gateway")  # fmt: skip
        link = _status(ot_dir, "relay-ot")["links"][target]
        assert link["connected"] is False and "ConnectionRefusedError" in link["last_error"]
        assert _status(ot_dir, "relay-ot")["spools"]["opcua"]["depth_bytes"] > 0

        rig.start_gateway()
        wait_until(lambda: _status(ot_dir, "relay-ot")["links"][target]["connected"] is True, 30, "sender connected")
        wait_until(lambda: _status(ot_dir, "relay-ot")["spools"]["opcua"]["depth_bytes"] == 0, 30, "spool drained")
        dmz = _status(dmz_dir, "relay-dmz")
        wait_until(lambda: (_status(dmz_dir, "relay-dmz").get("links") or {}).get(f"sender {SENDER}", {})
                   .get("last_ok") is not None, 30, "the gateway saw a batch")  # fmt: skip
        dmz = _status(dmz_dir, "relay-dmz")
        assert dmz["state"] == "running" and dmz["spools"]["dmz"]["depth_bytes"] > 0  # waiting for the writer
        check = subprocess.run(
            [sys.executable, "-m", "flowline.core", "status", "--data-dir", str(ot_dir), "--data-dir", str(dmz_dir),
             "--check", "all"], capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        assert check.stdout.splitlines() == ["healthy: relay-ot: running", "healthy: relay-dmz: running"]
    finally:
        rig.stop_all()
    assert _status(ot_dir, "relay-ot")["state"] == "stopped"
