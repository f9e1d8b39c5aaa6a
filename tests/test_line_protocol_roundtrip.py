"""Line-protocol escaping proven against the real InfluxDB 1.6 (auth on): what goes in comes back.

Arbitrary measurement names, tag keys/values, field keys and string values (commas, spaces, equals
signs, quotes, backslashes, newlines, unicode) are written through `HistorianWriter` and read back
with InfluxQL; they must match exactly. Names the line protocol cannot carry must be refused by the
encoder (`LineProtocolError`), never stored altered.
"""

from __future__ import annotations

import itertools
import uuid

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flowline.core.points import LineProtocolError, Point, encode_line
from flowline.historian import Connection, HistorianWriter
from flowline.historian.query import HistorianReader, quote_ident
from flowline.lab.services import InfluxDServer

SPECIALS = ",= \"'\\\n\r\t#"
ALPHABET = st.one_of(
    st.sampled_from(SPECIALS),
    st.sampled_from("abcXYZ09_-.:/"),
    st.characters(codec="utf-8", exclude_categories=["Cs"]),
)
names = st.text(ALPHABET, min_size=1, max_size=8)


@pytest.fixture(scope="module")
def roundtrip_db(influx: InfluxDServer) -> tuple[HistorianWriter, HistorianReader]:
    db = "lp_" + uuid.uuid4().hex[:8]
    influx.create_database(db)
    admin = Connection(influx.url, db, username=influx.admin.name, password=influx.admin.password)
    reader_conn = Connection(influx.url, db, username=influx.admin.name, password=influx.admin.password)
    return HistorianWriter(admin, gzip=False, retry_deadline_s=5), HistorianReader(reader_conn)


_timestamps = itertools.count(1_600_000_000_000_000_000, 1_000)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    measurement=names,
    tags=st.dictionaries(names, names, min_size=0, max_size=3),  # values non-empty: "" means absent
    field_key=names,
    field_value=st.text(ALPHABET, max_size=12),
)
def test_roundtrip_through_influxdb(
    roundtrip_db: tuple[HistorianWriter, HistorianReader],
    measurement: str,
    tags: dict[str, str],
    field_key: str,
    field_value: str,
) -> None:
    writer, reader = roundtrip_db
    if field_key in tags or "time" in (field_key, *tags):
        return  # a key used as both tag and field, or "time", is a schema error, not an escaping one
    ts = next(_timestamps)
    point = Point(measurement, tags, {field_key: field_value, "n": 1.5}, ts)
    try:
        encode_line(point.measurement, point.tags, point.fields, ts)
    except LineProtocolError:
        event("refused by the encoder")
        return  # refusal is checked by test_refuses_only_what_influxdb_cannot_carry
    event("written and read back")
    result = writer.write([point])
    assert (result.written, result.dead_lettered) == (1, 0)
    series = reader.query(f"SELECT * FROM {quote_ident(measurement)} WHERE time = {ts} GROUP BY *")
    assert len(series) == 1, series
    got = series[0]
    assert got.name == measurement
    # Other examples may share the measurement: GROUP BY * and SELECT * then list their tag and
    # field keys too, empty/null for this point.
    assert {k: v for k, v in got.tags.items() if v != ""} == tags
    row = {k: v for k, v in zip(got.columns, got.values[0], strict=True) if v is not None}
    assert row == {"time": ts, field_key: field_value, "n": 1.5}


@pytest.mark.parametrize(
    "measurement, tags, field_key",
    [
        ("a\nb", {}, "f"),  # a line break ends the line, escaped or not
        ("m", {"t": "x\ny"}, "f"),
        ("m", {"t": "x\ry"}, "f"),  # stored, but InfluxQL cannot name it
        ("m", {"t": "x\x00y"}, "f"),
        ("m", {"t": "trailing\\"}, "f"),  # would escape the separator that follows
        ("m", {"t": "a\\,b"}, "f"),  # "\," cannot mean backslash + comma
        ("m", {"t\\=": "v"}, "f"),
        ("m", {}, "f\\ g"),
        ("m\\", {}, "f"),
        ("#comment", {}, "f"),  # a line starting with # is a comment: silently dropped
        ("\tm", {}, "f"),  # leading whitespace is skipped
        ("", {}, "f"),
        ("m", {"": "v"}, "f"),
        ("m", {}, ""),
    ],
)
def test_refuses_only_what_influxdb_cannot_carry(measurement: str, tags: dict[str, str], field_key: str) -> None:
    with pytest.raises(LineProtocolError):
        encode_line(measurement, tags, {field_key: 1.0}, 1)


def test_escapes_what_it_can_carry() -> None:
    line = encode_line("m e,a=s", {"t k=": "v, =\\x"}, {"f ,=": 'say "hi"\\\n'}, 7)
    assert line == 'm\\ e\\,a=s,t\\ k\\==v\\,\\ \\=\\x f\\ \\,\\=="say \\"hi\\"\\\\\n" 7'
