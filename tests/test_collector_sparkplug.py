"""Sparkplug B host behaviour through a real Mosquitto: birth, alias data, death, seq gaps, rebirth,
templates (UDTs), DataSets and Ignition's Quality property."""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml

from flowline.collectors.common import Rejected
from flowline.collectors.mqtt import MqttCollector
from flowline.collectors.sparkplug import (
    BAD_NO_COMMUNICATION,
    BOOLEAN,
    BYTES,
    DATASET,
    DATETIME,
    DOUBLE,
    FLOAT,
    INT8,
    INT16,
    STRING,
    TEMPLATE,
    UINT64,
    DataSetSpec,
    HostResult,
    MetricSpec,
    Payload,
    SparkplugHost,
    TemplateSpec,
    encode_payload,
)
from flowline.core.points import Point, Quality
from flowline.inventory import load_site
from flowline.lab.services import MosquittoServer, wait_until
from tests.collectors_helpers import publisher, telemetry, varint, write_config, write_site
from tests.conftest import MQTT_PASSWORD, MQTT_USER

# Site tags fed by a template instance (Ignition UDT) and a DataSet on G1/E2/D1.
UDT_TAGS = {
    "pump1_speed": "Pump1/Speed",
    "pump1_running": "Pump1/Running",
    "pump1_motor_temp": "Pump1/Motor/Temp",
    "pump1_motor_rpm": "Pump1/Motor/Rpm",
    "tank_level": "Tanks/Level",
    "tank_name": "Tanks/Name",
    "tank_delta": "Tanks/Delta",
    "tank_checked": "Tanks/Checked",
    "plain": "Plain",
}


def _write_udt_site(folder: Path) -> Path:
    """The collector tests' site plus an asset whose tags come from templates and DataSets."""
    path = write_site(folder)
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    tags = [
        {"name": tag, "source": {"sparkplug": {"group": "G1", "edge_node": "E2", "device": "D1", "metric": metric}}}
        | ({"type": "string"} if tag == "tank_name" else {})
        for tag, metric in UDT_TAGS.items()
    ]
    doc["assets"].append({"id": "S-1", "name": "Skid", "type": "skid", "criticality": "B", "tags": tags})
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture
def collector(tmp_path: Path, mosquitto: MosquittoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[MqttCollector]:
    monkeypatch.setenv("FLOWLINE_TEST_MQTT_PASSWORD", MQTT_PASSWORD)
    section = {
        "mqtt": {
            "broker": {
                "host": "127.0.0.1",
                "port": mosquitto.port,
                "insecure_plain": True,
                "username": MQTT_USER,
                "password": {"env": "FLOWLINE_TEST_MQTT_PASSWORD"},
                "client_id": "sp-" + os.urandom(4).hex(),
            },
            "sparkplug_allow_rebirth": True,
            "sparkplug_host_id": "flowline-test",
        }
    }
    c = MqttCollector(write_config(tmp_path, _write_udt_site(tmp_path), section))
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
    # an undefined alias loses only that metric: the rest of the message lands
    mixed = [MetricSpec(None, 1.0, DOUBLE, alias=99), MetricSpec(None, 5.0, DOUBLE, alias=1)]
    partly = host.handle("spBv1.0/G1/NDATA/E1", encode_payload(mixed, seq=6))
    assert [p.fields["value"] for p in partly.points] == [5.0]
    assert _only_reject(partly).reason == "bad_payload" and "alias 99" in str(partly.rejects[0])
    with pytest.raises(Rejected) as err:
        host.handle("spBv1.0/G1/NDATA/E1", b"\xff\xff\xff")
    assert err.value.reason == "bad_payload"
    unknown = host.handle("spBv1.0/G1/NDATA/E1", encode_payload([MetricSpec("other", True, BOOLEAN)], seq=7))
    assert unknown.points == [] and host.unknown == ["G1/E1//other"]


# --- templates (UDTs), DataSets, Ignition's Quality property ------------------------------------

BAD_STALE = -2147483132  # Ignition 8 QualityCode Bad_Stale (level bits 10, subcode 516)
UNCERTAIN = 1073742080  # Ignition 8 QualityCode Uncertain (level bits 01)
ERROR = -1073741056  # Ignition 8 QualityCode Error (level bits 11)
IGNITION_GOOD = 192
DDATA = "spBv1.0/G1/DDATA/E2/D1"

# A UDT definition as Ignition sends it in NBIRTH: it holds defaults, not values.
PUMP_DEFINITION = MetricSpec(
    "_types_/Pump",
    TemplateSpec(
        (
            MetricSpec("Speed", 0.0),
            MetricSpec("Running", False, BOOLEAN),
            MetricSpec("Motor", TemplateSpec((MetricSpec("Temp", 0.0, FLOAT),), template_ref="Motor"), TEMPLATE),
        ),
        is_definition=True,
    ),
    TEMPLATE,
)
TANK_COLUMNS = ("Level", "Name", "Delta", "Checked", "Extra")
TANK_TYPES = (DOUBLE, STRING, INT8, DATETIME, DOUBLE)


def _pump(speed: float, temp: float, rpm: int, temp_ms: int | None = None, quality: int | None = None) -> TemplateSpec:
    motor = TemplateSpec(
        (MetricSpec("Temp", temp, FLOAT, timestamp_ms=temp_ms), MetricSpec("Rpm", rpm, INT16)), template_ref="Motor"
    )
    members = (
        MetricSpec("Speed", speed, quality_code=quality),
        MetricSpec("Running", True, BOOLEAN),
        MetricSpec("Motor", motor, TEMPLATE),
        MetricSpec("Note", "ok", STRING),
    )
    return TemplateSpec(members, template_ref="Pump")


def _host(tmp_path: Path) -> SparkplugHost:
    return SparkplugHost(load_site(_write_udt_site(tmp_path)), 86400, False)


def _birth(host: SparkplugHost, now_ms: int, dbirth: list[MetricSpec]) -> HostResult:
    nbirth = host.handle(
        "spBv1.0/G1/NBIRTH/E2",
        encode_payload([MetricSpec("bdSeq", 0, UINT64), PUMP_DEFINITION], seq=0, timestamp_ms=now_ms),
    )
    assert nbirth.points == [] and host.unknown == []  # the definition is neither values nor unknown metrics
    return host.handle("spBv1.0/G1/DBIRTH/E2/D1", encode_payload(dbirth, seq=1, timestamp_ms=now_ms))


def _by_tag(points: list[Point]) -> dict[str, list[Point]]:
    out: dict[str, list[Point]] = {}
    for p in points:
        out.setdefault(p.tags["tag"], []).append(p)
    return out


def _only_reject(result: HostResult) -> Rejected:
    """The one bad metric of a message (each bad metric is rejected on its own)."""
    (reject,) = result.rejects
    return reject


def _value(p: Point) -> object:
    return p.fields.get("value", p.fields.get("value_str"))


def test_template_members_flatten_from_birth_and_alias_data(tmp_path: Path) -> None:
    host = _host(tmp_path)
    now = int(time.time() * 1000)
    birth = _birth(host, now, [MetricSpec("Pump1", _pump(10.0, 50.5, -3), TEMPLATE, alias=1)])
    values = {tag: [_value(p) for p in ps] for tag, ps in _by_tag(birth.points).items()}
    assert values == {
        "pump1_speed": [10.0],
        "pump1_running": [1.0],
        "pump1_motor_temp": [50.5],
        "pump1_motor_rpm": [-3.0],
    }
    assert host.unknown == ["G1/E2/D1/Pump1/Note"]
    assert all(p.timestamp_ns == now * 1_000_000 for p in birth.points)
    host.unknown.clear()

    # DATA addresses the template by alias; a member without a datatype takes the one from the BIRTH
    data: Any = Payload()
    ddata = [MetricSpec(None, _pump(11.0, 51.25, -7, temp_ms=now + 7), TEMPLATE, alias=1, timestamp_ms=now + 5)]
    data.ParseFromString(encode_payload(ddata, seq=2))
    motor = next(m for m in data.metrics[0].template_value.metrics if m.name == "Motor")
    next(m for m in motor.template_value.metrics if m.name == "Rpm").ClearField("datatype")
    result = host.handle(DDATA, data.SerializeToString())
    points = _by_tag(result.points)
    assert [_value(p) for p in points["pump1_speed"]] == [11.0]
    assert [_value(p) for p in points["pump1_motor_rpm"]] == [-7.0]
    assert points["pump1_speed"][0].timestamp_ns == (now + 5) * 1_000_000  # the template metric's time
    assert points["pump1_motor_temp"][0].timestamp_ns == (now + 7) * 1_000_000  # the member's own time
    assert all(p.fields["quality"] == Quality.GOOD and "status" not in p.fields for p in result.points)
    assert all(p.tags["asset"] == "S-1" for p in result.points)


def test_ignition_quality_property_sets_quality_and_keeps_the_code(tmp_path: Path) -> None:
    host = _host(tmp_path)
    now = int(time.time() * 1000)
    _birth(host, now, [MetricSpec("Plain", 1.0, alias=3), MetricSpec("Pump1", _pump(1.0, 2.0, 3), TEMPLATE, alias=1)])
    expected = [
        (IGNITION_GOOD, Quality.GOOD),
        (UNCERTAIN, Quality.UNCERTAIN),
        (BAD_STALE, Quality.BAD),
        (ERROR, Quality.BAD),
    ]
    for seq, (code, quality) in enumerate(expected, start=2):
        result = host.handle(DDATA, encode_payload([MetricSpec(None, 5.0, alias=3, quality_code=code)], seq))
        (point,) = result.points
        assert point.fields == {"value": 5.0, "quality": quality, "status": code & 0xFFFFFFFF}
    null = host.handle(DDATA, encode_payload([MetricSpec(None, None, alias=3, quality_code=BAD_STALE)], 6))
    assert null.points[0].fields == {"value_str": "", "quality": Quality.BAD, "status": 0x80000204}
    text_quality: Any = Payload()
    text_quality.ParseFromString(encode_payload([MetricSpec(None, 5.0, alias=3, quality_code=IGNITION_GOOD)], 7))
    text_quality.metrics[0].properties.values[0].string_value = "Good"
    err = _only_reject(host.handle(DDATA, text_quality.SerializeToString()))
    assert err.reason == "wrong_type" and "Quality property is not an integer" in str(err)

    # a template's Quality holds for members without their own; Speed carries its own (good)
    pump = _pump(4.0, 5.0, 6, quality=IGNITION_GOOD)
    result = host.handle(DDATA, encode_payload([MetricSpec(None, pump, TEMPLATE, alias=1, quality_code=BAD_STALE)], 8))
    qualities = {p.tags["tag"]: p.fields["quality"] for p in result.points}
    assert qualities == {
        "pump1_speed": Quality.GOOD,
        "pump1_running": Quality.BAD,
        "pump1_motor_temp": Quality.BAD,
        "pump1_motor_rpm": Quality.BAD,
    }


def test_dataset_rows_become_indexed_points_per_column(tmp_path: Path) -> None:
    host = _host(tmp_path)
    now = int(time.time() * 1000)
    rows = ((1.5, "A", -2, now, 9.0), (None, "B", 3, now + 1000, 9.0))
    birth = _birth(host, now, [MetricSpec("Tanks", DataSetSpec(TANK_COLUMNS, TANK_TYPES, rows), DATASET, alias=2)])
    got = {(p.tags["tag"], p.tags["index"]): (_value(p), p.fields["quality"]) for p in birth.points}
    assert got == {
        ("tank_level", "0"): (1.5, Quality.GOOD),
        ("tank_level", "1"): ("", Quality.BAD),  # a null cell
        ("tank_name", "0"): ("A", Quality.GOOD),
        ("tank_name", "1"): ("B", Quality.GOOD),
        ("tank_delta", "0"): (-2.0, Quality.GOOD),
        ("tank_delta", "1"): (3.0, Quality.GOOD),
        ("tank_checked", "0"): (now / 1000, Quality.GOOD),
        ("tank_checked", "1"): (now / 1000 + 1, Quality.GOOD),
    }
    assert host.unknown == ["G1/E2/D1/Tanks/Extra"]  # once per column, not per row
    assert all(p.timestamp_ns == now * 1_000_000 for p in birth.points)

    one_row = DataSetSpec(TANK_COLUMNS, TANK_TYPES, ((2.5, "C", 1, now, 0.0),))
    data = host.handle(DDATA, encode_payload([MetricSpec(None, one_row, DATASET, alias=2)], 2))
    assert sorted((p.tags["tag"], p.tags["index"]) for p in data.points) == [
        ("tank_checked", "0"),
        ("tank_delta", "0"),
        ("tank_level", "0"),
        ("tank_name", "0"),
    ]

    short = DataSetSpec(TANK_COLUMNS, TANK_TYPES, ((2.5, "C", 1, now, 0.0), (2.5,)))
    err = _only_reject(host.handle(DDATA, encode_payload([MetricSpec(None, short, DATASET, alias=2)], 3)))
    assert err.reason == "bad_payload" and "row 1 column 'Name'" in str(err)
    untyped = DataSetSpec(TANK_COLUMNS, TANK_TYPES[:2], ())
    err = _only_reject(host.handle(DDATA, encode_payload([MetricSpec(None, untyped, DATASET, alias=2)], 4)))
    assert err.reason == "bad_payload" and "5 columns but 2 types" in str(err)


def test_null_compounds_and_unsupported_values(tmp_path: Path) -> None:
    host = _host(tmp_path)
    now = int(time.time() * 1000)
    tanks = DataSetSpec(TANK_COLUMNS, TANK_TYPES, ())
    _birth(
        host,
        now,
        [
            MetricSpec("Pump1", _pump(1.0, 2.0, 3), TEMPLATE, alias=1),
            MetricSpec("Tanks", tanks, DATASET, alias=2),
            MetricSpec("Plain", 1.0, alias=3),
        ],
    )
    nulls = [MetricSpec(None, None, TEMPLATE, alias=1), MetricSpec(None, None, DATASET, alias=2)]
    result = host.handle(DDATA, encode_payload(nulls, 2))
    assert sorted(p.tags["tag"] for p in result.points) == sorted(set(UDT_TAGS) - {"plain"})
    assert all(p.fields == {"value_str": "", "quality": Quality.BAD} for p in result.points)

    nameless = TemplateSpec((MetricSpec(None, 1.0),))
    err = _only_reject(host.handle(DDATA, encode_payload([MetricSpec(None, nameless, TEMPLATE, alias=1)], 3)))
    assert err.reason == "bad_payload" and "member without a name" in str(err)

    def ddata(seq: int, set_value: Any) -> bytes:
        msg: Any = Payload()
        msg.ParseFromString(encode_payload([MetricSpec(None, 0.0, alias=3)], seq))
        msg.metrics[0].datatype = BYTES
        set_value(msg.metrics[0])
        return bytes(msg.SerializeToString())

    for seq, set_value, kind in (
        (4, lambda m: setattr(m, "bytes_value", b"\x01\x02"), "bytes"),
        (5, lambda m: m.extension_value.SetInParent(), "extension"),
    ):
        err = _only_reject(host.handle(DDATA, ddata(seq, set_value)))
        assert err.reason == "wrong_type" and f"{kind} values are not supported" in str(err)

    # the same type on a metric the site does not map is only counted as unknown
    unmapped: Any = Payload()
    unmapped.ParseFromString(encode_payload([MetricSpec("Blob", None, BYTES)], 6))
    unmapped.metrics[0].ClearField("is_null")
    unmapped.metrics[0].bytes_value = b"\x00"
    host.unknown.clear()
    assert host.handle(DDATA, unmapped.SerializeToString()).points == []
    assert host.unknown == ["G1/E2/D1/Blob"]


def _uint(number: int, n: int) -> bytes:
    return varint(number << 3) + varint(n)


def _sub(number: int, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return varint(number << 3 | 2) + varint(len(body)) + body


def _text(number: int, s: str) -> bytes:
    return _sub(number, s.encode())


def _double(number: int, x: float) -> bytes:
    return varint(number << 3 | 1) + struct.pack("<d", x)


def _float(number: int, x: float) -> bytes:
    return varint(number << 3 | 5) + struct.pack("<f", x)


def test_wire_bytes_written_from_the_tahu_field_numbers_decode(tmp_path: Path) -> None:
    """A payload encoded by hand from sparkplug_b.proto's field numbers, not by our own encoder."""
    host = _host(tmp_path)
    now = int(time.time() * 1000)
    host.handle("spBv1.0/G1/NBIRTH/E2", encode_payload([MetricSpec("bdSeq", 0, UINT64)], seq=0))
    # Metric: name 1, alias 2, datatype 4, properties 9, double 13, float 12, dataset 17, template 18
    motor = _sub(18, _text(4, "Motor"), _sub(2, _text(1, "Temp"), _uint(4, FLOAT), _float(12, 2.5)))
    pump = _sub(
        2,
        _text(1, "Pump1"),
        _uint(2, 1),
        _uint(4, TEMPLATE),
        # Template: metrics 2, template_ref 4, is_definition 5
        _sub(18, _sub(2, _text(1, "Speed"), _uint(4, DOUBLE), _double(13, 12.5)),
             _sub(2, _text(1, "Motor"), _uint(4, TEMPLATE), motor), _text(4, "Pump"), _uint(5, 0)),
    )  # fmt: skip
    # DataSet: num_of_columns 1, columns 2, types 3, rows 4 (Row: elements 1; DataSetValue: double 4)
    tanks = _sub(
        2,
        _text(1, "Tanks"),
        _uint(4, DATASET),
        _sub(17, _uint(1, 1), _text(2, "Level"), _uint(3, DOUBLE), _sub(4, _sub(1, _double(4, 7.25)))),
    )
    # PropertySet: keys 1, values 2 (PropertyValue: type 1, int_value 3)
    quality = _sub(9, _text(1, "Quality"), _sub(2, _uint(1, 3), _uint(3, 0x80000204)))
    plain = _sub(2, _text(1, "Plain"), _uint(4, DOUBLE), quality, _double(13, 1.0))
    payload = _uint(1, now) + pump + tanks + plain + _uint(3, 1)  # timestamp 1, metrics 2, seq 3
    points = host.handle("spBv1.0/G1/DBIRTH/E2/D1", payload).points
    got = {(p.tags["tag"], p.tags.get("index")): (_value(p), p.fields["quality"]) for p in points}
    assert got == {
        ("pump1_speed", None): (12.5, Quality.GOOD),
        ("pump1_motor_temp", None): (2.5, Quality.GOOD),
        ("tank_level", "0"): (7.25, Quality.GOOD),
        ("plain", None): (1.0, Quality.BAD),
    }


def test_template_and_dataset_through_mosquitto(collector: MqttCollector, mosquitto: MosquittoServer) -> None:
    pub = publisher(mosquitto.port, MQTT_USER, MQTT_PASSWORD)
    spool = collector.runtime.writer.folder
    base = "spBv1.0/G1"
    now = int(time.time() * 1000)
    rows = ((1.5, "A", -2, now, 9.0), (2.5, "B", 3, now, 9.0))
    tanks = DataSetSpec(TANK_COLUMNS, TANK_TYPES, rows)
    nbirth = [MetricSpec("bdSeq", 0, UINT64), PUMP_DEFINITION]
    pub.publish(f"{base}/NBIRTH/E2", encode_payload(nbirth, seq=0, timestamp_ms=now), qos=1)
    dbirth = [
        MetricSpec("Pump1", _pump(10.0, 50.5, -3), TEMPLATE, alias=1),
        MetricSpec("Tanks", tanks, DATASET, alias=2),
        MetricSpec("Plain", 1.0, alias=3),
    ]
    pub.publish(f"{base}/DBIRTH/E2/D1", encode_payload(dbirth, seq=1, timestamp_ms=now), qos=1)
    one_row = DataSetSpec(TANK_COLUMNS, TANK_TYPES, ((3.5, "C", 4, now, 9.0),))
    ddata = [
        MetricSpec(None, _pump(11.0, 51.5, -4, quality=BAD_STALE), TEMPLATE, alias=1, timestamp_ms=now + 1),
        MetricSpec(None, one_row, DATASET, alias=2, timestamp_ms=now + 1),
        MetricSpec(None, 2.0, alias=3, timestamp_ms=now + 1),
    ]
    pub.publish(f"{base}/DDATA/E2/D1", encode_payload(ddata, seq=2), qos=1)
    # a short DataSet row rejects that metric only: the scalar in the same message lands
    short = DataSetSpec(TANK_COLUMNS, TANK_TYPES, ((4.5,),))
    mixed = [MetricSpec(None, short, DATASET, alias=2), MetricSpec(None, 3.0, alias=3)]
    pub.publish(f"{base}/DDATA/E2/D1", encode_payload(mixed, seq=3), qos=1)

    def values(tag: str) -> list[tuple[str | None, object]]:
        points = [p for p in telemetry(spool) if p.tags["tag"] == tag and p.tags["asset"] == "S-1"]
        return [(p.tags.get("index"), _value(p)) for p in points]

    wait_until(lambda: values("plain") == [(None, 1.0), (None, 2.0), (None, 3.0)], 10, "the scalar stream")
    assert values("pump1_speed") == [(None, 10.0), (None, 11.0)]
    assert values("pump1_motor_temp") == [(None, 50.5), (None, 51.5)]
    assert values("tank_level") == [("0", 1.5), ("1", 2.5), ("0", 3.5)]
    assert values("tank_name") == [("0", "A"), ("1", "B"), ("0", "C")]
    stale = next(p for p in telemetry(spool) if p.tags["tag"] == "pump1_speed" and p.fields.get("value") == 11.0)
    assert stale.fields["quality"] == Quality.BAD and stale.fields["status"] == 0x80000204
    assert stale.timestamp_ns == (now + 1) * 1_000_000
    assert collector.metrics.counter("rejected_total", reason="bad_payload") == 1
    (dead,) = [json.loads(line) for line in collector.runtime.rejects.dead_letter.path.read_text().splitlines()]
    assert "DataSet metric G1/E2/D1/Tanks row 0" in dead["message"] and dead["where"] == f"topic '{base}/DDATA/E2/D1'"
    address = "G1/E2/D1/Pump1/Note"
    assert collector.metrics.counter("unknown_sources_total", source="sparkplug", address=address) == 2
    pub.loop_stop()
