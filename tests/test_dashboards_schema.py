"""Dashboards as code: schema validity, committed JSON in sync, InfluxQL subset, layout and links."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from click.testing import CliRunner

from flowline.core.cli import main
from flowline.dashboards.builder import Col, DashboardBuildError, Select, override
from flowline.dashboards.definitions import RELIABILITY_UID, all_dashboards
from flowline.dashboards.export import PACKAGED_JSON, dumps, render_all
from flowline.inventory import load_site
from tests.conftest import EXAMPLE_SITE, schema_file
from tests.dashboard_helpers import EXPORT_COMMAND


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = schema_file("grafana-dashboard.jsonschema.json")
    return jsonschema.Draft7Validator(json.loads(schema.read_text(encoding="utf-8")))


def _all_variants() -> list[tuple[str, dict[str, Any]]]:
    plain = render_all()
    with_site = render_all(load_site(EXAMPLE_SITE))
    return [(f"{n} (generic)", d) for n, d in plain.items()] + [(f"{n} (site)", d) for n, d in with_site.items()]


@pytest.mark.schemas
@pytest.mark.parametrize(("name", "dashboard"), _all_variants(), ids=[n for n, _ in _all_variants()])
def test_dashboard_validates_against_grafana_schema(
    name: str, dashboard: dict[str, Any], validator: jsonschema.Draft7Validator
) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message[:200]}" for e in validator.iter_errors(dashboard)]
    assert errors == [], name


def test_committed_json_is_what_the_code_generates() -> None:
    # The committed copies are the docker deployment's default: rendered with its default site file.
    generated = {name: dumps(d) for name, d in render_all(load_site(EXAMPLE_SITE)).items()}
    committed = {p.name: p.read_text(encoding="utf-8") for p in PACKAGED_JSON.glob("*.json")}
    assert committed == generated, (
        f"committed dashboards are stale: run `{EXPORT_COMMAND}`"
    )


def test_export_command_writes_the_four_dashboards(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["dashboards", "export", "--out", str(tmp_path / "out"), "--site", str(EXAMPLE_SITE)]
    )
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in (tmp_path / "out").glob("*.json"))
    assert files == sorted(render_all())
    assert len(files) == 4
    bad_site = tmp_path / "bad.yaml"
    bad_site.write_text("site: x\nassets: 5\n")
    failed = CliRunner().invoke(main, ["dashboards", "export", "--out", str(tmp_path), "--site", str(bad_site)])
    assert failed.exit_code != 0 and "assets" in failed.output


def _queries(dashboard: dict[str, Any]) -> list[str]:
    texts = [t["query"] for p in dashboard["panels"] for t in p.get("targets", [])]
    texts += [a["target"]["query"] for a in dashboard["annotations"]["list"]]
    return texts + [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]


def test_influxql_stays_in_the_subset_influxdb3_supports() -> None:
    for dashboard in render_all().values():
        for query in _queries(dashboard):
            upper = query.upper()
            assert not re.search(r"\bINTO\b|\bSLIMIT\b|\bSOFFSET\b|FROM\s*\(", upper), query
            assert "time($__interval)" in query or "GROUP BY TIME" not in upper, query
            if upper.startswith("SELECT"):
                # Bounded: by the dashboard range, or by a fixed look-back (freshness, inventory).
                bounded = "$timeFilter" in query or re.search(r"time > now\(\) - \d+[dh] ", query)
                assert bounded, f"unbounded query: {query}"
            else:
                assert upper.startswith("SHOW TAG VALUES"), query
    with pytest.raises(DashboardBuildError, match="top"):
        Select("telemetry", [Col("value", "top", fn_arg="3")]).render()


def test_builder_refuses_overrides_the_schema_cannot_hold() -> None:
    with pytest.raises(DashboardBuildError, match="object values"):
        override("p_cross", unit={"a": 1}, decimals=2)  # type: ignore[arg-type]


def test_layout_ids_and_variables() -> None:
    for dashboard in render_all().values():
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), dashboard["uid"]
        cells: set[tuple[int, int]] = set()
        for panel in dashboard["panels"]:
            g = panel["gridPos"]
            assert g["x"] + g["w"] <= 24
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & mine, f"{dashboard['uid']}: {panel['title']} overlaps"
            cells |= mine
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "influxdb"
        assert variables["site"]["query"].startswith("SHOW TAG VALUES")
    reliability = render_all()[f"{RELIABILITY_UID}.json"]
    names = [v["name"] for v in reliability["templating"]["list"]]
    assert names == ["datasource", "site", "asset", "tag", "unit"]
    assert reliability["annotations"]["list"][0]["target"]["query"].startswith('SELECT "title", "text"')


@pytest.mark.parametrize("title", ["Assets, worst tag first", "Assessed tags, worst first"])
def test_fleet_tables_link_to_the_drill_down_of_the_row_tag(title: str) -> None:
    reliability = render_all()[f"{RELIABILITY_UID}.json"]
    table = next(p for p in reliability["panels"] if p["title"] == title)
    (link,) = table["fieldConfig"]["defaults"]["links"]
    assert link["url"].startswith(
        f"/d/{RELIABILITY_UID}?var-site=${{__data.fields.site}}&var-asset=${{__data.fields.asset}}"
        "&var-tag=${__data.fields.tag}"
    )
    query = table["targets"][0]["query"]
    for column in ("flag", "hours_to_alarm", "p_cross", "trend_per_day", "unit"):
        assert f'"{column}"' in query
    assert 'GROUP BY "site", "asset", "tag"' in query
    # The newest whole row per series, so a field the newest pass left out is not an older value.
    assert query.endswith("ORDER BY time DESC LIMIT 1")


def test_reliability_range_ends_at_the_forecast_horizon() -> None:
    assert render_all()[f"{RELIABILITY_UID}.json"]["time"] == {"from": "now-7d", "to": "now+168h"}
    assert render_all(horizon_hours=83.5)[f"{RELIABILITY_UID}.json"]["time"]["to"] == "now+84h"


def test_site_alarm_limits_become_threshold_bands() -> None:
    site = load_site(EXAMPLE_SITE)
    operations = next(d for d in all_dashboards(site) if d.uid == "flowline-operations").to_json()
    flow_panel = next(p for p in operations["panels"] if p["title"] == "Pressure (barg)")
    by_name = {o["matcher"]["options"]["names"][0]: o for o in flow_panel["fieldConfig"]["overrides"]}
    # P-101 discharge_pressure: low 55, high 95 (north-field.yaml)
    steps = next(p["value"] for p in by_name["P-101 discharge_pressure"]["properties"] if p["id"] == "thresholds")[
        "steps"
    ]
    assert steps == [
        {"value": None, "color": "red"},
        {"value": 55.0, "color": "green"},
        {"value": 95.0, "color": "orange"},
    ]
    generic = render_all()["flowline-operations.json"]
    assert all(not p["fieldConfig"]["overrides"] for p in generic["panels"] if p["type"] == "timeseries")
