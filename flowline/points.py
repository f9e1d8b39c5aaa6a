"""The unit of data that flows through every stage: a `Point`, and its InfluxDB line-protocol form.

Telemetry uses one narrow measurement (see DESIGN.md):
``telemetry,site=…,asset=…,tag=…[,unit=…] value=<float>,quality=<int>[,status=<int>] <ns>``.
InfluxDB fixes a field's type per measurement and shard and rejects a whole batch on a mixed type,
so ``value`` is always a float; strings go to ``value_str``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum

TELEMETRY = "telemetry"

FieldValue = float | int | bool | str


class Quality(IntEnum):
    """OPC UA status-code class. Bad values are stored, not dropped, so gaps are explainable."""

    GOOD = 0
    UNCERTAIN = 1
    BAD = 2

    @classmethod
    def from_status_code(cls, code: int) -> Quality:
        """Map a 32-bit OPC UA StatusCode to its class (the top two bits)."""
        severity = (code >> 30) & 0x3
        if severity == 0:
            return cls.GOOD
        if severity == 1:
            return cls.UNCERTAIN
        return cls.BAD


@dataclass(frozen=True, slots=True)
class Point:
    """One InfluxDB point. ``fields`` must not be empty; ``timestamp_ns`` is Unix epoch nanoseconds."""

    measurement: str
    tags: dict[str, str]
    fields: dict[str, FieldValue]
    timestamp_ns: int

    def to_line(self) -> str:
        return encode_line(self.measurement, self.tags, self.fields, self.timestamp_ns)

    def to_wire(self) -> list[object]:
        """Compact JSON-able form used inside spool records and relay batches."""
        return [self.measurement, self.tags, self.fields, self.timestamp_ns]

    @classmethod
    def from_wire(cls, item: list[object]) -> Point:
        measurement, tags, fields, ts = item
        if not (
            isinstance(measurement, str)
            and isinstance(tags, dict)
            and isinstance(fields, dict)
            and isinstance(ts, int)
        ):
            raise ValueError(f"malformed wire point: {item!r:.200}")
        return cls(measurement, tags, fields, ts)


@dataclass(frozen=True, slots=True)
class TagRef:
    """Where a telemetry value belongs in the inventory."""

    site: str
    asset: str
    tag: str
    unit: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


def telemetry_point(
    ref: TagRef,
    value: FieldValue,
    timestamp_ns: int,
    quality: Quality = Quality.GOOD,
    status_code: int | None = None,
) -> Point:
    """Build a telemetry point, keeping ``value`` a float so InfluxDB never sees a type conflict."""
    tags = {"site": ref.site, "asset": ref.asset, "tag": ref.tag}
    if ref.unit:
        tags["unit"] = ref.unit
    tags.update(ref.extra)
    fields: dict[str, FieldValue] = {"quality": int(quality)}
    if isinstance(value, str):
        fields["value_str"] = value
    else:
        number = float(value)
        if math.isfinite(number):
            fields["value"] = number
        else:
            # InfluxDB cannot store NaN/inf; keep the sample as a bad-quality marker instead of losing it.
            fields["quality"] = int(Quality.BAD)
            fields["value_str"] = repr(number)
    if status_code is not None:
        fields["status"] = int(status_code)
    return Point(TELEMETRY, tags, fields, timestamp_ns)


# --- line protocol -----------------------------------------------------------------------------
# https://docs.influxdata.com/influxdb/v1/write_protocols/line_protocol_reference/#special-characters

_MEASUREMENT_ESCAPES = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n", "\r": r"\r", "\\": "\\\\"})
_KEY_ESCAPES = str.maketrans({",": r"\,", " ": r"\ ", "=": r"\=", "\n": r"\n", "\r": r"\r", "\\": "\\\\"})
_STRING_FIELD_ESCAPES = str.maketrans({'"': r"\"", "\\": "\\\\"})


class LineProtocolError(ValueError):
    """A point that cannot be represented in line protocol (empty name, no fields, NaN, …)."""


def escape_measurement(name: str) -> str:
    if not name:
        raise LineProtocolError("measurement name is empty")
    return name.translate(_MEASUREMENT_ESCAPES)


def escape_key(key: str) -> str:
    """Escape a tag key, tag value or field key."""
    return key.translate(_KEY_ESCAPES)


def format_field_value(value: FieldValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise LineProtocolError(f"field value {value!r} is not finite")
        return repr(value)
    return '"' + value.translate(_STRING_FIELD_ESCAPES) + '"'


def encode_line(
    measurement: str, tags: dict[str, str], fields: dict[str, FieldValue], timestamp_ns: int
) -> str:
    if not fields:
        raise LineProtocolError(f"point in {measurement!r} has no fields")
    parts = [escape_measurement(measurement)]
    for key in sorted(tags):
        value = tags[key]
        if value == "":
            continue  # InfluxDB rejects empty tag values; an absent tag means the same
        parts.append(f"{escape_key(key)}={escape_key(value)}")
    field_text = ",".join(f"{escape_key(k)}={format_field_value(v)}" for k, v in fields.items())
    return f"{','.join(parts)} {field_text} {timestamp_ns}"


def encode_lines(points: list[Point]) -> bytes:
    return ("\n".join(p.to_line() for p in points) + "\n").encode("utf-8") if points else b""
