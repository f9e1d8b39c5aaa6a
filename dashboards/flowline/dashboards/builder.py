"""A small typed builder for Grafana dashboards over InfluxDB (InfluxQL).

Queries are built from structure (`Select`), not typed as text, so every query knows which
measurement, fields and tags it reads: the tests compare that against what the pipeline really
writes, and the InfluxQL stays inside the subset InfluxDB 1.x, 2.x and 3.x all run (no
subqueries, no ``INTO``, no ``SLIMIT``/``SOFFSET``, only functions 3.x implements).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from flowline.core.errors import FlowlineError
from flowline.historian.query import quote_literal

JSON = dict[str, Any]
Fill = Literal["null", "none", "previous", "0"]

SCHEMA_VERSION = 41
DATASOURCE_VARIABLE = "datasource"
DATASOURCE: JSON = {"type": "influxdb", "uid": "${" + DATASOURCE_VARIABLE + "}"}

# Functions InfluxQL in InfluxDB 3 implements (aggregates, selectors, transformations) that the
# dashboards may use; anything else fails at build time instead of on a customer's 3.x server.
INFLUXQL3_FUNCTIONS = frozenset(
    {
        "count",
        "mean",
        "median",
        "sum",
        "spread",
        "stddev",
        "first",
        "last",
        "max",
        "min",
        "percentile",
        "derivative",
        "non_negative_derivative",
        "difference",
        "non_negative_difference",
    }
)


class DashboardBuildError(FlowlineError):
    """A dashboard definition that Grafana or InfluxDB 3 would not accept."""


def quote_ident(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class Col:
    """One selected expression: ``fn(field)`` or ``outer(fn(field), arg)`` with an alias."""

    field: str
    fn: str | None = None
    alias: str | None = None
    outer: str | None = None  # e.g. non_negative_derivative(max(value), 1s)
    outer_arg: str | None = None
    fn_arg: str | None = None  # e.g. percentile(value, 95)
    is_tag: bool = False  # a tag key selected as a column next to raw fields (annotations, logs)

    def render(self) -> str:
        for name in (self.fn, self.outer):
            if name is not None and name not in INFLUXQL3_FUNCTIONS:
                raise DashboardBuildError(f"function {name}() is not in the InfluxDB 3 InfluxQL subset")
        text = quote_ident(self.field)
        if self.fn is not None:
            text = f"{self.fn}({text}{', ' + self.fn_arg if self.fn_arg else ''})"
        if self.outer is not None:
            text = f"{self.outer}({text}{', ' + self.outer_arg if self.outer_arg else ''})"
        return f"{text} AS {quote_ident(self.alias)}" if self.alias else text


@dataclass(frozen=True)
class Match:
    """A tag condition: ``"tag" =~ /^$var$/`` for a template variable, or a fixed regex/value."""

    tag: str
    variable: str | None = None
    regex: str | None = None
    value: str | None = None

    def render(self) -> str:
        if self.variable is not None:
            return f"{quote_ident(self.tag)} =~ /^${self.variable}$/"
        if self.regex is not None:
            return f"{quote_ident(self.tag)} =~ /{self.regex}/"
        if self.value is not None:
            return f"{quote_ident(self.tag)} = {quote_literal(self.value)}"
        raise DashboardBuildError(f"condition on {self.tag!r} has nothing to match")

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.tag,)


@dataclass(frozen=True)
class AnyOf:
    """``(("asset" = 'P-101' AND "tag" = 'flow') OR ...)``: exact (asset, tag) pairs from the site file,
    where two regexes would also match the pairs' cross product."""

    pairs: Sequence[tuple[str, str]]
    keys: tuple[str, ...] = ("asset", "tag")

    def render(self) -> str:
        if not self.pairs:
            raise DashboardBuildError("an AnyOf condition needs at least one pair")
        terms = (
            " AND ".join(f"{quote_ident(k)} = {quote_literal(v)}" for k, v in zip(self.keys, pair, strict=True))
            for pair in self.pairs
        )
        return "(" + " OR ".join(f"({t})" for t in terms) + ")"


Condition = Match | AnyOf


@dataclass(frozen=True)
class Select:
    """``SELECT cols FROM [rp.]measurement WHERE $timeFilter AND matches GROUP BY [time], tags``.

    ``retention_policy`` addresses the rollup tiers (``"rollup_1h"."telemetry_1h"``): a retention
    policy on 1.x, the DBRP-mapped bucket ``<db>/<rp>`` on 2.x. ``since`` replaces the dashboard's
    time range by a fixed look-back (``time > now() - 7d``), for panels that must see what the
    range hides: a tag that went silent before the range began, an inventory written once a day.
    """

    measurement: str
    cols: Sequence[Col]
    where: Sequence[Condition] = ()
    group_by: Sequence[str] = ()
    by_time: bool = False
    fill: Fill | None = None
    order_desc: bool = False
    limit: int | None = None
    retention_policy: str | None = None
    since: str | None = None

    @property
    def source(self) -> str:
        """The FROM clause target."""
        name = quote_ident(self.measurement)
        return f"{quote_ident(self.retention_policy)}.{name}" if self.retention_policy else name

    def render(self) -> str:
        if not self.cols:
            raise DashboardBuildError(f"query on {self.measurement} selects nothing")
        parts = [f"SELECT {', '.join(c.render() for c in self.cols)} FROM {self.source}"]
        window = "$timeFilter" if self.since is None else f"time > now() - {self.since}"
        parts.append("WHERE " + " AND ".join([window, *(m.render() for m in self.where)]))
        groups = (["time($__interval)"] if self.by_time else []) + [quote_ident(t) for t in self.group_by]
        if groups:
            parts.append("GROUP BY " + ", ".join(groups))
        if self.fill is not None:
            parts.append(f"fill({self.fill})")
        if self.order_desc:
            parts.append("ORDER BY time DESC")
        if self.limit is not None:
            parts.append(f"LIMIT {self.limit}")
        return " ".join(parts)

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(c.field for c in self.cols if not c.is_tag)

    @property
    def tags(self) -> frozenset[str]:
        selected = (c.field for c in self.cols if c.is_tag)
        return frozenset([*self.group_by, *(k for m in self.where for k in m.keys), *selected])

    @property
    def columns(self) -> tuple[str, ...]:
        """Column names InfluxDB returns (time first), tags of the GROUP BY aside."""
        return ("time", *(c.alias or c.outer or c.fn or c.field for c in self.cols))


@dataclass(frozen=True)
class Target:
    """A panel query. ``table`` results carry the GROUP BY tags as columns."""

    select: Select
    ref_id: str = "A"
    result_format: Literal["time_series", "table"] = "time_series"
    alias: str | None = None

    def to_json(self) -> JSON:
        out: JSON = {
            "refId": self.ref_id,
            "datasource": DATASOURCE,
            "rawQuery": True,
            "query": self.select.render(),
            "resultFormat": self.result_format,
        }
        if self.alias:
            out["alias"] = self.alias
        return out


@dataclass(frozen=True)
class TagValues:
    """A template variable fed by ``SHOW TAG VALUES``, optionally filtered by earlier variables."""

    name: str
    measurement: str
    key: str
    label: str | None = None
    depends_on: Sequence[str] = ()  # tag keys that are also variables of the same name
    multi: bool = False
    include_all: bool = False
    hide: Literal[0, 1, 2] = 0  # 2: not shown, only used in titles and queries

    @property
    def query(self) -> str:
        text = f"SHOW TAG VALUES FROM {quote_ident(self.measurement)} WITH KEY = {quote_ident(self.key)}"
        if self.depends_on:
            text += " WHERE " + " AND ".join(Match(t, variable=t).render() for t in self.depends_on)
        return text

    def to_json(self) -> JSON:
        return {
            "type": "query",
            "name": self.name,
            "label": self.label or self.name.capitalize(),
            "datasource": DATASOURCE,
            "query": self.query,
            "definition": self.query,
            "refresh": 1,
            "sort": 1,
            "multi": self.multi,
            "includeAll": self.include_all,
            "hide": self.hide,
        }


def datasource_variable() -> JSON:
    """Lets one dashboard file point at any InfluxDB datasource (ours or an existing one)."""
    return {
        "type": "datasource",
        "name": DATASOURCE_VARIABLE,
        "label": "InfluxDB",
        "query": "influxdb",
        "hide": 0,
    }


@dataclass(frozen=True)
class Annotation:
    """An InfluxQL annotation query (no write access to Grafana needed)."""

    name: str
    select: Select
    title_column: str
    text_column: str
    tags_columns: Sequence[str] = ()
    color: str = "orange"

    def to_json(self) -> JSON:
        return {
            "name": self.name,
            "datasource": DATASOURCE,
            "enable": True,
            "iconColor": self.color,
            "target": {
                "refId": "Anno",
                "rawQuery": True,
                "query": self.select.render(),
                "resultFormat": "table",
                "titleColumn": self.title_column,
                "textColumn": self.text_column,
                "tagsColumn": ",".join(self.tags_columns),
            },
        }


def thresholds(*steps: tuple[float | None, str], percentage: bool = False) -> JSON:
    return {
        "mode": "percentage" if percentage else "absolute",
        "steps": [{"value": value, "color": color} for value, color in steps],
    }


def value_mappings(*entries: tuple[str, str | None, str]) -> list[JSON]:
    """Grafana value mappings from ``(value, display text or None, colour)``."""
    options: JSON = {}
    for index, (value, text, color) in enumerate(entries):
        options[value] = {"color": color, "index": index, **({"text": text} if text else {})}
    return [{"type": "value", "options": options}]


FLAG_MAPPINGS = value_mappings(
    ("0", "OK", "green"), ("1", "WATCH", "yellow"), ("2", "DEGRADING", "orange"), ("3", "CRITICAL", "red")
)
QUALITY_MAPPINGS = value_mappings(("0", "GOOD", "green"), ("1", "UNCERTAIN", "yellow"), ("2", "BAD", "red"))


def override(column: str, **properties: JSON) -> JSON:
    """Field config for one column or series.

    The dashboard schema types override values as objects, so only object-valued properties
    (``thresholds``, ``color``, ``custom.lineStyle``, ``custom.cellOptions``, ...) can be overridden
    per field; scalars (unit, decimals) go in the panel defaults. ``byNames`` takes an object too.
    """
    for key, value in properties.items():
        if not isinstance(value, dict):
            raise DashboardBuildError(f"override {key!r} of {column!r}: the schema only allows object values")
    return {
        "matcher": {"id": "byNames", "options": {"mode": "include", "names": [column]}},
        "properties": [{"id": key, "value": value} for key, value in properties.items()],
    }


def data_link(title: str, url: str) -> JSON:
    """A data link on table cells (the schema wants the full dashboard-link shape)."""
    return {
        "title": title,
        "type": "link",
        "icon": "external link",
        "tooltip": title,
        "url": url,
        "tags": [],
        "asDropdown": False,
        "targetBlank": False,
        "includeVars": False,
        "keepTime": False,
    }


def fixed_color(color: str) -> JSON:
    return {"mode": "fixed", "fixedColor": color}


@dataclass
class Panel:
    title: str
    type: str
    targets: Sequence[Target]
    width: int = 12
    height: int = 8
    description: str = ""
    unit: str | None = None
    thresholds: JSON | None = None
    mappings: Sequence[JSON] = ()
    custom: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    overrides: Sequence[JSON] = ()
    transformations: Sequence[JSON] = ()
    min: float | None = None
    max: float | None = None
    links: Sequence[JSON] = ()
    decimals: int | None = None
    time_from: str | None = None  # a fixed relative range for this panel, e.g. "90d"

    def to_json(self, panel_id: int, x: int, y: int) -> JSON:
        if not 0 < self.width <= 24:
            raise DashboardBuildError(f"panel {self.title!r}: width {self.width} outside 1-24")
        defaults: JSON = {}
        if self.unit:
            defaults["unit"] = self.unit
        if self.thresholds:
            defaults["thresholds"] = self.thresholds
            defaults["color"] = {"mode": "thresholds"}
        if self.mappings:
            defaults["mappings"] = list(self.mappings)
        if self.custom:
            defaults["custom"] = dict(self.custom)
        if self.decimals is not None:
            defaults["decimals"] = self.decimals
        if self.links:
            defaults["links"] = list(self.links)
        if self.min is not None:
            defaults["min"] = self.min
        if self.max is not None:
            defaults["max"] = self.max
        refs = [t.ref_id for t in self.targets]
        if len(set(refs)) != len(refs):
            raise DashboardBuildError(f"panel {self.title!r}: duplicate refId in {refs}")
        out: JSON = {
            "id": panel_id,
            "type": self.type,
            "title": self.title,
            "datasource": DATASOURCE,
            "gridPos": {"x": x, "y": y, "w": self.width, "h": self.height},
            "targets": [t.to_json() for t in self.targets],
            "fieldConfig": {"defaults": defaults, "overrides": list(self.overrides)},
            "options": dict(self.options),
        }
        if self.description:
            out["description"] = self.description
        if self.transformations:
            out["transformations"] = list(self.transformations)
        if self.time_from:
            out["timeFrom"] = self.time_from
        return out


@dataclass
class Row:
    """A collapsed-free row header; panels after it flow underneath."""

    title: str


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    items: Sequence[Panel | Row]
    variables: Sequence[TagValues] = ()
    annotations: Sequence[Annotation] = ()
    tags: Sequence[str] = ("flowline",)
    time_from: str = "now-6h"
    time_to: str = "now"
    refresh: str = "1m"
    links: Sequence[JSON] = ()

    def panels(self) -> Iterator[Panel]:
        return (item for item in self.items if isinstance(item, Panel))

    def queries(self) -> Iterator[tuple[str, Select]]:
        """Every InfluxQL SELECT of the dashboard, labelled for test messages."""
        for panel in self.panels():
            for target in panel.targets:
                yield f"{self.uid}/{panel.title}/{target.ref_id}", target.select
        for annotation in self.annotations:
            yield f"{self.uid}/annotation {annotation.name}", annotation.select

    def to_json(self) -> JSON:
        if not 8 <= len(self.uid) <= 40:
            raise DashboardBuildError(f"dashboard uid {self.uid!r} must be 8-40 characters")
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": list(self.tags),
            "timezone": "browser",
            "editable": True,
            "graphTooltip": 1,
            "time": {"from": self.time_from, "to": self.time_to},
            "refresh": self.refresh,
            "schemaVersion": SCHEMA_VERSION,
            "version": 1,
            "links": list(self.links),
            "templating": {"list": [datasource_variable(), *(v.to_json() for v in self.variables)]},
            "annotations": {"list": [a.to_json() for a in self.annotations]},
            "panels": self._layout(),
        }

    def _layout(self) -> list[JSON]:
        """Flow panels left to right on Grafana's 24-column grid, new line when full or at a row."""
        out: list[JSON] = []
        x = y = line_height = 0
        for number, item in enumerate(self.items, start=1):
            if isinstance(item, Row):
                y += line_height
                out.append(
                    {
                        "type": "row",
                        "id": number,
                        "title": item.title,
                        "collapsed": False,
                        "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
                        "panels": [],
                    }
                )
                x, y, line_height = 0, y + 1, 0
                continue
            if x + item.width > 24:
                x, y, line_height = 0, y + line_height, 0
            out.append(item.to_json(number, x, y))
            x += item.width
            line_height = max(line_height, item.height)
        return out


def dashboard_link(title: str, uid: str, *, include_vars: bool = True) -> JSON:
    """A link in the dashboard header to another Flowline dashboard, keeping time and variables."""
    return {
        "title": title,
        "type": "link",
        "icon": "dashboard",
        "tooltip": title,
        "url": f"/d/{uid}",
        "tags": [],
        "asDropdown": False,
        "targetBlank": False,
        "includeVars": include_vars,
        "keepTime": True,
    }
