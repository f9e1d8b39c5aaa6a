"""The InfluxDB 2.x paths against a strict stand-in that answers from InfluxData's OpenAPI descriptions.

Every request below (set-up through the v2 API, token-auth writes on the v2 and 1.x-compatible
APIs, 1.x-compatible InfluxQL queries with a token) is validated by tests/influx2_stub.py, which
refuses anything the descriptions do not define; data lands in a real InfluxDB 1.6 behind it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from flowline.core.config import HistorianConfig
from flowline.core.points import FieldValue, Point, TagRef, telemetry_point
from flowline.dashboards.annotations import read_flag_changes
from flowline.dashboards.definitions import all_dashboards
from flowline.historian.connection import Connection
from flowline.historian.errors import HistorianAuthError
from flowline.historian.query import HistorianReader
from flowline.historian.rollups import Checkpoint, RollupJob
from flowline.historian.setup import ROLES
from flowline.historian.setup_v2 import setup_v2
from flowline.historian.writer import HistorianWriter
from flowline.inventory import load_site
from flowline.lab.services import InfluxDServer
from tests.conftest import EXAMPLE_SITE, SCHEMAS_ENV, schema_file
from tests.influx2_stub import V1COMPAT_FILE, V2_FILE, Influx2Stub, OpenApiContract

pytestmark = pytest.mark.schemas
ORG = "flowline-org"
ADMIN_TOKEN = "operator-" + uuid.uuid4().hex
FLOWLINE = str(Path(sys.executable).parent / "flowline")


@pytest.fixture(scope="module")
def contracts() -> tuple[OpenApiContract, OpenApiContract]:
    return OpenApiContract(schema_file(V2_FILE)), OpenApiContract(schema_file(V1COMPAT_FILE))


@pytest.fixture
def stub(contracts: tuple[OpenApiContract, OpenApiContract], influx: InfluxDServer) -> Iterator[Influx2Stub]:
    server = Influx2Stub(*contracts, influx, ADMIN_TOKEN, ORG).start()
    yield server
    server.stop()


@pytest.fixture
def database(influx: InfluxDServer) -> Iterator[str]:
    name = "v2_" + uuid.uuid4().hex[:10]
    yield name
    influx.query(f'DROP DATABASE "{name}"')


def _set_up(stub: Influx2Stub, database: str) -> dict[str, str]:
    config = HistorianConfig(url=stub.url, database=database)
    result = setup_v2(stub.url, ADMIN_TOKEN, ORG, config, ROLES)
    assert stub.rejected == []
    return result.tokens


def _last_hour() -> tuple[int, int]:
    now = time.time_ns()
    return now - 3600 * 10**9, now + 10**9


def _points(n: int, tag: str = "flow") -> list[Point]:
    now = time.time_ns() - 60 * 10**9
    return [telemetry_point(TagRef("s1", "P-101", tag, "m3/h"), float(i), now + i * 10**9) for i in range(n)]


def test_setup_creates_buckets_mappings_and_role_tokens_and_converges(stub: Influx2Stub, database: str) -> None:
    tokens = _set_up(stub, database)
    assert sorted(tokens) == sorted(ROLES) and len(set(tokens.values())) == len(ROLES)
    assert sorted(b["name"] for b in stub.state.buckets.values()) == [
        f"{database}/raw",
        f"{database}/rollup_1h",
        f"{database}/rollup_1m",
    ]
    assert {(d["retention_policy"], d["default"]) for d in stub.state.dbrps.values()} == {
        ("raw", True),
        ("rollup_1m", False),
        ("rollup_1h", False),
    }
    described = set(stub.requests)
    assert ("POST", "/api/v2/buckets") in described and ("POST", "/api/v2/dbrps") in described
    assert ("POST", "/api/v2/authorizations") in described
    writer = next(a for a in stub.state.auths.values() if a.token == tokens["writer"])
    assert {p["action"] for p in writer.permissions} == {"write"}
    grafana = next(a for a in stub.state.auths.values() if a.token == tokens["grafana"])
    assert {p["action"] for p in grafana.permissions} == {"read"}
    _set_up(stub, database)  # again: no second bucket or mapping
    assert len(stub.state.buckets) == 3 and len(stub.state.dbrps) == 3


def test_token_writes_and_queries_on_the_1x_compatible_api(stub: Influx2Stub, database: str) -> None:
    """The documented deployment: the writer and the readers use tokens on /write and /query."""
    tokens = _set_up(stub, database)
    with HistorianWriter(Connection(stub.url, database, token=tokens["writer"]), retry_deadline_s=5) as writer:
        assert writer.write(_points(5)).written == 5
    reader = HistorianReader(Connection(stub.url, database, token=tokens["analytics"]))
    history = reader.read_tag_history("s1", "P-101", "flow", *_last_hour())
    assert list(history["value"]) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert stub.rejected == []
    assert ("POST", "/write") in stub.requests and ("POST", "/query") in stub.requests
    # least privilege holds: the writer's token reads nothing, Grafana's writes nothing
    with pytest.raises(HistorianAuthError, match="not allowed to query"):
        HistorianReader(Connection(stub.url, database, token=tokens["writer"])).read_tag_history(
            "s1", "P-101", "flow", *_last_hour()
        )
    grafana = Connection(stub.url, database, token=tokens["grafana"])
    with HistorianWriter(grafana, retry_deadline_s=2) as refused, pytest.raises(HistorianAuthError):
        refused.write(_points(1))


def test_v2_write_api_with_a_token(stub: Influx2Stub, database: str) -> None:
    tokens = _set_up(stub, database)
    conn = Connection(stub.url, database, token=tokens["writer"])
    with HistorianWriter(conn, api="v2", org=ORG, bucket=f"{database}/raw", retry_deadline_s=5) as writer:
        assert writer.write(_points(3, "level")).written == 3
    assert stub.rejected == [] and ("POST", "/api/v2/write") in stub.requests
    reader = HistorianReader(Connection(stub.url, database, token=tokens["grafana"]))
    assert list(reader.read_tag_history("s1", "P-101", "level", *_last_hour())["value"]) == [0.0, 1.0, 2.0]


def test_rollup_job_with_its_token_reads_raw_and_writes_its_tiers(
    stub: Influx2Stub, database: str, tmp_path: Path
) -> None:
    tokens = _set_up(stub, database)
    with HistorianWriter(Connection(stub.url, database, token=tokens["writer"]), retry_deadline_s=5) as writer:
        minute = 60 * 10**9
        start = time.time_ns() // minute * minute - 3 * minute  # two whole minutes, one value per second
        ref = TagRef("s1", "P-101", "flow", "m3/h")
        writer.write([telemetry_point(ref, float(i), start + i * 10**9) for i in range(120)])
    job = RollupJob(Connection(stub.url, database, token=tokens["rollup"]), Checkpoint(tmp_path / "c.json"), lag_s=0)
    try:
        runs = {run.tier: run for run in job.run_once(time.time_ns())}
    finally:
        job.close()
    assert runs["1m"].points == 2 and stub.rejected == []
    reader = HistorianReader(Connection(stub.url, database, token=tokens["grafana"]))
    rows = reader.read_rollup("s1", "P-101", "flow", *_last_hour(), tier="1m")
    assert int(rows["count"].sum()) == 120


def test_dashboard_annotation_query_binds_its_parameters_without_undescribed_ones(
    stub: Influx2Stub, database: str
) -> None:
    tokens = _set_up(stub, database)
    tags = {"site": "s1", "asset": "P-101", "tag": "flow", "kind": "flag_raised"}
    fields: dict[str, FieldValue] = {"title": "P-101 flow WATCH", "text": "it's rising", "flag": "WATCH"}
    event = Point("events", tags, fields, time.time_ns() - 10**9)
    with HistorianWriter(Connection(stub.url, database, token=tokens["analytics"]), retry_deadline_s=5) as writer:
        writer.write([event])
    reader = HistorianReader(Connection(stub.url, database, token=tokens["grafana"]))
    changes = read_flag_changes(reader, time.time_ns() - 3600 * 10**9, site="s1")
    assert [(c.asset, c.flag, c.text) for c in changes] == [("P-101", "WATCH", "it's rising")]
    assert stub.rejected == []


def test_every_dashboard_query_runs_through_the_2x_mapping_with_grafanas_token(
    stub: Influx2Stub, database: str
) -> None:
    """The InfluxQL of every panel and variable, with its retention policies resolved through the
    DBRP mappings, run with the read-only token Grafana gets. (Grafana itself sends them as GET, which
    the 1.x-compatible description does not list; see the module docstring of tests/influx2_stub.py.)"""
    tokens = _set_up(stub, database)
    site = load_site(EXAMPLE_SITE)
    asset, tag = next((a.id, t.name) for a, t in site.iter_tags())
    with HistorianWriter(Connection(stub.url, database, token=tokens["writer"]), retry_deadline_s=5) as writer:
        writer.write([telemetry_point(TagRef(site.site, asset, tag), 1.0, time.time_ns() - 10**9)])
    reader = HistorianReader(Connection(stub.url, database, token=tokens["grafana"]))
    now_ms = time.time_ns() // 10**6
    values = {"site": site.site, "asset": asset, "tag": tag, "criticality": "A", "zone": "z", "sender": "s",
              "timeFilter": f"time >= {now_ms - 3_600_000}ms AND time <= {now_ms}ms", "__interval": "1m"}  # fmt: skip
    ran = 0
    for dashboard in all_dashboards(site):
        texts = [v.query for v in dashboard.variables] + [select.render() for _, select in dashboard.queries()]
        for text in texts:
            for name, value in sorted(values.items(), key=lambda kv: -len(kv[0])):
                text = text.replace(f"${name}", value)
            reader.query(text)  # raises on a refused request or an InfluxQL error
            ran += 1
    assert ran > 20 and stub.rejected == []


def test_the_stub_refuses_what_the_descriptions_do_not_define(stub: Influx2Stub, database: str) -> None:
    """What the code sent before: a form body with chunking and bound parameters on /query, and v1
    credentials through the private legacy-authorization API."""
    _set_up(stub, database)
    auth = {"Authorization": f"Token {ADMIN_TOKEN}", "Accept-Encoding": "gzip", "Accept": "application/json"}
    form = {"q": "SHOW MEASUREMENTS", "db": database, "chunked": "true", "params": "{}"}
    response = requests.post(f"{stub.url}/query", data=form, headers=auth, timeout=5)
    assert response.status_code == 400 and "'application/x-www-form-urlencoded' is not one of" in response.text
    chunked = {"q": "SHOW MEASUREMENTS", "db": database, "chunked": "true"}
    response = requests.post(f"{stub.url}/query", params=chunked, headers=auth, timeout=5)
    assert response.status_code == 400 and "'chunked' is not in" in response.json()["message"]
    legacy = requests.post(f"{stub.url}/api/v2/private/legacy/authorizations", json={}, headers=auth, timeout=5)
    assert legacy.status_code == 404
    unknown_key = {"orgID": stub.state.org["id"], "name": "x", "retentionPolicy": "7d"}
    assert requests.post(f"{stub.url}/api/v2/buckets", json=unknown_key, headers=auth, timeout=5).status_code == 400
    assert requests.post(f"{stub.url}/write", params={"db": database}, data="m v=1", timeout=5).status_code == 401


@pytest.mark.schemas  # runs only where the variable is set, to show the message without it
def test_a_missing_schema_directory_says_how_to_set_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SCHEMAS_ENV)
    with pytest.raises(
        pytest.fail.Exception, match=re.escape(f"{SCHEMAS_ENV} is not set: point it at the folder holding {V2_FILE}")
    ):
        schema_file(V2_FILE)


def test_setup_v2_command_writes_one_token_file_per_role(stub: Influx2Stub, database: str, tmp_path: Path) -> None:
    config = tmp_path / "flowline.yaml"
    text = f"site_file: {EXAMPLE_SITE}\ndata_dir: {tmp_path}\nhistorian:\n  url: {stub.url}\n  database: {database}\n"
    config.write_text(text, encoding="utf-8")
    env = {**os.environ, "OPERATOR_TOKEN": ADMIN_TOKEN}
    args = ["historian", "setup-v2", "--config", str(config), "--admin-token-env", "OPERATOR_TOKEN", "--org", ORG,
            "--role", "writer", "--role", "grafana", "--token-dir", str(tmp_path / "secrets")]  # fmt: skip
    done = subprocess.run([FLOWLINE, *args], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert f"mapped to {database}.raw" in done.stdout
    files = sorted(p.name for p in (tmp_path / "secrets").iterdir())
    assert files == ["influxdb_grafana_token", "influxdb_writer_token"]
    token = (tmp_path / "secrets" / "influxdb_writer_token").read_text().strip()
    assert (tmp_path / "secrets" / "influxdb_writer_token").stat().st_mode & 0o777 == 0o600
    with HistorianWriter(Connection(stub.url, database, token=token), retry_deadline_s=5) as writer:
        assert writer.write(_points(2)).written == 2
    wrong = subprocess.run([FLOWLINE, *args[:-2], "--token-dir", str(tmp_path / "s2"), "--org", "nope"], env=env,
                           capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr and "answered 404" in wrong.stderr
