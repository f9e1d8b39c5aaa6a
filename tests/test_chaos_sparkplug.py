"""Chaos on the Sparkplug B path: broker restarts and kill -9, edge node deaths and rebirths.

An edge node (a paho client behaving as the Sparkplug B spec asks: NDEATH as its will, NBIRTH with
aliases on every connect, NDATA by alias with a rolling seq) streams one metric while the collector
(the `MqttCollector` as a Sparkplug host) records it. Faults in a seeded order: graceful Mosquitto
restarts, Mosquitto kill -9, and edge node deaths (its connection dropped without DISCONNECT, so
the broker publishes the will) followed by a rebirth with the next bdSeq.

Checked: each death reached the collector (it stored the metric as offline, bad quality); the
collector reconnected after each broker restart; every NDATA the broker acknowledged is in the
spool with its value, except what a kill -9 made the broker forget (acknowledged within
`BROKER_LOSS_WINDOW_S` before it: reported as the broker's loss); no sequence gap, no value wrong.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from flowline.collectors.mqtt import MqttCollector
from flowline.collectors.sparkplug import DOUBLE, UINT64, MetricSpec, encode_payload
from flowline.lab.services import MosquittoServer, wait_until
from tests.collectors_helpers import plain_broker, telemetry, write_config, write_site
from tests.conftest import MQTT_PASSWORD, MQTT_USER

pytestmark = pytest.mark.slow

FAULTS = ["broker_restart", "broker_kill9", "edge_death"]
ROUNDS = int(os.environ.get("FLOWLINE_CHAOS_SPARKPLUG_ROUNDS", "2"))  # each fault kind this often
BROKER_LOSS_WINDOW_S = 3.0  # Mosquitto autosaves every 1 s (see MosquittoServer)
TOPIC = "spBv1.0/G1/{kind}/E1"
T0_MS = int(time.time() * 1000)  # message i is stamped T0_MS + i (inside the host's timestamp window)


def grew(counter: Callable[[], float], before: float) -> bool:
    return counter() > before


class EdgeNode:
    """Edge node E1 of group G1 publishing metric ``speed`` (alias 1): message ``i`` carries value ``i``."""

    def __init__(self, port: int, bd_seq: int) -> None:
        self.bd_seq = bd_seq
        self.seq = 0
        self.sent = 0  # next message index, shared across incarnations (see `rebirth`)
        self.acked: dict[int, float] = {}  # message index -> monotonic time of the broker's PUBACK
        self.live_from = 0  # first message index of the current incarnation (earlier ones may die unacked)
        self._pending: dict[int, int] = {}
        self._early: dict[int, float] = {}
        self._lock = threading.Lock()
        self.port = port
        self.births = 0
        self.client = self._connect()

    def _connect(self) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edge-E1-{self.bd_seq}", protocol=mqtt.MQTTv311)
        client.username_pw_set(MQTT_USER, MQTT_PASSWORD)
        death = encode_payload([MetricSpec("bdSeq", self.bd_seq, UINT64)], seq=None)
        client.will_set(TOPIC.format(kind="NDEATH"), death, qos=1)
        client.reconnect_delay_set(min_delay=1, max_delay=2)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_publish = self._on_publish
        client.connect_async("127.0.0.1", self.port, keepalive=5)
        client.loop_start()
        return client

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        # Every (re)connect is a new session for the host: birth first (seq 0), then data by alias.
        with self._lock:
            self.seq = 0
            self.births += 1
        birth = [MetricSpec("bdSeq", self.bd_seq, UINT64), MetricSpec("speed", -1.0, DOUBLE, alias=1)]
        client.publish(TOPIC.format(kind="NBIRTH"), encode_payload(birth, seq=0), qos=1)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self._lock:
            i = self._pending.pop(mid, None)
            if i is None:
                self._early[mid] = time.monotonic()
            else:
                self.acked[i] = time.monotonic()

    def publish(self) -> None:
        if not self.client.is_connected():
            return  # Sparkplug data is live data: an edge node does not queue it while offline
        with self._lock:
            self.seq = (self.seq + 1) % 256
            i, seq = self.sent, self.seq
            self.sent += 1
        metric = MetricSpec(None, float(i), DOUBLE, alias=1, timestamp_ms=T0_MS + i)
        # Not under our lock: paho's network thread calls `_on_publish` (which takes our lock) while it
        # holds its own message mutex, which `publish` needs too; both locks at once would deadlock.
        info = self.client.publish(TOPIC.format(kind="NDATA"), encode_payload([metric], seq=seq), qos=1)
        with self._lock:
            if info.mid in self._early:
                self.acked[i] = self._early.pop(info.mid)
            else:
                self._pending[info.mid] = i

    def die(self) -> None:
        """Drop the TCP connection without DISCONNECT: the broker publishes our will (NDEATH)."""
        sock = self.client.socket()
        self.client.loop_stop()  # no callback may run under our lock here: paho joins its thread
        if isinstance(sock, socket.socket):
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def rebirth(self) -> None:
        self.bd_seq += 1
        self.live_from = self.sent
        self.client = self._connect()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _collector(tmp_path: Path, broker: MosquittoServer, monkeypatch: pytest.MonkeyPatch) -> MqttCollector:
    monkeypatch.setenv("FLOWLINE_TEST_MQTT_PASSWORD", MQTT_PASSWORD)
    section = {
        "mqtt": {
            "broker": plain_broker(
                broker.port,
                username=MQTT_USER,
                password={"env": "FLOWLINE_TEST_MQTT_PASSWORD"},
                client_id="sp-chaos-host",
            ),
            "sparkplug_allow_rebirth": True,
            "sparkplug_host_id": "flowline-chaos",
        }
    }
    collector = MqttCollector(write_config(tmp_path, write_site(tmp_path), section))
    collector.start()
    wait_until(collector.connected.is_set, 15, "collector connected")
    return collector


def test_sparkplug_broker_restarts_and_edge_node_death_and_rebirth(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = mosquitto_factory(tls=False, users={MQTT_USER: MQTT_PASSWORD})
    collector = _collector(tmp_path, broker, monkeypatch)
    spool = collector.runtime.writer.folder
    edge = EdgeNode(broker.port, bd_seq=0)
    rng = random.Random(int(os.environ.get("FLOWLINE_CHAOS_SPARKPLUG_SEED", "7")))
    schedule = rng.sample(FAULTS * ROUNDS, len(FAULTS) * ROUNDS)
    faults: dict[str, int] = dict.fromkeys(FAULTS, 0)
    kill9_at: list[float] = []
    pids = {broker.pid}

    def offline() -> int:
        return sum(1 for p in telemetry(spool) if p.tags["tag"] == "speed" and p.fields.get("value_str") == "offline")

    def stream(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            edge.publish()
            time.sleep(0.02)

    try:
        wait_until(lambda: edge.births == 1, 15, "the edge node's birth")
        stream(1.5)
        for fault in schedule:
            faults[fault] += 1
            reconnects = collector.metrics.total("reconnects_total")
            if fault == "edge_death":
                deaths = offline()
                edge.die()
                # The will reached the host: the metric is stored as offline (bad quality).
                wait_until(partial(grew, offline, deaths), 15, "the NDEATH to mark the metric offline")
                stream(0.3)  # nothing is sent while dead
                edge.rebirth()
                wait_until(lambda: edge.client.is_connected(), 15, "the edge node's rebirth")
            else:
                births = edge.births
                if fault == "broker_restart":
                    broker.restart()
                else:
                    broker.kill()
                    assert broker.returncode == -signal.SIGKILL
                    kill9_at.append(time.monotonic())
                    broker.start()
                pids.add(broker.pid)
                reconnected = partial(grew, lambda: collector.metrics.total("reconnects_total"), reconnects)
                wait_until(reconnected, 30, "the collector to reconnect")
                wait_until(partial(grew, lambda: edge.births, births), 30, "the edge node to reconnect and birth again")
            stream(rng.uniform(1.0, 2.0))
        # A dead incarnation's unacknowledged messages died with it (not ours: never acknowledged).
        live = range(edge.live_from, edge.sent)
        wait_until(lambda: all(i in edge.acked for i in live), 30, "the broker to acknowledge the live NDATA")
        acked = dict(edge.acked)
        must = {i for i, at in acked.items() if not any(0 <= t - at <= BROKER_LOSS_WINDOW_S for t in kill9_at)}

        def values() -> set[float]:
            return {
                v for p in telemetry(spool)
                if p.tags["tag"] == "speed" and isinstance(v := p.fields.get("value"), float) and v >= 0
            }

        wait_until(lambda: {float(i) for i in must} <= values(), 30, "every acknowledged NDATA in the spool")
        time.sleep(1.0)  # stragglers of the broker-loss window
        found = values()
        points = [p for p in telemetry(spool) if p.tags["tag"] == "speed" and p.fields.get("value", -1.0) != -1.0]
    finally:
        edge.stop()
        collector.stop()
    stamped = [(v, p.timestamp_ns) for p in points if isinstance(v := p.fields.get("value"), float) and v >= 0]
    wrong = [(v, ts) for v, ts in stamped if v % 1 or ts != (T0_MS + int(v)) * 1_000_000]
    lost_by_broker = [i for i in acked if float(i) not in found and i not in must]
    gaps = collector.metrics.total("sequence_gaps_total")
    print(
        f"\nchaos Sparkplug: faults {faults}, edge births {edge.births}, bdSeq {edge.bd_seq}, offline marks "
        f"{offline()}; NDATA sent {edge.sent}, acknowledged by the broker {len(acked)} "
        f"(the rest died with their edge node), found {len(found)}, "
        f"lost by the broker (kill -9) {len(lost_by_broker)}, lost by us {len(must - {int(v) for v in found})}, "
        f"sequence gaps {gaps:.0f}, wrong {len(wrong)}"
    )
    assert len(pids) == faults["broker_restart"] + faults["broker_kill9"] + 1
    assert edge.bd_seq == faults["edge_death"]
    assert offline() >= faults["edge_death"]
    assert not must - {int(v) for v in found}
    assert not wrong, wrong[:5]
