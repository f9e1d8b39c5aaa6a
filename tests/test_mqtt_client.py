"""The MQTT collector's fast receive path (flowline/collectors/mqtt_client.py).

Wire level: a byte stream of PUBLISH (QoS 0/1/2, 3.1.1 and 5 with properties) and other packets,
encoded here from the MQTT specification, is cut at arbitrary points and fed through a real socket
pair into `FastClient`; every QoS 0/1 message must come out once, whole and in order, and the rest
must reach paho's own parser (which answers a QoS 2 PUBLISH with PUBREC). Then the same through a
real Mosquitto: large messages spanning reads, every QoS, MQTT 5 properties, and batched PUBACKs
that the broker accepts (a restarted collector gets nothing twice).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from flowline.collectors.mqtt import MqttCollector
from flowline.collectors.mqtt_client import FastClient, Publish, split_publishes
from flowline.core.config import FlowlineConfig
from flowline.lab.services import MosquittoServer, wait_until
from tests.collectors_helpers import telemetry, varint, write_config, write_site
from tests.conftest import MQTT_PASSWORD, MQTT_USER

PINGRESP = b"\xd0\x00"


def _publish(msg: Publish, mqtt5: bool, properties: bytes = b"") -> bytes:
    topic = msg.topic.encode()
    body = struct.pack("!H", len(topic)) + topic
    if msg.qos:
        body += struct.pack("!H", msg.mid)
    if mqtt5:
        body += varint(len(properties)) + properties
    body += msg.payload
    return bytes([0x30 | msg.qos << 1]) + varint(len(body)) + body


# MQTT 5 properties a broker may forward: content type (0x03) and a user property (0x26)
_PROPERTIES = b"\x03\x00\x10application/json" + b"\x26\x00\x04unit\x00\x03bar"

_messages = st.lists(
    st.one_of(
        st.builds(
            Publish,
            topic=st.text(min_size=1, max_size=40).filter(lambda t: "\x00" not in t),
            payload=st.one_of(st.binary(max_size=300), st.binary(min_size=70_000, max_size=140_000)),
            qos=st.sampled_from([0, 1, 2]),
            mid=st.integers(1, 65535),
        ),
        st.just(None),  # a PINGRESP: a packet only paho handles
    ),
    max_size=40,
)


class _Wire:
    """A FastClient whose socket is one end of a real socket pair; the test is the broker."""

    def __init__(self, mqtt5: bool) -> None:
        self.broker, ours = socket.socketpair()
        ours.setblocking(False)
        self.client = FastClient(
            CallbackAPIVersion.VERSION2,
            client_id="wire",
            protocol=mqtt.MQTTv5 if mqtt5 else mqtt.MQTTv311,
            manual_ack=True,
        )
        self.client._sock = ours
        self.batches: list[list[Publish]] = []
        self.client.on_publish_batch = self.batches.append

    def feed(self, chunk: bytes) -> MQTTErrorCode:
        self.broker.sendall(chunk)
        return self.client.loop_read()

    def received(self) -> list[Publish]:
        return [message for batch in self.batches for message in batch]

    def answers(self) -> bytes:
        self.broker.setblocking(False)
        try:
            return self.broker.recv(1 << 20)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        self.broker.close()
        if self.client._sock is not None:
            self.client._sock.close()


@settings(max_examples=60, deadline=None)
@given(messages=_messages, mqtt5=st.booleans(), cuts=st.lists(st.integers(1, 65536), min_size=1, max_size=20))
def test_every_qos01_publish_comes_out_once_whole_and_in_order(
    messages: list[Publish | None], mqtt5: bool, cuts: list[int]
) -> None:
    stream = b"".join(PINGRESP if m is None else _publish(m, mqtt5, _PROPERTIES if mqtt5 else b"") for m in messages)
    wire = _Wire(mqtt5)
    try:
        pos, i = 0, 0
        while pos < len(stream):
            size = cuts[i % len(cuts)]  # at most 64 KiB: one loop_read takes one chunk
            assert wire.feed(stream[pos : pos + size]) == MQTTErrorCode.MQTT_ERR_SUCCESS
            pos, i = pos + size, i + 1
        # a QoS 0 PUBLISH carries no packet id: it comes out with mid 0
        want = [m._replace(mid=m.mid if m.qos else 0) for m in messages if m is not None and m.qos < 2]
        assert wire.received() == want
        assert len(wire.client._rbuf) == 0  # nothing left half-parsed
        qos2 = [m for m in messages if m is not None and m.qos == 2]
        # paho parsed each QoS 2 PUBLISH itself and answered PUBREC (0x50) with its packet id
        assert wire.answers() == b"".join(struct.pack("!BBH", 0x50, 2, m.mid) for m in qos2)
    finally:
        wire.close()


def test_ack_many_sends_pubacks_in_order_in_one_write() -> None:
    wire = _Wire(mqtt5=False)
    try:
        wire.client.ack_many([7, 1, 65535])
        assert wire.answers() == b"\x40\x02\x00\x07\x40\x02\x00\x01\x40\x02\xff\xff"
        wire.client.ack_many([])
        assert wire.answers() == b""
    finally:
        wire.close()


def test_malformed_length_and_closed_connection_are_reported_by_paho() -> None:
    wire = _Wire(mqtt5=False)
    disconnects: list[Any] = []
    wire.client.on_disconnect = lambda *args: disconnects.append(args[3])
    try:
        # five length bytes with the continuation bit: no valid packet can follow
        assert wire.feed(b"\x30\xff\xff\xff\xff\xff\x00") == MQTTErrorCode.MQTT_ERR_PROTOCOL
        assert wire.client._sock is None and len(wire.client._rbuf) == 0 and disconnects
    finally:
        wire.close()
    wire = _Wire(mqtt5=False)
    try:
        half = _publish(Publish("t", b"x" * 100, 1, 5), mqtt5=False)[:50]
        assert wire.feed(half) == MQTTErrorCode.MQTT_ERR_SUCCESS and wire.received() == []
        wire.broker.close()
        assert wire.client.loop_read() == MQTTErrorCode.MQTT_ERR_CONN_LOST
        assert wire.received() == []  # a half message is never delivered
    finally:
        wire.close()


def test_split_leaves_qos2_and_partial_packets_for_later() -> None:
    one = _publish(Publish("a/b", b"1", 1, 9), mqtt5=False)
    two = _publish(Publish("a/c", b"2", 2, 10), mqtt5=False)
    buf = bytearray(one + two + one[:3])
    messages, pos = split_publishes(buf, 0, mqtt5=False)
    assert messages == [Publish("a/b", b"1", 1, 9)] and pos == len(one)
    assert split_publishes(buf, len(one + two), mqtt5=False) == ([], len(one + two))


# --- through a real Mosquitto -----------------------------------------------------------------


@pytest.fixture(autouse=True)
def _password_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWLINE_TEST_MQTT_PASSWORD", MQTT_PASSWORD)


def _config(folder: Path, port: int, protocol: str, client_id: str) -> FlowlineConfig:
    broker = {
        "host": "127.0.0.1",
        "port": port,
        "insecure_plain": True,
        "username": MQTT_USER,
        "password": {"env": "FLOWLINE_TEST_MQTT_PASSWORD"},
        "client_id": client_id,
        "protocol": protocol,
    }
    return write_config(folder, write_site(folder), {"mqtt": {"broker": broker}})


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_mixed_qos_large_messages_and_batched_acks_through_mosquitto(
    tmp_path: Path,
    mosquitto: MosquittoServer,
    run_collector: Callable[[FlowlineConfig], MqttCollector],
    protocol: str,
) -> None:
    config = _config(tmp_path, mosquitto.port, protocol, "fast-" + os.urandom(4).hex())
    collector = run_collector(config)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.username_pw_set(MQTT_USER, MQTT_PASSWORD)
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.UserProperty = ("unit", "bar")
    properties.ContentType = "application/json"
    now = time.time()
    big = json.dumps([{"value": i, "ts": now - 1 + i / 1e5} for i in range(5000)])  # ~190 KiB: spans reads
    assert 65536 < len(big) < 256 * 1024
    expected: list[float] = []
    for i in range(600):
        qos = i % 3
        pub.publish("plant/test-site/P-1/rpm", str(i), qos=qos, properties=properties).wait_for_publish(5)
        expected.append(float(i))
        if i in (100, 400):
            pub.publish("plant/test-site/P-1/pressure", big, qos=1).wait_for_publish(5)
    spool = config.spool_dir("mqtt")

    def rpm() -> list[float]:
        return [float(p.fields["value"]) for p in telemetry(spool) if p.tags["tag"] == "rpm"]

    wait_until(lambda: len(rpm()) >= 600 and len(telemetry(spool)) >= 600 + 10000, 30, "every message spooled")
    assert sorted(rpm()) == expected  # each exactly once, whatever its QoS
    pressure = [p.fields["value"] for p in telemetry(spool) if p.tags["tag"] == "pressure"]
    assert pressure == [float(i) for i in range(5000)] * 2
    # Every QoS 1/2 message was acknowledged: a new connection with the same session gets no redelivery.
    collector.stop()
    again = run_collector(config)
    pub.publish("plant/test-site/P-1/rpm", "-1", qos=1).wait_for_publish(5)
    wait_until(lambda: -1.0 in rpm(), 15, "the marker after the restart")
    assert sorted(rpm()) == [-1.0, *expected]
    assert again.metrics.total("rejected_total") == 0
    pub.loop_stop()
