"""Sparkplug B host behaviour through a real Mosquitto: birth, alias data, death, seq gaps, rebirth."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from flowline.collectors.common import Rejected
from flowline.collectors.mqtt import MqttCollector
from flowline.collectors.sparkplug import (
    BAD_NO_COMMUNICATION,
    BOOLEAN,
    DOUBLE,
    INT16,
    UINT64,
    MetricSpec,
    Payload,
    SparkplugHost,
    encode_payload,
)
from flowline.inventory import load_site
from flowline.points import Quality
from flowline.services import MosquittoServer, wait_until
from tests.collectors_helpers import publisher, telemetry, write_config, write_site
from tests.conftest import MQTT_PASSWORD, MQTT_USER


@pytest.fixture
def collector(tmp_path: Path, mosquitto: MosquittoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[MqttCollector]:
    monkeypatch.setenv("FLOWLINE_TEST_MQTT_PASSWORD", MQTT_PASSWORD)
    section = {
        "mqtt": {
            "broker": {
                "host": "127.0.0.1",
                "port": mosquitto.port,
                "username": MQTT_USER,
                "password": {"env": "FLOWLINE_TEST_MQTT_PASSWORD"},
                "client_id": "sp-" + os.urandom(4).hex(),
            },
            "sparkplug_allow_rebirth": True,
            "sparkplug_host_id": "flowline-test",
        }
    }
    c = MqttCollector(write_config(tmp_path, write_site(tmp_path), section))
    c.start()
    wait_until(c.connected.is_set, 15, "collector connected")
    yield c
    c.stop()


def _birth_metrics(seq_bd: int) -> list[MetricSpec]:
    return [MetricSpec("bdSeq", seq_bd, UINT64), MetricSpec("speed", 1.0, DOUBLE, alias=1)]


def test_birth_alias_data_death_and_rebirth(collector: MqttCollector, mosquitto: MosquittoServer) -> None:
    pub = publisher(mosquitto.port, MQTT_USER, MQTT_PASSWORD)
    commands: list[mqtt.MQTTMessage] = []
    pub.on_message = lambda c, u, m: commands.append(m)
    pub.subscribe("spBv1.0/G1/NCMD/E1", qos=1)
    states: list[mqtt.MQTTMessage] = []
    state_sub = publisher(mosquitto.port, MQTT_USER, MQTT_PASSWORD)
    state_sub.on_message = lambda c, u, m: states.append(m)
    state_sub.subscribe("spBv1.0/STATE/flowline-test", qos=1)
    wait_until(lambda: bool(states), 10, "the host's retained STATE message")
    assert json.loads(states[-1].payload)["online"] is True and states[-1].retain
    state_sub.loop_stop()
    spool = collector.runtime.writer.folder
    base = "spBv1.0/G1"
    now_ms = int(time.time() * 1000)

    # DATA before any BIRTH: rejected, and (allowed here) a rebirth is requested
    pub.publish(f"{base}/NDATA/E1", encode_payload([MetricSpec(None, 5.0, DOUBLE, alias=1)], seq=3), qos=1)
    wait_until(lambda: collector.metrics.counter("rejected_total", reason="data_before_birth") == 1, 10, "reject")
    wait_until(lambda: len(commands) == 1, 10, "rebirth NCMD")
    ncmd = Payload()
    ncmd.ParseFromString(commands[0].payload)
    assert ncmd.metrics[0].name == "Node Control/Rebirth" and ncmd.metrics[0].boolean_value

    pub.publish(f"{base}/NBIRTH/E1", encode_payload(_birth_metrics(7), seq=0, timestamp_ms=now_ms), qos=1)
    dbirth = [MetricSpec("temp", 20.0, DOUBLE, alias=10), MetricSpec("count", -5, INT16, alias=11)]
    pub.publish(f"{base}/DBIRTH/E1/D1", encode_payload(dbirth, seq=1, timestamp_ms=now_ms), qos=1)
    pub.publish(f"{base}/NDATA/E1", encode_payload([MetricSpec(None, 2.0, DOUBLE, alias=1)], seq=2), qos=1)
    ddata = [MetricSpec(None, 21.5, DOUBLE, alias=10, timestamp_ms=now_ms + 5), MetricSpec(None, -300, INT16, alias=11)]
    pub.publish(f"{base}/DDATA/E1/D1", encode_payload(ddata, seq=3), qos=1)
    pub.publish(f"{base}/DDEATH/E1/D1", encode_payload([], seq=4), qos=1)
    pub.publish(f"{base}/NDEATH/E1", encode_payload([MetricSpec("bdSeq", 7, UINT64)], seq=None), qos=1)

    def by_tag() -> dict[str, list[object]]:
        out: dict[str, list[object]] = {}
        for p in telemetry(spool):
            out.setdefault(p.tags["tag"], []).append(p.fields.get("value", p.fields.get("value_str")))
        return out

    wait_until(lambda: by_tag().get("speed") == [1.0, 2.0, "offline"], 10, "speed birth, data, death")
    values = by_tag()
    assert values["temp"] == [20.0, 21.5, "offline", "offline"]  # DDEATH, then the node's NDEATH
    assert values["count"] == [-5.0, -300.0, "offline", "offline"]
    points = telemetry(spool)
    temp_data = next(p for p in points if p.tags["tag"] == "temp" and p.fields.get("value") == 21.5)
    assert temp_data.timestamp_ns == (now_ms + 5) * 1_000_000
    offline = next(p for p in points if p.fields.get("value_str") == "offline")
    assert offline.fields["quality"] == Quality.BAD and offline.fields["status"] == BAD_NO_COMMUNICATION
    assert collector.metrics.counter("sequence_gaps_total", sender="G1/E1") == 0
    pub.loop_stop()


def test_sequence_gap_counted_and_unknown_alias_rejected(tmp_path: Path) -> None:
    host = SparkplugHost(load_site(write_site(tmp_path)), 86400, False)
    host.handle("spBv1.0/G1/NBIRTH/E1", encode_payload(_birth_metrics(1), seq=0))
    ok = host.handle("spBv1.0/G1/NDATA/E1", encode_payload([MetricSpec(None, 3.0, DOUBLE, alias=1)], seq=1))
    assert not ok.sequence_gap and [p.fields["value"] for p in ok.points] == [3.0]
    gap = host.handle("spBv1.0/G1/NDATA/E1", encode_payload([MetricSpec(None, 4.0, DOUBLE, alias=1)], seq=5))
    assert gap.sequence_gap and gap.rebirth_topic is None  # rebirth not allowed by this config
    with pytest.raises(Rejected) as err:
        host.handle("spBv1.0/G1/NDATA/E1", encode_payload([MetricSpec(None, 1.0, DOUBLE, alias=99)], seq=6))
    assert err.value.reason == "bad_payload"
    with pytest.raises(Rejected) as err:
        host.handle("spBv1.0/G1/NDATA/E1", b"\xff\xff\xff")
    assert err.value.reason == "bad_payload"
    unknown = host.handle("spBv1.0/G1/NDATA/E1", encode_payload([MetricSpec("other", True, BOOLEAN)], seq=7))
    assert unknown.points == [] and host.unknown == ["G1/E1//other"]
