"""The four Flowline dashboards. Every name used here is in ``docs/measurements.md``.

Counters (``*_total``) are cumulative per process, so rates use ``non_negative_derivative`` and
per-interval counts ``non_negative_difference`` of ``max(value)``: a restart shows as a reset, not
as a negative spike.
"""

from __future__ import annotations

from collections.abc import Sequence

from flowline.dashboards.builder import (
    FLAG_MAPPINGS,
    JSON,
    QUALITY_MAPPINGS,
    Annotation,
    Col,
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

# Key production quantities on the operations centre, matched on the inventory's tag names.
PRODUCTION_QUANTITIES: tuple[tuple[str, str, str], ...] = (
    ("Flow", "flow", "none"),
    ("Pressure", "press", "none"),
    ("Temperature", "temp", "celsius"),
    ("Power", "power|current|load", "none"),
)


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
    where: Sequence[Match],
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


def _drilldown_link(with_tag: bool) -> JSON:
    url = f"/d/{RELIABILITY_UID}?var-site=${{__data.fields.site}}&var-asset=${{__data.fields.asset}}"
    if with_tag:
        url += "&var-tag=${__data.fields.tag}"
    return data_link("Drill down into ${__data.fields.asset}", url + "&${__url_time_range}")


def _latest_row(cols: Sequence[Col], where: Sequence[Match], by: Sequence[str] = ()) -> Select:
    """The newest ``asset_health`` row per series (``ORDER BY time DESC LIMIT 1``, per group in
    InfluxQL on 1.x and 3.x), so fields the newest pass left out read as empty."""
    return Select("asset_health", cols, where, group_by=by, order_desc=True, limit=1)


def _colored(column: str, steps: JSON) -> JSON:
    return override(column, thresholds=steps, color={"mode": "thresholds"}, **{"custom.cellOptions": COLOR_CELL})


def reliability() -> Dashboard:
    fleet = Select(
        "asset_health",
        [
            Col("risk", "last", "risk"),
            Col("health_score", "last", "health"),
            Col("flag_level", "last", "flag_level"),
        ],
        where=(SITE,),
        group_by=("site", "asset", "criticality"),
    )
    # Each series' newest whole row, not last() per field: a pass that forecasts no crossing writes
    # no hours_to_alarm, and last("hours_to_alarm") would show an older pass's value instead.
    degrading = _latest_row(
        [
            Col("flag_level"),
            Col("flag"),
            Col("hours_to_alarm"),
            Col("p_cross"),
            Col("trend_per_day"),
            Col("health_score", alias="health"),
        ],
        (SITE,),
        ("site", "asset", "tag", "criticality"),
    )
    drill = (SITE, ASSET, TAG)
    items: list[Panel | Row] = [
        Row("Fleet"),
        Panel(
            "Fleet health by risk",
            "table",
            [Target(fleet, result_format="table")],
            width=10,
            height=10,
            description="Latest health per asset and criticality, highest risk (p_cross x consequence) first.",
            decimals=2,
            overrides=[_colored("health", HEALTH_STEPS), _colored("flag_level", FLAG_STEPS)],
            links=[_drilldown_link(with_tag=False)],
            transformations=[{"id": "sortBy", "options": {"sort": [{"field": "risk", "desc": True}]}}],
        ),
        Panel(
            "Degrading assets",
            "table",
            [Target(degrading, result_format="table")],
            width=14,
            height=10,
            description="Tags flagged WATCH or worse; click the asset for the drill-down.",
            decimals=2,
            overrides=[_colored("health", HEALTH_STEPS), _colored("flag_level", FLAG_STEPS)],
            links=[_drilldown_link(with_tag=True)],
            transformations=[
                {
                    "id": "filterByValue",
                    "options": {
                        "type": "include",
                        "match": "any",
                        "filters": [
                            {
                                "fieldName": "flag_level",
                                "config": {"id": "greaterOrEqual", "options": {"value": 1}},
                            }
                        ],
                    },
                },
                {"id": "sortBy", "options": {"sort": [{"field": "p_cross", "desc": True}]}},
            ],
        ),
        Row("Drill-down: $asset $tag"),
        Panel(
            "Actual vs forecast",
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
            "Health score",
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
            "Trend per day",
            "stat",
            [Target(Select("asset_health", [Col("trend_per_day", "last", "trend_per_day")], drill))],
            width=4,
        ),
        Panel(
            "Model",
            "stat",
            [Target(Select("asset_health", [Col("model", "last", "model")], drill))],
            width=4,
            options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "/.*/"}, "textMode": "value"},
        ),
        Panel(
            "Last 90 days (hourly rollup)",
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
            description="Good-quality samples rolled up per hour by the historian (telemetry_1h).",
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
        ],
        annotations=[Annotation("Flag changes", events, "title", "text", ("kind", "flag", "tag"))],
        time_from="now-7d",
        time_to="now+3d",
        refresh="5m",
        links=_links(),
    )


def alarm_overrides(site: Site | None) -> list[JSON]:
    """Threshold lines and colours per series from the site file's alarm limits."""
    if site is None:
        return []
    out: list[JSON] = []
    for asset, tag in site.iter_tags():
        alarm = tag.alarm
        if alarm is None:
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


def operations(site: Site | None = None) -> Dashboard:
    scope = (SITE, ASSET)
    items: list[Panel | Row] = [Row("Production on $site")]
    for title, pattern, unit in PRODUCTION_QUANTITIES:
        items.append(
            Panel(
                title,
                "timeseries",
                [
                    _series(
                        "telemetry",
                        [Col("value", "mean", "value")],
                        (*scope, Match("tag", regex=pattern)),
                        "$tag_asset $tag_tag",
                        by=("asset", "tag"),
                        fill="null",
                    )
                ],
                width=12,
                unit=unit,
                description="Mean per interval; threshold bands come from the site file's alarm limits.",
                overrides=alarm_overrides(site),
            )
        )
    latest = Select(
        "telemetry",
        [Col("value", "last", "value")],
        scope,
        group_by=("asset", "tag", "unit"),
    )
    freshness = Select("telemetry", [Col("quality", "last", "quality")], scope, group_by=("asset",))
    items += [
        Row("Latest values and freshness"),
        Panel(
            "Latest values",
            "table",
            [Target(latest, result_format="table")],
            width=14,
            height=10,
            description="Newest value of every tag; Time is when it was measured.",
        ),
        Panel(
            "Data freshness per asset",
            "table",
            [Target(freshness, result_format="table")],
            width=10,
            height=10,
            description="Time since the newest value of each asset.",
            unit="dateTimeFromNow",
            transformations=[{"id": "organize", "options": {"excludeByName": {"quality": True}}}],
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
        "Real-time production per site: key process values, latest readings and data freshness.",
        items,
        variables=[
            _site_var("telemetry"),
            TagValues("asset", "telemetry", "asset", depends_on=("site",), multi=True, include_all=True),
        ],
        time_from="now-1h",
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


def all_dashboards(site: Site | None = None) -> list[Dashboard]:
    return [reliability(), operations(site), pipeline(), security()]
