"""The backtest: replay is causal and equals the job's assessment at each time; scoring against
event times gives the lead times, misses, open events and false flags a reliability engineer reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flowline.analytics.assess import assess_series
from flowline.analytics.backtest import read_events, replay, score
from flowline.analytics.job import series_specs
from flowline.analytics.rules import Flag
from flowline.inventory import load_site
from flowline.lab.sim.plant import Plant
from tests.conftest import EXAMPLE_SITE

EPOCH = pd.Timestamp("2026-01-15T00:00:00Z")


def _plant_series(plant: Plant, asset: str, tag: str, days_after: float = 5) -> pd.Series:
    times = pd.date_range(EPOCH - pd.Timedelta(days=14), EPOCH + pd.Timedelta(days=days_after), freq="10min")
    return pd.Series(plant.series(asset, tag, times.as_unit("ns").asi8), index=times)


def test_replay_is_causal_and_is_the_jobs_assessment_at_each_time() -> None:
    site = load_site(EXAMPLE_SITE)
    plant = Plant(site, seed=7, epoch_ns=int(EPOCH.value))
    spec = next(s for s in series_specs(site) if (s.asset, s.tag) == ("P-102", "vibration_rms"))
    values = _plant_series(plant, "P-102", "vibration_rms")
    start, end = EPOCH - pd.Timedelta(days=2), EPOCH + pd.Timedelta(days=1)
    replayed = replay(values, spec, start=start, end=end, every="24h")
    assert list(replayed.index) == list(pd.date_range(start, end, freq="24h"))
    for t, row in replayed.iterrows():
        # Only what was stamped before t, from the 14 days before it: later data changes nothing.
        before = values[(values.index >= t - pd.Timedelta(days=14)) & (values.index < t)]
        alone = assess_series(before, spec, end=t)
        assert (row["flag"], row["p_cross"], row["hours_to_alarm"]) == (alone.flag.name, alone.p_cross,
                                                                        alone.hours_to_alarm)
    truncated = replay(values[values.index < end], spec, start=start, end=end, every="24h")
    pd.testing.assert_frame_equal(replayed, truncated)


def test_the_injected_fault_is_caught_ahead_and_the_healthy_pump_raises_no_flag() -> None:
    site = load_site(EXAMPLE_SITE)
    plant = Plant(site, seed=7, epoch_ns=int(EPOCH.value))
    fault = plant.fault("P-102", "vibration_rms")
    assert fault is not None
    specs = {(s.asset, s.tag): s for s in series_specs(site)}
    frames = []
    for key in (("P-102", "vibration_rms"), ("P-101", "vibration_rms")):
        replayed = replay(_plant_series(plant, *key), specs[key], start=EPOCH - pd.Timedelta(days=3),
                          end=EPOCH + pd.Timedelta(days=5), every="24h")
        frames.append(replayed.reset_index().assign(asset=key[0], tag=key[1]))
    events = pd.DataFrame({"time": [pd.Timestamp(fault.crossing_ns, tz="UTC")], "asset": ["P-102"], "tag": [""]})
    result = score(pd.concat(frames), events)
    caught = result.events.iloc[0]
    assert caught["status"] == "caught" and caught["lead_hours"] >= 24
    assert result.false_flags.empty
    assert result.summary["caught"] == 1 and result.summary["false_flags"] == 0
    assert str(result).startswith("1 of 1 events caught at DEGRADING or worse, lead time median")


def _frame(levels: list[int], asset: str = "A", tag: str = "t") -> pd.DataFrame:
    times = pd.date_range("2026-01-01", periods=len(levels), freq="12h", tz="UTC")
    return pd.DataFrame({"time": times, "asset": asset, "tag": tag, "flag_level": levels,
                         "flag": [Flag(x).name for x in levels]})


def test_scoring_lead_times_misses_open_events_and_false_flags() -> None:
    # 2026-01-01 00:00 .. 01-10 12:00, every 12 h. A: flagged from 01-03 12:00 (index 5) to 01-05;
    # again 01-09 (16-17) with nothing after it: a false flag. B: never flagged.
    a = _frame([0, 0, 0, 0, 0, 2, 2, 3, 3, 0, 0, 0, 0, 0, 0, 0, 2, 2, 0, 0])
    b = _frame([0] * 20, asset="B")
    events = pd.DataFrame(
        {
            "time": pd.to_datetime(
                ["2026-01-05T06:00Z", "2026-01-06T00:00Z", "2026-01-12T00:00Z", "2026-03-01T00:00Z",
                 "2025-12-31T00:00Z"]
            ),
            "asset": ["A", "B", "B", "A", "B"],
            "tag": ["t", "", "", "", ""],
        }
    )
    result = score(pd.concat([a, b]), events, window_hours=72)
    by_time = result.events.set_index("time")["status"]
    assert by_time.tolist() == ["caught", "missed", "open", "outside", "outside"]
    lead = result.events[result.events["status"] == "caught"]["lead_hours"].item()
    assert lead == pytest.approx(42.0)  # 01-05 06:00 minus the first flag in the 72 h before it (01-03 12:00)
    assert result.false_flags[["asset", "start", "peak_flag"]].values.tolist() == [
        ["A", pd.Timestamp("2026-01-09T00:00Z"), "DEGRADING"]
    ]
    assert result.summary == {
        "events": 5, "caught": 1, "missed": 1, "open": 1, "outside": 2, "false_flags": 1,
        "lead_hours_median": 42.0, "lead_hours_min": 42.0,
    }
    # WATCH counts when asked for: the same replay at a lower bar
    assert score(pd.concat([a, b]), events, min_flag=Flag.WATCH, window_hours=72).summary["caught"] == 1


def test_read_events_parses_times_in_a_time_zone_and_says_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "work-orders.csv"
    path.write_text("when,asset,note\n2026-01-05 07:00,P-102,bearing replaced\n2026-01-02T00:00Z,E-201,\n")
    events = read_events(path, time_col="when", tz="Europe/Oslo")
    assert events["time"].tolist() == [pd.Timestamp("2026-01-02T00:00Z"), pd.Timestamp("2026-01-05T06:00Z")]
    assert events["note"].tolist() == ["", "bearing replaced"]
    with pytest.raises(ValueError, match=r"no column 'time' \(columns: when, asset, note\)"):
        read_events(path)
    assert np.isnan(score(_frame([0, 0]), events).summary["lead_hours_median"])
    bad = tmp_path / "bad.csv"
    bad.write_text("time,asset\n2026-01-01,P-102\nyesterday-ish,P-102\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3: time 'yesterday-ish' is not a time"):
        read_events(bad)
