"""Batch bodies grouped by series: encoded once on the OT side, checked per series in the DMZ.

A body is JSON ``{"series": [[measurement, tags, [rest, …]], …], "points": [wire point, …]}``
where each ``rest`` is the part of a point's line-protocol line after its series key (fields and
timestamp in ns). Points that cannot take that fast form (unrepresentable in line protocol, or a
string field holding a newline) travel as plain wire points and are handled point by point.

Why: the OT sender turns each point into line protocol exactly once; the gateway then enforces the
approved flows per *series* (hundreds) instead of per point (hundreds of thousands) and stores the
body as it came when everything is approved; the writer only glues series key and rest together.
The gateway recomputes every series key from (measurement, tags) itself and refuses a ``rest``
with a newline, so a sender cannot smuggle a line into a series it is not approved for.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import orjson

from flowline.core.errors import FlowlineError
from flowline.core.points import LineProtocolError, Point, encode_line, series_key

Series = tuple[str, dict[str, str], list[str]]


class BodyError(FlowlineError):
    """A body that is not valid JSON of the documented shape."""


@dataclass
class BodyBuilder:
    """Accumulates wire points (as decoded from spool records) into one grouped body."""

    groups: dict[str, Series] = field(default_factory=dict)
    raw: list[object] = field(default_factory=list)
    count: int = 0
    newest_ns: int = 0

    def add_wire(self, items: list[list[object]]) -> None:
        groups = self.groups
        newest = self.newest_ns
        for item in items:
            try:
                measurement, tags, fields, ts = item
                line = encode_line(measurement, tags, fields, ts)  # type: ignore[arg-type]
            except (LineProtocolError, ValueError, TypeError):
                self.raw.append(item)  # the writer dead-letters it with the historian's message
                continue
            # The series key ends at the first unescaped space (names never hold a backslash
            # before a space other than as its escape: encode_line refuses them).
            cut = line.find(" ")
            while line[cut - 1] == "\\":
                cut = line.find(" ", cut + 1)
            prefix, rest = line[:cut], line[cut + 1 :]
            if "\n" in rest:
                self.raw.append(item)
                continue
            if prefix not in groups:
                groups[prefix] = (measurement, tags, [])  # type: ignore[assignment]
            groups[prefix][2].append(rest)
            if ts > newest:  # type: ignore[operator]
                newest = ts  # type: ignore[assignment]
        self.newest_ns = newest
        self.count += len(items)

    def add_points(self, points: Iterable[Point]) -> None:
        self.add_wire([p.to_wire() for p in points])

    def encode(self) -> bytes:
        return orjson.dumps({"series": list(self.groups.values()), "points": self.raw})


def encode_body(points: Iterable[Point]) -> bytes:
    builder = BodyBuilder()
    builder.add_points(points)
    return builder.encode()


def decode_body(payload: bytes) -> tuple[list[Series], list[list[object]]]:
    """Parse and check the shape; raises `BodyError` on anything else."""
    try:
        body = orjson.loads(payload)
        series, raw = body["series"], body["points"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise BodyError(f"batch body is not a series/points object: {exc}") from exc
    if not isinstance(series, list) or not isinstance(raw, list):
        raise BodyError("batch body: 'series' and 'points' must be lists")
    for entry in series:
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and isinstance(entry[1], dict)
            and isinstance(entry[2], list)
            and all(isinstance(v, str) for v in entry[1].values())
        ):
            raise BodyError(f"batch body: malformed series entry {str(entry)[:200]}")
    return series, raw


def body_lines(series: list[Series]) -> list[str]:
    """Line-protocol lines (ns timestamps) of the grouped part of a body."""
    lines: list[str] = []
    for measurement, tags, rests in series:
        prefix = series_key(measurement, tags) + " "
        lines.extend([prefix + rest for rest in rests])
    return lines
