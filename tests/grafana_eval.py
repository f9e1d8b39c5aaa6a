"""What Grafana would show: a panel's queries run against InfluxDB with the time range, interval and
variables substituted, their results shaped into data frames the way Grafana's InfluxDB datasource
does, then the panel's transformations applied; and an alert rule evaluated the way Grafana's
alerting does (query per series, reduce, threshold).

Only the transformations and expressions the Flowline dashboards and rules use are implemented, each
with Grafana's semantics as documented: a transformation that names a field a frame lacks leaves that
frame alone; ``merge`` joins rows whose shared fields are equal; ``groupBy`` keeps the order in which
groups first appear; ``first`` takes the first row's value, null or not. An unknown transformation
fails the test rather than being skipped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flowline.dashboards.alerting import Rule, reduce_ref
from flowline.dashboards.builder import JSON, Dashboard, Panel
from tests.dashboard_helpers import InfluxReader, regex_escape

Row = dict[str, Any]


@dataclass
class Frame:
    fields: list[str]
    rows: list[Row] = field(default_factory=list)
    ref_id: str = "A"

    def column(self, name: str) -> list[Any]:
        return [row.get(name) for row in self.rows]

    def records(self) -> list[Row]:
        return [{f: row.get(f) for f in self.fields} for row in self.rows]


@dataclass(frozen=True)
class TimeRange:
    from_ms: int
    to_ms: int
    interval: str = "1m"


def fill_variables(text: str, values: dict[str, str]) -> str:
    for name, value in sorted(values.items(), key=lambda kv: -len(kv[0])):
        text = text.replace("${" + name + "}", value).replace(f"${name}", value)
    return text


def resolve_variables(
    dashboard: Dashboard, reader: InfluxReader, chosen: dict[str, str] | None = None
) -> dict[str, str]:
    """Template variables as Grafana sets them: the given value, else the first option (all options
    as ``(a|b)`` for multi-value), regex-escaped for ``=~ /^$var$/``."""
    chosen = chosen or {}
    values: dict[str, str] = {}
    for variable in dashboard.variables:
        options = reader.values(fill_variables(variable.query, values), column=1)
        if variable.name in chosen:
            assert chosen[variable.name] in options, f"${variable.name}={chosen[variable.name]} not in {options}"
            values[variable.name] = regex_escape(chosen[variable.name])
        elif variable.multi:
            values[variable.name] = f"({'|'.join(regex_escape(v) for v in options)})"
        elif options:
            values[variable.name] = regex_escape(options[0])
    return values


def render_query(text: str, variables: dict[str, str], window: TimeRange) -> str:
    text = fill_variables(text, variables)
    text = text.replace("$timeFilter", f"time >= {window.from_ms}ms AND time <= {window.to_ms}ms")
    text = text.replace("$__interval", window.interval)
    assert not re.search(r"\$(?![/)])", text), f"unfilled macro or variable in {text}"
    return text


def _alias(template: str, tags: dict[str, str], column: str) -> str:
    out = re.sub(r"\$tag_(\w+)", lambda m: tags.get(m.group(1), ""), template)
    return out.replace("$col", column)


def query_frames(reader: InfluxReader, target: JSON, variables: dict[str, str], window: TimeRange) -> list[Frame]:
    """Grafana's frames for one InfluxQL target: ``table`` is one frame (Time, the GROUP BY tags, the
    columns); ``time_series`` is one frame per series and column, named by the alias."""
    series = reader.series(render_query(target["query"], variables, window))
    ref = target["refId"]
    if target["resultFormat"] == "table":
        tag_keys = sorted({k for s in series for k in s.get("tags", {})}, key=lambda k: k)
        first = series[0]["columns"][1:] if series else []
        frame = Frame(["Time", *tag_keys, *first], ref_id=ref)
        for s in series:
            for values in s["values"]:
                row: Row = {"Time": values[0], **s.get("tags", {})}
                row.update(dict(zip(s["columns"][1:], values[1:], strict=True)))
                frame.rows.append(row)
        return [frame]
    frames = []
    for s in series:
        for index, column in enumerate(s["columns"][1:], start=1):
            name = _alias(target.get("alias") or "$col", s.get("tags", {}), column)
            frames.append(Frame(["Time", name], [{"Time": v[0], name: v[index]} for v in s["values"]], ref))
    return frames


# --- transformations ----------------------------------------------------------------------------------


def _operand(spec: JSON, row: Row, variables: dict[str, str]) -> Any:
    if "fixed" in spec:
        return float(fill_variables(str(spec["fixed"]), variables))
    return row.get(spec["matcher"]["options"])


def _has_operand(spec: JSON, frame: Frame) -> bool:
    return "fixed" in spec or spec["matcher"]["options"] in frame.fields


BINARY: dict[str, Callable[[float, float], float]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b if b else math.nan,
}


def _calculate(frames: list[Frame], options: JSON, variables: dict[str, str]) -> list[Frame]:
    out = []
    for frame in frames:
        if options["mode"] == "binary":
            spec = options["binary"]
            if not (_has_operand(spec["left"], frame) and _has_operand(spec["right"], frame)):
                out.append(frame)  # Grafana: nothing to calculate, the frame passes unchanged
                continue
            alias = options["alias"]
            for row in frame.rows:
                left, right = _operand(spec["left"], row, variables), _operand(spec["right"], row, variables)
                row[alias] = None if left is None or right is None else BINARY[spec["operator"]](left, right)
            frame.fields = [*frame.fields, alias]
        elif options["mode"] == "reduceRow":
            assert options["reduce"]["reducer"] == "sum"
            alias = options["alias"]
            numeric = [f for f in frame.fields if f != "Time"]
            for row in frame.rows:
                values = [row[f] for f in numeric if isinstance(row.get(f), (int, float))]
                row[alias] = sum(values) if values else None
            frame.fields = ["Time", alias] if options.get("replaceFields") else [*frame.fields, alias]
        else:
            raise AssertionError(f"calculateField mode {options['mode']} not emulated")
        out.append(frame)
    return out


def _organize(frames: list[Frame], options: JSON) -> list[Frame]:
    exclude = {k for k, v in options.get("excludeByName", {}).items() if v}
    rename = options.get("renameByName", {})
    out = []
    for frame in frames:
        kept = [f for f in frame.fields if f not in exclude]
        rows = [{rename.get(f, f): row.get(f) for f in kept} for row in frame.rows]
        out.append(Frame([rename.get(f, f) for f in kept], rows, frame.ref_id))
    return out


def _merge(frames: list[Frame]) -> list[Frame]:
    if not frames:
        return frames
    shared = [f for f in frames[0].fields if all(f in fr.fields for fr in frames)]
    fields: list[str] = []
    for frame in frames:
        fields += [f for f in frame.fields if f not in fields]
    merged: dict[tuple[Any, ...], Row] = {}
    for frame in frames:
        for row in frame.rows:
            key = tuple(row.get(f) for f in shared)
            merged.setdefault(key, {}).update({k: v for k, v in row.items() if v is not None or k not in merged[key]})
    return [Frame(fields, list(merged.values()))]


def _matches(row: Row, fieldname: str, config: JSON) -> bool:
    value = row.get(fieldname)
    if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return False
    limit = float(config["options"]["value"])
    return {
        "greater": value > limit,
        "greaterOrEqual": value >= limit,
        "lower": value < limit,
        "lowerOrEqual": value <= limit,
    }[config["id"]]


def _filter(frames: list[Frame], options: JSON) -> list[Frame]:
    assert options["type"] == "include" and options["match"] == "any"
    out = []
    for frame in frames:
        keep = [r for r in frame.rows if any(_matches(r, f["fieldName"], f["config"]) for f in options["filters"])]
        out.append(Frame(frame.fields, keep, frame.ref_id))
    return out


def _sort(frames: list[Frame], options: JSON) -> list[Frame]:
    (spec,) = options["sort"]
    name, desc = spec["field"], spec.get("desc", False)
    for frame in frames:
        present = [r for r in frame.rows if r.get(name) is not None]
        missing = [r for r in frame.rows if r.get(name) is None]
        frame.rows = sorted(present, key=lambda r: r[name], reverse=desc) + missing
    return frames


def _group_by(frames: list[Frame], options: JSON) -> list[Frame]:
    specs = options["fields"]
    keys = [k for k, v in specs.items() if v["operation"] == "groupby"]
    aggregated = [(k, agg) for k, v in specs.items() if v["operation"] == "aggregate" for agg in v["aggregations"]]
    out = []
    for frame in frames:
        groups: dict[tuple[Any, ...], list[Row]] = {}
        for row in frame.rows:
            groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
        fields = [*keys, *(f"{k} ({agg})" for k, agg in aggregated)]
        rows = []
        for key, members in groups.items():
            row = dict(zip(keys, key, strict=True))
            for name, agg in aggregated:
                assert agg == "first", f"groupBy {agg} not emulated"
                row[f"{name} ({agg})"] = members[0].get(name)
            rows.append(row)
        out.append(Frame(fields, rows, frame.ref_id))
    return out


def _join_by_time(frames: list[Frame]) -> list[Frame]:
    fields = ["Time"] + [f for frame in frames for f in frame.fields if f != "Time"]
    rows: dict[Any, Row] = {}
    for frame in frames:
        for row in frame.rows:
            rows.setdefault(row["Time"], {"Time": row["Time"]}).update(row)
    return [Frame(fields, [rows[t] for t in sorted(rows)])]


def apply_transformations(
    frames: list[Frame], transformations: Sequence[JSON], variables: dict[str, str]
) -> list[Frame]:
    for t in transformations:
        kind, options = t["id"], t["options"]
        if kind == "calculateField":
            frames = _calculate(frames, options, variables)
        elif kind == "organize":
            frames = _organize(frames, options)
        elif kind == "merge":
            frames = _merge(frames)
        elif kind == "filterByValue":
            frames = _filter(frames, options)
        elif kind == "sortBy":
            frames = _sort(frames, options)
        elif kind == "groupBy":
            frames = _group_by(frames, options)
        elif kind == "joinByField":
            assert options == {"byField": "Time", "mode": "outer"}
            frames = _join_by_time(frames)
        else:
            raise AssertionError(f"transformation {kind} not emulated")
    return frames


def panel_frames(
    reader: InfluxReader, dashboard: Dashboard, title: str, variables: dict[str, str], window: TimeRange
) -> list[Frame]:
    """What a panel displays, before formatting: its queries' frames after its transformations."""
    panel: Panel = next(
        p for p in dashboard.panels() if fill_variables(p.title, variables) == title or p.title == title
    )
    macros = {**variables, "__to": str(window.to_ms), "__from": str(window.from_ms)}
    frames = [f for t in panel.targets for f in query_frames(reader, t.to_json(), variables, window)]
    return apply_transformations(frames, panel.transformations, macros)


# --- alerting -------------------------------------------------------------------------------------------

REDUCERS: dict[str, Callable[[list[float]], float]] = {
    "last": lambda xs: xs[-1],
    "max": max,
    "min": min,
    "sum": lambda xs: float(sum(xs)),
}


def evaluate_rule(reader: InfluxReader, rule: Rule, now_ms: int) -> list[tuple[dict[str, str], dict[str, float]]]:
    """Firing instances of ``rule`` at ``now_ms``: (labels, reduced values by refId) per series that
    meets the threshold, as Grafana's alerting computes them (one instance per label set)."""
    reduced: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for query in rule.queries:
        window = TimeRange(now_ms - query.range_s * 1000, now_ms)
        text = render_query(query.text, {}, window)
        values: dict[tuple[tuple[str, str], ...], float] = {}
        for s in reader.series(text):
            (column,) = s["columns"][1:]  # one value column: one alert instance per series
            numbers = [row[1] for row in s["values"]]
            if query.replace_null is not None:
                numbers = [query.replace_null if v is None else v for v in numbers]
            clean = [math.nan if v is None else float(v) for v in numbers]
            reducer: Callable[[list[float]], float] = REDUCERS[query.reducer]
            # InfluxDB returns ORDER BY time DESC newest first; Grafana sorts frames by time.
            ordered = clean if s["values"][0][0] <= s["values"][-1][0] else list(reversed(clean))
            values[tuple(sorted(s.get("tags", {}).items()))] = reducer(ordered)
            assert column
        reduced[reduce_ref(query.ref_id)] = values
    condition = reduced[reduce_ref(rule.queries[0].ref_id)]
    firing = []
    for labels, value in condition.items():
        hit = value > rule.threshold if rule.op == "gt" else value < rule.threshold
        if hit:
            firing.append((dict(labels), {ref: vals.get(labels, math.nan) for ref, vals in reduced.items()}))
    return firing
