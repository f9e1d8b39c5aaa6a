"""Line-protocol encoding as pure logic (the server round trip is in test_line_protocol_roundtrip.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowline.core.points import LineProtocolError, Point, TagRef, encode_line, encode_lines, telemetry_point

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
    max_leaves=4,
)


@settings(max_examples=300)
@given(
    measurement=json_values,
    tags=st.dictionaries(st.text(max_size=4), json_values, max_size=3),
    fields=st.dictionaries(st.text(max_size=4), json_values, max_size=3),
    timestamp=json_values,
)
def test_malformed_wire_points_raise_only_line_protocol_errors(
    measurement: object, tags: dict[str, object], fields: dict[str, object], timestamp: object
) -> None:
    """Whatever a decoded wire point holds, encoding either works or raises LineProtocolError."""
    try:
        line = encode_line(measurement, tags, fields, timestamp)  # type: ignore[arg-type]
    except LineProtocolError:
        return
    assert "\n" not in line.split(" ", 1)[0]


def test_tag_order_does_not_matter_and_replays_encode_identically() -> None:
    a = encode_line("m", {"b": "2", "a": "1"}, {"v": 1.5}, 10)
    b = encode_line("m", {"a": "1", "b": "2"}, {"v": 1.5}, 10)
    assert a == b == "m,a=1,b=2 v=1.5 10"
    points = [telemetry_point(TagRef("s", "a", "t", "u"), 2, 5)]
    expected = b"telemetry,asset=a,site=s,tag=t,unit=u quality=0i,value=2.0 5\n"
    assert encode_lines(points) == encode_lines(list(points)) == expected


def test_field_types() -> None:
    line = Point("m", {}, {"f": 1.0, "i": 3, "b": True, "s": "x"}, 1).to_line()
    assert line == 'm f=1.0,i=3i,b=true,s="x" 1'
    with pytest.raises(LineProtocolError, match="not finite"):
        encode_line("m", {}, {"f": float("nan")}, 1)
    assert encode_lines([]) == b""
