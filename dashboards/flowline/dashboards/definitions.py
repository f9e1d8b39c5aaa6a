"""The four Flowline dashboards. Every name used here is in ``docs/measurements.md``.

Counters (``*_total``) are cumulative per process, so rates use ``non_negative_derivative`` and
per-interval counts ``non_negative_difference`` of ``max(value)``: a restart shows as a reset, not
as a negative spike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from flowline.dashboards.builder import (
    FLAG_MAPPINGS,
    JSON,
    QUALITY_MAPPINGS,
    Annotation,
    AnyOf,
    Col,
    Condition,
    Dashboard,
    Fill,
    Match,
    Panel,
    Row,
    Select,
    TagValues,
    Target,
    dashboard_link,
    data_link,
    fixed_color,
    override,
    thresholds,
    value_mappings,
)
from flowline.historian.tiers import ROLLUP_1H_POLICY
from flowline.inventory import Site

RELIABILITY_UID = "flowline-reliability"
OPERATIONS_UID = "flowline-operations"
PIPELINE_UID = "flowline-pipeline"
SECURITY_UID = "flowline-security"

SITE = Match("site", variable="site")
ASSET = Match("asset", variable="asset")
TAG = Match("tag", variable="tag")

HEALTH_STEPS = thresholds((None, "red"), (50, "orange"), (70, "yellow"), (85, "green"))
STAGE_ALIAS = "$tag_stage $tag_instance"
FLAG_STEPS = thresholds((None, "green"), (1, "yellow"), (2, "orange"), (3, "red"))
DASHED: JSON = {"fill": "dash", "dash": [10, 10]}
DOTTED: JSON = {"fill": "dot", "dash": [0, 10]}
COLOR_CELL: JSON = {"type": "color-background"}
NO_CROSSING: JSON = {
    "type": "special",
    "options": {"match": "null", "result": {"text": "no crossing", "color": "green", "index": 0}},
}
COMPLETENESS_STEPS = thresholds((None, "red"), (0.9, "orange"), (0.98, "green"))

def _field(name: str) -> JSON:
    return {"matcher": {"id": "byName", "options": name}}


def _binary(alias: str, left: JSON, operator: str, right: JSON) -> JSON:
    return {
        "id": "calculateField",
        "options": {
            "mode": "binary",
            "alias": alias,
            "binary": {"left": left, "operator": operator, "right": right},
            "replaceFields": False,
        },
    }


# Received (A) and expected_per_hour (B) per tag, merged on (asset, tag); only tags with a stated
# rate count, so an asset's unknown-rate MQTT tags do not inflate its ratio. Then summed per asset:
# expected = per hour / 3600 x the range in seconds, completeness = received / expected. InfluxQL
# cannot sum the per-tag last() values without a subquery, so Grafana does it.
COMPLETENESS_TRANSFORMS: list[JSON] = [
    {"id": "organize", "options": {"excludeByName": {"Time": True}}},
    {"id": "merge", "options": {}},
    {
        "id": "filterByValue",
        "options": {
            "type": "include",
            "match": "any",
            "filters": [{"fieldName": "expected_per_hour", "config": {"id": "isNotNull", "options": {}}}],
        },
    },
    {
        "id": "groupBy",
        "options": {
            "fields": {
                "asset": {"operation": "groupby", "aggregations": []},
                "received": {"operation": "aggregate", "aggregations": ["sum"]},
                "expected_per_hour": {"operation": "aggregate", "aggregations": ["sum"]},
            }
        },
    },
    {
        "id": "organize",
        "options": {"renameByName": {"received (sum)": "received", "expected_per_hour (sum)": "expected_per_hour"}},
    },
    _binary("expected_per_s", _field("expected_per_hour"), "/", {"fixed": "3600"}),
    _binary("expected", _field("expected_per_s"), "*", {"fixed": "${__range_s}"}),
    _binary("completeness", _field("received"), "/", _field("expected")),
    {"id": "organize", "options": {"excludeByName": {"expected_per_s": True}}},
    {"id": "sortBy", "options": {"sort": [{"field": "completeness", "desc": False}]}},
]


def _links() -> list[JSON]:
    return [
        dashboard_link("Reliability", RELIABILITY_UID),
        dashboard_link("Operations centre", OPERATIONS_UID),
        dashboard_link("Pipeline health", PIPELINE_UID),
        dashboard_link("Security and inventory", SECURITY_UID),
    ]


def _site_var(measurement: str) -> TagValues:
    return TagValues("site", measurement, "site")


def _series(
    measurement: str,
    cols: Sequence[Col],
    where: Sequence[Condition],
    alias: str = "$col",
    *,
    by: Sequence[str] = (),
    fill: Fill = "none",
    ref: str = "A",
    rp: str | None = None,
) -> Target:
    """A time-series target: ``GROUP BY time($__interval)`` and ``by`` tags, one series per alias."""
    select = Select(measurement, cols, where, group_by=by, by_time=True, fill=fill, retention_policy=rp)
    return Target(select, ref, alias=alias)


def _counter(
    metric: str, column: str, by: Sequence[str], alias: str, *, per_second: bool = False, ref: str = "A"
) -> Target:
    """Rate per second, or increase per interval, of a cumulative counter."""
    rate = Col("value", "max", column, outer="non_negative_derivative", outer_arg="1s")
    increase = Col("value", "max", column, outer="non_negative_difference")
    return _series(metric, [rate if per_second else increase], (SITE,), alias, by=by, ref=ref)


def _drilldown_link() -> JSON:
    url = (
        f"/d/{RELIABILITY_UID}?var-site=${{__data.fields.site}}&var-asset=${{__data.fields.asset}}"
        "&var-tag=${__data.fields.tag}&${__url_time_range}"
    )
    return data_link("Drill down into ${__data.fields.asset} ${__data.fields.tag}", url)


def _latest_row(cols: Sequence[Col], where: Sequence[Condition], by: Sequence[str] = ()) -> Select:
    """The newest ``asset_health`` row per series (``ORDER BY time DESC LIMIT 1``, per group in
    InfluxQL on 1.x and 3.x), so fields the newest pass left out read as empty."""
    return Select("asset_health", cols, where, group_by=by, order_desc=True, limit=1)


def _colored(column: str, steps: JSON) -> JSON:
    return override(column, thresholds=steps, color={"mode": "thresholds"}, **{"custom.cellOptions": COLOR_CELL})


def _organize(exclude: Sequence[str] = (), rename: dict[str, str] | None = None) -> JSON:
    return {
        "id": "organize",
        "options": {"excludeByName": {name: True for name in exclude}, "renameByName": dict(rename or {})},
    }


def _sort(column: str, desc: bool = True) -> JSON:
    return {"id": "sortBy", "options": {"sort": [{"field": column, "desc": desc}]}}


def _only_rows(*conditions: tuple[str, str, float]) -> JSON:
    """Keep rows where any ``(column, greater|greaterOrEqual|lower, value)`` holds."""
    return {
        "id": "filterByValue",
        "options": {
            "type": "include",
            "match": "any",
            "filters": [
                {"fieldName": column, "config": {"id": op, "options": {"value": value}}}
                for column, op, value in conditions
            ],
        },
    }


# One row per assessed tag: its newest whole assessment row, so flag, health, hours to alarm and
# p_cross always come from the same tag and the same pass. Units ride in the column names (the
# dashboard schema cannot hold a unit per table column) and, for the tag's own unit, in `unit`.
HEALTH = "health (0-100)"
TO_ALARM = "to alarm (h)"
P_CROSS = "P(cross) (0-1)"
RISK = "risk (0-3)"
TAG_COLUMNS = (
    Col("flag"),
    Col("health_score", alias=HEALTH),
    Col("hours_to_alarm", alias=TO_ALARM),
    Col("p_cross", alias=P_CROSS),
    Col("risk", alias=RISK),
    Col("trend_per_day", alias="trend per day"),
    Col("alarm_limit", alias="alarm limit"),
    Col("unit"),
    Col("flag_level"),
)
TAG_GROUPS = ("site", "asset", "tag", "criticality")
# "Worst" = highest flag, then highest risk (risk is below 10, so flag x 10 + risk orders both).
RANK_TRANSFORMS: list[JSON] = [
    _binary("flag_x10", _field("flag_level"), "*", {"fixed": "10"}),
    _binary("rank", _field("flag_x10"), "+", _field(RISK)),
]
FLAG_TEXT_MAPPINGS = value_mappings(
    ("OK", None, "green"), ("WATCH", None, "yellow"), ("DEGRADING", None, "orange"), ("CRITICAL", None, "red")
)
TAG_OVERRIDES = [
    override("flag", **{"custom.cellOptions": COLOR_CELL}),
    _colored(HEALTH, HEALTH_STEPS),
]
DEFAULT_HORIZON_HOURS = 168.0


def _asset_view_transforms() -> list[JSON]:
    """Per asset, every column from its worst tag's row: sort by rank, then take the first row of
    each asset (Grafana's groupBy keeps row order, so "first" is the worst tag for every column)."""
    firsts = ("Time", "tag", "flag", HEALTH, TO_ALARM, P_CROSS, RISK, "unit", "rank")
    fields: JSON = {key: {"operation": "groupby", "aggregations": []} for key in ("site", "asset", "criticality")}
    fields.update({key: {"operation": "aggregate", "aggregations": ["first"]} for key in firsts})
    return [
        *RANK_TRANSFORMS,
        _sort("rank"),
        {"id": "groupBy", "options": {"fields": fields}},
        _organize(
            exclude=("rank (first)",),
            rename={f"{key} (first)": ("assessed" if key == "Time" else key) for key in firsts},
        ),
    ]


def reliability(horizon_hours: float = DEFAULT_HORIZON_HOURS) -> Dashboard:
    tags_table = _latest_row(TAG_COLUMNS, (SITE,), TAG_GROUPS)
    drill = (SITE, ASSET, TAG)
    items: list[Panel | Row] = [
        Row("Fleet"),
        Panel(
            "Assets, worst tag first",
            "table",
            [Target(tags_table, result_format="table")],
            width=11,
            height=10,
            description=(
                "One row per asset showing its worst tag (highest flag, then highest risk); every column "
                "comes from that tag's newest assessment. Click a row for the drill-down of that tag."
            ),
            decimals=2,
            mappings=FLAG_TEXT_MAPPINGS,
            overrides=TAG_OVERRIDES,
            links=[_drilldown_link()],
            transformations=_asset_view_transforms(),
        ),
        Panel(
            "Assessed tags, worst first",
            "table",
            [Target(tags_table, result_format="table")],
            width=13,
            height=10,
            description=(
                "Every assessed tag's newest assessment (one row per tag), worst flag and highest risk "
                "first. 'to alarm' is empty when no crossing is forecast within the horizon; trend and "
                "alarm limit are in the tag's unit. Click a row for its drill-down."
            ),
            decimals=2,
            mappings=FLAG_TEXT_MAPPINGS,
            overrides=TAG_OVERRIDES,
            links=[_drilldown_link()],
            transformations=[
                *RANK_TRANSFORMS,
                _sort("rank"),
                _organize(exclude=("flag_level", "flag_x10", "rank"), rename={"Time": "assessed"}),
            ],
        ),
        Row("Drill-down: $asset $tag"),
        Panel(
            "Actual vs forecast ($unit)",
            "timeseries",
            [
                _series("telemetry", [Col("value", "mean", "actual")], drill, fill="null", ref="A"),
                _series(
                    "forecast",
                    [Col("yhat", "mean", "forecast"), Col("lower", "mean", "lower"), Col("upper", "mean", "upper")],
                    drill,
                    ref="B",
                ),
                _series("asset_health", [Col("alarm_limit", "last", "alarm_limit")], drill, fill="previous", ref="C"),
            ],
            width=24,
            height=10,
            description="Measured value, forecast with its prediction band (lower/upper), and the alarm limit.",
            overrides=[
                override("upper", color=fixed_color("light-blue"), **{"custom.lineStyle": DOTTED}),
                override("lower", color=fixed_color("light-blue"), **{"custom.lineStyle": DOTTED}),
                override("forecast", color=fixed_color("blue"), **{"custom.lineStyle": DASHED}),
                override("alarm_limit", color=fixed_color("red"), **{"custom.lineStyle": DASHED}),
            ],
        ),
        Panel(
            "Health flag",
            "state-timeline",
            [_series("asset_health", [Col("flag_level", "last", "flag_level")], drill, "$tag_tag", fill="previous")],
            width=24,
            height=4,
            mappings=FLAG_MAPPINGS,
            thresholds=FLAG_STEPS,
        ),
        Panel(
            "Health score (0-100)",
            "timeseries",
            [_series("asset_health", [Col("health_score", "mean", "health")], drill)],
            width=6,
            min=0,
            max=100,
            thresholds=HEALTH_STEPS,
            custom={"thresholdsStyle": {"mode": "area"}},
        ),
        Panel(
            "Crossing probability and anomaly score",
            "timeseries",
            [
                _series(
                    "asset_health", [Col("p_cross", "max", "p_cross"), Col("anomaly_score", "max", "anomaly")], drill
                )
            ],
            width=6,
            unit="percentunit",
            min=0,
            max=1,
        ),
        Panel(
            "Time to alarm limit",
            "stat",
            [
                # flag_level is always written: it makes InfluxDB return the newest row even when
                # that row has no hours_to_alarm (a lone field skips rows where it is missing).
                Target(_latest_row([Col("hours_to_alarm"), Col("flag_level")], drill))
            ],
            width=4,
            unit="h",
            description="From the newest assessment; 'no crossing' when it forecasts none within the horizon.",
            mappings=[NO_CROSSING],
            options={"reduceOptions": {"calcs": ["last"], "fields": "/^hours_to_alarm$/", "values": False}},
            thresholds=thresholds((None, "red"), (24, "orange"), (72, "yellow"), (168, "green")),
        ),
        Panel(
            "Trend per day ($unit/day)",
            "stat",
            [Target(_latest_row([Col("trend_per_day"), Col("flag_level")], drill))],
            width=4,
            options={"reduceOptions": {"calcs": ["last"], "fields": "/^trend_per_day$/", "values": False}},
        ),
        Panel(
            "Model",
            "stat",
            [Target(_latest_row([Col("model")], drill))],
            width=4,
            options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "/.*/"}, "textMode": "value"},
        ),
        Panel(
            "Last 90 days, hourly min / mean / max ($unit)",
            "timeseries",
            [
                _series(
                    "telemetry_1h",
                    [Col("min", "min", "min"), Col("mean", "mean", "mean"), Col("max", "max", "max")],
                    drill,
                    fill="null",
                    rp=ROLLUP_1H_POLICY,
                )
            ],
            width=24,
            time_from="90d",
            description="Good-quality samples rolled up per hour by the historian's rollup job (telemetry_1h).",
            overrides=[
                override("min", color=fixed_color("light-blue"), **{"custom.lineStyle": DOTTED}),
                override("max", color=fixed_color("light-blue"), **{"custom.lineStyle": DOTTED}),
            ],
        ),
    ]
    events = Select(
        "events",
        [
            Col("title"),
            Col("text"),
            Col("flag"),
            Col("previous_flag"),
            Col("kind", is_tag=True),
            Col("tag", is_tag=True),
        ],
        where=(SITE, ASSET),
    )
    return Dashboard(
        RELIABILITY_UID,
        "Flowline - Reliability",
        "Asset health, degrading tags, and the per-asset forecast drill-down.",
        items,
        variables=[
            _site_var("asset_health"),
            TagValues("asset", "asset_health", "asset", depends_on=("site",)),
            TagValues("tag", "asset_health", "tag", depends_on=("site", "asset")),
            TagValues("unit", "telemetry", "unit", depends_on=("site", "asset", "tag"), hide=2),
        ],
        annotations=[Annotation("Flag changes", events, "title", "text", ("kind", "flag", "tag"))],
        # Ends at the forecast horizon: every crossing the analytics forecast lies inside the range.
        time_from="now-7d",
        time_to=f"now+{math.ceil(horizon_hours)}h",
        refresh="5m",
        links=_links(),
    )


# --- operations centre ----------------------------------------------------------------------------

# Grafana's own unit ids where it has one; anything else is shown as the site file writes it.
GRAFANA_UNITS = {"degC": "celsius", "K": "kelvin", "%": "percent", "A": "amp", "Hz": "hertz", "kW": "kwatt"}
PRETTY_UNITS = {"degC": "°C", "m3/h": "m³/h", "Sm3/h": "Sm³/h", "um": "µm"}
QUANTITIES = {
    "barg": "Pressure",
    "bar": "Differential pressure",
    "degC": "Temperature",
    "K": "Temperature difference",
    "m3/h": "Liquid flow",
    "Sm3/h": "Gas flow",
    "mm/s": "Vibration velocity",
    "um": "Shaft vibration",
    "g": "Vibration acceleration",
    "A": "Current",
    "kW": "Power",
    "rpm": "Speed",
    "Hz": "Frequency",
    "%": "Level and position",
}
FRESHNESS_LOOKBACK = "7d"  # a tag silent for longer than this drops off the freshness table
INVENTORY_LOOKBACK = "30d"  # analytics writes the inventory on every pass
STALE_INTERVALS = 30.0  # silent for more than this many expected intervals: stale


def pretty_unit(unit: str) -> str:
    return PRETTY_UNITS.get(unit, unit)


def grafana_unit(unit: str) -> str:
    return GRAFANA_UNITS.get(unit) or f"suffix: {pretty_unit(unit)}"


def quantity_title(unit: str) -> str:
    return f"{QUANTITIES.get(unit, 'Values')} ({pretty_unit(unit)})"


def alarm_overrides(site: Site | None, unit: str | None = None) -> list[JSON]:
    """Threshold lines and colours per series from the site file's alarm limits (of one unit)."""
    if site is None:
        return []
    out: list[JSON] = []
    for asset, tag in site.iter_tags():
        alarm = tag.alarm
        if alarm is None or (unit is not None and tag.unit != unit):
            continue
        lows = [v for v in (alarm.low_low, alarm.low) if v is not None]
        highs = [v for v in (alarm.high, alarm.high_high) if v is not None]
        if not lows and not highs:
            continue
        steps: list[tuple[float | None, str]] = [(None, "red" if lows else "green")]
        if lows:
            steps.append((max(lows), "green"))
        steps += [(value, colour) for value, colour in zip(highs, ("orange", "red"), strict=False)]
        out.append(
            override(
                f"{asset.id} {tag.name}",
                thresholds=thresholds(*steps),
                **{"custom.thresholdsStyle": {"mode": "line+area"}},
            )
        )
    return out


def _production(site: Site) -> list[Panel | Row]:
    """Per stream: a stat of the site total with its sparkline, and the stacked share per train/well."""
    items: list[Panel | Row] = []
    for stream, tags in site.production_streams().items():
        unit = tags[0][1].unit or ""
        where = (SITE, AnyOf([(asset.id, tag.name) for asset, tag in tags]))
        value = [Col("value", "mean", "value")]
        target = _series("telemetry", value, where, "$tag_asset $tag_tag", by=("asset", "tag"), fill="previous")
        label = f"{stream.capitalize()} ({pretty_unit(unit)})"
        items += [
            Panel(
                f"{label}: site total",
                "stat",
                [target],
                width=6,
                height=6,
                unit=grafana_unit(unit),
                decimals=0,
                description=f"Sum of the {stream} meters ({', '.join(a.id for a, _ in tags)}), mean per interval.",
                options={
                    "graphMode": "area",
                    "colorMode": "none",
                    "textMode": "value",
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                },
                transformations=[
                    {"id": "joinByField", "options": {"byField": "Time", "mode": "outer"}},
                    {
                        "id": "calculateField",
                        "options": {
                            "mode": "reduceRow",
                            "reduce": {"reducer": "sum"},
                            "alias": "total",
                            "replaceFields": True,
                        },
                    },
                ],
            ),
            Panel(
                f"{label} per train or well",
                "timeseries",
                [target],
                width=18,
                height=6,
                unit=grafana_unit(unit),
                description="Stacked: the top edge is the site total.",
                custom={"stacking": {"mode": "normal"}, "fillOpacity": 25},
            ),
        ]
    return items


def _latest(scope: Sequence[Condition]) -> Select:
    return Select("telemetry", [Col("value", "last", "value")], scope, group_by=("asset", "tag", "unit"))


def _beyond_limit(scope: Sequence[Condition]) -> Panel:
    limits = Select(
        "inventory",
        [Col("alarm_low", "last", "alarm low"), Col("alarm_high", "last", "alarm high")],
        scope,
        group_by=("asset", "tag"),
        since=INVENTORY_LOOKBACK,
    )
    return Panel(
        "Now beyond alarm limit",
        "table",
        [Target(_latest(scope), "A", result_format="table"), Target(limits, "B", result_format="table")],
        width=10,
        height=8,
        description="Tags whose newest value is above their high or below their low alarm limit (site file).",
        transformations=[
            _organize(exclude=("Time",)),
            {"id": "merge", "options": {}},
            _binary("above", _field("value"), "-", _field("alarm high")),
            _binary("below", _field("alarm low"), "-", _field("value")),
            _only_rows(("above", "greater", 0), ("below", "greater", 0)),
            _organize(exclude=("above", "below")),
            _sort("asset", desc=False),
        ],
        overrides=[override("value", color=fixed_color("red"), **{"custom.cellOptions": COLOR_CELL})],
    )


SILENT_FOR = "silent for (s)"
MISSED = "expected intervals missed"


def _freshness(scope: Sequence[Condition]) -> Panel:
    newest = Select("telemetry", [Col("quality", "last", "quality")], scope, ("asset", "tag"), since=FRESHNESS_LOOKBACK)
    expected = Select(
        "inventory",
        [Col("expected_per_hour", "last", "expected_per_hour")],
        scope,
        group_by=("asset", "tag"),
        since=INVENTORY_LOOKBACK,
    )
    return Panel(
        "Data freshness per tag",
        "table",
        [Target(newest, "A", result_format="table"), Target(expected, "B", result_format="table")],
        width=14,
        height=8,
        description=(
            f"Seconds since each tag's newest value (looking back {FRESHNESS_LOOKBACK}, whatever the time range, "
            f"so a silent asset stays listed) and how many of its expected intervals that is; red beyond "
            f"{STALE_INTERVALS:g} (stale)."
        ),
        decimals=0,
        overrides=[_colored(MISSED, thresholds((None, "green"), (STALE_INTERVALS, "red")))],
        transformations=[
            # Only the telemetry frame has `quality`, so q0 and the age exist there alone; the
            # inventory frame's Time (when analytics wrote it) is dropped before merging on asset, tag.
            _binary("q0", _field("quality"), "*", {"fixed": "0"}),
            _binary("newest_ms", _field("Time"), "+", _field("q0")),
            _binary("age_ms", _field("newest_ms"), "-", {"fixed": "${__to}"}),
            _binary(SILENT_FOR, _field("age_ms"), "/", {"fixed": "-1000"}),
            _organize(exclude=("Time", "quality", "q0", "newest_ms", "age_ms")),
            {"id": "merge", "options": {}},
            _binary("per_s", _field("expected_per_hour"), "/", {"fixed": "3600"}),
            _binary(MISSED, _field(SILENT_FOR), "*", _field("per_s")),
            _organize(exclude=("per_s", "expected_per_hour")),
            _sort(SILENT_FOR),
        ],
    )


def operations(site: Site | None = None) -> Dashboard:
    scope: tuple[Condition, ...] = (SITE, ASSET)
    items: list[Panel | Row] = []
    if site is not None and site.production_streams():
        items += [Row("Production on $site"), *_production(site)]
    items += [Row("Alarms and freshness"), _beyond_limit(scope), _freshness(scope), Row("Process values")]
    variables = [
        _site_var("telemetry"),
        TagValues("asset", "telemetry", "asset", depends_on=("site",), multi=True, include_all=True),
    ]
    order = list(QUANTITIES)
    found = {tag.unit for _, tag in site.iter_tags() if tag.unit} if site is not None else set()
    units = sorted(found, key=lambda u: (order.index(u) if u in order else len(order), u))
    for unit in units:
        items.append(
            Panel(
                quantity_title(unit),
                "timeseries",
                [
                    _series(
                        "telemetry",
                        [Col("value", "mean", "value")],
                        (*scope, Match("unit", value=unit)),
                        "$tag_asset $tag_tag",
                        by=("asset", "tag"),
                        fill="null",
                    )
                ],
                width=12,
                unit=grafana_unit(unit),
                description="Mean per interval; bands are the site file's alarm limits.",
                overrides=alarm_overrides(site, unit),
            )
        )
    if not units:
        # Without a site file the units are not known at export time: one panel, one unit at a time.
        variables.append(TagValues("unit", "telemetry", "unit", depends_on=("site",)))
        items.append(
            Panel(
                "Values in $unit",
                "timeseries",
                [
                    _series(
                        "telemetry",
                        [Col("value", "mean", "value")],
                        (*scope, Match("unit", variable="unit")),
                        "$tag_asset $tag_tag",
                        by=("asset", "tag"),
                        fill="null",
                    )
                ],
                width=24,
                description="Mean per interval of the tags measured in the chosen unit.",
            )
        )
    items += [
        Row("Latest values and quality"),
        Panel(
            "Latest values",
            "table",
            [Target(_latest(scope), result_format="table")],
            width=24,
            height=10,
            description="Newest value of every tag with its unit; Time is when it was measured.",
        ),
        Panel(
            "Bad or uncertain quality",
            "timeseries",
            [
                _series(
                    "telemetry", [Col("quality", "max", "quality")], scope, "$tag_asset $tag_tag", by=("asset", "tag")
                )
            ],
            width=24,
            height=6,
            mappings=QUALITY_MAPPINGS,
            thresholds=thresholds((None, "green"), (1, "yellow"), (2, "red")),
            min=0,
            max=2,
        ),
    ]
    return Dashboard(
        OPERATIONS_UID,
        "Flowline - Operations centre",
        "Production per site and train, tags beyond alarm limits, data freshness and process values by unit.",
        items,
        variables=variables,
        time_from="now-6h",
        refresh="10s",
        links=_links(),
    )


def pipeline() -> Dashboard:
    per_stage = ("stage", "instance")
    items: list[Panel | Row] = [
        Row("Throughput and lag"),
        Panel(
            "Points out per second by stage",
            "timeseries",
            [_counter("flowline_points_out_total", "points_per_s", per_stage, STAGE_ALIAS, per_second=True)],
            unit="pps",
        ),
        Panel(
            "Points in per second by stage",
            "timeseries",
            [_counter("flowline_points_in_total", "points_per_s", per_stage, STAGE_ALIAS, per_second=True)],
            unit="pps",
        ),
        Panel(
            "End-to-end lag",
            "timeseries",
            [_series("flowline_lag_seconds", [Col("value", "max", "lag")], (SITE,), STAGE_ALIAS, by=per_stage)],
            unit="s",
            thresholds=thresholds((None, "green"), (30, "orange"), (300, "red")),
            custom={"thresholdsStyle": {"mode": "line"}},
        ),
        Panel(
            "Spool depth",
            "timeseries",
            [
                _series(
                    "flowline_spool_bytes",
                    [Col("value", "max", "bytes")],
                    (SITE,),
                    "$tag_stage $tag_spool",
                    by=("stage", "spool"),
                )
            ],
            unit="bytes",
        ),
        Row("Connections and rejects"),
        Panel(
            "Reconnects",
            "timeseries",
            [_counter("flowline_reconnects_total", "reconnects", ("stage", "target"), "$tag_stage → $tag_target")],
            custom={"drawStyle": "bars"},
        ),
        Panel(
            "Connected",
            "state-timeline",
            [
                _series(
                    "flowline_connected",
                    [Col("value", "last", "connected")],
                    (SITE,),
                    "$tag_stage → $tag_target",
                    by=("stage", "target"),
                    fill="previous",
                )
            ],
            mappings=value_mappings(("0", "down", "red"), ("1", "up", "green")),
        ),
        Panel(
            "Rejects by reason",
            "timeseries",
            [_counter("flowline_rejected_total", "rejected", ("stage", "reason"), "$tag_stage $tag_reason")],
            custom={"drawStyle": "bars", "stacking": {"mode": "normal"}},
        ),
        Panel(
            "Dead letters and write errors",
            "timeseries",
            [
                _counter("flowline_dead_letter_total", "dead_letters", ("reason",), "dead letter $tag_reason", ref="A"),
                _counter(
                    "flowline_write_errors_total", "write_errors", ("status",), "write error $tag_status", ref="B"
                ),
            ],
            custom={"drawStyle": "bars"},
        ),
        Row("Diode and sequence"),
        Panel(
            "Diode: points lost and sequence gaps",
            "timeseries",
            [
                _counter("flowline_diode_lost_total", "lost", ("stage",), "lost points", ref="A"),
                _counter("flowline_sequence_gaps_total", "gaps", ("sender",), "gaps from $tag_sender", ref="B"),
            ],
            custom={"drawStyle": "bars"},
        ),
        Panel(
            "Diode datagrams",
            "timeseries",
            [_counter("flowline_diode_datagrams_total", "datagrams_per_s", ("kind",), "$tag_kind", per_second=True)],
            unit="pps",
        ),
        Row("Completeness"),
        Panel(
            "Points received per asset",
            "timeseries",
            [
                _series(
                    "telemetry", [Col("quality", "count", "received")], (SITE,), "$tag_asset", by=("asset",), fill="0"
                )
            ],
            width=12,
            custom={"drawStyle": "bars"},
            description="Values received per interval and asset; a drop to zero is a gap.",
        ),
        Panel(
            "Completeness per asset (received vs expected)",
            "table",
            [
                Target(
                    Select("telemetry", [Col("quality", "count", "received")], (SITE,), group_by=("asset", "tag")),
                    "A",
                    result_format="table",
                ),
                Target(
                    Select(
                        "inventory",
                        [Col("expected_per_hour", "last", "expected_per_hour")],
                        (SITE,),
                        group_by=("asset", "tag"),
                    ),
                    "B",
                    result_format="table",
                ),
            ],
            width=12,
            decimals=2,
            description=(
                "Values received in the range per asset against what its tags should send (inventory "
                "expected_per_hour x range), counting only tags whose rate is known (OPC UA sampling or "
                "the site file's expected_interval_s)."
            ),
            overrides=[_colored("completeness", COMPLETENESS_STEPS)],
            transformations=COMPLETENESS_TRANSFORMS,
        ),
        Panel(
            "Analytics series assessed",
            "timeseries",
            [_counter("flowline_analytics_series_total", "series", ("result",), "$tag_result")],
            width=24,
            height=6,
            custom={"drawStyle": "bars", "stacking": {"mode": "normal"}},
        ),
    ]
    return Dashboard(
        PIPELINE_UID,
        "Flowline - Pipeline health",
        "The pipeline's own metrics: throughput, spools, lag, reconnects, rejects, diode gaps, completeness.",
        items,
        variables=[_site_var("flowline_points_out_total")],
        time_from="now-6h",
        refresh="30s",
        links=_links(),
    )


def security() -> Dashboard:
    items: list[Panel | Row] = [
        Row("Security events"),
        Panel(
            "Security events by reason",
            "timeseries",
            [_series("security_event", [Col("count", "sum", "events")], (SITE,), "$tag_reason", by=("reason",))],
            custom={"drawStyle": "bars", "stacking": {"mode": "normal"}},
        ),
        Panel(
            "Security event log",
            "table",
            [
                Target(
                    Select(
                        "security_event",
                        [Col("count"), Col("message")],
                        (SITE,),
                        group_by=("sender", "reason", "asset", "tag"),
                        order_desc=True,
                        limit=500,
                    ),
                    result_format="table",
                )
            ],
            description="Unapproved flows, bad signatures, replays, bad certificates, sequence gaps.",
        ),
        Row("Inventory"),
        Panel(
            "Sources not in the inventory",
            "table",
            [
                Target(
                    Select(
                        "flowline_unknown_sources_total",
                        [Col("value", "last", "values_seen")],
                        (SITE,),
                        group_by=("stage", "source", "address"),
                    ),
                    result_format="table",
                )
            ],
            description="Topics and nodes that sent values the site file does not map to a tag.",
            transformations=[{"id": "sortBy", "options": {"sort": [{"field": "values_seen", "desc": True}]}}],
        ),
        Panel(
            "Asset inventory",
            "table",
            [
                Target(
                    Select(
                        "inventory",
                        [
                            Col("name", "last", "name"),
                            Col("unit", "last", "unit"),
                            Col("alarm_high", "last", "alarm_high"),
                            Col("alarm_low", "last", "alarm_low"),
                            Col("forecast", "last", "forecast"),
                        ],
                        (SITE,),
                        group_by=("asset", "tag", "criticality", "zone", "type", "source"),
                    ),
                    result_format="table",
                )
            ],
            mappings=value_mappings(("A", None, "red"), ("B", None, "orange"), ("C", None, "green")),
            overrides=[override("criticality", **{"custom.cellOptions": {"type": "color-text"}})],
            width=24,
            height=12,
        ),
    ]
    return Dashboard(
        SECURITY_UID,
        "Flowline - Security and inventory",
        "Security events at the DMZ gateway, sources missing from the inventory, and the inventory itself.",
        items,
        variables=[_site_var("inventory")],
        time_from="now-24h",
        refresh="1m",
        links=_links(),
    )


def all_dashboards(site: Site | None = None, horizon_hours: float = DEFAULT_HORIZON_HOURS) -> list[Dashboard]:
    return [reliability(horizon_hours), operations(site), pipeline(), security()]
