"""Every dashboard query runs against a real InfluxDB holding pipeline data and returns what its
panel expects; every measurement, field and tag a query names is one the pipeline actually wrote."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest

from flowline.dashboards.builder import Col, Dashboard, Select, TagValues
from flowline.dashboards.definitions import all_dashboards
from flowline.dashboards.export import render_all
from flowline.inventory import load_site
from flowline.services import InfluxDServer
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
