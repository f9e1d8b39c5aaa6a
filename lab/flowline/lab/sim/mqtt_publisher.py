"""The simulator's MQTT side: JSON values for the site's MQTT tags, QoS 1, TLS and passwords.

Payload (one message per tag and sample, on the tag's topic ``plant/<site>/<asset>/<tag>``)::

    {"value": 2.13, "ts": 1764102000123, "quality": "good"}     # ts: Unix milliseconds

When the site file gives the tag a ``json_key``, the value goes under that key instead of ``value``.

Usage::

    publisher = MqttPublisher(site, MqttSettings(host="127.0.0.1", port=8883, tls_ca=Path("ca.pem"),
                                                 username="sim", password=SecretRef(env="MQTT_PASSWORD").read()))
    publisher.start(timeout=10)          # connects (paho loop thread; reconnects on its own)
    publisher.publish("P-101", "bearing_temp", 68.2, ts_ns)
    publisher.stop()                     # waits for in-flight QoS 1 messages (bounded), disconnects
"""

from __future__ import annotations

import contextlib
import json
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from flowline.core.errors import FlowlineError
from flowline.core.metrics import Metrics
from flowline.inventory import Site

_MAX_QUEUED = 200_000  # bound paho's outgoing queue while the broker is away


class MqttPublishError(FlowlineError):
    """The publisher cannot reach or is refused by the broker, or the tag has no MQTT topic."""


@dataclass(frozen=True)
class MqttSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None  # TLS on when given: the broker's certificate must chain to this CA
    client_cert: Path | None = None
    client_key: Path | None = None
    client_id: str = "flowline-sim"
    qos: int = 1
    keepalive_s: int = 30


def payload(value: float, ts_ns: int, quality: str = "good", key: str | None = None) -> bytes:
    return json.dumps({key or "value": value, "ts": ts_ns // 1_000_000, "quality": quality}).encode()


class MqttPublisher:
    """Publishes values of the site's MQTT tags (see the module docstring)."""

    def __init__(self, site: Site, settings: MqttSettings, metrics: Metrics | None = None) -> None:
        self.site = site
        self.settings = settings
        self.metrics = metrics or Metrics("sim", site.site, settings.client_id)
        self._topics: dict[tuple[str, str], tuple[str, str | None]] = {}
        for asset, tag in site.iter_tags("mqtt"):
            assert tag.source.mqtt is not None  # iter_tags("mqtt") guarantees it
            self._topics[(asset.id, tag.name)] = (tag.source.mqtt.topic, tag.source.mqtt.json_key)
        self._connected = threading.Event()
        self._refused: str | None = None
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=settings.client_id, clean_session=True)
        if settings.username is not None:
            client.username_pw_set(settings.username, settings.password)
        if settings.tls_ca is not None:
            client.tls_set(
                ca_certs=str(settings.tls_ca),
                certfile=str(settings.client_cert) if settings.client_cert else None,
                keyfile=str(settings.client_key) if settings.client_key else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_queued_messages_set(_MAX_QUEUED)
        client.max_inflight_messages_set(1000)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        self._client = client
        self._started = False
        self._last: mqtt.MQTTMessageInfo | None = None

    def tags(self) -> list[tuple[str, str]]:
        return list(self._topics)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self, timeout: float = 10.0) -> None:
        """Connect and start the network thread; raise if not connected within ``timeout``."""
        try:
            self._client.connect_async(self.settings.host, self.settings.port, self.settings.keepalive_s)
        except (OSError, ValueError) as exc:
            raise MqttPublishError(f"cannot connect to {self._where()}: {exc}") from exc
        self._client.loop_start()
        self._started = True
        deadline = time.monotonic() + timeout
        while not self._connected.wait(0.1):
            if self._refused is not None or time.monotonic() > deadline:
                self.stop()
                raise MqttPublishError(
                    f"MQTT broker {self._where()}: {self._refused or f'not connected within {timeout:g} s'}"
                )

    def publish(self, asset: str, tag: str, value: float, ts_ns: int, quality: str = "good") -> None:
        try:
            topic, key = self._topics[(asset, tag)]
        except KeyError:
            raise MqttPublishError(f"{asset}/{tag} has no MQTT source in site {self.site.site}") from None
        info = self._client.publish(topic, payload(value, ts_ns, quality, key), qos=self.settings.qos)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            self.metrics.inc("rejected_total", reason="publish_queue_full")
        else:
            self._last = info
            self.metrics.inc("points_out_total")

    def stop(self, drain_timeout: float = 5.0) -> None:
        """Give queued QoS 1 messages up to ``drain_timeout`` to be acknowledged, then disconnect."""
        if not self._started:
            return
        if self._last is not None and self._connected.is_set():
            # QoS 1 acknowledgements arrive in order: the last one acknowledged means all were.
            with contextlib.suppress(RuntimeError, ValueError):
                self._last.wait_for_publish(drain_timeout)
        self._client.disconnect()
        self._client.loop_stop()
        self._started = False

    def _where(self) -> str:
        scheme = "mqtts" if self.settings.tls_ca else "mqtt"
        return f"{scheme}://{self.settings.host}:{self.settings.port}"

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        if reason.is_failure:
            self._refused = f"connection refused ({reason})"
            self.metrics.inc("rejected_total", reason="mqtt_connect_refused")
            return
        if self.metrics.gauge("connected", target="mqtt") == 0.0:
            self.metrics.inc("reconnects_total", target="mqtt")
        self.metrics.set("connected", 1.0, target="mqtt")
        self._connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        self._connected.clear()
        self.metrics.set("connected", 0.0, target="mqtt")
