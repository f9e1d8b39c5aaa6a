"""The assessment job against a real InfluxDB: what it writes, idempotency, Dask equals local."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from flowline.analytics.job import health_point, run_pass
from flowline.core.cli import main
from flowline.core.config import load_config
from flowline.historian.connection import Connection
from flowline.historian.query import HistorianReader
from flowline.inventory import load_site
from flowline.lab.services import InfluxDServer
from tests.analytics_helpers import END, write_config, write_telemetry

NOW = END + pd.Timedelta(minutes=3)  # floored to the 10-minute step: the assessment time is END


def _rows(reader: HistorianReader, measurement: str) -> pd.DataFrame:
    frame = reader.query_df(f'SELECT * FROM "{measurement}" GROUP BY *')
    return frame.drop(columns=["measurement"]).sort_values(["asset", "time"], ignore_index=True)


@pytest.fixture
def loaded(influx: InfluxDServer, influx_db: str, tmp_path: Path) -> Path:
    write_telemetry(influx, influx_db)
    return write_config(tmp_path, influx, influx_db)


def test_pass_writes_health_forecast_events_and_is_idempotent(loaded: Path) -> None:
    config = load_config(loaded)
    assert config.historian is not None
    site = load_site(config.site_file)
    first = run_pass(site, config.historian, config.analytics, now=NOW, workers=1)
    assert first.assessed_at == END
    flags = {a.spec.asset: a.flag.name for a in first.assessments}
    assert first.counts() == {"ok": 4, "failed": 0, "skipped": 0}
    assert flags["P-101"] in ("DEGRADING", "CRITICAL")
    assert flags["P-102"] == "OK" and flags["C-201"] == "OK" and flags["K-301"] == "OK"

    reader = HistorianReader.from_config(config.historian)
    health = _rows(reader, "asset_health")
    assert set(health["asset"]) == {"P-101", "P-102", "C-201", "K-301"}
    assert (health["time"] == END).all()
    p101 = health[health["asset"] == "P-101"].iloc[0]
    assert p101["flag_level"] >= 2 and 0 <= p101["health_score"] < 50 and p101["hours_to_alarm"] > 24
    assert p101["criticality"] == "A" and p101["alarm_limit"] == 70.0
    forecast = _rows(reader, "forecast")
    assert (forecast["time"] >= END).all() and (forecast["lower"] <= forecast["upper"]).all()
    assert len(forecast) == 4 * 168
    events = _rows(reader, "events")
    assert list(events["asset"]) == ["P-101"] and events.iloc[0]["kind"] == "flag_raised"
    inventory = _rows(reader, "inventory")
    assert len(inventory) == 4 and set(inventory["source"]) == {"mqtt"}

    second = run_pass(site, config.historian, config.analytics, now=NOW, workers=2)
    assert second.events == first.events
    for name, before in (("asset_health", health), ("forecast", forecast), ("events", events)):
        after = _rows(reader, name)
        pd.testing.assert_frame_equal(after.reset_index(drop=True), before.reset_index(drop=True))

    # A later pass on healthier data would clear the flag; here: the same data an hour later keeps
    # the flag, so no new event (the previous flag is read back from InfluxDB).
    third = run_pass(site, config.historian, config.analytics, now=NOW + pd.Timedelta(hours=1), workers=1)
    assert third.events == 0
    reader.close()


def test_dask_local_cluster_equals_local_pool(loaded: Path) -> None:
    from distributed import LocalCluster

    config = load_config(loaded)
    assert config.historian is not None
    site = load_site(config.site_file)
    local = run_pass(site, config.historian, config.analytics, now=NOW, workers=1)
    with LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        remote = run_pass(site, config.historian, config.analytics, now=NOW, dask_scheduler=cluster.scheduler_address)
    for a, b in zip(local.assessments, remote.assessments, strict=True):
        assert health_point(a) == health_point(b)
        assert a.forecast is not None and b.forecast is not None
        pd.testing.assert_frame_equal(a.forecast, b.forecast)


def test_analyze_cli_once_prints_ranked_table_and_isolates_failures(
    influx: InfluxDServer, influx_db: str, tmp_path: Path
) -> None:
    # 14 days ending now for the four assets, 1 day for none: X-999 is in the site file without
    # data and Y-998 has too little; both are reported with the reason, the rest is assessed.
    now = pd.Timestamp.now(tz="UTC").floor("10min")
    write_telemetry(influx, influx_db, end=now)
    config = write_config(tmp_path, influx, influx_db, extra_assets=("X-999",))
    png = tmp_path / "report.png"
    result = CliRunner().invoke(
        main, ["analyze", "--config", str(config), "--once", "--workers", "2", "--report", str(png)]
    )
    assert result.exit_code == 0, result.output
    assert f"report: 1 flagged asset(s) plotted in {png}" in result.output
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "skipped: test-field/X-999/vibration_rms: no good-quality values in the history window" in result.output
    assert "4 assessed, 0 failed, 1 skipped" in result.output
    table = result.output.split("Assets at WATCH or worse")[1]
    assert "P-101" in table and "DEGRADING" in table and "P-102" not in table
    reader = HistorianReader(
        Connection(url=influx.url, database=influx_db, username=influx.admin.name, password=influx.admin.password)
    )
    metric = reader.query_df('SELECT last("value") FROM "flowline_analytics_series_total" GROUP BY "result"')
    assert dict(zip(metric["result"], metric["last"], strict=True)) == {"ok": 4.0, "skipped": 1.0}
    assert set(reader.query_df('SHOW TAG VALUES FROM "inventory" WITH KEY = "asset"')["value"]) == {
        "P-101", "P-102", "C-201", "K-301", "X-999"
    }


def test_too_short_history_is_a_reported_failure(influx: InfluxDServer, influx_db: str, tmp_path: Path) -> None:
    write_telemetry(influx, influx_db, days=1, end=NOW.floor("10min"))
    config = load_config(write_config(tmp_path, influx, influx_db))
    assert config.historian is not None
    report = run_pass(load_site(config.site_file), config.historian, config.analytics, now=NOW, workers=1)
    assert report.counts() == {"ok": 0, "failed": 4, "skipped": 0}
    assert all(a.reason.startswith("too short: 24 h of history") for a in report.failures())


def test_analyze_cli_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("site_file: nope.yaml\nanalytics: {step: 10m, bogus: 1}\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["analyze", "--config", str(bad), "--once"])
    assert result.exit_code != 0 and "analytics.bogus" in result.output
