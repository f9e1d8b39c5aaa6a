"""Sparkplug B (spBv1.0): the payload schema and a stateful host application.

The Eclipse Tahu Python bindings and pysparkplug pin old protobuf/paho versions, so the schema is
declared here with Google's maintained ``protobuf`` package: the subset of ``sparkplug_b.proto``
(Tahu, field numbers as in the specification) a host needs to read values. Fields not declared
here (metadata, property sets, datasets, templates) are skipped by the parser as unknown fields.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

from flowline.collectors.common import Rejected, check_timestamp
from flowline.inventory import Site
from flowline.points import FieldValue, Point, Quality, TagRef, telemetry_point

NAMESPACE = "spBv1.0"
BAD_NO_COMMUNICATION = 0x80310000  # OPC UA StatusCode used for "edge node / device offline"

# Sparkplug B DataType enum (specification 6.4.16)
INT8, INT16, INT32, INT64 = 1, 2, 3, 4
UINT8, UINT16, UINT32, UINT64 = 5, 6, 7, 8
FLOAT, DOUBLE, BOOLEAN, STRING, DATETIME, TEXT, UUID = 9, 10, 11, 12, 13, 14, 15
_SIGNED_BITS = {INT8: 8, INT16: 16, INT32: 32, INT64: 64}
_VALUE_FIELD = {
    **dict.fromkeys((INT8, INT16, INT32, UINT8, UINT16, UINT32), "int_value"),
    **dict.fromkeys((INT64, UINT64, DATETIME), "long_value"),
    FLOAT: "float_value",
    DOUBLE: "double_value",
    BOOLEAN: "boolean_value",
    **dict.fromkeys((STRING, TEXT, UUID), "string_value"),
}


def _build_payload_class() -> type[Message]:
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(
        name="flowline_sparkplug_b.proto", package="org.eclipse.tahu.protobuf", syntax="proto2"
    )
    payload = fdp.message_type.add(name="Payload")
    metric = payload.nested_type.add(name="Metric")
    metric.oneof_decl.add(name="value")
    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    # (name, number, type, in the `value` oneof), numbers as in Tahu's sparkplug_b.proto
    for name, number, ftype, in_oneof in (
        ("name", 1, F.TYPE_STRING, False),
        ("alias", 2, F.TYPE_UINT64, False),
        ("timestamp", 3, F.TYPE_UINT64, False),
        ("datatype", 4, F.TYPE_UINT32, False),
        ("is_historical", 5, F.TYPE_BOOL, False),
        ("is_transient", 6, F.TYPE_BOOL, False),
        ("is_null", 7, F.TYPE_BOOL, False),
        ("int_value", 10, F.TYPE_UINT32, True),
        ("long_value", 11, F.TYPE_UINT64, True),
        ("float_value", 12, F.TYPE_FLOAT, True),
        ("double_value", 13, F.TYPE_DOUBLE, True),
        ("boolean_value", 14, F.TYPE_BOOL, True),
        ("string_value", 15, F.TYPE_STRING, True),
        ("bytes_value", 16, F.TYPE_BYTES, True),
    ):
        field = metric.field.add(name=name, number=number, type=ftype, label=opt)
        if in_oneof:
            field.oneof_index = 0
    payload.field.add(name="timestamp", number=1, type=F.TYPE_UINT64, label=opt)
    payload.field.add(
        name="metrics", number=2, type=F.TYPE_MESSAGE, label=rep,
        type_name=".org.eclipse.tahu.protobuf.Payload.Metric",
    )  # fmt: skip
    payload.field.add(name="seq", number=3, type=F.TYPE_UINT64, label=opt)
    payload.field.add(name="uuid", number=4, type=F.TYPE_STRING, label=opt)
    payload.field.add(name="body", number=5, type=F.TYPE_BYTES, label=opt)
    payload.extension_range.add(start=6, end=536870912)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    cls: type[Message] = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("org.eclipse.tahu.protobuf.Payload")
    )
    return cls


Payload = _build_payload_class()


@dataclass(frozen=True)
class MetricSpec:
    """What a host or a test needs to encode one metric."""

    name: str | None
    value: FieldValue | None
    datatype: int = DOUBLE
    alias: int | None = None
    timestamp_ms: int | None = None


def encode_payload(metrics: list[MetricSpec], seq: int | None, timestamp_ms: int | None = None) -> bytes:
    """A Sparkplug B payload (used by tests, benchmarks and the rebirth NCMD)."""
    msg: Any = Payload()
    msg.timestamp = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
    if seq is not None:
        msg.seq = seq
    for spec in metrics:
        m = msg.metrics.add()
        if spec.name is not None:
            m.name = spec.name
        if spec.alias is not None:
            m.alias = spec.alias
        m.datatype = spec.datatype
        m.timestamp = spec.timestamp_ms if spec.timestamp_ms is not None else msg.timestamp
        if spec.value is None:
            m.is_null = True
            continue
        value: Any = spec.value
        if spec.datatype in _SIGNED_BITS and int(value) < 0:
            value = int(value) + (1 << (32 if spec.datatype != INT64 else 64))
        setattr(m, _VALUE_FIELD[spec.datatype], value)
    return bytes(msg.SerializeToString())


def _metric_value(metric: Any, datatype: int) -> FieldValue | None:
    if metric.is_null:
        return None
    kind = metric.WhichOneof("value")
    if kind is None:
        return None
    if kind == "bytes_value":
        raise Rejected("wrong_type", f"metric {metric.name or metric.alias}: bytes values are not supported")
    raw: FieldValue = getattr(metric, kind)
    bits = _SIGNED_BITS.get(datatype)
    if bits is not None and isinstance(raw, int):
        raw &= (1 << bits) - 1
        if raw >= 1 << (bits - 1):
            raw -= 1 << bits
    if datatype == DATETIME and isinstance(raw, int):
        return raw / 1000.0  # epoch seconds as the float value
    return raw


@dataclass
class _Definition:
    name: str
    datatype: int


@dataclass
class _Device:
    online: bool = False
    aliases: dict[int, _Definition] = field(default_factory=dict)
    names: dict[str, int] = field(default_factory=dict)  # metric name -> datatype


@dataclass
class _Node:
    online: bool = False
    bd_seq: int | None = None
    seq: int | None = None
    node: _Device = field(default_factory=_Device)
    devices: dict[str, _Device] = field(default_factory=dict)


@dataclass
class HostResult:
    points: list[Point] = field(default_factory=list)
    rebirth_topic: str | None = None  # set when a rebirth NCMD should be published
    sequence_gap: bool = False


class SparkplugHost:
    """Per edge node state: birth definitions and aliases, bdSeq, seq; maps metrics to site tags."""

    def __init__(self, site: Site, window_s: float, allow_rebirth: bool) -> None:
        self.site = site
        self.window_s = window_s
        self.allow_rebirth = allow_rebirth
        self.nodes: dict[tuple[str, str], _Node] = {}
        self.refs: dict[tuple[str, str, str | None, str], TagRef] = {}
        for asset, tag in site.iter_tags("sparkplug"):
            src = tag.source.sparkplug
            assert src is not None
            self.refs[(src.group, src.edge_node, src.device, src.metric)] = site.tag_ref(asset, tag)
        self.unknown: list[str] = []  # metric addresses the site does not know, drained by the caller

    def groups(self) -> set[str]:
        return {key[0] for key in self.refs}

    def handle(self, topic: str, payload: bytes) -> HostResult:
        parts = topic.split("/")
        if len(parts) not in (4, 5) or parts[0] != NAMESPACE:
            raise Rejected("bad_payload", f"not a Sparkplug B topic: {topic!r}")
        _, group, kind, edge = parts[:4]
        device = parts[4] if len(parts) == 5 else None
        if kind in ("NCMD", "DCMD", "STATE"):
            return HostResult()
        msg: Any = Payload()
        try:
            msg.ParseFromString(payload)
        except DecodeError as exc:
            raise Rejected("bad_payload", f"not a Sparkplug B payload: {exc}") from exc
        node = self.nodes.setdefault((group, edge), _Node())
        handler = {
            "NBIRTH": self._nbirth,
            "DBIRTH": self._dbirth,
            "NDATA": self._data,
            "DDATA": self._data,
            "NDEATH": self._ndeath,
            "DDEATH": self._ddeath,
        }.get(kind)
        if handler is None:
            raise Rejected("bad_payload", f"unknown Sparkplug message type {kind!r}")
        return handler(msg, node, group, edge, device)

    # --- message types ---------------------------------------------------------------------------

    def _check_seq(self, msg: Any, node: _Node, group: str, edge: str, result: HostResult) -> None:
        if not msg.HasField("seq"):
            return
        expected = None if node.seq is None else (node.seq + 1) % 256
        node.seq = msg.seq
        if expected is not None and msg.seq != expected:
            result.sequence_gap = True
            if self.allow_rebirth:
                result.rebirth_topic = f"{NAMESPACE}/{group}/NCMD/{edge}"

    def _nbirth(self, msg: Any, node: _Node, group: str, edge: str, device: str | None) -> HostResult:
        result = HostResult()
        node.online, node.seq, node.node = True, msg.seq if msg.HasField("seq") else 0, _Device(online=True)
        node.devices.clear()
        for metric in msg.metrics:
            if metric.name == "bdSeq":
                node.bd_seq = int(metric.long_value)
        self._define(msg, node.node, group, edge, None, result)
        return result

    def _dbirth(self, msg: Any, node: _Node, group: str, edge: str, device: str | None) -> HostResult:
        if not node.online or device is None:
            raise Rejected("data_before_birth", f"DBIRTH for {group}/{edge}/{device} before its NBIRTH")
        result = HostResult()
        self._check_seq(msg, node, group, edge, result)
        dev = node.devices[device] = _Device(online=True)
        self._define(msg, dev, group, edge, device, result)
        return result

    def _define(self, msg: Any, dev: _Device, group: str, edge: str, device: str | None, result: HostResult) -> None:
        for metric in msg.metrics:
            if not metric.name:
                raise Rejected("bad_payload", "BIRTH metric without a name")
            if metric.HasField("alias"):
                dev.aliases[metric.alias] = _Definition(metric.name, metric.datatype)
            dev.names[metric.name] = metric.datatype
        self._values(msg, dev, group, edge, device, result)

    def _data(self, msg: Any, node: _Node, group: str, edge: str, device: str | None) -> HostResult:
        dev = node.node if device is None else node.devices.get(device)
        if not node.online or dev is None or not dev.online:
            where = f"{group}/{edge}" + (f"/{device}" if device else "")
            result = HostResult()
            if self.allow_rebirth:
                result.rebirth_topic = f"{NAMESPACE}/{group}/NCMD/{edge}"
            raise RejectedWithRebirth(result, f"DATA from {where} before its BIRTH (no metric definitions)")
        result = HostResult()
        self._check_seq(msg, node, group, edge, result)
        self._values(msg, dev, group, edge, device, result)
        return result

    def _ndeath(self, msg: Any, node: _Node, group: str, edge: str, device: str | None) -> HostResult:
        bd_seq = next((int(m.long_value) for m in msg.metrics if m.name == "bdSeq"), None)
        if node.bd_seq is not None and bd_seq is not None and bd_seq != node.bd_seq:
            return HostResult()  # a stale death certificate from an earlier session
        node.online, node.seq = False, None
        for dev in (node.node, *node.devices.values()):
            dev.online = False
        return HostResult(self._offline_points(group, edge, None, whole_node=True))

    def _ddeath(self, msg: Any, node: _Node, group: str, edge: str, device: str | None) -> HostResult:
        result = HostResult()
        self._check_seq(msg, node, group, edge, result)
        dev = node.devices.get(device or "")
        if dev is not None:
            dev.online = False
        result.points = self._offline_points(group, edge, device, whole_node=False)
        return result

    # --- values ----------------------------------------------------------------------------------

    def _offline_points(self, group: str, edge: str, device: str | None, whole_node: bool) -> list[Point]:
        now = time.time_ns()
        return [
            telemetry_point(ref, "offline", now, Quality.BAD, BAD_NO_COMMUNICATION)
            for (g, e, d, _), ref in self.refs.items()
            if g == group and e == edge and (whole_node or d == device)
        ]

    def _values(self, msg: Any, dev: _Device, group: str, edge: str, device: str | None, result: HostResult) -> None:
        default_ms = msg.timestamp if msg.HasField("timestamp") else None
        for metric in msg.metrics:
            if metric.HasField("name") and metric.name:
                name, datatype = metric.name, dev.names.get(metric.name, metric.datatype)
            else:
                definition = dev.aliases.get(metric.alias)
                if definition is None:
                    raise Rejected("bad_payload", f"alias {metric.alias} was not defined in the BIRTH")
                name, datatype = definition.name, definition.datatype
            if name == "bdSeq" or name.startswith(("Node Control/", "Device Control/", "Properties/")):
                continue
            ref = self.refs.get((group, edge, device, name))
            if ref is None:
                self.unknown.append(f"{group}/{edge}/{device or ''}/{name}")
                continue
            ts_ms = metric.timestamp if metric.HasField("timestamp") else default_ms
            ts_ns = int(ts_ms) * 1_000_000 if ts_ms is not None else time.time_ns()
            check_timestamp(ts_ns, self.window_s)
            value = _metric_value(metric, metric.datatype or datatype)
            if value is None:
                result.points.append(telemetry_point(ref, "", ts_ns, Quality.BAD))
            else:
                result.points.append(telemetry_point(ref, value, ts_ns))


class RejectedWithRebirth(Rejected):
    """DATA before BIRTH: rejected, and the host may ask the edge node to rebirth."""

    def __init__(self, result: HostResult, message: str) -> None:
        super().__init__("data_before_birth", message)
        self.result = result


def rebirth_payload() -> bytes:
    return encode_payload([MetricSpec("Node Control/Rebirth", True, BOOLEAN)], seq=None)
