"""Historian set-up on the real InfluxDB 1.6: retention tiers and least-privilege accounts."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowline.core.config import HistorianConfig
from flowline.core.points import Point, TagRef, telemetry_point
from flowline.historian import Connection, HistorianAuthError, HistorianWriter
from flowline.historian.query import HistorianReader
from flowline.historian.setup import ROLES, Account, setup_v1
from flowline.historian.tiers import duration_seconds
from flowline.lab.services import InfluxDServer


@pytest.fixture
def names(influx: InfluxDServer) -> Iterator[tuple[str, str]]:
    db, analytics_db = "s_" + uuid.uuid4().hex[:8], "a_" + uuid.uuid4().hex[:8]
    yield db, analytics_db
    for name in (db, analytics_db):
        influx.query(f'DROP DATABASE "{name}"')


def conn(influx: InfluxDServer, db: str, account: Account) -> Connection:
    return Connection(influx.url, db, username=account.name, password=account.password)


def sample(measurement: str = "telemetry") -> list[Point]:
    point = telemetry_point(TagRef("s", "a", "t"), 1.0, time.time_ns())
    return [Point(measurement, point.tags, point.fields, point.timestamp_ns)]


def test_setup_creates_tiers_and_least_privilege_accounts(influx: InfluxDServer, names: tuple[str, str]) -> None:
    db, analytics_db = names
    config = HistorianConfig(database=db, analytics_database=analytics_db, raw_retention="30d")
    accounts = {role: Account(f"{role}_{db}", uuid.uuid4().hex) for role in ROLES}
    admin = Connection(influx.url, db, username=influx.admin.name, password=influx.admin.password)
    statements = setup_v1(admin, config, accounts)
    assert all(account.password not in " ".join(statements) for account in accounts.values())

    policies = influx.query(f'SHOW RETENTION POLICIES ON "{db}"', db)["results"][0]["series"][0]["values"]  # type: ignore[index]
    by_name = {row[0]: (row[1], row[4]) for row in policies}
    assert by_name["raw"] == ("720h0m0s", True)
    assert by_name["rollup_1m"] == ("9600h0m0s", False)
    assert by_name["rollup_1h"] == ("0s", False)  # INF

    def can_write(role: str, database: str, measurement: str = "telemetry") -> bool:
        try:
            HistorianWriter(conn(influx, database, accounts[role])).write(sample(measurement))
        except HistorianAuthError:
            return False
        return True

    def can_read(role: str, database: str) -> bool:
        try:
            HistorianReader(conn(influx, database, accounts[role])).query('SELECT * FROM "telemetry"')
        except HistorianAuthError:
            return False
        return True

    assert can_write("writer", db) and not can_read("writer", db)
    assert can_read("grafana", db) and can_read("grafana", analytics_db) and not can_write("grafana", db)
    assert can_read("analytics", db) and not can_write("analytics", db)
    assert can_write("analytics", analytics_db, "asset_health")
    assert can_read("rollup", db) and can_write("rollup", db, "telemetry_1m")

    # Re-running converges: new retention, new password, no error on existing objects.
    rotated = {"writer": Account(accounts["writer"].name, "new-" + uuid.uuid4().hex)}
    setup_v1(admin, config.model_copy(update={"raw_retention": "60d"}), rotated)
    policies = influx.query(f'SHOW RETENTION POLICIES ON "{db}"', db)["results"][0]["series"][0]["values"]  # type: ignore[index]
    assert {row[0]: row[1] for row in policies}["raw"] == "1440h0m0s"
    with pytest.raises(HistorianAuthError):
        HistorianWriter(conn(influx, db, accounts["writer"])).write(sample())
    assert HistorianWriter(conn(influx, db, rotated["writer"])).write(sample()).written == 1


def test_durations_are_validated() -> None:
    assert duration_seconds("1h30m") == 5400
    assert duration_seconds("INF") is None
    with pytest.raises(ValueError, match="retention duration"):
        duration_seconds("90 days")


def test_setup_command_never_prints_a_password(
    influx: InfluxDServer, names: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """First run (CREATE USER), re-run (SET PASSWORD), and a statement InfluxDB refuses: no password shown."""
    from click.testing import CliRunner

    from flowline.historian.cli import historian

    db, _ = names
    config = tmp_path / "flowline.yaml"
    config.write_text(f"site_file: site.yaml\nhistorian:\n  url: {influx.url}\n  database: {db}\n")
    secret_part = uuid.uuid4().hex
    password = "pw'with\\odd" + secret_part
    monkeypatch.setenv("ADMIN_PW", influx.admin.password)
    monkeypatch.setenv("WRITER_PW", password)

    def run(*accounts: str) -> str:
        args = ["setup", "--config", str(config), "--admin-password-env", "ADMIN_PW"]
        result = CliRunner().invoke(historian, [*args, *(a for acc in accounts for a in ("--account", acc))])
        output = result.output + (str(result.exception) if result.exception else "")
        assert secret_part[:8] not in output and secret_part[-8:] not in output and influx.admin.password not in output
        return output

    first = run(f"writer=w_{db}:env:WRITER_PW")
    assert f'CREATE USER "w_{db}" WITH PASSWORD ***' in first
    again = run(f"writer=w_{db}:env:WRITER_PW")
    assert f'SET PASSWORD FOR "w_{db}" = ***' in again
    refused = run("writer=:env:WRITER_PW")  # an empty user name: InfluxDB refuses the statement
    assert 'Error: InfluxDB refused CREATE USER "" WITH PASSWORD ***: username required' in refused
