"""What a person reads on the dashboards and what the alerts say, from a known plant state.

InfluxDB is filled through the pipeline's own code (`load_plant_state`): the simulator's plant with
three degrading tags, one asset silent for two hours, one tag beyond its high alarm limit, a spool
past half full, a dead letter and security events; one real analytics pass. Each panel is then
evaluated as Grafana would (`tests.grafana_eval`: queries with the time range and variables
substituted, the panel's transformations applied) and each alert rule as Grafana's alerting would.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest

from flowline.analytics.assess import Assessment, SeriesSpec
from flowline.analytics.job import health_point
from flowline.analytics.rules import Flag
from flowline.core.config import AnalyticsConfig
from flowline.dashboards.alerting import alert_rules, degrading_rule
from flowline.dashboards.builder import Dashboard
from flowline.dashboards.definitions import (
    MISSED,
    OPERATIONS_UID,
    RELIABILITY_UID,
    SILENT_FOR,
    STALE_INTERVALS,
    all_dashboards,
    grafana_unit,
    pretty_unit,
)
from flowline.historian.connection import Connection
from flowline.historian.writer import HistorianWriter
from flowline.inventory import Criticality, load_site
from flowline.lab.services import InfluxDServer
from flowline.lab.sim.plant import Plant
from tests.conftest import EXAMPLE_SITE
from tests.dashboard_helpers import InfluxReader, PipelineData, PlantState, load_plant_state, regex_escape
from tests.grafana_eval import (
    Frame,
    TimeRange,
    evaluate_rule,
    fill_variables,
    panel_frames,
    render_query,
    resolve_variables,
)

SITE = load_site(EXAMPLE_SITE)
DASHBOARDS = {d.uid: d for d in all_dashboards(SITE)}
RELIABILITY = DASHBOARDS[RELIABILITY_UID]
OPERATIONS = DASHBOARDS[OPERATIONS_UID]
RULES = {rule.uid: rule for rule in alert_rules(SITE)}


@pytest.fixture(scope="module")
def plant(influx: InfluxDServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PipelineData, PlantState]]:
    database = "seen_" + uuid.uuid4().hex[:8]
    yield load_plant_state(influx, database, EXAMPLE_SITE, tmp_path_factory.mktemp("plant-state"))
    influx.query(f'DROP DATABASE "{database}"')


@pytest.fixture(scope="module")
def reader(plant: tuple[PipelineData, PlantState]) -> InfluxReader:
    return InfluxReader(plant[0])


@pytest.fixture(scope="module")
def admin_reader(plant: tuple[PipelineData, PlantState], influx: InfluxDServer) -> InfluxReader:
    data = plant[0]
    return InfluxReader(PipelineData(data.url, data.database, (influx.admin.name, influx.admin.password), 0, 0))


def _window(data: PipelineData, hours: float, interval: str = "1m") -> TimeRange:
    """The dashboard's range ending when the data was loaded (as if Grafana refreshed then)."""
    return TimeRange(data.end_ms - int(hours * 3_600_000), data.end_ms, interval)


def _newest_assessments(reader: InfluxReader) -> dict[tuple[str, str], dict[str, Any]]:
    rows = {}
    for s in reader.series('SELECT * FROM "asset_health" GROUP BY "asset", "tag" ORDER BY time DESC LIMIT 1'):
        rows[(s["tags"]["asset"], s["tags"]["tag"])] = dict(zip(s["columns"], s["values"][0], strict=True))
    return rows


def _faults() -> set[tuple[str, str]]:
    return {(f.asset, f.tag) for f in Plant(SITE, seed=3).faults}


def _table(frames: list[Frame]) -> list[dict[str, Any]]:
    (frame,) = frames
    return frame.records()


def _variables(dashboard: Dashboard, reader: InfluxReader, **chosen: str) -> dict[str, str]:
    return resolve_variables(dashboard, reader, chosen)


# --- reliability ----------------------------------------------------------------------------------------


def _same_assessment(row: dict[str, Any], newest: dict[str, Any]) -> None:
    assert row["flag"] == newest["flag"]
    assert row["health (0-100)"] == newest["health_score"]
    assert row["to alarm (h)"] == newest.get("hours_to_alarm")
    assert row["P(cross) (0-1)"] == newest["p_cross"]
    assert row["unit"] == newest["unit"]


def test_tag_table_has_one_row_per_assessed_tag_from_its_newest_assessment(
    plant: tuple[PipelineData, PlantState], reader: InfluxReader, admin_reader: InfluxReader
) -> None:
    data, _ = plant
    variables = _variables(RELIABILITY, reader, site=SITE.site)
    rows = _table(panel_frames(reader, RELIABILITY, "Assessed tags, worst first", variables, _window(data, 7 * 24)))
    newest = _newest_assessments(admin_reader)
    assert sorted((r["asset"], r["tag"]) for r in rows) == sorted(newest)
    assert len(rows) == len(SITE.forecast_tags())
    for row in rows:
        _same_assessment(row, newest[(row["asset"], row["tag"])])
        assert row["assessed"] == newest[(row["asset"], row["tag"])]["time"]
    # Worst first: the three faulty tags lead, each DEGRADING or worse with a forecast crossing.
    top = rows[: len(_faults())]
    assert {(r["asset"], r["tag"]) for r in top} == _faults()
    for row in top:
        assert row["flag"] in ("DEGRADING", "CRITICAL") and row["to alarm (h)"] is not None
    assert all(r["flag"] in ("OK", "WATCH") for r in rows[len(top) :])
    assert list(rows[0]) == [
        *("assessed", "asset", "criticality", "site", "tag", "flag", "health (0-100)", "to alarm (h)"),
        *("P(cross) (0-1)", "risk (0-3)", "trend per day", "alarm limit", "unit"),
    ]


def test_asset_view_shows_its_worst_tag_with_every_value_from_that_tag(
    plant: tuple[PipelineData, PlantState], reader: InfluxReader, admin_reader: InfluxReader
) -> None:
    data, _ = plant
    variables = _variables(RELIABILITY, reader, site=SITE.site)
    rows = _table(panel_frames(reader, RELIABILITY, "Assets, worst tag first", variables, _window(data, 7 * 24)))
    newest = _newest_assessments(admin_reader)
    assert sorted(r["asset"] for r in rows) == sorted({asset for asset, _ in newest})
    by_asset = {r["asset"]: r for r in rows}
    # The P-102: its degrading vibration, not bearing_temp's health of 100.
    p102 = by_asset["P-102"]
    assert p102["tag"] == "vibration_rms" and p102["flag"] in ("DEGRADING", "CRITICAL")
    assert p102["health (0-100)"] < 100
    for row in rows:
        _same_assessment(row, newest[(row["asset"], row["tag"])])
        own = [v for (asset, _), v in newest.items() if asset == row["asset"]]
        assert row["flag"] == max(own, key=lambda v: (v["flag_level"], v["risk"]))["flag"]
    assert {r["asset"] for r in rows[:3]} == {asset for asset, _ in _faults()}


def test_a_row_click_opens_the_drill_down_of_that_tag_with_forecast_and_alarm_limit(
    plant: tuple[PipelineData, PlantState], reader: InfluxReader
) -> None:
    data, _ = plant
    panel = next(p for p in RELIABILITY.panels() if p.title == "Assets, worst tag first")
    (link,) = panel.links
    row = {"site": SITE.site, "asset": "P-102", "tag": "vibration_rms"}
    url = re.sub(r"\$\{__data\.fields\.(\w+)\}", lambda m: row[m.group(1)], link["url"])
    assert url.startswith(f"/d/{RELIABILITY_UID}?var-site=north-field&var-asset=P-102&var-tag=vibration_rms&")
    chosen = dict(pair.split("=", 1) for pair in url.split("?", 1)[1].split("&") if pair.startswith("var-"))
    variables = _variables(RELIABILITY, reader, **{k.removeprefix("var-"): v for k, v in chosen.items()})
    assert variables["unit"] == regex_escape("mm/s")  # as queries use it; the title shows "mm/s"
    window = TimeRange(data.end_ms - 7 * 86_400_000, data.end_ms + 168 * 3_600_000, "1h")
    names = {f.fields[1] for f in panel_frames(reader, RELIABILITY, "Actual vs forecast ($unit)", variables, window)}
    assert names == {"actual", "forecast", "lower", "upper", "alarm_limit"}
    title = next(p.title for p in RELIABILITY.panels() if p.title.startswith("Actual vs forecast"))
    assert fill_variables(title, {"unit": "mm/s"}) == "Actual vs forecast (mm/s)"


def test_every_forecast_crossing_lies_inside_the_default_time_range(
    plant: tuple[PipelineData, PlantState], admin_reader: InfluxReader
) -> None:
    to = RELIABILITY.time_to
    match = re.fullmatch(r"now\+(\d+)h", to)
    assert match, to
    horizon_ms = int(match.group(1)) * 3_600_000
    # The promise is about the forecast horizon: hours to alarm are extrapolated beyond it (up to 4
    # horizons, flowline.analytics.assess), and such a crossing may lie after the range, as it should.
    forecast_horizon_h = AnalyticsConfig().horizon_hours  # the plant's analytics pass runs with the default
    assert horizon_ms >= forecast_horizon_h * 3_600_000
    crossings = [
        (key, row["time"] + row["hours_to_alarm"] * 3_600_000)
        for key, row in _newest_assessments(admin_reader).items()
        if row.get("hours_to_alarm") is not None and row["hours_to_alarm"] <= forecast_horizon_h
    ]
    assert len(crossings) >= len(_faults())
    for key, crossing_ms in crossings:
        assert crossing_ms <= plant[0].end_ms + horizon_ms, f"{key} crosses after the range ends ({to})"
    # The crossings the issue saw hidden by now+3d: 83 h and 141 h ahead.
    assert horizon_ms >= 141 * 3_600_000


# --- operations centre -----------------------------------------------------------------------------------


def test_no_panel_mixes_units_and_each_shows_its_unit(
    plant: tuple[PipelineData, PlantState], reader: InfluxReader
) -> None:
    data, _ = plant
    units = {(a.id, t.name): t.unit for a, t in SITE.iter_tags()}
    variables = _variables(OPERATIONS, reader, site=SITE.site)
    checked = 0
    for panel in OPERATIONS.panels():
        if panel.type not in ("timeseries", "stat") or panel.title == "Bad or uncertain quality":
            continue
        seen = set()
        for target in panel.targets:
            for s in reader.series(render_query(target.to_json()["query"], variables, _window(data, 6, "10m"))):
                seen.add(units[(s["tags"]["asset"], s["tags"]["tag"])])
        assert len(seen) == 1, f"{panel.title}: units {seen}"
        (unit,) = seen
        assert unit is not None and panel.unit == grafana_unit(unit), panel.title
        assert f"({pretty_unit(unit)})" in panel.title
        checked += 1
    assert checked == len({u for u in units.values() if u}) + 2 * len(SITE.production_streams())


def test_production_total_is_the_sum_of_the_trains(
    plant: tuple[PipelineData, PlantState], reader: InfluxReader
) -> None:
    data, _ = plant
    variables = _variables(OPERATIONS, reader, site=SITE.site)
    window = _window(data, 6, "10m")
    (total,) = panel_frames(reader, OPERATIONS, "Crude export (m³/h): site total", variables, window)
    assert total.fields == ["Time", "total"]
    trains = panel_frames(reader, OPERATIONS, "Crude export (m³/h) per train or well", variables, window)
    assert sorted(f.fields[1] for f in trains) == ["P-101 flow", "P-102 flow"]
    by_time = {row["Time"]: row["total"] for row in total.rows}
    last = max(by_time)
    expected = sum(next(r[f.fields[1]] for r in f.rows if r["Time"] == last) for f in trains)
    assert by_time[last] == pytest.approx(expected)
    assert 800 < by_time[last] < 1000  # two pumps near their 450 m3/h design point


def test_silent_asset_is_listed_as_stale_and_the_others_are_fresh(
    plant: tuple[PipelineData, PlantState], reader: InfluxReader
) -> None:
    data, state = plant
    variables = _variables(OPERATIONS, reader, site=SITE.site)
    # A one-hour range: the silent asset's values are all older, yet the table keeps it.
    rows = _table(panel_frames(reader, OPERATIONS, "Data freshness per tag", variables, _window(data, 1)))
    assert len(rows) == len(SITE.iter_tags())
    stale = {(r["asset"], r["tag"]) for r in rows if r[MISSED] is not None and r[MISSED] > STALE_INTERVALS}
    assert stale == {(state.silent_asset, t.name) for t in SITE.assets_by_id[state.silent_asset].tags}
    silent = [r for r in rows if r["asset"] == state.silent_asset]
    for row in silent:
        assert 7190 <= row[SILENT_FOR] <= 7800  # two hours (the last 10-minute sample before the cut)
    assert rows[0]["asset"] == state.silent_asset  # longest silence first
    fresh = [r for r in rows if r["asset"] != state.silent_asset]
    assert all(r[SILENT_FOR] <= 2 for r in fresh)


def test_beyond_limit_table_lists_exactly_the_tag_above_its_limit(
    plant: tuple[PipelineData, PlantState], reader: InfluxReader
) -> None:
    data, state = plant
    variables = _variables(OPERATIONS, reader, site=SITE.site)
    rows = _table(panel_frames(reader, OPERATIONS, "Now beyond alarm limit", variables, _window(data, 1)))
    assert [(r["asset"], r["tag"], r["value"], r["unit"], r["alarm high"]) for r in rows] == [
        (*state.beyond_tag, state.beyond_value, "degC", 60.0)
    ]


# --- alerts ------------------------------------------------------------------------------------------------


def test_degrading_critical_asset_alert_fires_and_the_healthy_ones_do_not(
    plant: tuple[PipelineData, PlantState], reader: InfluxReader, admin_reader: InfluxReader
) -> None:
    rule = degrading_rule(SITE)
    assert rule is not None
    firing = evaluate_rule(reader, rule, plant[0].end_ms)
    critical_faults = {f for f in _faults() if SITE.assets_by_id[f[0]].criticality is Criticality.A}
    assert {(labels["asset"], labels["tag"]) for labels, _ in firing} == critical_faults == {("P-102", "vibration_rms")}
    values = firing[0][1]
    newest = _newest_assessments(admin_reader)[("P-102", "vibration_rms")]
    assert values["FLAG_LAST"] == newest["flag_level"] >= 2
    assert values["HOURS_LAST"] == pytest.approx(newest["hours_to_alarm"])
    assert values["PCROSS_LAST"] == pytest.approx(newest["p_cross"])
    assert "{{ $labels.asset }}" in rule.summary and "$values.HOURS_LAST" in rule.summary
    assert "var-asset={{ $labels.asset }}&var-tag={{ $labels.tag }}" in rule.annotations()["drilldown_url"]


def test_degrading_alert_never_shows_an_older_pass_hours_to_alarm(influx: InfluxDServer, influx_db: str) -> None:
    spec = SeriesSpec(SITE.site, "P-101", "vibration_rms", high=4.5, criticality="A", unit="mm/s")
    now = pd.Timestamp.now(tz="UTC").floor("min")
    passes = [
        Assessment(spec, now - pd.Timedelta(hours=1), "ok", flag=Flag.DEGRADING, hours_to_alarm=30.0, p_cross=0.8),
        Assessment(spec, now, "ok", flag=Flag.DEGRADING, p_cross=0.6),  # no crossing forecast this pass
    ]
    admin = Connection(influx.url, influx_db, username=influx.admin.name, password=influx.admin.password)
    with HistorianWriter(admin, precision="s") as writer:
        writer.write([health_point(a) for a in passes])
    reader = InfluxReader(PipelineData(influx.url, influx_db, (influx.admin.name, influx.admin.password), 0, 0))
    rule = degrading_rule(SITE)
    assert rule is not None
    ((labels, values),) = evaluate_rule(reader, rule, int(now.value) // 10**6 + 1000)
    assert labels == {"asset": "P-101", "tag": "vibration_rms"}
    assert values["HOURS_LAST"] == -1.0 and values["PCROSS_LAST"] == 0.6  # "no crossing forecast"


def test_silent_tag_alert_fires_for_the_silent_asset_only(
    plant: tuple[PipelineData, PlantState], reader: InfluxReader
) -> None:
    data, state = plant
    (rule,) = [r for r in RULES.values() if "-silent-" in r.uid]
    # Evaluate mid-window, as the pending period makes Grafana do in effect (see the rule).
    at = data.end_ms - (data.end_ms - 15_000) % 30_000
    firing = {(labels["asset"], labels["tag"]) for labels, _ in evaluate_rule(reader, rule, at)}
    assert firing == {(state.silent_asset, t.name) for t in SITE.assets_by_id[state.silent_asset].tags}


def test_pipeline_alerts_fire_on_the_trouble_written_and_nothing_else(
    plant: tuple[PipelineData, PlantState], reader: InfluxReader, admin_reader: InfluxReader
) -> None:
    now = plant[0].end_ms
    spool = evaluate_rule(reader, RULES["flowline-north-field-spool"], now)
    assert [(lab["stage"], lab["instance"], lab["spool"]) for lab, _ in spool] == [("relay-ot", "live", "opcua")]
    assert evaluate_rule(reader, RULES["flowline-north-field-lag"], now) == []
    dead = evaluate_rule(reader, RULES["flowline-north-field-dead-letters"], now)
    assert [(lab["stage"], lab["instance"], values["DEAD_LAST"]) for lab, values in dead] == [
        ("historian", "live", 4.0)
    ]
    security = evaluate_rule(reader, RULES["flowline-north-field-security"], now)
    written = {
        s["tags"]["reason"]
        for s in admin_reader.series('SELECT count("count") FROM "security_event" GROUP BY "reason"')
    }
    assert {lab["reason"] for lab, _ in security} == written and written


def test_every_alert_query_runs_and_reads_names_the_pipeline_writes(
    plant: tuple[PipelineData, PlantState], reader: InfluxReader
) -> None:
    for rule in RULES.values():
        for query in rule.queries:
            text = render_query(query.text, {}, TimeRange(plant[0].end_ms - query.range_s * 1000, plant[0].end_ms))
            assert reader.series(text), f"{rule.title}/{query.ref_id}: no series for {text}"
        assert not math.isnan(rule.threshold)
