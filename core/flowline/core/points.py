"""The unit of data that flows through every stage: a `Point`, and its InfluxDB line-protocol form.

Telemetry uses one narrow measurement (see DESIGN.md):
``telemetry,site=…,asset=…,tag=…[,unit=…] value=<float>,quality=<int>[,status=<int>] <ns>``.
InfluxDB fixes a field's type per measurement and shard and rejects a whole batch on a mixed type,
so ``value`` is always a float; strings go to ``value_str``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from enum import IntEnum

from flowline.core.errors import FlowlineError

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
#
# What InfluxDB 1.6's parser really does (proven by tests/test_line_protocol_roundtrip.py against the
# real server; summarised in docs/measurements.md): in a measurement only "," and " " are escapes, in
# tag keys, tag values and field keys "," " " and "="; "\\" is NOT an escape there (a backslash is
# stored as written). In string field values "\\" and "\"" are escapes and newlines are allowed.
# So names keep their backslashes unescaped, and a name the parser cannot read back exactly is
# refused with LineProtocolError (the writer dead-letters it) instead of being stored altered.

_MEASUREMENT_SPECIALS = ", "
_KEY_SPECIALS = ", ="
_MEASUREMENT_ESCAPES = str.maketrans({",": r"\,", " ": r"\ "})
_KEY_ESCAPES = str.maketrans({",": r"\,", " ": r"\ ", "=": r"\="})
_STRING_FIELD_ESCAPES = str.maketrans({'"': r"\"", "\\": "\\\\"})
# A newline ends the line even when escaped; 1.6 stores CR and NUL, but InfluxQL has no way to write
# them in a name or a WHERE literal, so such series could never be queried.
_NEVER_IN_NAMES = ("\n", "\r", "\x00")


class LineProtocolError(FlowlineError):
    """A point that cannot be represented in line protocol (empty name, no fields, NaN, …)."""


def _check_name(text: str, specials: str, what: str) -> None:
    if not isinstance(text, str):
        raise LineProtocolError(f"{what} {text!r} is not a string")
    if not text:
        raise LineProtocolError(f"{what} is empty")
    for bad in _NEVER_IN_NAMES:
        if bad in text:
            raise LineProtocolError(f"{what} {text!r} contains {bad!r}, which InfluxDB cannot carry")
    # A backslash right before a special character (or at the end, before the separator that
    # follows) would turn that character's escape into a literal backslash.
    if "\\" in text and (text.endswith("\\") or any(f"\\{c}" in text for c in specials)):
        raise LineProtocolError(
                f"{what} {text!r} has a backslash before {specials!r} or at its end, "
                "which InfluxDB's line protocol cannot carry"
            )


def escape_measurement(name: str) -> str:
    _check_name(name, _MEASUREMENT_SPECIALS, "measurement name")
    if name[0] == "#" or (name[0].isspace() and name[0] != " "):
        # A line starting with "#" is a comment; leading whitespace other than an escaped space is skipped.
        raise LineProtocolError(f"measurement name {name!r} starts with {name[0]!r}, which InfluxDB skips")
    return name.translate(_MEASUREMENT_ESCAPES)


def escape_key(key: str) -> str:
    """Escape a tag key, tag value or field key (raises `LineProtocolError` if it cannot be carried)."""
    _check_name(key, _KEY_SPECIALS, "tag or field key/value")
    return key.translate(_KEY_ESCAPES)


def format_field_value(value: FieldValue) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise LineProtocolError(f"field value {value!r} is not finite")
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, str):
        return '"' + value.translate(_STRING_FIELD_ESCAPES) + '"'
    raise LineProtocolError(f"field value {value!r} has unsupported type {type(value).__name__}")


# Escaped "measurement,tags" prefixes and field keys repeat endlessly in telemetry, so they are cached:
# this makes encoding several times faster (see bench/line_protocol.py). Bounded by clearing.
_SERIES_CACHE: dict[tuple[str, ...], str] = {}  # key: measurement, tag values, tag keys
_FIELD_KEY_CACHE: dict[str, str] = {}
_CACHE_MAX = 100_000


def _series_prefix(measurement: str, tags: dict[str, str]) -> str:
    cache_key = (measurement, *tags.values(), *tags)
    prefix = _SERIES_CACHE.get(cache_key)
    if prefix is None:
        parts = [escape_measurement(measurement)]
        for key in sorted(tags):
            value = tags[key]
            if value == "":
                continue  # InfluxDB rejects empty tag values; an absent tag means the same
            parts.append(f"{escape_key(key)}={escape_key(value)}")
        prefix = ",".join(parts)
        if len(_SERIES_CACHE) >= _CACHE_MAX:
            _SERIES_CACHE.clear()
        _SERIES_CACHE[cache_key] = prefix
    return prefix


def _field_key(key: str) -> str:
    escaped = _FIELD_KEY_CACHE.get(key)
    if escaped is None:
        escaped = escape_key(key)
        if key[0] == "\t":
            # The parser skips tabs before the field set, so the key would lose its first character.
            raise LineProtocolError(f"field key {key!r} starts with a tab, which InfluxDB strips")
        if len(_FIELD_KEY_CACHE) >= _CACHE_MAX:
            _FIELD_KEY_CACHE.clear()
        _FIELD_KEY_CACHE[key] = escaped
    return escaped


def encode_line(
    measurement: str, tags: dict[str, str], fields: dict[str, FieldValue], timestamp_ns: int
) -> str:
    if not fields:
        raise LineProtocolError(f"point in {measurement!r} has no fields")
    try:
        prefix = _SERIES_CACHE.get((measurement, *tags.values(), *tags)) or _series_prefix(measurement, tags)
        parts = []
        for key, value in fields.items():
            escaped = _FIELD_KEY_CACHE.get(key) or _field_key(key)
            # Inline fast paths for float (finite iff value - value == 0) and int; the rest dispatches.
            if type(value) is float and value - value == 0:
                parts.append(f"{escaped}={value!r}")
            elif type(value) is int:
                parts.append(f"{escaped}={value}i")
            else:
                parts.append(f"{escaped}={format_field_value(value)}")
        # operator.index: ints and NumPy integers pass; floats and strings raise TypeError.
        return f"{prefix} {','.join(parts)} {operator.index(timestamp_ns)}"
    except (TypeError, AttributeError) as exc:
        # Points decoded from the wire may carry non-string names or unhashable values.
        raise LineProtocolError(f"malformed point in {measurement!r}: {exc}") from exc


def encode_lines(points: list[Point]) -> bytes:
    lines = [encode_line(p.measurement, p.tags, p.fields, p.timestamp_ns) for p in points]
    return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""


def series_key(measurement: str, tags: dict[str, str]) -> str:
    """The escaped ``measurement,tag=value,…`` start of a point's line (cached): the series' identity."""
    return _series_prefix(measurement, tags)
