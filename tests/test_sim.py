"""The plant simulator: model, faults' ground truth, OPC UA server, MQTT publisher, backfill, CLI."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from asyncua import ua
from asyncua.client.client import Client
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from asyncua.crypto.uacrypto import CertProperties
from asyncua.ua.uaerrors import UaError
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion

from flowline.core.cli import main as flowline
from flowline.core.spool import SpoolReader, SpoolWriter, decode_points
from flowline.inventory import Site, load_site, parse_site
from flowline.lab.pki import CertFiles, CertificateAuthority
from flowline.lab.services import MosquittoServer
from flowline.lab.sim.backfill import backfill
from flowline.lab.sim.faults import FAULT_SPECS, NS_PER_DAY
from flowline.lab.sim.mqtt_publisher import MqttPublisher, MqttPublishError, MqttSettings
from flowline.lab.sim.opcua_server import OpcUaServerError, SimOpcUaServer, server_certificate
from flowline.lab.sim.plant import Plant
from tests.conftest import EXAMPLE_SITE, MQTT_PASSWORD, MQTT_USER, REPO

EPOCH = 1_790_000_000 * 10**9  # a fixed "now" (2026-09-21) so the tests do not depend on the clock
MINUTE = 60 * 10**9


@pytest.fixture(scope="module")
def site() -> Site:
    return load_site(EXAMPLE_SITE)


# --- plant model -------------------------------------------------------------------------------


def test_deterministic_by_seed_and_independent_of_chunking(site: Site) -> None:
    times = np.arange(EPOCH - NS_PER_DAY, EPOCH, MINUTE, dtype=np.int64)
    a, b, other = Plant(site, 7, EPOCH), Plant(site, 7, EPOCH), Plant(site, 8, EPOCH)
    for asset, tag in site.iter_tags():
        whole = a.series(asset.id, tag.name, times)
        np.testing.assert_array_equal(whole, b.series(asset.id, tag.name, times))
        halves = np.concatenate([a.series(asset.id, tag.name, times[:700]), a.series(asset.id, tag.name, times[700:])])
        np.testing.assert_array_equal(whole, halves)
        assert a.value(asset.id, tag.name, int(times[5])) == whole[5]
        assert not np.array_equal(whole, other.series(asset.id, tag.name, times))
    assert [f.crossing_ns for f in a.faults] == [f.crossing_ns for f in b.faults]
    assert [f.crossing_ns for f in a.faults] != [f.crossing_ns for f in other.faults]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_tags_stay_clearly_within_limits_for_30_days(site: Site, seed: int) -> None:
    plant = Plant(site, seed, EPOCH)
    times = np.arange(EPOCH - 25 * NS_PER_DAY, EPOCH + 5 * NS_PER_DAY, MINUTE, dtype=np.int64)
    for asset, tag in site.iter_tags():
        if asset.id in plant.faulty_assets:
            continue
        values = plant.series(asset.id, tag.name, times)
        assert tag.alarm is not None and tag.normal is not None
        for limit in (tag.alarm.high, tag.alarm.high_high):
            if limit is not None:  # at least half of the normal-to-limit margin is never used
                assert values.max() < limit - 0.5 * (limit - tag.normal), f"{asset.id}/{tag.name}"
        for limit in (tag.alarm.low, tag.alarm.low_low):
            if limit is not None:
                assert values.min() > limit + 0.5 * (tag.normal - limit), f"{asset.id}/{tag.name}"
        # no trend: the last day's mean is within noise of the first day's
        day = 24 * 60
        assert abs(values[-day:].mean() - values[:day].mean()) < 0.05 * abs(tag.normal)


def test_faults_cross_their_limit_at_the_ground_truth_time(site: Site) -> None:
    seen_crossings = set()
    for seed in range(10):
        plant = Plant(site, seed, EPOCH)
        assert [(f.asset, f.tag, f.kind) for f in plant.faults] == list(FAULT_SPECS)
        for fault in plant.faults:
            seen_crossings.add(fault.crossing_ns)
            assert -9.0 <= (fault.start_ns - EPOCH) / NS_PER_DAY <= -5.5
            assert 2.0 <= (fault.crossing_ns - EPOCH) / NS_PER_DAY <= 4.5
            trend = fault.normal + fault.offset(np.array([fault.start_ns, fault.crossing_ns], dtype=np.int64))
            assert trend[0] == pytest.approx(fault.normal)
            assert trend[1] == pytest.approx(fault.limit)
            # The served signal: daily means below the limit a day before, above it a day after.
            before = np.arange(fault.crossing_ns - 2 * NS_PER_DAY, fault.crossing_ns - NS_PER_DAY, MINUTE)
            after = np.arange(fault.crossing_ns + NS_PER_DAY, fault.crossing_ns + 2 * NS_PER_DAY, MINUTE)
            assert plant.series(fault.asset, fault.tag, before).mean() < fault.limit
            assert plant.series(fault.asset, fault.tag, after).mean() > fault.limit
            # Visible in 14 days of history at the epoch: rising, still below the limit.
            history = plant.series(fault.asset, fault.tag, np.arange(EPOCH - 14 * NS_PER_DAY, EPOCH, MINUTE))
            first, last = history[: 24 * 60].mean(), history[-24 * 60 :].mean()
            assert last - first > 0.1 * (fault.limit - fault.normal) and last < fault.limit
    assert len(seen_crossings) == 30


def test_backfill_writes_every_tag_into_the_spool(site: Site, tmp_path: Path) -> None:
    plant = Plant(site, 3, EPOCH)
    progress: list[int] = []
    result = backfill(plant, tmp_path / "spool", days=1, step_s=600, end_ns=EPOCH, batch_points=1000,
                      progress=lambda n, total: progress.append(n))  # fmt: skip
    tags = site.iter_tags()
    assert result.points == 144 * len(tags) == progress[-1]
    points = [
        p for record in SpoolReader(tmp_path / "spool").read(max_records=10_000) for p in decode_points(record.payload)
    ]
    assert len(points) == result.points
    assert {p.tags["origin"] for p in points} == {"backfill"}
    assert {(p.tags["asset"], p.tags["tag"]) for p in points} == {(a.id, t.name) for a, t in tags}
    assert (
        min(p.timestamp_ns for p in points) == result.start_ns and max(p.timestamp_ns for p in points) == result.end_ns
    )
    assert result.end_ns == EPOCH - EPOCH % (600 * 10**9)
    sample = next(p for p in points if p.tags["asset"] == "P-102" and p.tags["tag"] == "vibration_rms")
    assert sample.fields["value"] == plant.value("P-102", "vibration_rms", sample.timestamp_ns)
    assert sample.tags["unit"] == "mm/s" and sample.fields["quality"] == 0


# --- OPC UA server -------------------------------------------------------------------------------


def _run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), timeout=60))


@pytest.fixture(scope="module")
def server_cert(pki: CertificateAuthority, site: Site) -> CertFiles:
    return server_certificate(pki, site.site, stem="sim-test-opcua-server")


def test_opcua_browse_read_history_and_restart(site: Site, server_cert: CertFiles) -> None:
    server = SimOpcUaServer(site, policies=("none", "basic256sha256"), cert=server_cert)
    opcua_tags = site.iter_tags("opcua")

    async def body() -> None:
        await server.start()
        try:
            base = time.time_ns() - 10 * MINUTE  # the server keeps 30 days of history before now
            for i in range(5):
                await server.set_value("P-101", "vibration_rms", 1.0 + i, source_ts=base + i * MINUTE)
            await server.set_value("P-101", "flow", 9.5, status=0x80000000)
            async with Client(server.url) as client:
                ns = await client.get_namespace_index(server.namespace_uri)
                assert ns == 2
                site_node = await client.nodes.objects.get_child(f"2:{site.site}")
                assets = {(await n.read_browse_name()).Name for n in await site_node.get_children()}
                assert assets == {a.id for a, _ in opcua_tags}
                node = await client.nodes.objects.get_child([f"2:{site.site}", "2:P-101", "2:vibration_rms"])
                assert node.nodeid == ua.NodeId.from_string("ns=2;s=P-101.vibration_rms")
                assert await node.read_value() == 5.0
                for _, tag in opcua_tags:  # every site-file node id resolves
                    assert tag.source.opcua is not None and tag.source.opcua.node is not None
                    path = tag.source.opcua.browse_path
                    assert path is not None
                    by_path = await client.nodes.root.get_child(path.split("/"))
                    assert by_path.nodeid == ua.NodeId.from_string(tag.source.opcua.node)
                bad = await client.get_node("ns=2;s=P-101.flow").read_data_value(raise_on_bad_status=False)
                assert bad.StatusCode is not None and bad.StatusCode.value == 0x80000000
                start = dt.datetime.fromtimestamp((base - MINUTE) / 1e9, dt.UTC)
                end = dt.datetime.fromtimestamp((base + 10 * MINUTE) / 1e9, dt.UTC)
                history = await node.read_raw_history(start, end)
                assert [h.Value.Value for h in history if h.Value is not None] == [1.0, 2.0, 3.0, 4.0, 5.0]
            port = server.port
            await server.stop()
            await server.start()
            assert server.port == port
            async with Client(server.url) as client:
                node = client.get_node("ns=2;s=P-101.vibration_rms")
                assert await node.read_value() == 5.0
                assert len(await node.read_raw_history(start, end)) == 5
        finally:
            await server.stop()

    _run(body)


def test_opcua_sign_and_encrypt_users_and_data_types(
    site: Site, pki: CertificateAuthority, server_cert: CertFiles
) -> None:
    server = SimOpcUaServer(site, policies=("basic256sha256",), cert=server_cert, users={"operator": "s3cret"},
                            trusted=(pki.files.cert,))  # fmt: skip
    client_cert = pki.issue("sim-test-client", uri="urn:flowline:sim-test-client", server=False)
    extra: dict[str, tuple[object, ua.VariantType]] = {
        "flag": (True, ua.VariantType.Boolean),
        "i16": (-7, ua.VariantType.Int16),
        "u64": (2**40, ua.VariantType.UInt64),
        "f32": (1.5, ua.VariantType.Float),
        "text": ("running", ua.VariantType.String),
        "when": (dt.datetime(2026, 1, 2, tzinfo=dt.UTC), ua.VariantType.DateTime),
        "array": ([1.0, 2.0, 3.0], ua.VariantType.Double),
    }

    async def secure_client(user: str | None, password: str | None) -> Client:
        client = Client(server.url)
        client.application_uri = "urn:flowline:sim-test-client"
        await client.set_security(
            SecurityPolicyBasic256Sha256,
            str(client_cert.der),
            CertProperties(client_cert.key, extension="pem"),
            server_certificate=str(server_cert.der),
            mode=ua.MessageSecurityMode.SignAndEncrypt,
        )
        if user is not None:
            client.set_user(user)
            client.set_password(password or "")
        return client

    async def body() -> None:
        await server.start()
        try:
            for name, (value, kind) in extra.items():
                await server.add_variable("TYPES", name, value, kind)
            await server.set_value("K-301", "speed", 10_750.0)
            async with await secure_client("operator", "s3cret") as client:
                assert await client.get_node("ns=2;s=K-301.speed").read_value() == 10_750.0
                for name, (value, kind) in extra.items():
                    dv = await client.get_node(f"ns=2;s=TYPES.{name}").read_data_value()
                    assert dv.Value is not None and dv.Value.VariantType == kind
                    assert dv.Value.Value == value
            with pytest.raises(UaError):
                async with await secure_client("operator", "wrong"):
                    pass
            with pytest.raises(UaError):
                async with await secure_client(None, None):
                    pass
            with pytest.raises(OpcUaServerError):
                await server.set_value("NOPE", "x", 1.0)
        finally:
            await server.stop()

    _run(body)


def test_bad_configurations_are_refused_clearly(site: Site) -> None:
    other_ns = parse_site(EXAMPLE_SITE.read_text().replace("ns=2;s=P-101.flow", "ns=3;s=P-101.flow"))
    with pytest.raises(OpcUaServerError, match=r"P-101/flow.*namespace 2"):
        SimOpcUaServer(other_ns)
    with pytest.raises(OpcUaServerError, match="certificate"):
        SimOpcUaServer(site, policies=("basic256sha256",))
    with pytest.raises(OpcUaServerError, match="unknown"):
        SimOpcUaServer(site, policies=("rot13",))


# --- MQTT publisher ------------------------------------------------------------------------------


def _subscriber(
    broker: MosquittoServer, pki: CertificateAuthority, topic: str
) -> tuple[mqtt.Client, queue.Queue[mqtt.MQTTMessage]]:
    received: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="sim-test-sub")
    client.username_pw_set(MQTT_USER, MQTT_PASSWORD)
    client.tls_set(ca_certs=str(pki.files.cert))
    subscribed = queue.Queue[int]()
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda c, u, mid, rc, p: subscribed.put(mid)
    client.on_message = lambda c, u, msg: received.put(msg)
    client.connect("127.0.0.1", broker.tls_port)
    client.loop_start()
    subscribed.get(timeout=10)
    return client, received


def test_mqtt_publisher_over_tls_with_password(
    site: Site, mosquitto: MosquittoServer, pki: CertificateAuthority
) -> None:
    subscriber, received = _subscriber(mosquitto, pki, "plant/north-field/#")
    settings = MqttSettings("127.0.0.1", mosquitto.tls_port, MQTT_USER, MQTT_PASSWORD, tls_ca=pki.files.cert,
                            client_id="sim-test-pub")  # fmt: skip
    publisher = MqttPublisher(site, settings)
    try:
        publisher.start(timeout=10)
        assert len(publisher.tags()) == len(site.iter_tags("mqtt"))
        publisher.publish("P-101", "bearing_temp", 68.25, EPOCH + 123_456_789)
        msg = received.get(timeout=10)
        assert msg.topic == "plant/north-field/P-101/bearing_temp" and msg.qos == 1
        assert json.loads(msg.payload) == {"value": 68.25, "ts": EPOCH // 10**6 + 123, "quality": "good"}
    finally:
        publisher.stop()
        subscriber.loop_stop()
        subscriber.disconnect()
    assert publisher.metrics.counter("points_out_total") == 1

    wrong = MqttSettings(
        "127.0.0.1", mosquitto.tls_port, MQTT_USER, "wrong", tls_ca=pki.files.cert, client_id="sim-bad"
    )
    refused = MqttPublisher(site, wrong)
    with pytest.raises(MqttPublishError, match=r"refused|not connected"):
        refused.start(timeout=5)


# --- CLI -----------------------------------------------------------------------------------------


def test_faults_command_prints_ground_truth() -> None:
    result = CliRunner().invoke(flowline, ["sim", "faults", "--site", str(EXAMPLE_SITE), "--seed", "4",
                                           "--epoch", str(EPOCH), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    plant = Plant(load_site(EXAMPLE_SITE), 4, EPOCH)
    assert [(f["asset"], f["crossing_ns"]) for f in doc["faults"]] == [(f.asset, f.crossing_ns) for f in plant.faults]
    table = CliRunner().invoke(
        flowline, ["sim", "faults", "--site", str(EXAMPLE_SITE), "--epoch", "2026-11-25T20:00:00Z"]
    )
    assert table.exit_code == 0 and "bearing_wear" in table.output and "P-102" in table.output


def test_backfill_command(tmp_path: Path) -> None:
    args = ["sim", "backfill", "--site", str(EXAMPLE_SITE), "--spool", str(tmp_path / "spool"), "--days", "0.25",
            "--step", "300", "--end", "2026-01-15T00:00:00Z", "--seed", "2"]  # fmt: skip
    result = CliRunner().invoke(flowline, args)
    assert result.exit_code == 0, result.output
    assert f"backfill: {72 * 66} points (66 tags) from 2026-01-14T18:05:00Z to 2026-01-15T00:00:00Z" in result.output
    with SpoolWriter(tmp_path / "spool"):  # another writer holds the folder
        locked = CliRunner().invoke(flowline, args)
    assert locked.exit_code == 1 and "already open for writing" in locked.output


def test_sim_run_serves_opcua_and_mqtt_until_sigterm(
    mosquitto: MosquittoServer, pki: CertificateAuthority, tmp_path: Path
) -> None:
    subscriber, received = _subscriber(mosquitto, pki, "plant/north-field/ESP-01/motor_temp")
    env = {**os.environ, "SIM_MQTT_PW": MQTT_PASSWORD}
    command = [str(Path(sys.executable).parent / "flowline"), "sim", "run", "--site", str(EXAMPLE_SITE), "--seed", "5",
               "--rate-hz", "2", "--cert-dir", str(tmp_path / "pki"), "--mqtt-host", "127.0.0.1",
               "--mqtt-port", str(mosquitto.tls_port), "--mqtt-tls-ca", str(pki.files.cert), "--mqtt-user", MQTT_USER,
               "--mqtt-password-env", "SIM_MQTT_PW"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        assert line.startswith("READY opcua=opc.tcp://127.0.0.1:"), line + (proc.stderr.read() if proc.poll() else "")
        url = line.split()[1].removeprefix("opcua=")

        async def read() -> float:
            async with Client(url) as client:
                return float(await client.get_node("ns=2;s=P-102.vibration_rms").read_value())

        assert 0.5 < asyncio.run(asyncio.wait_for(read(), 30)) < 10
        payload = json.loads(received.get(timeout=10).payload)
        assert 90 < payload["value"] < 150 and payload["quality"] == "good"
        assert (tmp_path / "pki" / "ca.pem").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subscriber.loop_stop()
        subscriber.disconnect()
