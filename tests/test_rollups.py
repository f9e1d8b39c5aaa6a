"""Rollups against the real InfluxDB 1.6 (auth on), checked against pandas on the same data."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flowline.core.config import HistorianConfig
from flowline.core.points import Point, Quality, TagRef, telemetry_point
from flowline.historian import Connection, HistorianWriter
from flowline.historian.query import HistorianReader, measurement_ref
from flowline.historian.rollups import Checkpoint, RollupJob
from flowline.historian.setup import Account, setup_v1
from flowline.historian.tiers import NS
from flowline.lab.services import InfluxDServer

HOUR = 3600 * NS


@pytest.fixture
def rollup_env(influx: InfluxDServer) -> Iterator[tuple[Connection, Connection, str]]:
    """A set-up database (retention policies, accounts) plus the writer and rollup connections."""
    db = "r_" + uuid.uuid4().hex[:8]
    config = HistorianConfig(database=db)
    accounts = {role: Account(f"{role}_{db}", uuid.uuid4().hex) for role in ("writer", "rollup")}
    admin = Connection(influx.url, db, username=influx.admin.name, password=influx.admin.password)
    setup_v1(admin, config, accounts)
    yield (
        Connection(influx.url, db, username=accounts["writer"].name, password=accounts["writer"].password),
        Connection(influx.url, db, username=accounts["rollup"].name, password=accounts["rollup"].password),
        db,
    )
    influx.query(f'DROP DATABASE "{db}"')


def raw_points(start: int, hours: int, seed: int) -> list[Point]:
    """Three tags sampled every 10 s with gaps and some uncertain/bad samples."""
    rng = np.random.default_rng(seed)
    points = []
    for tag in ("vibration_rms", "bearing_temp", "flow"):
        ref = TagRef("north-field", "P-101", tag, "u")
        for ts in range(start, start + hours * HOUR, 10 * NS):
            if rng.random() < 0.05:
                continue  # missing sample
            quality = Quality(int(rng.choice([0, 0, 0, 0, 0, 0, 0, 0, 1, 2])))
            points.append(telemetry_point(ref, float(np.round(rng.normal(50, 10), 3)), int(ts), quality))
    return points


def expected_rollup(points: list[Point], step: str, end: int) -> pd.DataFrame:
    frame = pd.DataFrame(
        {"tag": p.tags["tag"], "time": p.timestamp_ns, "value": p.fields["value"], "quality": p.fields["quality"]}
        for p in points
        if p.timestamp_ns < end
    )
    frame["time"] = pd.to_datetime(frame["time"], unit="ns", utc=True)
    frame = frame.sort_values("time")
    window = frame["time"].dt.floor(step)
    good = frame[frame["quality"] == 0].groupby(["tag", window[frame["quality"] == 0]])["value"]
    out = good.agg(["mean", "min", "max", "count"])
    out["last_quality"] = frame.groupby(["tag", window])["quality"].last()
    return out


def read_rollup(conn: Connection, db: str, policy: str, measurement: str) -> pd.DataFrame:
    frame = HistorianReader(conn).query_df(f"SELECT * FROM {measurement_ref(db, policy, measurement)} GROUP BY *")
    return frame.set_index(["tag", "time"])[["mean", "min", "max", "count", "last_quality"]].sort_index()


def test_rollups_match_pandas_and_run_incrementally(
    rollup_env: tuple[Connection, Connection, str], tmp_path: Path
) -> None:
    writer_conn, rollup_conn, db = rollup_env
    start = (time.time_ns() - 6 * HOUR) // HOUR * HOUR  # recent: inside the raw retention period
    points = raw_points(start, 3, seed=7)
    first, second = [p for p in points if p.timestamp_ns < start + 2 * HOUR], [
        p for p in points if p.timestamp_ns >= start + 2 * HOUR
    ]
    writer = HistorianWriter(writer_conn)
    writer.write(first)
    checkpoint = Checkpoint(tmp_path / "rollups.json")
    job = RollupJob(rollup_conn, checkpoint, lag_s=60)

    runs = job.run_once(now_ns=start + 2 * HOUR + 60 * NS)
    assert {r.tier: r.windows for r in runs} == {"1m": 120, "1h": 2}
    assert checkpoint.load() == {"1m": start + 2 * HOUR, "1h": start + 2 * HOUR}

    writer.write(second)
    runs = job.run_once(now_ns=start + 3 * HOUR + 60 * NS)
    assert {r.tier: r.windows for r in runs} == {"1m": 60, "1h": 1}

    end = start + 3 * HOUR
    for policy, measurement, step in (("rollup_1m", "telemetry_1m", "1min"), ("rollup_1h", "telemetry_1h", "1h")):
        got = read_rollup(rollup_conn, db, policy, measurement)
        want = expected_rollup(points, step, end)
        assert len(got) == len(want) == {"1min": 180, "1h": 3}[step] * 3
        pd.testing.assert_frame_equal(
            got.reset_index(drop=True), want.reset_index(drop=True), check_dtype=False, check_names=False
        )

    hourly = HistorianReader(rollup_conn).read_rollup("north-field", "P-101", "flow", start, end, tier="1h")
    want = expected_rollup(points, "1h", end).loc["flow"]
    assert list(hourly["count"]) == list(want["count"])
    assert hourly["mean"].tolist() == pytest.approx(want["mean"].tolist())

    # Replaying from scratch (lost checkpoint) rewrites identical points: nothing doubles or changes.
    before = read_rollup(rollup_conn, db, "rollup_1m", "telemetry_1m")
    checkpoint.path.unlink()
    job.run_once(now_ns=end + 60 * NS)
    pd.testing.assert_frame_equal(read_rollup(rollup_conn, db, "rollup_1m", "telemetry_1m"), before)


def test_nothing_to_do_on_an_empty_database(rollup_env: tuple[Connection, Connection, str], tmp_path: Path) -> None:
    _, rollup_conn, _ = rollup_env
    runs = RollupJob(rollup_conn, Checkpoint(tmp_path / "c.json")).run_once(now_ns=time.time_ns())
    assert all(r.windows == 0 and r.checkpoint_ns is None for r in runs)
