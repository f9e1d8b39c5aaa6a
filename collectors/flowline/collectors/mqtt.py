"""MQTT collector (paho-mqtt 2.x): plain JSON topics and Sparkplug B, QoS 1, persistent session.

A QoS 1 message is acknowledged to the broker (PUBACK) only after its points are durable in the
spool, or after it was rejected and written to the dead-letter file. Killing the collector at any
moment therefore loses nothing: the broker redelivers what was not acknowledged (persistent
session: fixed client id, ``clean_start`` false, session expiry on MQTT 5).

While the spool cannot store (full, disk error) QoS 0/1 messages are refused: not acknowledged,
and the network thread keeps running (keep-alive goes on). Once a message is refused, every later
one on that connection is refused too (PUBACKs go in order); when the spool takes data again the
collector drops the connection and paho reconnects, so the broker redelivers what was refused.
QoS 2 messages are held instead: after PUBREC the broker would not send them again.

Messages arrive in batches, one per socket read (`FastClient`, mqtt_client.py): a batch's points
go to the spool as one item and its PUBACKs leave in one write once that item is durable. QoS 2
messages take paho's own path (``on_message``), which keeps the exactly-once handshake.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
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
RECONNECT_MIN_S, RECONNECT_MAX_S = 1, 30  # paho's back-off: doubles from min to max, reset by a CONNACK


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
        self.status = self.runtime.status
        self.topics = TopicMap(self.site, self.cfg.topic_templates)
        self.host = SparkplugHost(self.site, self.cfg.timestamp_window_s, self.cfg.sparkplug_allow_rebirth)
        broker = self.cfg.broker
        self.target = f"mqtt{'s' if broker.tls else ''}://{broker.host}:{broker.port}"
        self.connected = threading.Event()
        self._stopping = False
        self.last_error: MqttCollectorError | None = None
        self._connections = 0
        self._refuse_lock = threading.Lock()
        self._refused_on_connection = False  # a message was refused: refuse the rest until we reconnect
        self._reconnect_asked = False
        self.runtime.sink.on_accepting(self._spool_accepting)
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
        client.reconnect_delay_set(min_delay=RECONNECT_MIN_S, max_delay=RECONNECT_MAX_S)
        if self.cfg.sparkplug_host_id:
            client.will_set(self._state_topic(), self._state_payload(False), qos=1, retain=True)
        client.on_pre_connect = self._on_pre_connect
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

    def _on_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        self.metrics.inc("connect_attempts_total", target=self.target)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._connect_failed(f"the broker refused the connection: {reason}")
            return
        with self._refuse_lock:
            self._refused_on_connection = self._reconnect_asked = False
        self._connections += 1
        if self._connections > 1:
            self.metrics.inc("reconnects_total", target=self.target)
        self.metrics.set("connected", 1, target=self.target)
        client.subscribe([(f, int(self.cfg.qos)) for f in self.subscriptions()])
        if self.cfg.sparkplug_host_id:
            client.publish(self._state_topic(), self._state_payload(True), qos=1, retain=True)
        log.info(
            "connected to MQTT broker %s, subscribed to %s (session present: %s)",
            self.target, ", ".join(self.subscriptions()), flags.session_present,
        )  # fmt: skip
        self.connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        self.metrics.set("connected", 0, target=self.target)
        if self._stopping:
            log.info("disconnected from %s", self.target)
        elif self._reconnect_asked:
            log.info("disconnected from %s for the redelivery; paho reconnects", self.target)
        elif self._tls_failed():
            pass  # logged with what to check
        elif not was_connected:
            # paho closes a refused connection with "Protocol error": `_connect_failed` already said why
            log.debug("connection to %s closed after the refusal (%s)", self.target, reason)
        else:
            self.status.connected(self.target, "source", False, error=f"disconnected: {reason}")
            log.warning("disconnected from %s: %s; reconnecting with back-off", self.target, reason)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        if self._tls_failed():
            return
        exc, self.client.connect_error = self.client.connect_error, None
        self._connect_failed(_describe_os_error(exc) if exc is not None else "connection failed")

    def _connect_failed(self, why: str) -> None:
        """Say what failed, where, and that paho keeps trying; count it; the status file shows it."""
        self.metrics.inc("connect_failures_total", target=self.target)
        self.metrics.set("connected", 0, target=self.target)
        attempts = int(self.metrics.counter("connect_attempts_total", target=self.target))
        message = (
            f"cannot connect to MQTT broker {self.target} (collectors.mqtt.broker): {why}; "
            f"retrying with back-off ({RECONNECT_MIN_S} s doubling to {RECONNECT_MAX_S} s between attempts; "
            f"attempt {attempts} failed)"
        )
        self.status.connected(self.target, "source", False, error=why)
        log.error("%s", message)

    def _tls_failed(self) -> bool:
        """Log and keep a TLS failure paho swallowed, saying what to check; False if there was none."""
        exc, self.client.tls_error = self.client.tls_error, None
        if exc is None:
            return False
        self.metrics.inc("connect_failures_total", target=self.target)
        self.status.connected(self.target, "source", False, error=f"TLS: {exc}")
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
        self.status.ok(self.target, "source")
        points: list[Point] = []
        for message in batch:
            points += self._decode_or_reject(message.topic, message.payload)
        mids = [message.mid for message in batch if message.qos]
        if points or mids:
            self._store(points, partial(self.client.ack_many, mids) if mids else None)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        points = self._decode_or_reject(msg.topic, bytes(msg.payload))
        mid, qos = msg.mid, msg.qos
        if qos == 2:
            # After PUBREC the broker will not send this message again: hold it, whatever the spool says
            # (the broker's in-flight window bounds how many), and PUBCOMP it once stored.
            self.runtime.sink.submit(points, partial(client.ack, mid, qos), hold=True)
        else:
            self._store(points, partial(client.ack, mid, qos))

    def _store(self, points: list[Point], ack: Callable[[], object] | None) -> None:
        """Hand points to the spool; ``ack`` runs once they are durable, never if they are refused."""
        if self._refused_on_connection:
            self.runtime.sink.refuse(len(points))  # keeps PUBACKs in order: redelivered after the reconnect
            return
        if self.runtime.sink.submit(points, ack):
            return
        with self._refuse_lock:
            if not self._refused_on_connection:
                log.warning(
                    "spool cannot store: messages from %s are not acknowledged; the broker keeps them and "
                    "redelivers them after a reconnect once the spool takes data again",
                    self.target,
                )
            self._refused_on_connection = True
        if self.runtime.sink.accepting:  # it came back while we refused: it may not call us again
            self._redeliver()

    def _spool_accepting(self) -> None:
        """Runs on the spool's writer thread when it takes data again."""
        if self._refused_on_connection:
            self._redeliver()

    def _redeliver(self) -> None:
        """Drop the connection (paho reconnects with back-off) so the broker resends what we refused."""
        with self._refuse_lock:
            if self._reconnect_asked:
                return
            self._reconnect_asked = True
        log.warning("spool takes data again: reconnecting to %s for the messages it refused", self.target)
        self.metrics.inc("redelivery_reconnects_total", target=self.target)
        sock = self.client.socket()
        if isinstance(sock, socket.socket):  # also TLS sockets
            with contextlib.suppress(OSError):  # paho may be closing it at the same moment
                sock.shutdown(socket.SHUT_RDWR)

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
            group, _, edge = topic.split("/")[1:4]
            log.info("asking Sparkplug edge node %s/%s to rebirth (Node Control/Rebirth on %s)", group, edge, topic)
            self.metrics.inc("rebirth_requests_total", sender=f"{group}/{edge}")
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


def _describe_os_error(exc: OSError) -> str:
    """``connection refused (ECONNREFUSED)``: the reason without Python's ``[Errno 111]`` noise."""
    if exc.errno is not None and exc.strerror:
        name = errno.errorcode.get(exc.errno)
        return f"{exc.strerror.lower()} ({name})" if name else exc.strerror.lower()
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
