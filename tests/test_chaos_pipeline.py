"""Chaos on the real ingest path: MQTT publisher -> Mosquitto -> collector -> OT spool -> relay -> InfluxDB.

A deterministic QoS 1 publisher sends a known (topic, timestamp, value) sequence over TLS to a real,
persistent Mosquitto; `flowline collect mqtt`, `flowline relay ot` (through a cuttable TCP link),
`flowline relay dmz` and `flowline relay writer` run as the processes a site runs (`LocalStack`).
While it streams, seeded random faults hit every stage: kill -9 of the collector, sender, gateway
and writer (each restarted), a graceful Mosquitto restart (its persistence keeps the collector's
session queue), TCP link cuts, and one 30 s InfluxDB outage. Then it reconciles: every message the
broker acknowledged is in InfluxDB with its value, and no (series, timestamp) is stored twice.

Longer soak runs: ``FLOWLINE_CHAOS_PIPELINE_S=900 pytest tests/test_chaos_pipeline.py -m slow -s``
(``FLOWLINE_CHAOS_PIPELINE_SEED`` picks the fault timeline); more faults with ``…_FAULT_GAP_S``
(a fault every 1 s to that many seconds, default 4), more load with ``FLOWLINE_CHAOS_PIPELINE_RATE``
(messages/s, default 100). Runs longer than about 2 minutes repeat the InfluxDB outage every 1-3 min.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from flowline.inventory import load_site
from flowline.lab.netem import CuttableTcpProxy
from flowline.lab.services import wait_until
from flowline.lab.sim.mqtt_publisher import payload
from flowline.lab.stack import LocalStack, StackOptions, StageProcess

pytestmark = pytest.mark.slow

INFLUX_OUTAGE_S = 30.0
FAULTS = ["collector", "sender", "gateway", "writer", "mosquitto", "mosquitto_while_collector_down", "cut"]


def expected_value(i: int) -> float:
    return (i * 7919 % 10007) / 10


class AckedPublisher:
    """QoS 1 publisher of message ``i`` = (topic ``i % n``, t0 + i ms, `expected_value(i)`).

    paho keeps every unacknowledged QoS 1 message and sends it again after each reconnect, so a
    broker restart only delays messages; `acknowledged` is what the broker answered with PUBACK.
    """

    def __init__(self, stack: LocalStack) -> None:
        assert stack.mosquitto is not None
        self.series = [
            (asset.id, tag.name, tag.source.mqtt.topic)
            for asset, tag in load_site(stack.options.site_file).iter_tags("mqtt")
            if tag.source.mqtt is not None and tag.source.mqtt.json_key is None
        ]
        self.t0_ms = time.time_ns() // 1_000_000
        self.published = 0
        self.acked: set[int] = set()
        # PUBACK may arrive before publish() returns the mid: the callback parks it in _early.
        self._pending: dict[int, int] = {}
        self._early: set[int] = set()
        self._lock = threading.Lock()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="chaos-publisher")
        client.username_pw_set("sim", stack.passwords["mqtt-sim"])
        client.tls_set(ca_certs=str(stack.ca.files.cert))
        client.reconnect_delay_set(min_delay=1, max_delay=2)
        client.max_queued_messages_set(0)  # unbounded: nothing may be dropped client-side
        client.max_inflight_messages_set(200)
        client.on_publish = self._on_publish
        client.connect_async("127.0.0.1", stack.mosquitto.tls_port, keepalive=10)
        client.loop_start()
        self.client = client

    def key(self, i: int) -> tuple[str, str, int]:
        asset, tag, _ = self.series[i % len(self.series)]
        return asset, tag, (self.t0_ms + i) * 1_000_000

    def publish(self, count: int) -> None:
        for _ in range(count):
            i = self.published
            _, _, topic = self.series[i % len(self.series)]
            info = self.client.publish(topic, payload(expected_value(i), self.key(i)[2]), qos=1)
            # NO_CONN still queues the message: paho sends it after the reconnect.
            assert info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN), mqtt.error_string(info.rc)
            self.published += 1
            with self._lock:
                if info.mid in self._early:
                    self._early.remove(info.mid)
                    self.acked.add(i)
                else:
                    self._pending[info.mid] = i

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self._lock:
            i = self._pending.pop(mid, None)
            if i is None:
                self._early.add(mid)
            else:
                self.acked.add(i)

    def acknowledged(self) -> list[int]:
        with self._lock:
            return sorted(self.acked)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def ot_config_through(stack: LocalStack, proxy_port: int) -> Path:
    """The stack's config with the OT sender pointed at the proxy (the DMZ still listens directly)."""
    doc: dict[str, Any] = yaml.safe_load(stack.config_path.read_text())
    doc["relay_ot"].update(
        gateway_port=proxy_port, spools=["mqtt"], ack_timeout_s=5, reconnect_min_s=0.1, reconnect_max_s=1.0
    )
    path = stack.workdir / "flowline-ot.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def chaos_stack(tmp_path: Path) -> Iterator[tuple[LocalStack, CuttableTcpProxy]]:
    """The stack's services and config, plus a cuttable link in front of the DMZ gateway's port."""
    stack = LocalStack(tmp_path / "stack", StackOptions(simulate=False, backfill_days=0))
    proxy: CuttableTcpProxy | None = None
    try:
        stack.prepare()
        stack.start_services()
        stack.write_config()
        dmz_port = int(yaml.safe_load(stack.config_path.read_text())["relay_dmz"]["listen_port"])
        proxy = CuttableTcpProxy(("127.0.0.1", dmz_port)).start()
        yield stack, proxy
    finally:
        if proxy is not None:
            proxy.stop()
        stack.stop()


def test_chaos_on_the_mqtt_ingest_path(chaos_stack: tuple[LocalStack, CuttableTcpProxy]) -> None:
    stack, proxy = chaos_stack
    duration = float(os.environ.get("FLOWLINE_CHAOS_PIPELINE_S", "55"))
    rate = float(os.environ.get("FLOWLINE_CHAOS_PIPELINE_RATE", "100"))
    max_gap = max(1.0, float(os.environ.get("FLOWLINE_CHAOS_PIPELINE_FAULT_GAP_S", "4")))
    rng = random.Random(int(os.environ.get("FLOWLINE_CHAOS_PIPELINE_SEED", "2026")))
    assert stack.mosquitto is not None
    config = str(stack.config_path)
    stages: dict[str, StageProcess] = {
        "writer": stack.stage("relay-writer", ["relay", "writer", "--config", config], "READY"),
        "gateway": stack.stage("relay-dmz", ["relay", "dmz", "--config", config], "READY"),
        "sender": stack.stage(
            "relay-ot", ["relay", "ot", "--config", str(ot_config_through(stack, proxy.port))], "READY"
        ),
        "collector": stack.stage("collect-mqtt", ["collect", "mqtt", "--config", config], "READY"),
    }
    for stage in stages.values():
        stage.start()
    publisher = AckedPublisher(stack)
    faults: Counter[str] = Counter()
    schedule = rng.sample(FAULTS, len(FAULTS))
    try:
        start = time.monotonic()
        end = start + duration
        influx_stop_at: float | None = start + rng.uniform(3, max(4, min(60, duration - INFLUX_OUTAGE_S - 5)))
        influx_down_since: float | None = None
        next_fault = start + rng.uniform(1, max_gap)
        while time.monotonic() < end or influx_down_since is not None:
            publisher.publish(max(1, round(rate / 10)))
            time.sleep(0.1)
            now = time.monotonic()
            if influx_down_since is None and influx_stop_at is not None and now >= influx_stop_at:
                stack.influx.stop()
                influx_down_since = now
                faults["influxdb_stopped_30s"] += 1
            elif influx_down_since is not None and now - influx_down_since >= INFLUX_OUTAGE_S:
                stack.influx.start()
                influx_down_since = None
                # Soak runs: another outage every few minutes, as long as it ends before the run does.
                influx_stop_at = now + rng.uniform(60, 180)
                if influx_stop_at + INFLUX_OUTAGE_S + 5 > end:
                    influx_stop_at = None
            if now < next_fault or now >= end:
                continue
            # Every kind once (in a seeded order) before random picks, so even a short run covers all.
            fault = schedule.pop() if schedule else rng.choice(FAULTS)
            faults[fault] += 1
            if fault == "cut":
                proxy.cut()
            elif fault == "mosquitto":
                stack.mosquitto.restart()  # graceful: persistence keeps the queued QoS 1 messages
            elif fault == "mosquitto_while_collector_down":
                # Messages queue for the collector's offline session and must survive the restart.
                stages["collector"].kill()
                publisher.publish(max(1, round(rate)))
                stack.mosquitto.restart()
                stages["collector"].start()
            else:
                stages[fault].kill()  # SIGKILL, then the same command again (waits for its READY line)
                stages[fault].start()
            next_fault = time.monotonic() + rng.uniform(1, max_gap)
        produced = publisher.published
        wait_until(lambda: len(publisher.acknowledged()) == produced, 60, "the broker to acknowledge everything")
        acknowledged = publisher.acknowledged()
        wanted = {publisher.key(i): i for i in acknowledged}
        try:
            stack.wait_for(
                'SELECT count("quality") FROM "telemetry"',
                lambda rows: bool(rows) and rows[0]["count"] >= len(wanted),
                120,
                f"{len(wanted)} acknowledged messages in InfluxDB",
            )
        except TimeoutError as exc:
            print(exc)  # the stage logs; the reconciliation below says what is missing
        rows = stack.query('SELECT "value" FROM "telemetry" GROUP BY "asset", "tag"')
        cuts = proxy.cuts
    finally:
        publisher.stop()
    stored = Counter((str(r["asset"]), str(r["tag"]), int(r["time"])) for r in rows)
    values = {(str(r["asset"]), str(r["tag"]), int(r["time"])): float(r["value"]) for r in rows}
    lost = [i for key, i in wanted.items() if key not in stored]
    duplicates = [key for key, n in stored.items() if n > 1]
    all_keys = {publisher.key(i): i for i in range(produced)}
    wrong = [key for key, v in values.items() if key not in all_keys or v != expected_value(all_keys[key])]
    print(
        f"\nchaos pipeline: faults {dict(faults)}, link cuts {cuts}; published {produced}, "
        f"acknowledged by the broker {len(acknowledged)}, found {len(stored)}, lost {len(lost)}, "
        f"duplicates {len(duplicates)}, wrong {len(wrong)}"
    )
    assert not lost, f"{len(lost)} acknowledged messages lost, e.g. {sorted(lost)[:5]}"
    assert not duplicates, f"{len(duplicates)} (series, timestamp) stored twice, e.g. {duplicates[:5]}"
    assert not wrong, f"{len(wrong)} stored points not in the sequence or with the wrong value, e.g. {wrong[:5]}"
