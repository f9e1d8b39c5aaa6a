"""API provisioning through grafana-client against a strict stand-in Grafana (real HTTP, loopback)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import requests
import yaml
from click.testing import CliRunner

from flowline.analytics.assess import Assessment, SeriesSpec
from flowline.analytics.job import event_point
from flowline.analytics.rules import Flag
from flowline.core.cli import main
from flowline.dashboards.export import PACKAGED_PROVISIONING, render_all
from flowline.dashboards.provision import (
    DATASOURCE_UID,
    FOLDER_UID,
    GrafanaProvisioner,
    InfluxCredentials,
    ProvisionError,
    datasource_model,
    provisioning_files,
)
from flowline.historian.connection import Connection
from flowline.historian.writer import HistorianWriter
from flowline.lab.services import InfluxDServer
from tests.conftest import schema_file
from tests.grafana_stub import GrafanaStub, SwaggerContract

pytestmark = pytest.mark.schemas
TOKEN = "glsa_test_token"


@pytest.fixture(scope="module")
def contract() -> SwaggerContract:
    swagger = schema_file("grafana-http-api.swagger.json")
    return SwaggerContract(swagger, schema_file("grafana-dashboard.jsonschema.json"))


@pytest.fixture
def grafana(contract: SwaggerContract) -> Iterator[GrafanaStub]:
    stub = GrafanaStub(contract, TOKEN).start()
    yield stub
    stub.stop()


def _datasource(version: str = "2") -> dict[str, object]:
    creds = InfluxCredentials(token="influx-read-token") if version != "1" else InfluxCredentials("grafana", "pw")
    return datasource_model(version, "http://influxdb:8086", "flowline", creds)  # type: ignore[arg-type]


def test_stub_rejects_unknown_keys_paths_and_bad_tokens(grafana: GrafanaStub) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    extra_key = requests.post(
        f"{grafana.url}/api/folders", json={"title": "x", "colour": "red"}, headers=auth, timeout=5
    )
    assert extra_key.status_code == 400 and "colour" in extra_key.json()["message"]
    nested = dict(_datasource(), secureJsonData={"password": "x"}, jsonDataa={})
    assert requests.post(f"{grafana.url}/api/datasources", json=nested, headers=auth, timeout=5).status_code == 400
    wrong_type = requests.post(f"{grafana.url}/api/folders", json={"title": 5}, headers=auth, timeout=5)
    assert wrong_type.status_code == 400
    assert requests.get(f"{grafana.url}/api/no/such/path", headers=auth, timeout=5).status_code == 404
    assert requests.delete(f"{grafana.url}/api/folders", headers=auth, timeout=5).status_code == 405
    assert (
        requests.get(f"{grafana.url}/api/folders/x", headers={"Authorization": "Bearer nope"}, timeout=5).status_code
        == 401
    )
    bad_dashboard = {"dashboard": {"uid": "abcdefgh", "title": "no schemaVersion"}, "overwrite": True}
    assert (
        requests.post(f"{grafana.url}/api/dashboards/db", json=bad_dashboard, headers=auth, timeout=5).status_code
        == 400
    )
    assert grafana.state.folders == {} and grafana.state.dashboards == {}


def test_provision_creates_then_second_run_changes_nothing(grafana: GrafanaStub) -> None:
    dashboards = list(render_all().values())
    provisioner = GrafanaProvisioner.connect(grafana.url, TOKEN)

    first = provisioner.run(dashboards, _datasource())
    assert grafana.rejected == []
    assert [a for _, _, a in first.actions] == ["created"] * (2 + len(dashboards))
    assert set(grafana.state.dashboards) == {d["uid"] for d in dashboards}
    assert {e["folderUid"] for e in grafana.state.dashboards.values()} == {FOLDER_UID}
    assert grafana.state.datasources[DATASOURCE_UID]["secureJsonData"] == {
        "httpHeaderValue1": "Token influx-read-token"
    }

    second = GrafanaProvisioner.connect(grafana.url, TOKEN).run(dashboards, _datasource())
    assert grafana.rejected == []
    actions = {(kind, action) for kind, _, action in second.actions}
    assert actions == {("folder", "unchanged"), ("datasource", "updated"), ("dashboard", "unchanged")}
    assert len(grafana.state.folders) == 1 and len(grafana.state.datasources) == 1
    assert len(grafana.state.dashboards) == len(dashboards)
    assert {e["version"] for e in grafana.state.dashboards.values()} == {1}


def test_changed_dashboard_and_folder_title_are_updated_in_place(grafana: GrafanaStub) -> None:
    dashboards = list(render_all().values())
    GrafanaProvisioner.connect(grafana.url, TOKEN).run(dashboards)
    changed = [dict(dashboards[0], title="Reliability (site A)"), *dashboards[1:]]
    renamed = GrafanaProvisioner(GrafanaProvisioner.connect(grafana.url, TOKEN).api, folder_title="Flowline site A")
    report = renamed.run(changed)
    assert grafana.rejected == []
    assert ("folder", "Flowline site A", "updated") in report.actions
    assert ("dashboard", "Reliability (site A)", "updated") in report.actions
    assert grafana.state.folders[FOLDER_UID]["title"] == "Flowline site A"
    entry = grafana.state.dashboards[dashboards[0]["uid"]]
    assert entry["version"] == 2 and entry["dashboard"]["title"] == "Reliability (site A)"
    assert len(grafana.state.dashboards) == len(dashboards)


def test_wrong_token_is_a_clear_error(grafana: GrafanaStub) -> None:
    with pytest.raises(ProvisionError, match="HTTP 401"):
        GrafanaProvisioner.connect(grafana.url, "wrong").run(list(render_all().values()))


@pytest.mark.parametrize("version", ["1", "2", "3"])
def test_every_datasource_variant_is_accepted(grafana: GrafanaStub, version: str) -> None:
    GrafanaProvisioner.connect(grafana.url, TOKEN).run([], _datasource(version))
    assert grafana.rejected == []
    stored = grafana.state.datasources[DATASOURCE_UID]
    assert stored["type"] == "influxdb" and stored["jsonData"]["dbName"] == "flowline"
    assert stored["jsonData"]["version"] == "InfluxQL"


def test_cli_provision(grafana: GrafanaStub, tmp_path: Path) -> None:
    token = tmp_path / "grafana-token"
    token.write_text(TOKEN + "\n")
    influx_token = tmp_path / "influx-token"
    influx_token.write_text("read-token\n")
    args = ["dashboards", "provision", "--url", grafana.url, "--token-file", str(token)]
    ds = ["--datasource-url", "http://influxdb:8086", "--influx-version", "3", "--influx-token-file", str(influx_token)]
    result = CliRunner().invoke(main, args + ds)
    assert result.exit_code == 0, result.output
    assert "created" in result.output and grafana.rejected == []
    assert grafana.state.datasources[DATASOURCE_UID]["secureJsonData"] == {"httpHeaderValue1": "Token read-token"}
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "unchanged" in again.output
    missing = CliRunner().invoke(main, [*args, "--datasource-url", "http://influxdb:8086", "--influx-version", "2"])
    assert missing.exit_code != 0 and "read token" in missing.output


def test_provisioning_yaml_is_generated_and_committed() -> None:
    files = provisioning_files()
    committed = {p.name: p.read_text(encoding="utf-8") for p in PACKAGED_PROVISIONING.glob("*.yaml")}
    assert committed == files, (
        "stale: flowline dashboards export --out flowline/dashboards/json "
        "--provisioning-out flowline/dashboards/provisioning"
    )
    for name, text in files.items():
        doc = yaml.safe_load(text)
        assert doc["apiVersion"] == 1
        if name.startswith("datasource"):
            (source,) = doc["datasources"]
            secrets = str(source.get("secureJsonData"))
            assert "$__file{/run/secrets/" in secrets, "secrets must come from files, never inline"


def _write_flag_changes(influx: InfluxDServer, database: str) -> None:
    """Two flag changes as the analytics job writes them (its own event builder and the writer)."""
    spec = SeriesSpec("north-field", "P-101", "vibration_rms", high=4.5, criticality="A")
    start = pd.Timestamp.now(tz="UTC").floor("10min") - pd.Timedelta("2h")
    raised = event_point(Assessment(spec, start, "ok", flag=Flag.WATCH, p_cross=0.4), Flag.OK)
    worse = event_point(Assessment(spec, start + pd.Timedelta("1h"), "ok", flag=Flag.DEGRADING), Flag.WATCH)
    assert raised is not None and worse is not None
    conn = Connection(influx.url, database, username=influx.admin.name, password=influx.admin.password)
    with HistorianWriter(conn) as writer:
        writer.write([raised, worse])


def test_push_annotations_is_opt_in_and_idempotent(
    grafana: GrafanaStub, influx: InfluxDServer, influx_db: str, tmp_path: Path
) -> None:
    _write_flag_changes(influx, influx_db)
    reader_password = tmp_path / "influx-password"
    reader_password.write_text(influx.admin.password)
    token = tmp_path / "grafana-token"
    token.write_text(TOKEN)
    base = ["dashboards", "provision", "--url", grafana.url, "--token-file", str(token)]
    ds = ["--datasource-url", influx.url, "--database", influx_db, "--influx-version", "1"]
    ds += ["--influx-user", influx.admin.name, "--influx-password-file", str(reader_password)]

    plain = CliRunner().invoke(main, base + ds)
    assert plain.exit_code == 0, plain.output
    assert grafana.state.annotations == [], "annotations are only pushed on request"

    pushed = CliRunner().invoke(main, [*base, *ds, "--push-annotations"])
    assert pushed.exit_code == 0, pushed.output
    assert "added    2" in pushed.output and grafana.rejected == []
    texts = [a["text"].splitlines()[0] for a in grafana.state.annotations]
    assert texts == ["P-101 vibration_rms: OK -> WATCH", "P-101 vibration_rms: WATCH -> DEGRADING"]
    assert {"flowline", "flag-change", "flag_raised", "asset:P-101"} <= set(grafana.state.annotations[0]["tags"])

    again = CliRunner().invoke(main, [*base, *ds, "--push-annotations"])
    assert again.exit_code == 0 and "added    0 flag changes (2 already" in again.output
    assert len(grafana.state.annotations) == 2 and grafana.rejected == []

    no_source = CliRunner().invoke(main, [*base, "--push-annotations"])
    assert no_source.exit_code != 0 and "--datasource-url" in no_source.output
