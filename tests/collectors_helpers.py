"""Helpers for the collector tests: a small site file, config files, reading the spool back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from flowline.core.config import FlowlineConfig, load_config
from flowline.core.points import TELEMETRY, Point
from flowline.core.spool import SpoolReader, decode_points

SITE = "test-site"
# A tag whose asset and name carry every character line protocol must escape.
ODD_ASSET = 'P 1,="x"ü'
ODD_TAG = 'temp, °C="a"'


def write_site(folder: Path, opcua_tags: list[dict[str, Any]] | None = None, name: str = "site.yaml") -> Path:
    tags: list[dict[str, Any]] = [
        {"name": "pressure", "unit": "bar", "source": {"mqtt": {"topic": "plant/test-site/P-1/pressure"}}},
        {"name": "flow", "source": {"mqtt": {"topic": "plant/multi", "json_key": "flow"}}},
        {"name": "level", "source": {"mqtt": {"topic": "plant/multi", "json_key": "level"}}},
        {"name": "rpm", "source": {"mqtt": {"topic": "plant/test-site/P-1/rpm"}}},
        {"name": "speed", "source": {"sparkplug": {"group": "G1", "edge_node": "E1", "metric": "speed"}}},
        {"name": "temp", "source": {"sparkplug": {"group": "G1", "edge_node": "E1", "device": "D1", "metric": "temp"}}},
        {
            "name": "count",
            "source": {"sparkplug": {"group": "G1", "edge_node": "E1", "device": "D1", "metric": "count"}},
        },
    ]
    assets: list[dict[str, Any]] = [
        {"id": "P-1", "name": "Pump", "type": "pump", "criticality": "A", "tags": tags},
        {
            "id": ODD_ASSET,
            "name": "odd",
            "type": "pump",
            "criticality": "C",
            "tags": [{"name": ODD_TAG, "type": "string", "source": {"mqtt": {"topic": "plant/odd topic, with=signs"}}}],
        },
    ]
    if opcua_tags:
        assets.append({"id": "U-1", "name": "Unit", "type": "unit", "criticality": "B", "tags": opcua_tags})
    path = folder / name
    path.write_text(yaml.safe_dump({"site": SITE, "assets": assets}, allow_unicode=True), encoding="utf-8")
    return path


def plain_broker(port: int, **fields: Any) -> dict[str, Any]:
    """``collectors.mqtt.broker`` for a test broker's plain listener (or a tap, or a dead port).

    Plain MQTT is refused unless the config says ``insecure_plain: true``: these tests say it explicitly.
    """
    return {"host": "127.0.0.1", "port": port, "insecure_plain": True, **fields}


def write_config(folder: Path, site_file: Path, collectors: dict[str, Any], **extra: Any) -> FlowlineConfig:
    doc: dict[str, Any] = {
        "site_file": str(site_file),
        "data_dir": str(folder / "data"),
        "metrics_interval_s": 0.5,
        "collectors": collectors,
        **extra,
    }
    path = folder / "flowline.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return load_config(path)


def read_spool(folder: Path) -> list[Point]:
    """Every point in the spool (nothing acknowledged, so the spool is not consumed)."""
    reader = SpoolReader(folder)
    points: list[Point] = []
    after = None
    while True:
        records = reader.read(after=after, max_records=10_000)
        if not records:
            return points
        for record in records:
            points.extend(decode_points(record.payload))
        after = records[-1].end


def telemetry(folder: Path) -> list[Point]:
    return [p for p in read_spool(folder) if p.measurement == TELEMETRY]


def metric_points(folder: Path, name: str) -> list[Point]:
    return [p for p in read_spool(folder) if p.measurement == f"flowline_{name}"]


def publisher(port: int, user: str, password: str, client_id: str = "") -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    client.username_pw_set(user, password)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def varint(n: int) -> bytes:
    """Base-128 varint, least significant group first: MQTT's remaining length and protobuf's varint."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)
