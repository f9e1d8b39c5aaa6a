"""MQTT collector (paho-mqtt 2.x): plain JSON topics and Sparkplug B, QoS 1, persistent session.

A QoS 1 message is acknowledged to the broker (PUBACK) only after its points are durable in the
spool, or after it was rejected and written to the dead-letter file. Killing the collector at any
moment therefore loses nothing: the broker redelivers what was not acknowledged (persistent
session: fixed client id, ``clean_start`` false, session expiry on MQTT 5).

Messages arrive in batches, one per socket read (`FastClient`, mqtt_client.py): a batch's points
go to the spool as one item and its PUBACKs leave in one write once that item is durable. QoS 2
messages take paho's own path (``on_message``), which keeps the exactly-once handshake.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from functools import partial
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from flowline.collectors.common import CollectorRuntime, Rejected
from flowline.collectors.mqtt_client import FastClient, Publish
from flowline.collectors.mqtt_json import TopicMap, decode_json
from flowline.collectors.mqtt_tls import tls_context
from flowline.collectors.sparkplug import NAMESPACE, RejectedWithRebirth, SparkplugHost, rebirth_payload
from flowline.core.config import FlowlineConfig, MqttCollectorConfig
from flowline.core.errors import FlowlineError
from flowline.core.points import Point

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 86400  # how long the broker keeps our queued messages while we are down


class MqttCollectorError(FlowlineError):
    """The MQTT collector cannot start or connect (missing config section, unreadable secret, TLS refused)."""


class MqttCollector:
    def __init__(self, config: FlowlineConfig) -> None:
        if config.collectors.mqtt is None:
            raise MqttCollectorError("the config file has no collectors.mqtt section")
        self.cfg: MqttCollectorConfig = config.collectors.mqtt
        self.runtime = CollectorRuntime(config, "mqtt", self.cfg.batch_max_points, self.cfg.batch_max_latency_ms / 1000)
        self.site = self.runtime.site
        self.metrics = self.runtime.metrics
        self.topics = TopicMap(self.site, self.cfg.topic_templates)
        self.host = SparkplugHost(self.site, self.cfg.timestamp_window_s, self.cfg.sparkplug_allow_rebirth)
        broker = self.cfg.broker
        self.target = f"mqtt{'s' if broker.tls else ''}://{broker.host}:{broker.port}"
        self.connected = threading.Event()
        self._stopping = False
        self.last_error: MqttCollectorError | None = None
        self._connections = 0
        self.client = self._make_client()

    # --- setup -----------------------------------------------------------------------------------

    def _make_client(self) -> FastClient:
        broker = self.cfg.broker
        v5 = broker.protocol == "5"
        client = FastClient(
            CallbackAPIVersion.VERSION2,
            client_id=broker.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else self.cfg.clean_start,
            manual_ack=True,
        )
        if broker.username is not None:
            password = broker.password.read() if broker.password is not None else None
            client.username_pw_set(broker.username, password)
        if broker.tls is not None:
            client.tls_set_context(tls_context(broker.tls))
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        if self.cfg.sparkplug_host_id:
            client.will_set(self._state_topic(), self._state_payload(False), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish_batch = self._on_publish_batch
        client.on_message = self._on_message  # QoS 2 only: paho keeps its exactly-once state
        return client

    def _state_topic(self) -> str:
        return f"{NAMESPACE}/STATE/{self.cfg.sparkplug_host_id}"

    def _state_payload(self, online: bool) -> bytes:
        return json.dumps({"online": online, "timestamp": int(time.time() * 1000)}).encode()

    def subscriptions(self) -> list[str]:
        groups = set(self.cfg.sparkplug_groups) | self.host.groups()
        filters = self.topics.subscriptions() + [f"{NAMESPACE}/{g}/#" for g in sorted(groups)]
        if self.cfg.shared_group:
            return [f"$share/{self.cfg.shared_group}/{f}" for f in filters]
        return filters

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self.runtime.start()
        broker = self.cfg.broker
        properties = None
        if broker.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 0 if self.cfg.clean_start else SESSION_EXPIRY_S
        self.client.connect_async(
            broker.host,
            broker.port,
            keepalive=broker.keepalive_s,
            clean_start=self.cfg.clean_start if broker.protocol == "5" else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )
        self.client.loop_start()
        log.info("MQTT collector connecting to %s, subscriptions %s", self.target, self.subscriptions())

    def stop(self) -> None:
        """Flush and acknowledge what is queued, then leave (unacknowledged messages stay at the broker)."""
        self._stopping = True
        self.runtime.stop()
        if self.cfg.sparkplug_host_id and self.connected.is_set():
            self.client.publish(self._state_topic(), self._state_payload(False), qos=1, retain=True).wait_for_publish(5)
        self.client.disconnect()
        self.client.loop_stop()

    # --- callbacks (paho network thread) ---------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.error("MQTT broker %s refused the connection: %s", self.target, reason)
            self.metrics.set("connected", 0, target=self.target)
            return
        self._connections += 1
        if self._connections > 1:
            self.metrics.inc("reconnects_total", target=self.target)
        self.metrics.set("connected", 1, target=self.target)
        client.subscribe([(f, int(self.cfg.qos)) for f in self.subscriptions()])
        if self.cfg.sparkplug_host_id:
            client.publish(self._state_topic(), self._state_payload(True), qos=1, retain=True)
        log.info("connected to %s (session present: %s)", self.target, flags.session_present)
        self.connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connected.clear()
        self.metrics.set("connected", 0, target=self.target)
        if self._stopping:
            log.info("disconnected from %s", self.target)
        elif not self._tls_failed():
            log.warning("disconnected from %s: %s; paho reconnects with back-off", self.target, reason)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._tls_failed()

    def _tls_failed(self) -> bool:
        """Log and keep a TLS failure paho swallowed, saying what to check; False if there was none."""
        exc, self.client.tls_error = self.client.tls_error, None
        if exc is None:
            return False
        self.last_error = MqttCollectorError(
            f"TLS connection to MQTT broker {self.target} failed: {exc}; check collectors.mqtt.broker.tls: "
            "ca_file must hold the broker's CA, and a broker that requires client certificates needs "
            "broker.tls.cert_file and key_file (retrying with back-off)"
        )
        log.error("%s", self.last_error)
        return True

    def _on_publish_batch(self, batch: list[Publish]) -> None:
        """QoS 0/1 messages of one socket read: their points go to the spool as one item, and the
        QoS 1 ones are acknowledged together once that item is durable."""
        points: list[Point] = []
        for message in batch:
            points += self._decode_or_reject(message.topic, message.payload)
        mids = [message.mid for message in batch if message.qos]
        if points or mids:
            self.runtime.sink.submit(points, partial(self.client.ack_many, mids) if mids else None)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        points = self._decode_or_reject(msg.topic, bytes(msg.payload))
        mid, qos = msg.mid, msg.qos
        self.runtime.sink.submit(points, partial(client.ack, mid, qos))

    def _decode_or_reject(self, topic: str, payload: bytes) -> list[Point]:
        """A message's points, or none when it is rejected (logged, counted, dead-lettered)."""
        try:
            return self.decode(topic, payload)
        except RejectedWithRebirth as exc:
            self._reject(exc, topic, payload)
            self._rebirth(exc.result.rebirth_topic)
        except Rejected as exc:
            self._reject(exc, topic, payload)
        except Exception as exc:  # one odd message must not stop paho's network thread
            log.exception("unexpected error decoding a message on %r", topic)
            self._reject(Rejected("bad_payload", f"{type(exc).__name__}: {exc}"), topic, payload)
        return []

    def _reject(self, exc: Rejected, topic: str, payload: bytes) -> None:
        self.runtime.rejects.reject(exc.reason, f"topic {topic!r}", str(exc), payload)

    def _rebirth(self, topic: str | None) -> None:
        if topic is not None:
            log.warning("asking %s to rebirth", topic)
            self.client.publish(topic, rebirth_payload(), qos=0)

    def decode(self, topic: str, payload: bytes) -> list[Point]:
        """Points in one message; raises `Rejected` for bad input."""
        if len(payload) > self.cfg.max_payload_bytes:
            raise Rejected("too_large", f"payload of {len(payload)} bytes exceeds {self.cfg.max_payload_bytes}")
        if topic.startswith(NAMESPACE + "/"):
            result = self.host.handle(topic, payload)
            if result.sequence_gap:
                edge = "/".join(topic.split("/")[1:4:2])
                self.metrics.inc("sequence_gaps_total", sender=edge)
                log.warning("Sparkplug sequence gap from %s", edge)
            self._rebirth(result.rebirth_topic)
            for bad_metric in result.rejects:
                self._reject(bad_metric, topic, payload)
            for address in self.host.unknown:
                self.runtime.rejects.unknown_source("sparkplug", address)
            self.host.unknown.clear()
            return result.points
        targets = self.topics.resolve(topic)
        if not targets:
            self.runtime.rejects.unknown_source("mqtt", topic)
            raise Rejected("unknown_topic", "no site tag for this topic")
        return decode_json(payload, targets, self.cfg.timestamp_window_s)
