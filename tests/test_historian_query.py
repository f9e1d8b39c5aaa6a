"""InfluxQL read helpers against the real InfluxDB 1.6 (auth on)."""

from __future__ import annotations

import pytest

from flowline.core.points import Point, Quality, TagRef, telemetry_point
from flowline.historian import (
    Connection,
    HistorianAuthError,
    HistorianNotFoundError,
    HistorianQueryError,
    HistorianUnavailableError,
    HistorianWriter,
)
from flowline.historian.query import HistorianReader
from flowline.lab.services import InfluxDServer, free_port

T0 = 1_700_000_040_000_000_000  # on a minute boundary
MIN = 60 * 10**9


@pytest.fixture
def reader(influx: InfluxDServer, influx_db: str) -> HistorianReader:
    admin = Connection(influx.url, influx_db, username=influx.admin.name, password=influx.admin.password)
    ref = TagRef("north-field", "P-101", "vibration_rms", "mm/s")
    points = [
        telemetry_point(ref, float(i), T0 + i * 10 * 10**9, Quality.BAD if i % 6 == 5 else Quality.GOOD)
        for i in range(60)  # 10 minutes at 10 s
    ]
    points.append(telemetry_point(TagRef("north-field", "C-201", "flow", "m3/h"), 42.0, T0))
    points += [
        Point("asset_health", {"site": "north-field", "asset": "P-101", "tag": "vibration_rms", "criticality": "A"},
              {"health_score": 71.5, "flag_level": 2, "flag": "DEGRADING"}, T0),
        Point("forecast", {"site": "north-field", "asset": "P-101", "tag": "vibration_rms"},
              {"yhat": 5.0, "lower": 4.0, "upper": 6.0}, T0 + 3600 * 10**9),
    ]
    HistorianWriter(admin).write(points)
    return HistorianReader(admin, chunk_size=7)  # small chunks: results arrive in several pieces


def test_read_tag_history_aggregates_good_samples_per_step(reader: HistorianReader) -> None:
    frame = reader.read_tag_history("north-field", "P-101", "vibration_rms", T0, T0 + 10 * MIN, step="1m")
    assert len(frame) == 10
    assert frame.index[0].value == T0
    # first minute: samples 0..5, sample 5 is bad -> mean of 0..4
    assert frame["value"].iloc[0] == pytest.approx(2.0)
    with_bad = reader.read_tag_history(
        "north-field", "P-101", "vibration_rms", T0, T0 + MIN, good_only=False, with_quality=True
    )
    assert list(with_bad["value"]) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert list(with_bad["quality"]) == [0, 0, 0, 0, 0, 2]
    raw = reader.read_tag_history("north-field", "P-101", "vibration_rms", T0, T0 + 10 * MIN)
    assert len(raw) == 50 and str(raw.index.tz) == "UTC"


def test_empty_history_has_the_same_shape(reader: HistorianReader) -> None:
    frame = reader.read_tag_history("north-field", "nope", "x", T0, T0 + MIN, step="1m")
    assert frame.empty and list(frame.columns) == ["value"]


def test_latest_values_and_analytics_readers(reader: HistorianReader) -> None:
    latest = reader.latest_values("north-field")
    assert list(latest["asset"]) == ["C-201", "P-101"]
    assert list(latest["value"]) == [42.0, 59.0]
    health = reader.read_asset_health("north-field", T0)
    assert health.loc[0, "flag"] == "DEGRADING" and health.loc[0, "criticality"] == "A"
    forecast = reader.read_forecast("north-field", "P-101", "vibration_rms", T0)
    assert forecast[["yhat", "lower", "upper"]].iloc[0].tolist() == [5.0, 4.0, 6.0]


def test_bound_parameters_and_chunked_results(reader: HistorianReader) -> None:
    frame = reader.query_df('SELECT "value" FROM "telemetry" WHERE "asset" = $asset', {"asset": "P-101"})
    assert len(frame) == 60  # several chunks of 7 merged


def test_clear_errors(influx: InfluxDServer, reader: HistorianReader) -> None:
    with pytest.raises(HistorianQueryError, match="error parsing query"):
        reader.query("SELEC nonsense")
    missing = Connection(influx.url, "no_such_db", username=influx.admin.name, password=influx.admin.password)
    with pytest.raises(HistorianNotFoundError, match="no_such_db"):
        HistorianReader(missing).query('SELECT * FROM "telemetry"')
    with pytest.raises(HistorianAuthError, match="401"):
        HistorianReader(Connection(influx.url, "x", username="admin", password="wrong")).query("SHOW DATABASES")
    with pytest.raises(HistorianUnavailableError, match="unreachable"):
        HistorianReader(Connection(f"http://127.0.0.1:{free_port()}", "x")).query("SHOW DATABASES")
