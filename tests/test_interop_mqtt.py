"""Issue 16, MQTT side: what broke with third-party publishers and edge nodes (real Mosquitto, real influxd)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import requests
import yaml

from flowline.collectors.mqtt import MqttCollector
from flowline.collectors.sparkplug import DOUBLE, UINT64, Payload, RebirthLimiter, RejectedWithRebirth, SparkplugHost
from flowline.core.config import FlowlineConfig
from flowline.inventory import SiteFileError, load_site
from flowline.lab.services import InfluxDServer, MosquittoServer, wait_until
from tests.collectors_helpers import ODD_TAG, plain_broker, publisher, telemetry, write_config, write_site
from tests.conftest import MQTT_PASSWORD, MQTT_USER
from tests.test_collector_sparkplug import _double, _sub, _text, _uint


@pytest.fixture(autouse=True)
def _password_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWLINE_TEST_MQTT_PASSWORD", MQTT_PASSWORD)


def mqtt_section(port: int, **extra: Any) -> dict[str, Any]:
    broker = plain_broker(
        port,
        username=MQTT_USER,
        password={"env": "FLOWLINE_TEST_MQTT_PASSWORD"},
        client_id="interop-" + os.urandom(4).hex(),
    )
    return {"mqtt": {"broker": broker, "topic_templates": ["plant/{site}/{asset}/{tag}"], **extra}}


def test_json_array_without_timestamps_keeps_every_value_in_influxdb(
    tmp_path: Path,
    mosquitto: MosquittoServer,
    influx: InfluxDServer,
    influx_db: str,
    run_collector: Callable[[FlowlineConfig], MqttCollector],
) -> None:
    """`[10, 20, 30]` on one topic: three points in, three rows in InfluxDB (not one, value 30)."""
    config = write_config(tmp_path, write_site(tmp_path), mqtt_section(mosquitto.port))
    run_collector(config)
    pub = publisher(mosquitto.port, MQTT_USER, MQTT_PASSWORD)
    pub.publish("plant/test-site/P-1/rpm", "[10, 20, 30]", qos=1).wait_for_publish(5)
    pub.loop_stop()
    spool = config.spool_dir("mqtt")
    wait_until(lambda: len(telemetry(spool)) >= 3, 15, "three points in the spool")
    points = telemetry(spool)
    assert [p.timestamp_ns - points[0].timestamp_ns for p in points] == [0, 1, 2]  # documented: + position in ns
    lines = "\n".join(p.to_line() for p in points)
    auth = (influx.admin.name, influx.admin.password)
    requests.post(f"{influx.url}/write", params={"db": influx_db}, data=lines, auth=auth, timeout=10).raise_for_status()
    result: Any = influx.query('SELECT "value" FROM "telemetry" WHERE "tag" = \'rpm\'', db=influx_db)
    assert [row[1] for row in result["results"][0]["series"][0]["values"]] == [10.0, 20.0, 30.0]


def test_strings_on_a_number_tag_are_refused_by_the_one_type_rule(
    tmp_path: Path, mosquitto: MosquittoServer, run_collector: Callable[[FlowlineConfig], MqttCollector]
) -> None:
    """`"high"` and `"NaN"` on a number tag are refused like the NaN literal, not stored as good strings."""
    config = write_config(tmp_path, write_site(tmp_path), mqtt_section(mosquitto.port))
    collector = run_collector(config)
    pub = publisher(mosquitto.port, MQTT_USER, MQTT_PASSWORD)
    for payload in ('"high"', '"NaN"', '{"value": "high"}', "true", "2.5"):
        pub.publish("plant/test-site/P-1/pressure", payload, qos=1).wait_for_publish(5)
    pub.publish("plant/odd topic, with=signs", "7", qos=1).wait_for_publish(5)  # a string tag
    pub.publish("plant/odd topic, with=signs", '"RUNNING"', qos=1).wait_for_publish(5)
    pub.loop_stop()
    spool = config.spool_dir("mqtt")
    wait_until(lambda: len(telemetry(spool)) >= 3, 15, "the three good values")
    got = [(p.tags["tag"], p.fields.get("value", p.fields.get("value_str"))) for p in telemetry(spool)]
    assert got == [("pressure", 1.0), ("pressure", 2.5), (ODD_TAG, "RUNNING")]
    assert collector.metrics.counter("rejected_total", reason="wrong_type") == 4
    dead = (config.data_dir / "deadletter" / "mqtt.jsonl").read_text()
    assert "P-1/pressure is a number tag but got a string ('high')" in dead


# --- Sparkplug: a host that starts after its edge nodes ---------------------------------------------------
# The edge node below writes its payloads byte by byte from the Sparkplug B field numbers (Payload:
# timestamp 1, metrics 2, seq 3; Metric: name 1, alias 2, datatype 4, long_value 11, double_value 13),
# not with the collector's own encoder.


def _metric(name: str | None, alias: int, value: float | int, datatype: int) -> bytes:
    parts = [_text(1, name)] if name is not None else []
    kind = _uint(11, int(value)) if datatype == UINT64 else _double(13, float(value))
    return _sub(2, *parts, _uint(2, alias), _uint(4, datatype), kind)


def _payload(seq: int | None, *metrics: bytes) -> bytes:
    return _uint(1, int(time.time() * 1000)) + b"".join(metrics) + (_uint(3, seq) if seq is not None else b"")


class EdgeNode:
    """Sparkplug edge node G1/E1 with device D1 that answers a Node Control/Rebirth NCMD with its births."""

    def __init__(self, port: int) -> None:
        self.seq = 0
        self.commands: list[bytes] = []
        self.client = publisher(port, MQTT_USER, MQTT_PASSWORD, client_id="edge-" + os.urandom(4).hex())
        self.client.on_message = self._on_command
        self.client.subscribe("spBv1.0/G1/NCMD/E1", qos=1)
        wait_until(lambda: self.client.is_connected(), 10, "edge node connected")
        time.sleep(0.3)  # the SUBACK

    def _next(self) -> int:
        seq, self.seq = self.seq, (self.seq + 1) % 256
        return seq

    def _on_command(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.commands.append(bytes(message.payload))
        self.birth()

    def birth(self) -> None:
        self.seq = 0
        node = _payload(self._next(), _metric("bdSeq", 0, 1, UINT64), _metric("speed", 1, 1.0, DOUBLE))
        self.client.publish("spBv1.0/G1/NBIRTH/E1", node, qos=1)
        device = _payload(self._next(), _metric("temp", 10, 20.0, DOUBLE))
        self.client.publish("spBv1.0/G1/DBIRTH/E1/D1", device, qos=1)

    def ddata(self, temp: float) -> None:
        self.client.publish("spBv1.0/G1/DDATA/E1/D1", _payload(self._next(), _metric(None, 10, temp, DOUBLE)), qos=1)

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _temps(spool: Path) -> list[float]:
    return [float(p.fields["value"]) for p in telemetry(spool) if p.tags["tag"] == "temp" and "value" in p.fields]


def test_host_started_after_its_edge_node_asks_once_for_a_rebirth_by_default(
    tmp_path: Path, mosquitto: MosquittoServer, run_collector: Callable[[FlowlineConfig], MqttCollector]
) -> None:
    """The edge node was born before the host: by default its DATA brings one rebirth request (not one per
    message), and its data flows from the rebirth on."""
    edge = EdgeNode(mosquitto.port)
    edge.birth()  # online before the host exists: this BIRTH is lost to it
    section = mqtt_section(mosquitto.port)  # sparkplug_allow_rebirth not set: the default
    collector = run_collector(write_config(tmp_path, write_site(tmp_path), section))
    time.sleep(0.3)
    answered = edge.commands
    edge.client.on_message = lambda c, u, m: answered.append(bytes(m.payload))  # count, do not answer yet
    for temp in (1.0, 2.0, 3.0, 4.0):
        edge.ddata(temp)
    wait_until(lambda: collector.metrics.counter("rejected_total", reason="data_before_birth") == 4, 10, "4 rejects")
    time.sleep(1.0)
    assert len(answered) == 1  # one request for four DATA messages
    ncmd = Payload()
    ncmd.ParseFromString(answered[0])
    assert [(m.name, m.boolean_value) for m in ncmd.metrics] == [("Node Control/Rebirth", True)]
    edge.birth()  # the rebirth the request asked for
    edge.ddata(5.0)
    spool = collector.runtime.writer.folder
    wait_until(lambda: _temps(spool) == [20.0, 5.0], 10, "the reborn node's data")
    assert collector.metrics.counter("rebirth_requests_total", sender="G1/E1") == 1
    edge.stop()


def test_without_rebirth_the_log_says_which_setting_to_change(
    tmp_path: Path,
    mosquitto: MosquittoServer,
    run_collector: Callable[[FlowlineConfig], MqttCollector],
    caplog: pytest.LogCaptureFixture,
) -> None:
    edge = EdgeNode(mosquitto.port)
    section = mqtt_section(mosquitto.port, sparkplug_allow_rebirth=False)
    collector = run_collector(write_config(tmp_path, write_site(tmp_path), section))
    edge.client.on_message = lambda c, u, m: edge.commands.append(bytes(m.payload))
    with caplog.at_level(logging.WARNING, logger="flowline.collectors.sparkplug"):
        for temp in (1.0, 2.0, 3.0):
            edge.ddata(temp)
        wait_until(lambda: collector.metrics.counter("rejected_total", reason="data_before_birth") == 3, 10, "rejects")
    hints = [r.getMessage() for r in caplog.records if "sparkplug_allow_rebirth: true" in r.getMessage()]
    assert len(hints) == 1 and "G1/E1" in hints[0] and "restart the edge node" in hints[0]
    assert edge.commands == []
    edge.stop()


def test_rebirth_requests_back_off_per_edge_node() -> None:
    limiter = RebirthLimiter(min_s=2, max_s=60)
    node, other = ("G1", "E1"), ("G1", "E2")
    sent = [t for t in (0, 0.5, 1.9, 2.0, 3.0, 5.9, 6.0, 13.0, 14.0) if limiter.allow(node, now=t)]
    assert sent == [0, 2.0, 6.0, 14.0]  # 2 s, then 4 s, then 8 s between requests
    assert limiter.allow(other, now=0.5)  # each edge node has its own back-off
    assert limiter.allow(node, now=14.0 + 61) and not limiter.allow(node, now=14.0 + 62)  # quiet spell: from 2 s again


# --- many similar devices: an asset pattern and a type whose tags are inherited ----------------------------


def _pattern_site(folder: Path) -> Path:
    path = write_site(folder)
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    doc["asset_types"] = {
        "booster-pump": {
            "tags": [
                {"name": "flow", "unit": "m3/h", "alarm": {"high": 40}},
                {"name": "state", "type": "string"},
            ]
        }
    }
    doc["asset_patterns"] = [{"pattern": "bp-*", "type": "booster-pump", "criticality": "B"}]
    doc["flows"] = [{"sender": "ot-1", "assets": ["P-1", "bp-*"], "tags": ["flow", "pressure"]}]
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    return path


def test_asset_pattern_maps_hundreds_of_devices_validated_and_subject_to_flows(
    tmp_path: Path, mosquitto: MosquittoServer, run_collector: Callable[[FlowlineConfig], MqttCollector]
) -> None:
    config = write_config(tmp_path, _pattern_site(tmp_path), mqtt_section(mosquitto.port))
    collector = run_collector(config)
    pub = publisher(mosquitto.port, MQTT_USER, MQTT_PASSWORD)
    sends = [
        *((f"plant/test-site/bp-{n:03d}/flow", str(float(n))) for n in range(200)),  # 200 devices, one rule
        ("plant/test-site/bp-007/state", '"RUNNING"'),
        ("plant/test-site/bp-007/vibration", "1.0"),  # not a tag of the type: unknown
        ("plant/test-site/valve-9/flow", "1.0"),  # matches no pattern: unknown
        ("plant/other-site/bp-001/flow", "1.0"),  # another site: unknown
        ("plant/test-site/bp-008/flow", '"high"'),  # typed by the asset type: refused
    ]
    for topic, payload in sends:
        pub.publish(topic, payload, qos=1)
    pub.publish("plant/test-site/P-1/pressure", "9", qos=1).wait_for_publish(5)
    pub.loop_stop()
    spool = config.spool_dir("mqtt")
    wait_until(lambda: len(telemetry(spool)) >= 202, 20, "202 points")
    points = telemetry(spool)
    flows = {p.tags["asset"]: p for p in points if p.tags["tag"] == "flow"}
    assert len(flows) == 200 and flows["bp-042"].fields["value"] == 42.0
    assert flows["bp-042"].tags == {"site": "test-site", "asset": "bp-042", "tag": "flow", "unit": "m3/h"}
    assert [p.fields["value_str"] for p in points if p.tags["tag"] == "state"] == ["RUNNING"]
    assert collector.metrics.counter("rejected_total", reason="unknown_topic") == 3
    assert collector.metrics.counter("rejected_total", reason="wrong_type") == 1
    # the DMZ gateway's policy applies to them like to listed assets
    site = load_site(config.site_file)
    assert site.is_flow_approved("ot-1", "bp-042", "flow")
    assert not site.is_flow_approved("ot-1", "bp-042", "state")  # not in the flow's tags
    assert not site.is_flow_approved("ot-2", "bp-042", "flow")


def test_asset_patterns_are_validated_when_the_site_file_loads(tmp_path: Path) -> None:
    path = _pattern_site(tmp_path)
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    doc["asset_patterns"] += [{"pattern": "fan/+", "type": "fan"}]
    doc["flows"] += [{"sender": "ot-1", "assets": ["cp-*"]}]
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    with pytest.raises(SiteFileError) as raised:
        load_site(path)
    problems = "\n".join(raised.value.problems)
    assert "asset_patterns[1] (fan/+).type: unknown asset type 'fan', expected one of ['booster-pump']" in problems
    assert "asset_patterns[1] (fan/+).pattern: an asset id is one MQTT topic level" in problems
    assert "flows[1].assets: pattern 'cp-*' matches no asset of the inventory" in problems


def test_mqtt_collector_says_where_it_connected_at_default_verbosity(
    tmp_path: Path, mosquitto: MosquittoServer
) -> None:
    write_config(tmp_path, write_site(tmp_path), mqtt_section(mosquitto.port))
    flowline = str(Path(sys.executable).parent / "flowline")
    proc = subprocess.Popen(
        [flowline, "collect", "mqtt", "--config", str(tmp_path / "flowline.yaml")],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and not any("connected to MQTT broker" in line for line in lines):
            lines.append(proc.stderr.readline())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    connected = next(line for line in lines if "connected to MQTT broker" in line)
    assert " INFO " in connected and f"mqtt://127.0.0.1:{mosquitto.port}" in connected
    assert "subscribed to plant/+/+/+" in connected


def test_a_dbirth_before_its_nbirth_also_asks_for_a_rebirth(tmp_path: Path) -> None:
    host = SparkplugHost(load_site(write_site(tmp_path)), 86400, allow_rebirth=True)
    device = _payload(0, _metric("temp", 10, 20.0, DOUBLE))
    with pytest.raises(RejectedWithRebirth) as raised:
        host.handle("spBv1.0/G1/DBIRTH/E1/D1", device)
    assert raised.value.reason == "data_before_birth"
    assert raised.value.result.rebirth_topic == "spBv1.0/G1/NCMD/E1"
