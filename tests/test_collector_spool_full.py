"""The full-spool policy with a real Mosquitto (docs/spool.md): QoS 1 refused and redelivered, QoS 2
held, keep-alive running on, nothing acknowledged lost."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from flowline.collectors.mqtt import MqttCollector
from flowline.core.config import FlowlineConfig
from flowline.core.spool import SpoolReader, decode_points
from flowline.lab.services import MosquittoServer, wait_until
from tests.collectors_helpers import publisher, write_config, write_site
from tests.conftest import MQTT_PASSWORD, MQTT_USER
from tests.test_collector_mqtt import _mqtt_section


def test_full_spool_refuses_qos1_holds_qos2_keeps_the_connection_and_loses_nothing(
    tmp_path: Path,
    mosquitto_factory: Callable[..., MosquittoServer],
    run_collector: Callable[[FlowlineConfig], MqttCollector],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = mosquitto_factory(tls=False)
    monkeypatch.setenv("FLOWLINE_TEST_MQTT_PASSWORD", MQTT_PASSWORD)
    section = _mqtt_section(broker.port, protocol="3.1.1")
    section["mqtt"]["broker"]["keepalive_s"] = 1  # a blocked network thread would be disconnected within 1.5 s
    config = write_config(
        tmp_path, write_site(tmp_path), section, spool={"max_bytes": 6000, "segment_bytes": 1000}
    )
    collector = run_collector(config)
    sink = collector.runtime.sink
    pub = publisher(broker.port, MQTT_USER, MQTT_PASSWORD, client_id="pub-full")
    sent = 0

    def publish(count: int) -> None:
        nonlocal sent
        for _ in range(count):
            # every tenth message QoS 2, the rest QoS 1
            topic = "plant/test-site/P-1/pressure" if sent % 10 == 9 else "plant/test-site/P-1/rpm"
            pub.publish(topic, str(sent), qos=2 if sent % 10 == 9 else 1)
            sent += 1

    deadline = time.monotonic() + 30
    while sink.accepting:
        assert time.monotonic() < deadline, "the spool never filled"
        publish(20)
        time.sleep(0.02)
    for _ in range(30):  # 3 s while full, twice the keep-alive timeout
        publish(10)
        time.sleep(0.1)
    refused = collector.metrics.counter("refused_total", reason="spool_full")
    assert refused > 0 and not sink.accepting
    assert collector.connected.is_set() and collector.metrics.counter("reconnects_total", target=collector.target) == 0

    # The relay drains the spool: the held batch is stored, the collector reconnects, the broker redelivers.
    reader = SpoolReader(config.spool_dir("mqtt"))
    seen: set[float] = set()

    def drained() -> bool:
        for record in reader.read(max_records=100):
            for point in decode_points(record.payload):
                if point.measurement == "telemetry":
                    seen.add(float(point.fields["value"]))
            reader.ack(record.end)
        return len(seen) == sent

    wait_until(drained, 60, f"all {sent} messages in the spool")
    assert seen == {float(i) for i in range(sent)}
    assert collector.metrics.counter("redelivery_reconnects_total", target=collector.target) >= 1
    print(f"\nspool full: {sent} messages, {refused:.0f} points refused while full, all {len(seen)} stored")
    pub.loop_stop()
