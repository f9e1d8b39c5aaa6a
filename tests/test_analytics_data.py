"""`flowline.analytics.data` and `flowline export` against a real InfluxDB: which config, which rows,
which resolution (raw, rollups, and rollups computed from raw where the job has not run), quality,
layouts, time zones, chunked reads and the Parquet/CSV files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from flowline.analytics.data import DataSource, NoStackError, choose_resolution, connect, find_config
from flowline.core.points import Quality, TagRef, telemetry_point
from flowline.historian.connection import Connection
from flowline.historian.rollups import Checkpoint, RollupJob
from flowline.historian.writer import HistorianWriter
from flowline.inventory import load_site
from flowline.lab.services import InfluxDServer
from tests.conftest import EXAMPLE_SITE

START = pd.Timestamp("2026-01-10T00:00:00Z")
DAYS = 3
ASSETS = ("P-102", "E-201")
PASSWORD_ENV = "FLOWLINE_TEST_DATA_PASSWORD"


def _expected() -> pd.DataFrame:
    """Every stored sample: one per minute per tag; every 50th is bad (and absurd, 1e6)."""
    site = load_site(EXAMPLE_SITE)
    times = pd.date_range(START, periods=DAYS * 1440, freq="1min")
    frames = []
    for k, (asset, tag) in enumerate((a.id, t.name) for a, t in site.iter_tags() if a.id in ASSETS):
        minute = np.arange(len(times))
        bad = minute % 50 == k % 50
        frames.append(
            pd.DataFrame(
                {
                    "time": times,
                    "asset": asset,
                    "tag": tag,
                    "value": np.where(bad, 1e6, k * 100.0 + (minute % 60) + 0.25),
                    "quality": np.where(bad, int(Quality.BAD), int(Quality.GOOD)),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


@pytest.fixture
def source(influx: InfluxDServer, influx_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DataSource:
    truth = _expected()
    site = load_site(EXAMPLE_SITE).site
    points = [
        telemetry_point(TagRef(site, r.asset, r.tag), float(r.value), int(r.time.value), Quality(int(r.quality)))
        for r in truth.itertuples()
    ]
    with HistorianWriter(_conn(influx, influx_db)) as writer:
        writer.write(points)
    monkeypatch.setenv(PASSWORD_ENV, influx.admin.password)
    config = {
        "site_file": str(EXAMPLE_SITE),
        "data_dir": str(tmp_path / "data"),
        "historian": {
            "url": influx.url,
            "database": influx_db,
            "username": influx.admin.name,
            "password": {"env": PASSWORD_ENV},
        },
    }
    (tmp_path / "flowline.yaml").write_text(yaml.safe_dump(config))
    return connect(tmp_path / "flowline.yaml")


def _conn(influx: InfluxDServer, db: str) -> Connection:
    return Connection(url=influx.url, database=db, username=influx.admin.name, password=influx.admin.password)


def test_config_rule_env_first_then_the_demo_folder_here_or_above(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLOWLINE_CONFIG", raising=False)
    nested = tmp_path / "repo" / "notebooks"
    nested.mkdir(parents=True)
    with pytest.raises(NoStackError, match=r"scripts/demo --keep"):
        find_config(nested)
    demo = tmp_path / "repo" / ".flowline-demo" / "flowline.yaml"
    demo.parent.mkdir()
    demo.write_text("{}")
    assert find_config(nested) == demo
    other = tmp_path / "site.yaml"
    other.write_text("{}")
    monkeypatch.setenv("FLOWLINE_CONFIG", str(other))
    assert find_config(nested) == other
    monkeypatch.setenv("FLOWLINE_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(NoStackError, match=r"missing\.yaml: no such file"):
        find_config(nested)


def test_resolution_follows_the_range() -> None:
    t = pd.Timestamp("2026-01-01T00:00:00Z")
    assert choose_resolution(t, t + pd.Timedelta(days=2)) == "raw"
    assert choose_resolution(t, t + pd.Timedelta(days=14)) == "1m"
    assert choose_resolution(t, t + pd.Timedelta(days=90)) == "1h"


def test_raw_rows_of_several_assets_good_only_or_all_with_quality(source: DataSource) -> None:
    truth = _expected()
    end = START + pd.Timedelta(days=DAYS)
    good = source.load(list(ASSETS), start=START, end=end, resolution="raw")
    assert list(good.columns) == ["time", "asset", "tag", "value", "quality"]
    expected_good = truth[truth.quality == 0]
    assert len(good) == len(expected_good) == 12 * DAYS * 1440 - len(truth[truth.quality != 0])
    assert good["value"].max() < 1e6 and set(good["quality"]) == {0}
    assert set(good["asset"]) == set(ASSETS) and good["tag"].nunique() == 12
    assert good["time"].is_monotonic_increasing

    everything = source.load(list(ASSETS), start=START, end=end, resolution="raw", quality="all")
    assert len(everything) == len(truth)
    assert (everything["quality"] == int(Quality.BAD)).sum() == (truth.quality == int(Quality.BAD)).sum()
    merged = everything.merge(truth, on=["time", "asset", "tag"], suffixes=("", "_true"))
    assert len(merged) == len(truth)
    assert np.allclose(merged["value"], merged["value_true"])


def test_chunked_read_equals_one_read_and_wide_layout(source: DataSource) -> None:
    end = START + pd.Timedelta(days=1)
    one = source.load("P-102", start=START, end=end, resolution="raw")
    plan = source.plan("P-102", start=START, end=end, resolution="raw", chunk_rows=20_000)
    assert len(plan.windows) == 26  # 20,000 rows / (6 tags x 1 row/s assumed) = 3,333 s windows over a day
    chunked = source.load("P-102", start=START, end=end, resolution="raw", chunk_rows=20_000, progress=True)
    pd.testing.assert_frame_equal(one, chunked)

    wide = source.load("P-102", start=START, end=end, resolution="raw", layout="wide")
    assert wide.shape == (1440, 6)
    assert wide.columns.names == ["asset", "tag"]
    for row in one.iloc[[0, 777, len(one) - 1]].itertuples():
        assert wide.loc[row.time, (row.asset, row.tag)] == row.value
    assert wide.notna().sum().sum() == len(one)
    with_quality = source.load("P-102", start=START, end=end, resolution="raw", layout="wide", quality="all")
    assert with_quality.columns.names == ["field", "asset", "tag"]
    assert set(with_quality.columns.get_level_values("field")) == {"value", "quality"}
    assert with_quality["quality"].max().max() == int(Quality.BAD)


def test_time_zone_of_inputs_and_outputs(source: DataSource) -> None:
    # Naive times are local to tz: 01:00 in Oslo (winter, UTC+1) is midnight UTC.
    frame = source.load(
        "P-102", "flow", start="2026-01-10 01:00", end="2026-01-10 02:00", resolution="raw", tz="Europe/Oslo"
    )
    assert str(frame["time"].dt.tz) == "Europe/Oslo"
    assert frame["time"].iloc[0] == START
    truth = _expected()
    hour = truth[(truth.asset == "P-102") & (truth.tag == "flow") & (truth.time < START + pd.Timedelta(hours=1))]
    assert frame["time"].iloc[0].hour == 1 and len(frame) == (hour.quality == 0).sum() < 60
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Base'"):
        source.load("P-102", tz="Mars/Base")


def _hourly_truth(asset: str, tag: str) -> pd.DataFrame:
    truth = _expected()
    one = truth[(truth.asset == asset) & (truth.tag == tag) & (truth.quality == 0)].set_index("time")["value"]
    grouped = one.groupby(one.index.floor("1h"))
    return pd.DataFrame({"value": grouped.mean(), "min": grouped.min(), "max": grouped.max(), "count": grouped.size()})


def test_hourly_resolution_from_raw_when_no_rollup_ran_and_from_the_rollups_when_they_did(
    source: DataSource, influx: InfluxDServer, influx_db: str, tmp_path: Path
) -> None:
    end = START + pd.Timedelta(days=DAYS)
    expected = _hourly_truth("P-102", "vibration_rms")

    # No rollup tiers at all on this database: the server aggregates raw to the same definitions.
    computed = source.load("P-102", "vibration_rms", start=START, end=end, resolution="1h").set_index("time")
    assert list(computed.columns) == ["asset", "tag", "value", "quality", "min", "max", "count"]
    assert len(computed) == DAYS * 24
    np.testing.assert_allclose(computed["value"].to_numpy(), expected["value"].to_numpy())
    assert (computed["count"].to_numpy() == expected["count"].to_numpy()).all()

    # Now the rollup job runs; then the raw data of the first day disappears (retention): the
    # first day must still read, from the rollup tier.
    for policy in ("rollup_1m", "rollup_1h"):
        influx.query(f'CREATE RETENTION POLICY "{policy}" ON "{influx_db}" DURATION INF REPLICATION 1')
    job = RollupJob(_conn(influx, influx_db), Checkpoint(tmp_path / "rollups.json"), lag_s=0)
    job.run_once(int((end + pd.Timedelta(hours=1)).value))
    job.close()
    influx.query(f"DELETE FROM telemetry WHERE time < {int((START + pd.Timedelta(days=1)).value)}", db=influx_db)
    rolled = source.load("P-102", "vibration_rms", start=START, end=end, resolution="1h").set_index("time")
    pd.testing.assert_frame_equal(rolled, computed)
    minute = source.load("P-102", "vibration_rms", start=START, end=START + pd.Timedelta(hours=2), resolution="1m")
    truth = _expected()
    bad = truth[(truth.asset == "P-102") & (truth.tag == "vibration_rms") & (truth.quality != 0)
                & (truth.time < START + pd.Timedelta(hours=2))]
    assert len(bad) == 3 and len(minute) == 120 - 3  # a minute holding only a bad sample has no good value
    assert len(source.load("P-102", "vibration_rms", start=START, end=START + pd.Timedelta(hours=2),
                           resolution="1m", quality="all")) == 120


def test_export_parquet_and_csv_stream_the_same_rows(source: DataSource, tmp_path: Path) -> None:
    end = START + pd.Timedelta(days=1)
    expected = source.load(list(ASSETS), start=START, end=end, resolution="raw")
    result = source.export(
        tmp_path / "x.parquet", source.plan(list(ASSETS), start=START, end=end, resolution="raw", chunk_rows=50_000)
    )
    assert result.rows == len(expected) and len(result.plan.windows) > 1
    back = pd.read_parquet(tmp_path / "x.parquet")
    assert len(back) == len(expected)
    assert np.allclose(back["value"].to_numpy(), expected["value"].to_numpy())
    assert str(back["time"].dt.tz) == "UTC"

    source.export(tmp_path / "x.csv", source.plan(list(ASSETS), start=START, end=end, resolution="raw",
                                                  chunk_rows=50_000))
    csv = pd.read_csv(tmp_path / "x.csv", parse_dates=["time"])
    assert len(csv) == len(expected) and list(csv.columns) == ["time", "asset", "tag", "value", "quality"]

    source.export(tmp_path / "w.csv", source.plan("P-102", start=START, end=end, resolution="1h", quality="all"),
                  layout="wide")
    wide = pd.read_csv(tmp_path / "w.csv")
    assert len(wide) == 24
    nothing = source.export(tmp_path / "none.parquet", source.plan("P-102", start="2020-01-01", end="2020-01-02"))
    assert nothing.rows == 0
    assert list(pd.read_parquet(tmp_path / "none.parquet").columns) == ["time", "asset", "tag", "value", "quality"]
    assert "value:P-102/vibration_rms" in wide.columns and "quality:P-102/flow" in wide.columns


def test_export_command_and_its_messages(source: DataSource, tmp_path: Path) -> None:
    assert source.config_path is not None
    env = {**os.environ, "FLOWLINE_CONFIG": str(source.config_path)}
    base = [sys.executable, "-m", "flowline.core", "export", "--asset", "P-102", "--start", "2026-01-10",
            "--end", "2026-01-11"]
    done = subprocess.run([*base, "--out", str(tmp_path / "p.parquet")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "rows (6 tags, raw, 2026-01-10 00:00 to 2026-01-11 00:00 UTC)" in done.stdout
    assert len(pd.read_parquet(tmp_path / "p.parquet")) == 6 * 1440 - sum(
        1 for k in range(6) for m in range(1440) if m % 50 == k % 50
    )

    # Without pyarrow: a clear message naming the extra, no traceback.
    blocked = (
        "import sys; sys.modules['pyarrow'] = None; from flowline.core.cli import main; "
        f"main({[*base[3:], '--out', str(tmp_path / 'q.parquet')]!r})"
    )
    missing = subprocess.run([sys.executable, "-c", blocked], env=env, capture_output=True, text=True)
    assert missing.returncode == 1
    expected = "Parquet needs pyarrow, which is not installed: uv sync --extra parquet"
    assert expected in missing.stderr
    assert "Traceback" not in missing.stderr

    unknown = subprocess.run([*base[:4], "--asset", "P-999", "--out", str(tmp_path / "x.csv")], env=env,
                             capture_output=True, text=True)
    assert unknown.returncode == 1 and "unknown asset(s) P-999 in site 'north-field'" in unknown.stderr

    nowhere = subprocess.run([*base, "--out", str(tmp_path / "x.csv")], cwd=tmp_path,
                             env={k: v for k, v in env.items() if k != "FLOWLINE_CONFIG"},
                             capture_output=True, text=True)
    assert nowhere.returncode == 1
    assert "no Flowline config: set FLOWLINE_CONFIG" in nowhere.stderr and "Traceback" not in nowhere.stderr


def test_a_stopped_demo_stack_is_named_with_what_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flowline.historian.errors import HistorianUnavailableError
    from flowline.lab.services import free_port

    monkeypatch.delenv("FLOWLINE_CONFIG", raising=False)
    demo = tmp_path / ".flowline-demo"
    demo.mkdir()
    config = {"site_file": str(EXAMPLE_SITE), "historian": {"url": f"http://127.0.0.1:{free_port()}"}}
    (demo / "flowline.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HistorianUnavailableError, match=r"is the demo stack up\? 'flowline stack status --workdir "):
        connect().load("P-102", days=1)
    done = subprocess.run([sys.executable, "-m", "flowline.core", "export", "--asset", "P-102", "--out", "x.csv"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 1 and "start it with 'scripts/demo --keep'" in done.stderr
    assert "Traceback" not in done.stderr
