"""``flowline historian setup|rollup|dead-letter`` end to end against the real InfluxDB (auth on)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from flowline.core.points import Point, TagRef, telemetry_point
from flowline.historian import Connection, DeadLetterFile, HistorianWriter
from flowline.historian.cli import historian
from flowline.historian.tiers import NS
from flowline.lab.services import InfluxDServer


def test_setup_then_rollup_then_dead_letter(
    influx: InfluxDServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = "cli_" + uuid.uuid4().hex[:8]
    passwords = {"ADMIN_PW": influx.admin.password, "WRITER_PW": uuid.uuid4().hex, "ROLLUP_PW": uuid.uuid4().hex}
    for name, value in passwords.items():
        monkeypatch.setenv(name, value)
    config = tmp_path / "flowline.yaml"
    config.write_text(yaml.safe_dump({
        "site_file": "site.yaml",
        "data_dir": str(tmp_path / "data"),
        "historian": {"url": influx.url, "database": db, "username": f"rollup_{db}",
                      "password": {"env": "ROLLUP_PW"}, "rollup_lag_s": 0},
    }))
    runner = CliRunner()
    result = runner.invoke(historian, [
        "setup", "--config", str(config), "--admin-password-env", "ADMIN_PW",
        "--account", f"writer=writer_{db}:env:WRITER_PW", "--account", f"rollup=rollup_{db}:env:ROLLUP_PW",
    ])
    assert result.exit_code == 0, result.output
    assert "CREATE RETENTION POLICY \"rollup_1m\"" in result.output and passwords["WRITER_PW"] not in result.output

    now = time.time_ns()
    writer = HistorianWriter(
        Connection(influx.url, db, username=f"writer_{db}", password=passwords["WRITER_PW"]),
        dead_letter=DeadLetterFile(tmp_path / "data" / "historian" / "dead-letter.jsonl"),
    )
    ref = TagRef("north-field", "P-101", "flow")
    writer.write([telemetry_point(ref, float(i), now - 300 * NS + i * NS) for i in range(120)])
    conflict = Point("telemetry", {"site": "north-field", "asset": "P-101", "tag": "flow"}, {"value": "x"}, now)
    assert writer.write([conflict]).dead_lettered == 1

    result = runner.invoke(historian, ["rollup", "--config", str(config), "--once"])
    assert result.exit_code == 0, result.output
    assert "1m:" in result.output and "points written" in result.output
    rows = influx.query('SELECT count("count") FROM "rollup_1m"."telemetry_1m"', db)
    assert rows["results"][0]["series"][0]["values"][0][1] >= 2  # type: ignore[index]

    result = runner.invoke(historian, ["dead-letter", "--config", str(config)])
    assert result.exit_code == 0 and "1 dead-lettered points" in result.output, result.output
    result = runner.invoke(historian, ["dead-letter", "--config", str(config), "--json"])
    assert json.loads(result.output)["reason"] == "field_type_conflict"
    influx.query(f'DROP DATABASE "{db}"')


def test_bad_account_spec_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "flowline.yaml"
    config.write_text(yaml.safe_dump({"site_file": "site.yaml", "historian": {"database": "x"}}))
    result = CliRunner().invoke(
        historian, ["setup", "--config", str(config), "--admin-password-env", "NOPE", "--account", "boss=x"]
    )
    assert result.exit_code == 2 and "ROLE=NAME:env:VAR" in result.output
    result = CliRunner().invoke(historian, ["rollup", "--config", str(tmp_path / "missing.yaml"), "--once"])
    assert result.exit_code == 1 and "cannot read config file" in result.output
