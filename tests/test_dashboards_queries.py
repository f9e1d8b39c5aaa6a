"""Every dashboard query runs against a real InfluxDB holding pipeline data and returns what its
panel expects; every measurement, field and tag a query names is one the pipeline actually wrote."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pandas as pd
import pytest

from flowline.analytics.assess import Assessment, SeriesSpec
from flowline.analytics.job import health_point
from flowline.analytics.rules import Flag
from flowline.dashboards.builder import Col, Dashboard, Select, TagValues
from flowline.dashboards.definitions import all_dashboards
from flowline.dashboards.export import render_all
from flowline.historian.connection import Connection
from flowline.historian.writer import HistorianWriter
from flowline.inventory import load_site
from flowline.lab.services import InfluxDServer
from tests.conftest import EXAMPLE_SITE
from tests.dashboard_helpers import InfluxReader, PipelineData, load_pipeline_data, regex_escape

DASHBOARDS = all_dashboards(load_site(EXAMPLE_SITE))
INTERVAL = "30m"


@pytest.fixture(scope="module")
def pipeline_data(influx: InfluxDServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PipelineData]:
    database = "dash_" + uuid.uuid4().hex[:8]
    yield load_pipeline_data(influx, database, EXAMPLE_SITE, tmp_path_factory.mktemp("dashboard-data"))
    influx.query(f'DROP DATABASE "{database}"')


@pytest.fixture(scope="module")
def reader(pipeline_data: PipelineData) -> InfluxReader:
    return InfluxReader(pipeline_data)


def _fill_variables(text: str, values: dict[str, str]) -> str:
    for name, value in sorted(values.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(f"${name}", value)
    return text


def _resolve_variables(dashboard: Dashboard, reader: InfluxReader) -> dict[str, str]:
    """Run the template-variable queries in order, as Grafana does, choosing the first value
    (or all values as ``(a|b)`` for multi-value variables)."""
    values: dict[str, str] = {}
    for variable in dashboard.variables:
        options = reader.values(_fill_variables(variable.query, values), column=1)
        assert options, f"{dashboard.uid}: variable ${variable.name} ({variable.query}) has no values"
        escaped = [regex_escape(v) for v in options]
        values[variable.name] = f"({'|'.join(escaped)})" if variable.multi else escaped[0]
    return values


def _render(select: Select, variables: dict[str, str], data: PipelineData) -> str:
    text = _fill_variables(select.render(), variables)
    text = text.replace("$timeFilter", f"time >= {data.start_ms}ms AND time <= {data.end_ms}ms")
    text = text.replace("$__interval", INTERVAL)
    assert not re.search(r"\$(?!/)", text), f"unfilled macro or variable in {text}"
    return text


QUERIES = [(d, label, select) for d in DASHBOARDS for label, select in d.queries()]
VARIABLES = [(d, v) for d in DASHBOARDS for v in d.variables]


def referenced_but_missing(select: Select, reader: InfluxReader) -> list[str]:
    """Names the query reads that the database does not contain (SHOW MEASUREMENTS/FIELD/TAG KEYS)."""
    if select.measurement not in reader.measurements():
        return [f"measurement {select.measurement}"]
    missing = [f"field {f}" for f in sorted(select.fields - reader.field_keys(select.source))]
    return missing + [f"tag {t}" for t in sorted(select.tags - reader.tag_keys(select.source))]


@pytest.mark.parametrize(("dashboard", "label", "select"), QUERIES, ids=[q[1] for q in QUERIES])
def test_query_names_exist_in_the_database(
    dashboard: Dashboard, label: str, select: Select, reader: InfluxReader
) -> None:
    assert referenced_but_missing(select, reader) == [], f"{label} reads names nobody writes"


@pytest.mark.parametrize(("dashboard", "label", "select"), QUERIES, ids=[q[1] for q in QUERIES])
def test_query_returns_rows_with_expected_columns(
    dashboard: Dashboard, label: str, select: Select, reader: InfluxReader, pipeline_data: PipelineData
) -> None:
    query = _render(select, _resolve_variables(dashboard, reader), pipeline_data)
    series = reader.series(query)
    assert series, f"{label}: no series for {query}"
    for s in series:
        assert tuple(s["columns"]) == select.columns, f"{label}: columns {s['columns']} for {query}"
        assert set(s.get("tags", {})) == set(select.group_by), f"{label}: group-by tags {s.get('tags')}"
    rows = [row for s in series for row in s["values"]]
    non_null = [row for row in rows if any(v is not None for v in row[1:])]
    assert non_null, f"{label}: only empty rows for {query}"


@pytest.mark.parametrize(("dashboard", "variable"), VARIABLES, ids=[f"{d.uid}/{v.name}" for d, v in VARIABLES])
def test_template_variable_lists_values(dashboard: Dashboard, variable: TagValues, reader: InfluxReader) -> None:
    values = _resolve_variables(dashboard, reader)
    assert values[variable.name]


def test_missing_name_check_catches_a_field_and_a_tag_nobody_writes(reader: InfluxReader) -> None:
    bogus = Select("asset_health", [Col("health", "last")], group_by=("plant",))
    assert referenced_but_missing(bogus, reader) == ["field health", "tag plant"]
    assert referenced_but_missing(Select("telemetry_5m", [Col("value", "mean")]), reader) == [
        "measurement telemetry_5m"
    ]
    # The rollup lives in its own retention policy: the default one has no such fields.
    assert referenced_but_missing(Select("telemetry_1h", [Col("mean", "mean")]), reader) == ["field mean"]


def test_annotation_query_returns_title_text_and_tags_columns(
    reader: InfluxReader, pipeline_data: PipelineData
) -> None:
    reliability = next(d for d in DASHBOARDS if d.annotations)
    variables = _resolve_variables(reliability, reader)
    for annotation in reliability.annotations:
        series = reader.series(_render(annotation.select, variables, pipeline_data))
        assert series, f"no flag-change events for {variables}"
        columns = set(series[0]["columns"])
        assert {annotation.title_column, annotation.text_column, *annotation.tags_columns} <= columns


def test_exported_json_carries_exactly_these_queries() -> None:
    # The committed/exported JSON is rendered from the same Select objects tested above.
    queries = {select.render() for _, _, select in QUERIES}
    rendered = render_all(load_site(EXAMPLE_SITE))
    texts = {t["query"] for d in rendered.values() for p in d["panels"] for t in p.get("targets", [])}
    texts |= {a["target"]["query"] for d in rendered.values() for a in d["annotations"]["list"]}
    assert texts == queries


def _select(label_suffix: str) -> Select:
    return next(select for _, label, select in QUERIES if label.endswith(label_suffix))


def test_newest_pass_without_a_crossing_shows_no_stale_hours_to_alarm(influx: InfluxDServer, influx_db: str) -> None:
    # Two passes: the first forecasts a crossing in 30 h, the second none, so it writes no
    # hours_to_alarm at all (docs/measurements.md).
    spec = SeriesSpec("north-field", "P-101", "bearing_temp", high=70.0, criticality="A")
    first = pd.Timestamp("2026-01-01T00:00:00Z")
    passes = [
        Assessment(spec, first, "ok", flag=Flag.DEGRADING, hours_to_alarm=30.0, p_cross=0.8, model="holt"),
        Assessment(spec, first + pd.Timedelta(hours=1), "ok", flag=Flag.WATCH, p_cross=0.1, model="holt"),
    ]
    admin = Connection(influx.url, influx_db, username=influx.admin.name, password=influx.admin.password)
    with HistorianWriter(admin, precision="s") as writer:
        writer.write([health_point(a) for a in passes])
    span_ms = (int(first.value) // 10**6 - 3_600_000, int(first.value) // 10**6 + 7_200_000)
    data = PipelineData(influx.url, influx_db, (influx.admin.name, influx.admin.password), *span_ms)
    reader = InfluxReader(data)
    variables = {"site": regex_escape("north-field"), "asset": regex_escape("P-101"), "tag": "bearing_temp"}

    def newest(select: Select) -> dict[str, object]:
        (series,) = reader.series(_render(select, variables, data))
        (row,) = series["values"]
        return dict(zip(series["columns"], row, strict=True))

    table = _select("/Assessed tags, worst first/A")
    stale = Select(
        table.measurement, [Col("hours_to_alarm", "last", "hours_to_alarm")], table.where, group_by=table.group_by
    )
    assert newest(stale)["hours_to_alarm"] == 30.0  # what last() per field showed: the first pass's value
    row = newest(table)
    assert row["to alarm (h)"] is None and row["flag_level"] == int(Flag.WATCH) and row["P(cross) (0-1)"] == 0.1
    stat = newest(_select("/Time to alarm limit/A"))
    assert stat["hours_to_alarm"] is None and stat["flag_level"] == int(Flag.WATCH)


def test_completeness_inputs_merge_per_tag_into_a_ratio_per_asset(
    reader: InfluxReader, pipeline_data: PipelineData
) -> None:
    # The panel's Grafana transformations, emulated: merge A and B on (asset, tag), keep tags with a
    # rate, sum per asset, completeness = received / (expected_per_hour x range hours).
    site = load_site(EXAMPLE_SITE)
    variables = {"site": regex_escape(site.site)}
    tables = {}
    for ref in ("A", "B"):
        select = _select(f"/Completeness per asset (received vs expected)/{ref}")
        tables[ref] = {
            (s["tags"]["asset"], s["tags"]["tag"]): s["values"][0][1]
            for s in reader.series(_render(select, variables, pipeline_data))
        }
    received, expected = tables["A"], tables["B"]
    with_rate = {(a.id, t.name) for a, t in site.iter_tags() if t.source.kind == "opcua" or t.expected_interval_s}
    assert set(expected) == with_rate and with_rate <= set(received)
    hours = (pipeline_data.end_ms - pipeline_data.start_ms) / 3_600_000
    for asset in {asset for asset, _ in expected}:
        keys = [k for k in expected if k[0] == asset]
        ratio = sum(received[k] for k in keys) / (sum(expected[k] for k in keys) * hours)
        # Test telemetry is one value per 10 minutes over 7 of the range's 10 days, against the
        # OPC UA collector's default of one per second.
        assert ratio == pytest.approx(6 * 24 * 7 / (3600 * 24 * 10), rel=0.01)
