"""Alerting as code: the rules, contact points and policy validate against Grafana's published API
schema (file and API forms), provision idempotently through the API without touching a site's own
routes, and every expression refers to what exists. Whether each query fires on the right plant
state is in test_dashboards_seen.py."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from flowline.core.cli import main
from flowline.dashboards.alerting import (
    FLOWLINE_LABEL,
    TEAMS,
    alert_rules,
    alerting_file,
    contact_points,
    policy_tree,
    reduce_ref,
)
from flowline.dashboards.export import PACKAGED_ALERTING, PACKAGED_ALERTING_DIR
from flowline.dashboards.provision import FOLDER_UID
from flowline.inventory import load_site
from tests.conftest import EXAMPLE_SITE, schema_file
from tests.dashboard_helpers import EXPORT_COMMAND
from tests.grafana_stub import GrafanaStub, SwaggerContract

pytestmark = pytest.mark.schemas

TOKEN = "glsa_alerting_token"
SITE = load_site(EXAMPLE_SITE)
RULES = alert_rules(SITE)
EMAILS = {"reliability": "reliability@site.example", "operations": "control-room@site.example"}


@pytest.fixture(scope="module")
def contract() -> SwaggerContract:
    return SwaggerContract(
        schema_file("grafana-http-api.swagger.json"), schema_file("grafana-dashboard.jsonschema.json")
    )


@pytest.fixture
def grafana(contract: SwaggerContract) -> Iterator[GrafanaStub]:
    stub = GrafanaStub(contract, TOKEN).start()
    yield stub
    stub.stop()


def test_rules_cover_degrading_silent_and_pipeline_trouble() -> None:
    titles = [r.title for r in RULES]
    assert titles == [
        "north-field: critical asset degrading",
        "north-field: tag silent for 30 s (30 x its 1 s interval)",
        "north-field: spool filling",
        "north-field: end-to-end lag",
        "north-field: security events at the DMZ gateway",
        "north-field: dead-lettered points",
    ]
    degrading = RULES[0].queries[0].text
    for asset in SITE.assets:  # criticality A from the site file, and only those
        assert (re.escape(asset.id).replace("\\-", "\\-") in degrading) == (asset.criticality.value == "A")


def test_api_bodies_validate_against_the_grafana_http_api_schema(contract: SwaggerContract) -> None:
    for rule in RULES:
        assert contract.validate_definition("ProvisionedAlertRule", rule.api_body(SITE.site)) == [], rule.title
    for cp in contact_points(EMAILS):
        assert contract.validate_definition("EmbeddedContactPoint", cp) == []
    assert contract.validate_definition("Route", policy_tree()) == []


def test_provisioning_file_validates_and_the_committed_one_is_current(contract: SwaggerContract) -> None:
    doc = alerting_file(RULES, SITE.site)
    assert contract.validate_definition("AlertingFileExport", doc) == []
    committed = yaml.safe_load((PACKAGED_ALERTING_DIR / PACKAGED_ALERTING).read_text(encoding="utf-8"))
    assert committed == alerting_file(RULES, SITE.site), f"stale: run {EXPORT_COMMAND}"
    # Addresses come from Grafana's environment, never written into the file.
    addresses = {r["settings"]["addresses"] for cp in committed["contactPoints"] for r in cp["receivers"]}
    assert addresses == {"$FLOWLINE_ALERT_EMAIL_RELIABILITY", "$FLOWLINE_ALERT_EMAIL_OPERATIONS"}


def test_schema_check_rejects_a_wrong_state_an_unknown_key_and_a_numeric_for(contract: SwaggerContract) -> None:
    body: dict[str, Any] = RULES[0].api_body(SITE.site)
    assert contract.validate_definition("ProvisionedAlertRule", {**body, "noDataState": "Sometimes"})
    assert contract.validate_definition("ProvisionedAlertRule", {**body, "severity": "high"})
    assert contract.validate_definition("ProvisionedAlertRule", {**body, "for": 300})
    del body["condition"]
    assert contract.validate_definition("ProvisionedAlertRule", body)


def test_every_expression_refers_to_an_existing_query() -> None:
    for rule in RULES:
        data = rule.data()
        refs = [d["refId"] for d in data]
        assert len(refs) == len(set(refs)) and rule.condition in refs
        for item in data:
            if item["datasourceUid"] == "__expr__":
                assert item["model"]["expression"] in refs, (rule.title, item)
        used = set(re.findall(r"\$values\.(\w+)\.", rule.summary))
        assert used <= {reduce_ref(q.ref_id) for q in rule.queries}, rule.title
        assert all('"' in q.text and "$timeFilter" in q.text for q in rule.queries)
        labels = rule.labels(SITE.site)
        assert labels[FLOWLINE_LABEL[0]] == FLOWLINE_LABEL[1] and labels["team"] in TEAMS


def _provision(grafana: GrafanaStub, tmp_path: Path, *extra: str) -> Any:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    args = ["dashboards", "provision", "--url", grafana.url, "--token-file", str(token), "--site", str(EXAMPLE_SITE)]
    return CliRunner().invoke(main, [*args, *extra])


def test_provision_by_api_is_idempotent_and_keeps_the_sites_own_routes(grafana: GrafanaStub, tmp_path: Path) -> None:
    emails = [f"--alert-email={team}={address}" for team, address in EMAILS.items()]
    first = _provision(grafana, tmp_path, *emails)
    assert first.exit_code == 0, first.output
    assert grafana.rejected == []
    assert sorted(grafana.state.alert_rules) == sorted(r.uid for r in RULES)
    assert all(r["folderUID"] == FOLDER_UID for r in grafana.state.alert_rules.values())
    assert {cp["name"]: cp["settings"]["addresses"] for cp in grafana.state.contact_points.values()} == {
        f"flowline-{team}": address for team, address in EMAILS.items()
    }
    routes = grafana.state.policies["routes"]
    assert routes[0]["object_matchers"] == [[FLOWLINE_LABEL[0], "=", FLOWLINE_LABEL[1]]]
    assert routes[1] == {"receiver": "grafana-default-email", "object_matchers": [["team", "=", "it"]]}
    assert "alert      created   north-field: critical asset degrading" in first.output

    second = _provision(grafana, tmp_path, *emails)
    assert second.exit_code == 0, second.output
    assert second.output.count("unchanged") >= len(RULES) and "created   north" not in second.output
    assert len(grafana.state.policies["routes"]) == 2  # the Flowline branch replaced, not added twice
    assert grafana.rejected == []


def test_provision_refuses_alerts_without_every_team_address(grafana: GrafanaStub, tmp_path: Path) -> None:
    result = _provision(grafana, tmp_path, "--alert-email", "reliability=r@site.example")
    assert result.exit_code == 2 and "no address for operations" in result.output
    assert grafana.state.alert_rules == {}


def test_export_writes_the_alerting_file_only_with_a_site(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "alerting"
    ok = runner.invoke(
        main,
        ["dashboards", "export", "--out", str(tmp_path / "d"), "--site", str(EXAMPLE_SITE), "--alerting-out", str(out)],
    )
    assert ok.exit_code == 0, ok.output
    assert str(out / PACKAGED_ALERTING) in ok.output
    assert yaml.safe_load((out / PACKAGED_ALERTING).read_text())["groups"][0]["rules"]
    refused = runner.invoke(main, ["dashboards", "export", "--out", str(tmp_path / "d"), "--alerting-out", str(out)])
    assert refused.exit_code == 2 and "alert rules are generated from a site file" in refused.output


def test_export_without_a_site_says_what_the_dashboards_lack(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["dashboards", "export", "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert "No site file" in result.output and "no alarm bands" in result.output
