"""MQTT collector against a real Mosquitto: JSON shapes, TLS + auth, bad input, restarts without loss."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from flowline.collectors.mqtt import MqttCollector
from flowline.core.config import FlowlineConfig
from flowline.core.points import Quality
from flowline.lab.pki import CertificateAuthority
from flowline.lab.services import MosquittoServer, wait_until
from tests.collectors_helpers import (
    ODD_ASSET,
    ODD_TAG,
    metric_points,
    publisher,
    telemetry,
    write_config,
    write_site,
)
from tests.conftest import MQTT_PASSWORD, MQTT_USER, REPO


def _mqtt_section(port: int, tls_ca: Path | None = None, protocol: str = "5", **extra: Any) -> dict[str, Any]:
    broker: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "username": MQTT_USER,
        "password": {"env": "FLOWLINE_TEST_MQTT_PASSWORD"},
        "client_id": "collector-" + os.urandom(4).hex(),
        "protocol": protocol,
    }
    if tls_ca is not None:
        broker["tls"] = {"ca_file": str(tls_ca)}
    else:
        broker["insecure_plain"] = True  # the test broker's plain listener, said explicitly
    return {"mqtt": {"broker": broker, "topic_templates": ["plant/{site}/{asset}/{tag}"], **extra}}


@pytest.fixture(autouse=True)
def _password_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWLINE_TEST_MQTT_PASSWORD", MQTT_PASSWORD)


def _values(points: list[Any], tag: str) -> list[float]:
    return [p.fields["value"] for p in points if p.tags["tag"] == tag and "value" in p.fields]


def test_json_payload_shapes_over_tls_with_auth(
    tmp_path: Path,
    mosquitto: MosquittoServer,
    pki: CertificateAuthority,
    run_collector: Callable[[FlowlineConfig], MqttCollector],
) -> None:
    config = write_config(tmp_path, write_site(tmp_path), _mqtt_section(mosquitto.tls_port, pki.files.cert))
    run_collector(config)
    pub = publisher(mosquitto.port, MQTT_USER, MQTT_PASSWORD)
    t0 = int(time.time()) - 3600
    iso = datetime.fromtimestamp(t0 + 2, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    sends = [
        ("plant/test-site/P-1/pressure", "1.5"),
        ("plant/test-site/P-1/pressure", json.dumps({"value": 2.5, "ts": t0, "quality": "uncertain"})),
        ("plant/test-site/P-1/pressure", json.dumps({"value": 3.5, "ts": t0 * 1000 + 1500})),
        ("plant/test-site/P-1/pressure", json.dumps({"value": 4.5, "ts": iso, "quality": 0x80000000})),
        ("plant/test-site/P-1/rpm", json.dumps([{"value": 10, "ts": t0}, {"value": 11, "ts": t0 + 1}])),
        ("plant/multi", json.dumps({"flow": 7, "level": {"value": True}})),
        ("plant/test-site/P-1/speed", "42"),  # via the template: asset P-1, tag speed
        ("plant/odd topic, with=signs", '"text value"'),
    ]
    for topic, payload in sends:
        pub.publish(topic, payload, qos=1).wait_for_publish(5)
    spool = config.spool_dir("mqtt")
    wait_until(lambda: len(telemetry(spool)) >= 10, 15, "10 points in the spool")
    points = telemetry(spool)
    pressure = [p for p in points if p.tags["tag"] == "pressure"]
    assert [p.fields["value"] for p in pressure] == [1.5, 2.5, 3.5, 4.5]
    assert pressure[0].tags == {"site": "test-site", "asset": "P-1", "tag": "pressure", "unit": "bar"}
    assert pressure[1].timestamp_ns == t0 * 10**9
    assert pressure[1].fields["quality"] == Quality.UNCERTAIN
    assert pressure[2].timestamp_ns == (t0 * 1000 + 1500) * 10**6
    assert pressure[3].timestamp_ns == (t0 + 2) * 10**9
    assert pressure[3].fields["quality"] == Quality.BAD and pressure[3].fields["status"] == 0x80000000
    assert _values(points, "rpm") == [10.0, 11.0]
    assert _values(points, "flow") == [7.0] and _values(points, "level") == [1.0]
    assert _values(points, "speed") == [42.0]
    odd = next(p for p in points if p.tags["asset"] == ODD_ASSET)
    assert odd.tags["tag"] == ODD_TAG and odd.fields["value_str"] == "text value"
    assert 'asset=P\\ 1\\,\\="x"ü' in odd.to_line()
    pub.loop_stop()


def test_bad_input_is_rejected_counted_dead_lettered_and_stream_goes_on(
    tmp_path: Path, mosquitto: MosquittoServer, run_collector: Callable[[FlowlineConfig], MqttCollector]
) -> None:
    section = _mqtt_section(mosquitto.port, max_payload_bytes=1024, timestamp_window_s=3600)
    config = write_config(tmp_path, write_site(tmp_path), section)
    collector = run_collector(config)
    pub = publisher(mosquitto.port, MQTT_USER, MQTT_PASSWORD)
    topic = "plant/test-site/P-1/pressure"
    bad = {
        "invalid_json": (topic, b"{not json"),
        "not_finite": (topic, b"NaN"),
        "wrong_type": (topic, b'{"value": [1, 2]}'),
        "too_large": (topic, b"1" * 2000),
        "unknown_topic": ("plant/test-site/NOPE/x", b"1"),
        "timestamp_out_of_window": (topic, json.dumps({"value": 1, "ts": 1_000_000_000}).encode()),
    }
    for t, payload in bad.values():
        pub.publish(t, payload, qos=1).wait_for_publish(5)
    pub.publish(topic, b'{"value": Infinity}', qos=1).wait_for_publish(5)
    pub.publish(topic, b"99", qos=1).wait_for_publish(5)
    spool = config.spool_dir("mqtt")
    wait_until(lambda: _values(telemetry(spool), "pressure") == [99.0], 15, "the good message after the bad ones")
    m = collector.metrics
    for reason in bad:
        assert m.counter("rejected_total", reason=reason) >= 1, reason
    assert m.counter("rejected_total", reason="not_finite") == 2
    assert m.counter("unknown_sources_total", source="mqtt", address="plant/test-site/NOPE/x") == 1
    dead = [json.loads(line) for line in (config.data_dir / "deadletter" / "mqtt.jsonl").read_text().splitlines()]
    assert {d["reason"] for d in dead} == set(bad)
    assert next(d for d in dead if d["reason"] == "invalid_json")["payload"] == "{not json"
    assert all(topic in d["where"] or "NOPE" in d["where"] for d in dead)
    # the counters also travel through the spool as flowline_* points
    wait_until(lambda: bool(metric_points(spool, "rejected_total")), 10, "metrics in the spool")
    pub.loop_stop()


def test_broker_restart_loses_no_qos1_message(
    tmp_path: Path,
    mosquitto_factory: Callable[..., MosquittoServer],
    run_collector: Callable[[FlowlineConfig], MqttCollector],
) -> None:
    broker = mosquitto_factory(tls=False)
    config = write_config(tmp_path, write_site(tmp_path), _mqtt_section(broker.port, protocol="3.1.1"))
    collector = run_collector(config)
    pub = publisher(broker.port, MQTT_USER, MQTT_PASSWORD, client_id="pub-restart")
    pub.reconnect_delay_set(1, 2)
    total = 600
    for i in range(total):
        pub.publish("plant/test-site/P-1/rpm", str(i), qos=1)
        if i == total // 2:
            broker.restart()
        time.sleep(0.002)
    spool = config.spool_dir("mqtt")
    wait_until(lambda: set(_values(telemetry(spool), "rpm")) == set(map(float, range(total))), 60, "all messages")
    assert collector.metrics.counter("reconnects_total", target=collector.target) >= 1
    pub.loop_stop()


def _collector_process(config_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "FLOWLINE_TEST_MQTT_PASSWORD": MQTT_PASSWORD}
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "flowline"), "collect", "mqtt", "--config", str(config_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_collector_killed_while_publishing_loses_nothing(tmp_path: Path, mosquitto: MosquittoServer) -> None:
    config = write_config(tmp_path, write_site(tmp_path), _mqtt_section(mosquitto.port))
    config_path = tmp_path / "flowline.yaml"
    spool = config.spool_dir("mqtt")
    proc = _collector_process(config_path)
    pub = publisher(mosquitto.port, MQTT_USER, MQTT_PASSWORD)
    try:
        # until the collector has subscribed once, the broker has no session to queue messages in
        def probe() -> bool:
            pub.publish("plant/test-site/P-1/rpm", "-1", qos=1)
            return -1.0 in _values(telemetry(spool), "rpm")

        wait_until(probe, 30, "collector subprocess running", interval=0.5)
        total = 2000
        stop = threading.Event()

        def publish_all() -> None:
            for i in range(total):
                pub.publish("plant/test-site/P-1/rpm", str(i), qos=1)
                time.sleep(0.001)
            stop.set()

        thread = threading.Thread(target=publish_all)
        thread.start()
        wait_until(lambda: len(_values(telemetry(spool), "rpm")) > 200, 30, "some messages spooled")
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)  # reaps it and closes its pipes
        thread.join()
        proc = _collector_process(config_path)
        want = {float(i) for i in range(total)}
        wait_until(lambda: want <= set(_values(telemetry(spool), "rpm")), 60, "every message after the restart")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
        pub.loop_stop()


def test_ms_timestamps_and_non_finite_helpers() -> None:
    from flowline.collectors.mqtt_json import parse_timestamp

    assert parse_timestamp(1_700_000_000.25) == 1_700_000_000_250_000_000
    assert parse_timestamp("2023-11-14T22:13:20.5+00:00") == 1_700_000_000_500_000_000
    assert math.isclose(parse_timestamp(1_700_000_000_000_000) / 1e9, 1_700_000_000)


@pytest.mark.parametrize(
    ("payload", "reason", "says"),
    [
        (b'{"value": NaN}', "not_finite", "NaN"),
        (b"[1, Infinity]", "not_finite", "Infinity"),
        (b'{"value": 1', "invalid_json", "line 1 column"),
        (b"\xff\xfe", "invalid_json", "not UTF-8"),
        (b'{"value": "\\ud800"}', "invalid_json", "surrogate"),  # Python reads it, UTF-8 cannot carry it
    ],
)
def test_refused_json_says_exactly_why(payload: bytes, reason: str, says: str) -> None:
    from flowline.collectors.common import Rejected
    from flowline.collectors.mqtt_json import TopicTarget, decode_json
    from flowline.core.points import TagRef

    with pytest.raises(Rejected) as refused:
        decode_json(payload, [TopicTarget(TagRef("s", "a", "t"), None)], 3600)
    assert refused.value.reason == reason and says in str(refused.value)


def test_shared_subscription_splits_the_stream_between_replicas(
    tmp_path: Path, mosquitto: MosquittoServer, run_collector: Callable[[FlowlineConfig], MqttCollector]
) -> None:
    site = write_site(tmp_path)
    group = "g" + os.urandom(3).hex()
    replicas = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        config = write_config(tmp_path / name, site, _mqtt_section(mosquitto.port, shared_group=group))
        replicas.append(run_collector(config))
    assert all(s.startswith(f"$share/{group}/") for s in replicas[0].subscriptions())
    pub = publisher(mosquitto.port, MQTT_USER, MQTT_PASSWORD)
    for i in range(100):
        pub.publish("plant/test-site/P-1/rpm", str(i), qos=1).wait_for_publish(5)
    spools = [r.runtime.writer.folder for r in replicas]

    def split() -> list[set[float]]:
        return [set(_values(telemetry(s), "rpm")) for s in spools]

    wait_until(lambda: set.union(*split()) == set(map(float, range(100))), 15, "all messages across replicas")
    a, b = split()
    assert a and b and not (a & b)  # each message went to exactly one replica
    pub.loop_stop()
