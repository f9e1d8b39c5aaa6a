"""Sparkplug B (spBv1.0): the payload schema and a stateful host application.

The Eclipse Tahu Python bindings and pysparkplug pin old protobuf/paho versions, so the schema is
declared here with Google's maintained ``protobuf`` package: every message of Tahu's
``sparkplug_b.proto`` (field numbers as in the specification), so no metric value is dropped as
an unknown field. How a metric becomes telemetry, for the site tag whose ``metric`` is its name:

- Scalars: integers, floats and booleans as ``value``, strings as ``value_str``, DateTime as Unix
  epoch seconds. A null metric is stored as a bad-quality point.
- Template instances (Ignition UDTs) are flattened: each member is ``<template metric>/<member>``,
  recursively for nested templates (``Pump1/Motor/Temp``, Ignition's naming). DATA messages
  address the template by its alias and carry the members by name; a member without its own
  timestamp takes the template metric's, then the payload's. A null template marks every site tag
  under it bad. Template definitions (``is_definition``, sent in NBIRTH) hold no values and are
  skipped; template parameters are configuration, not values, and are not stored.
- DataSets: each column is ``<metric>/<column>``; every row is one point, tagged ``index=<row>``
  (from 0), at the metric's timestamp, so no row overwrites another in InfluxDB. A null cell is a
  bad-quality point; a row shorter than a mapped column is rejected (``bad_payload``). A null
  DataSet marks every site tag under it bad (without ``index``).
- The ``Quality`` property Ignition adds to a metric is an Ignition 8 QualityCode, a 32-bit code
  whose top two bits give the level like an OPC UA StatusCode (good, uncertain, bad, error). It
  sets the point's quality (error counts as bad) and is kept as ``status``; without it a value is
  good (Cirrus Link leaves good quality out). Template members without one inherit the template's.
- Bytes, File, the array types (all carried as ``bytes_value``) and extension values are rejected
  (``wrong_type``) when the site maps such a metric; unmapped metrics of any type are only counted
  as unknown.

A bad metric (undefined alias, unsupported type, timestamp outside the window, short DataSet row)
is rejected on its own, in ``HostResult.rejects``: the collector logs, counts and dead-letters it,
and the message's other metrics still land. A bad message (not a Sparkplug payload, DATA before
BIRTH, a BIRTH metric without a name) raises `Rejected` and is rejected whole.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

from flowline.collectors.common import Rejected, check_timestamp
from flowline.core.points import FieldValue, Point, Quality, TagRef, telemetry_point
from flowline.inventory import Site

NAMESPACE = "spBv1.0"
BAD_NO_COMMUNICATION = 0x80310000  # OPC UA StatusCode used for "edge node / device offline"
QUALITY_PROPERTY = "Quality"  # Ignition's per-metric quality (an Ignition 8 QualityCode)

# Sparkplug B DataType enum (specification 6.4.16)
INT8, INT16, INT32, INT64 = 1, 2, 3, 4
UINT8, UINT16, UINT32, UINT64 = 5, 6, 7, 8
FLOAT, DOUBLE, BOOLEAN, STRING, DATETIME, TEXT, UUID = 9, 10, 11, 12, 13, 14, 15
DATASET, BYTES, FILE, TEMPLATE = 16, 17, 18, 19
_SIGNED_BITS = {INT8: 8, INT16: 16, INT32: 32, INT64: 64}
_VALUE_FIELD = {
    **dict.fromkeys((INT8, INT16, INT32, UINT8, UINT16, UINT32), "int_value"),
    **dict.fromkeys((INT64, UINT64, DATETIME), "long_value"),
    FLOAT: "float_value",
    DOUBLE: "double_value",
    BOOLEAN: "boolean_value",
    **dict.fromkeys((STRING, TEXT, UUID), "string_value"),
}
_SCALAR_KINDS = frozenset(_VALUE_FIELD.values())

# --- schema (Tahu's sparkplug_b.proto, proto2) ---------------------------------------------------

_PACKAGE = "org.eclipse.tahu.protobuf"
_MAX_FIELD_NUMBER = 536870911  # `extensions N to max`


class _Field(NamedTuple):
    name: str
    number: int
    type: str  # a scalar type, or a message path inside the package
    repeated: bool = False
    oneof: bool = False  # in the message's `value` oneof


_BASIC_VALUES = (
    ("int_value", "uint32"),
    ("long_value", "uint64"),
    ("float_value", "float"),
    ("double_value", "double"),
    ("boolean_value", "bool"),
    ("string_value", "string"),
)


def _basic_values(first: int) -> tuple[_Field, ...]:
    """The six scalar members every Sparkplug `value` oneof starts with, numbered from ``first``."""
    return tuple(_Field(name, first + i, kind, oneof=True) for i, (name, kind) in enumerate(_BASIC_VALUES))


# (message path, first extension field number or None, fields); parents before their nested types
_MESSAGES: tuple[tuple[str, int | None, tuple[_Field, ...]], ...] = (
    ("Payload", 6, (
        _Field("timestamp", 1, "uint64"),
        _Field("metrics", 2, "Payload.Metric", repeated=True),
        _Field("seq", 3, "uint64"),
        _Field("uuid", 4, "string"),
        _Field("body", 5, "bytes"),
    )),
    ("Payload.Template", 6, (
        _Field("version", 1, "string"),
        _Field("metrics", 2, "Payload.Metric", repeated=True),
        _Field("parameters", 3, "Payload.Template.Parameter", repeated=True),
        _Field("template_ref", 4, "string"),
        _Field("is_definition", 5, "bool"),
    )),
    ("Payload.Template.Parameter", None, (
        _Field("name", 1, "string"),
        _Field("type", 2, "uint32"),
        *_basic_values(3),
        _Field("extension_value", 9, "Payload.Template.Parameter.ParameterValueExtension", oneof=True),
    )),
    ("Payload.Template.Parameter.ParameterValueExtension", 1, ()),
    ("Payload.DataSet", 5, (
        _Field("num_of_columns", 1, "uint64"),
        _Field("columns", 2, "string", repeated=True),
        _Field("types", 3, "uint32", repeated=True),
        _Field("rows", 4, "Payload.DataSet.Row", repeated=True),
    )),
    ("Payload.DataSet.DataSetValue", None, (
        *_basic_values(1),
        _Field("extension_value", 7, "Payload.DataSet.DataSetValue.DataSetValueExtension", oneof=True),
    )),
    ("Payload.DataSet.DataSetValue.DataSetValueExtension", 1, ()),
    ("Payload.DataSet.Row", 2, (_Field("elements", 1, "Payload.DataSet.DataSetValue", repeated=True),)),
    ("Payload.PropertyValue", None, (
        _Field("type", 1, "uint32"),
        _Field("is_null", 2, "bool"),
        *_basic_values(3),
        _Field("propertyset_value", 9, "Payload.PropertySet", oneof=True),
        _Field("propertysets_value", 10, "Payload.PropertySetList", oneof=True),
        _Field("extension_value", 11, "Payload.PropertyValue.PropertyValueExtension", oneof=True),
    )),
    ("Payload.PropertyValue.PropertyValueExtension", 1, ()),
    ("Payload.PropertySet", 3, (
        _Field("keys", 1, "string", repeated=True),
        _Field("values", 2, "Payload.PropertyValue", repeated=True),
    )),
    ("Payload.PropertySetList", 2, (_Field("propertyset", 1, "Payload.PropertySet", repeated=True),)),
    ("Payload.MetaData", 9, (
        _Field("is_multi_part", 1, "bool"),
        _Field("content_type", 2, "string"),
        _Field("size", 3, "uint64"),
        _Field("seq", 4, "uint64"),
        _Field("file_name", 5, "string"),
        _Field("file_type", 6, "string"),
        _Field("md5", 7, "string"),
        _Field("description", 8, "string"),
    )),
    ("Payload.Metric", None, (
        _Field("name", 1, "string"),
        _Field("alias", 2, "uint64"),
        _Field("timestamp", 3, "uint64"),
        _Field("datatype", 4, "uint32"),
        _Field("is_historical", 5, "bool"),
        _Field("is_transient", 6, "bool"),
        _Field("is_null", 7, "bool"),
        _Field("metadata", 8, "Payload.MetaData"),
        _Field("properties", 9, "Payload.PropertySet"),
        *_basic_values(10),
        _Field("bytes_value", 16, "bytes", oneof=True),
        _Field("dataset_value", 17, "Payload.DataSet", oneof=True),
        _Field("template_value", 18, "Payload.Template", oneof=True),
        _Field("extension_value", 19, "Payload.Metric.MetricValueExtension", oneof=True),
    )),
    ("Payload.Metric.MetricValueExtension", 1, ()),
)  # fmt: skip


def _build_payload_class() -> type[Message]:
    F = descriptor_pb2.FieldDescriptorProto
    scalars = {
        "string": F.TYPE_STRING,
        "bytes": F.TYPE_BYTES,
        "bool": F.TYPE_BOOL,
        "uint32": F.TYPE_UINT32,
        "uint64": F.TYPE_UINT64,
        "float": F.TYPE_FLOAT,
        "double": F.TYPE_DOUBLE,
    }
    fdp = descriptor_pb2.FileDescriptorProto(name="flowline_sparkplug_b.proto", package=_PACKAGE, syntax="proto2")
    protos: dict[str, descriptor_pb2.DescriptorProto] = {}
    for path, extensions_from, fields in _MESSAGES:
        parent, _, name = path.rpartition(".")
        proto = protos[path] = (protos[parent].nested_type if parent else fdp.message_type).add(name=name)
        if extensions_from is not None:
            proto.extension_range.add(start=extensions_from, end=_MAX_FIELD_NUMBER + 1)
        if any(f.oneof for f in fields):
            proto.oneof_decl.add(name="value")
        for f in fields:
            label = F.LABEL_REPEATED if f.repeated else F.LABEL_OPTIONAL
            fd = proto.field.add(name=f.name, number=f.number, label=label)
            if f.type in scalars:
                fd.type = scalars[f.type]
            else:
                fd.type, fd.type_name = F.TYPE_MESSAGE, f".{_PACKAGE}.{f.type}"
            if f.oneof:
                fd.oneof_index = 0
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    cls: type[Message] = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.Payload"))
    return cls


Payload = _build_payload_class()

# --- encoding (tests, benchmarks, the rebirth NCMD) ------------------------------------------------


@dataclass(frozen=True)
class TemplateSpec:
    """A Template value: an instance (``template_ref`` names its definition) or a definition."""

    members: tuple[MetricSpec, ...]
    template_ref: str | None = None
    is_definition: bool = False


@dataclass(frozen=True)
class DataSetSpec:
    """A DataSet value: column names, their Sparkplug datatypes, rows of cells (None is a null cell)."""

    columns: tuple[str, ...]
    types: tuple[int, ...]
    rows: tuple[tuple[FieldValue | None, ...], ...]


@dataclass(frozen=True)
class MetricSpec:
    """What a host or a test needs to encode one metric (``datatype`` TEMPLATE/DATASET for those values)."""

    name: str | None
    value: FieldValue | TemplateSpec | DataSetSpec | None
    datatype: int = DOUBLE
    alias: int | None = None
    timestamp_ms: int | None = None
    quality_code: int | None = None  # sent as Ignition's Int32 "Quality" property


def encode_payload(metrics: list[MetricSpec], seq: int | None, timestamp_ms: int | None = None) -> bytes:
    """A Sparkplug B payload; top-level metrics without a timestamp get the payload's, members none."""
    msg: Any = Payload()
    msg.timestamp = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
    if seq is not None:
        msg.seq = seq
    for spec in metrics:
        _encode_metric(msg.metrics.add(), spec, spec.timestamp_ms if spec.timestamp_ms is not None else msg.timestamp)
    return bytes(msg.SerializeToString())


def _encode_metric(m: Any, spec: MetricSpec, timestamp_ms: int | None) -> None:
    if spec.name is not None:
        m.name = spec.name
    if spec.alias is not None:
        m.alias = spec.alias
    m.datatype = spec.datatype
    if timestamp_ms is not None:
        m.timestamp = timestamp_ms
    if spec.quality_code is not None:
        m.properties.keys.append(QUALITY_PROPERTY)
        _set_value(m.properties.values.add(type=INT32), INT32, spec.quality_code)
    value = spec.value
    if value is None:
        m.is_null = True
    elif isinstance(value, TemplateSpec):
        m.template_value.SetInParent()
        m.template_value.is_definition = value.is_definition
        if value.template_ref is not None:
            m.template_value.template_ref = value.template_ref
        for member in value.members:
            _encode_metric(m.template_value.metrics.add(), member, member.timestamp_ms)
    elif isinstance(value, DataSetSpec):
        dataset = m.dataset_value
        dataset.num_of_columns = len(value.columns)
        dataset.columns.extend(value.columns)
        dataset.types.extend(value.types)
        for row in value.rows:
            elements = dataset.rows.add().elements
            # not strict: tests encode short (malformed) rows on purpose
            for datatype, cell in zip(value.types, row, strict=False):
                element = elements.add()
                if cell is not None:
                    _set_value(element, datatype, cell)
    else:
        _set_value(m, spec.datatype, value)


def _set_value(target: Any, datatype: int, value: FieldValue) -> None:
    """Set the oneof member Sparkplug uses for ``datatype``; negative integers go as two's complement."""
    bits = _SIGNED_BITS.get(datatype)
    if bits is not None and int(value) < 0:
        value = int(value) + (1 << (64 if bits == 64 else 32))
    setattr(target, _VALUE_FIELD[datatype], value)


def rebirth_payload() -> bytes:
    return encode_payload([MetricSpec("Node Control/Rebirth", True, BOOLEAN)], seq=None)


# --- decoding --------------------------------------------------------------------------------------


def _scalar(holder: Any, datatype: int, where: str) -> FieldValue | None:
    """The value of a Metric or DataSetValue, read as ``datatype``; None when it has none."""
    kind = holder.WhichOneof("value")
    if kind is None:
        return None
    if kind not in _SCALAR_KINDS:
        raise Rejected("wrong_type", f"{where}: {kind.removesuffix('_value')} values are not supported")
    raw: FieldValue = getattr(holder, kind)
    bits = _SIGNED_BITS.get(datatype)
    if bits is not None and isinstance(raw, int):
        raw &= (1 << bits) - 1
        if raw >= 1 << (bits - 1):
            raw -= 1 << bits
    if datatype == DATETIME and isinstance(raw, int):
        return raw / 1000.0  # epoch seconds as the float value
    return raw


def _quality_code(metric: Any, where: str) -> int | None:
    """Ignition's "Quality" property as an unsigned 32-bit code; None when the metric has none."""
    if not metric.HasField("properties"):
        return None
    properties = metric.properties
    for key, prop in zip(properties.keys, properties.values, strict=False):
        if key != QUALITY_PROPERTY:
            continue
        kind = prop.WhichOneof("value")
        if prop.is_null or kind is None:
            return None
        if kind not in ("int_value", "long_value"):
            raise Rejected("wrong_type", f"{where}: the {QUALITY_PROPERTY} property is not an integer ({kind})")
        return int(getattr(prop, kind)) & 0xFFFFFFFF
    return None


@dataclass
class _Definition:
    name: str
    datatype: int


@dataclass
class _Device:
    online: bool = False
    aliases: dict[int, _Definition] = field(default_factory=dict)
    names: dict[str, int] = field(default_factory=dict)  # metric name (members flattened) -> datatype


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
    rejects: list[Rejected] = field(default_factory=list)  # bad metrics, each left out on its own


@dataclass
class _Reading:
    """One BIRTH or DATA message being turned into points."""

    group: str
    edge: str
    device: str | None
    dev: _Device
    birth: bool
    result: HostResult

    def address(self, name: str) -> str:
        return f"{self.group}/{self.edge}/{self.device or ''}/{name}"


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
        self._define(msg, _Reading(group, edge, None, node.node, True, result))
        return result

    def _dbirth(self, msg: Any, node: _Node, group: str, edge: str, device: str | None) -> HostResult:
        if not node.online or device is None:
            raise Rejected("data_before_birth", f"DBIRTH for {group}/{edge}/{device} before its NBIRTH")
        result = HostResult()
        self._check_seq(msg, node, group, edge, result)
        dev = node.devices[device] = _Device(online=True)
        self._define(msg, _Reading(group, edge, device, dev, True, result))
        return result

    def _define(self, msg: Any, reading: _Reading) -> None:
        dev = reading.dev
        for metric in msg.metrics:
            if not metric.name:
                raise Rejected("bad_payload", "BIRTH metric without a name")
            if metric.HasField("alias"):
                dev.aliases[metric.alias] = _Definition(metric.name, metric.datatype)
            dev.names[metric.name] = metric.datatype
        self._values(msg, reading)

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
        self._values(msg, _Reading(group, edge, device, dev, False, result))
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

    def _values(self, msg: Any, reading: _Reading) -> None:
        default_ms = msg.timestamp if msg.HasField("timestamp") else None
        points = reading.result.points
        for metric in msg.metrics:
            kept = len(points)
            try:
                self._top_level_metric(reading, metric, default_ms)
            except Rejected as exc:
                del points[kept:]  # none of a bad metric's points, e.g. the DataSet rows before a short one
                reading.result.rejects.append(exc)

    def _top_level_metric(self, reading: _Reading, metric: Any, default_ms: int | None) -> None:
        if metric.HasField("name") and metric.name:
            name, datatype = metric.name, reading.dev.names.get(metric.name, metric.datatype)
        else:
            definition = reading.dev.aliases.get(metric.alias)
            if definition is None:
                address = reading.address(f"alias {metric.alias}")
                raise Rejected("bad_payload", f"metric {address} was not defined in the BIRTH")
            name, datatype = definition.name, definition.datatype
        if name == "bdSeq" or name.startswith(("Node Control/", "Device Control/", "Properties/")):
            return
        ts_ms = metric.timestamp if metric.HasField("timestamp") else default_ms
        self._metric(reading, metric, name, datatype, ts_ms, None)

    def _metric(
        self, reading: _Reading, metric: Any, name: str, datatype: int, ts_ms: int | None, inherited: int | None
    ) -> None:
        """Points of one metric; ``datatype`` from the BIRTH counts when the metric omits its own."""
        datatype = metric.datatype or datatype
        quality_code = _quality_code(metric, f"metric {reading.address(name)}")
        if quality_code is None:
            quality_code = inherited
        kind = metric.WhichOneof("value")
        if datatype in (TEMPLATE, DATASET) and (metric.is_null or kind is None):
            self._null_compound(reading, name, ts_ms, quality_code)
        elif kind == "template_value":
            self._template(reading, metric.template_value, name, ts_ms, quality_code)
        elif kind == "dataset_value":
            self._dataset(reading, metric.dataset_value, name, ts_ms, quality_code)
        else:
            ref = self._ref(reading, name)
            if ref is not None:
                value = None if metric.is_null else _scalar(metric, datatype, f"metric {reading.address(name)}")
                self._emit(reading, ref, value, ts_ms, quality_code)

    def _template(self, reading: _Reading, template: Any, name: str, ts_ms: int | None, quality: int | None) -> None:
        if template.is_definition:
            return  # a UDT definition (NBIRTH): its member values are defaults, not measurements
        for member in template.metrics:
            if not member.name:
                raise Rejected("bad_payload", f"template metric {reading.address(name)} has a member without a name")
            path = f"{name}/{member.name}"
            if reading.birth:
                reading.dev.names[path] = member.datatype
            member_ms = member.timestamp if member.HasField("timestamp") else ts_ms
            self._metric(reading, member, path, reading.dev.names.get(path, 0), member_ms, quality)

    def _dataset(self, reading: _Reading, dataset: Any, name: str, ts_ms: int | None, quality: int | None) -> None:
        if len(dataset.types) != len(dataset.columns):
            counts = f"{len(dataset.columns)} columns but {len(dataset.types)} types"
            raise Rejected("bad_payload", f"DataSet metric {reading.address(name)}: {counts}")
        for column, (column_name, datatype) in enumerate(zip(dataset.columns, dataset.types, strict=True)):
            ref = self._ref(reading, f"{name}/{column_name}")
            if ref is None:
                continue
            for row_number, row in enumerate(dataset.rows):
                where = f"DataSet metric {reading.address(name)} row {row_number} column {column_name!r}"
                if column >= len(row.elements):
                    raise Rejected("bad_payload", f"{where}: the row has only {len(row.elements)} values")
                value = _scalar(row.elements[column], datatype, where)
                row_ref = dataclasses.replace(ref, extra={**ref.extra, "index": str(row_number)})
                self._emit(reading, row_ref, value, ts_ms, quality)

    def _null_compound(self, reading: _Reading, name: str, ts_ms: int | None, quality: int | None) -> None:
        """A null Template or DataSet: every site tag under it gets a bad point (its members are unknown)."""
        prefix = name + "/"
        for (group, edge, device, metric), ref in self.refs.items():
            if (group, edge, device) == (reading.group, reading.edge, reading.device) and metric.startswith(prefix):
                self._emit(reading, ref, None, ts_ms, quality)

    def _ref(self, reading: _Reading, name: str) -> TagRef | None:
        ref = self.refs.get((reading.group, reading.edge, reading.device, name))
        if ref is None:
            self.unknown.append(reading.address(name))
        return ref

    def _emit(
        self, reading: _Reading, ref: TagRef, value: FieldValue | None, ts_ms: int | None, quality_code: int | None
    ) -> None:
        ts_ns = int(ts_ms) * 1_000_000 if ts_ms is not None else time.time_ns()
        check_timestamp(ts_ns, self.window_s)
        quality = Quality.GOOD if quality_code is None else Quality.from_status_code(quality_code)
        if value is None:
            reading.result.points.append(telemetry_point(ref, "", ts_ns, Quality.BAD, quality_code))
        else:
            reading.result.points.append(telemetry_point(ref, value, ts_ns, quality, quality_code))


class RejectedWithRebirth(Rejected):
    """DATA before BIRTH: rejected, and the host may ask the edge node to rebirth."""

    def __init__(self, result: HostResult, message: str) -> None:
        super().__init__("data_before_birth", message)
        self.result = result
