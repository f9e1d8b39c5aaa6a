"""End to end on real processes: OPC UA and MQTT values crossing collectors, relay and writer into
InfluxDB with the right site/asset/tag, value, quality and timestamp; and `flowline demo` flagging
the injected faults and only them."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from flowline.core.points import Quality
from flowline.core.status import read_all
from flowline.inventory import load_site
from flowline.lab.sim.mqtt_publisher import MqttPublisher, MqttSettings
from flowline.lab.sim.opcua_server import SimOpcUaServer
from flowline.lab.sim.plant import Plant
from flowline.lab.stack import LocalStack, StackOptions

from .conftest import EXAMPLE_SITE

T = TypeVar("T")

# OPC UA StatusCode UncertainLastUsableValue: its class must arrive as quality 1, the code kept.
UNCERTAIN_LAST_USABLE = 0x40900000


class BackgroundLoop:
    """An asyncio loop on its own thread, so a test can drive an asyncua server synchronously."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture
def live_stack(tmp_path: Path) -> Iterator[tuple[LocalStack, SimOpcUaServer, BackgroundLoop]]:
    """The whole pipeline with a test-controlled OPC UA server (SignAndEncrypt) instead of the simulator."""
    stack = LocalStack(tmp_path / "stack", StackOptions(simulate=False, backfill_days=0))
    loop = BackgroundLoop()
    server: SimOpcUaServer | None = None
    try:
        stack.prepare()
        stack.start_services()
        assert stack.sim_certs is not None
        server = SimOpcUaServer(load_site(EXAMPLE_SITE), policies=("basic256sha256",), cert=stack.sim_certs)
        loop.run(server.start())
        stack.options.opcua_url = server.url
        stack.write_config()
        stack.start_pipeline()
        yield stack, server, loop
    finally:
        stack.stop()
        if server is not None:
            loop.run(server.stop())
        loop.close()


def test_opcua_and_mqtt_values_land_with_tags_value_quality_and_timestamp(
    live_stack: tuple[LocalStack, SimOpcUaServer, BackgroundLoop],
) -> None:
    stack, server, loop = live_stack
    site = load_site(EXAMPLE_SITE)
    opcua_asset, opcua_tag = next((a.id, t.name) for a, t in site.iter_tags("opcua"))
    mqtt_asset, mqtt_tag = next((a.id, t.name) for a, t in site.iter_tags("mqtt"))
    # Millisecond-aligned timestamps: OPC UA DateTime has 100 ns resolution, the JSON payload ms.
    opcua_ts = (time.time_ns() // 1_000_000 - 5_000) * 1_000_000
    mqtt_ts = opcua_ts - 1_000_000_000

    loop.run(server.set_value(opcua_asset, opcua_tag, 1234.5, status=UNCERTAIN_LAST_USABLE, source_ts=opcua_ts))
    assert stack.mosquitto is not None
    publisher = MqttPublisher(
        site,
        MqttSettings(
            port=stack.mosquitto.tls_port,
            username="sim",
            password=stack.passwords["mqtt-sim"],
            tls_ca=stack.ca.files.cert,
            client_id="e2e-test",
        ),
    )
    publisher.start()
    try:
        publisher.publish(mqtt_asset, mqtt_tag, 42.25, mqtt_ts, quality="bad")
    finally:
        publisher.stop()

    opcua_rows = stack.wait_for(
        f"SELECT * FROM telemetry WHERE \"asset\" = '{opcua_asset}' AND \"tag\" = '{opcua_tag}' AND value = 1234.5",
        lambda rows: len(rows) == 1,
        timeout=90,
        what="the OPC UA value in InfluxDB",
    )
    row = opcua_rows[0]
    assert row["site"] == site.site
    assert row["time"] == opcua_ts
    assert row["quality"] == int(Quality.UNCERTAIN)
    assert row["status"] == UNCERTAIN_LAST_USABLE
    assert row["unit"] == site.tag(opcua_asset, opcua_tag).unit  # type: ignore[union-attr]

    mqtt_rows = stack.wait_for(
        f"SELECT * FROM telemetry WHERE \"asset\" = '{mqtt_asset}' AND \"tag\" = '{mqtt_tag}'",
        lambda rows: len(rows) == 1,
        timeout=90,
        what="the MQTT value in InfluxDB",
    )
    row = mqtt_rows[0]
    assert (row["site"], row["value"], row["time"]) == (site.site, 42.25, mqtt_ts)
    assert row["quality"] == int(Quality.BAD)

    # The pipeline reports on itself: every stage's metrics crossed the same path.
    stages = stack.wait_for(
        'SHOW TAG VALUES FROM "flowline_points_in_total" WITH KEY = "stage"',
        lambda rows: {"collector-opcua", "collector-mqtt"} <= {r["value"] for r in rows},
        timeout=60,
        what="collector metrics in InfluxDB",
    )
    assert stages


@pytest.mark.timeout(660)  # the demo itself may take up to its 600 s subprocess timeout
def test_demo_runs_end_to_end_and_flags_exactly_the_injected_faults(tmp_path: Path) -> None:
    seed = 7
    workdir = tmp_path / "demo"
    command = ["demo", "--duration", "5", "--seed", str(seed), "--workdir", str(workdir), "--backfill-step", "600"]
    result = subprocess.run(
        [sys.executable, "-m", "flowline.core", *command],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    flagged = {(item["asset"], item["tag"]) for item in summary["degrading"]}
    truth = {(fault.asset, fault.tag) for fault in Plant(load_site(EXAMPLE_SITE), seed).faults}
    assert flagged == truth
    site = load_site(EXAMPLE_SITE)
    assert set(summary["points_per_asset"]) == {asset.id for asset in site.assets}
    assert (workdir / "report.png").stat().st_size > 10_000
    assert len(list((workdir / "dashboards").glob("*.json"))) >= 4
    assert "Degrading assets" in result.stdout
    assert summary["analytics_incomplete"] is None  # every series of the demo was assessed
    # every stage left its status file, and each stopped cleanly (none failed); the one-shot rollup
    # (historian rollup --once) writes its own and ends "stopped" too
    states = {doc["process"]: doc["state"] for doc in read_all(workdir / "data")}
    assert states == dict.fromkeys(
        ["analytics", "collector-mqtt", "collector-opcua", "relay-dmz", "relay-ot", "relay-writer", "rollup"],
        "stopped",
    )
    alerting = workdir / "alerting" / "alerting.yaml"
    assert f"Alert rules, contact points and policy (Grafana provisioning): {alerting.resolve()}" in result.stdout
    assert "critical asset degrading" in alerting.read_text()
    rollup_log = (workdir / "logs" / "historian.log").read_text()  # the demo rolls up the hourly tier
    assert re.search(r"1h: \d+ windows, [1-9]\d* points written", rollup_log), rollup_log
