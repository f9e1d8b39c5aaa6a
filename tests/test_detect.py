"""`flowline detect`: causal row-by-row scoring of a CSV series."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from flowline.analytics.detect import DetectorSettings, score_series
from flowline.analytics.synthetic import HIGH, make_series
from flowline.core.cli import main

SETTINGS = DetectorSettings(alarm_high=HIGH)


def test_causal_later_rows_do_not_change_earlier_scores() -> None:
    s = make_series("degrading", seed=1)
    base = score_series(s.index, s.to_numpy(), SETTINGS)
    altered = s.to_numpy().copy()
    cut = 1200
    altered[cut:] = np.random.default_rng(5).normal(500, 100, len(altered) - cut)  # wild future
    times = s.index[: cut + 1].append(s.index[cut + 1 :] + pd.Timedelta(hours=3))  # irregular future times
    changed = score_series(times, altered, SETTINGS)
    pd.testing.assert_frame_equal(base.iloc[:cut].reset_index(drop=True), changed.iloc[:cut].reset_index(drop=True))
    assert not base.iloc[cut:].reset_index(drop=True).equals(changed.iloc[cut:].reset_index(drop=True))


@pytest.mark.parametrize("seed", range(3))
def test_healthy_and_daily_never_degrading(seed: int) -> None:
    for kind in ("healthy", "daily"):
        s = make_series(kind, seed=seed)
        out = score_series(s.index, s.to_numpy(), SETTINGS)
        assert (out["flag_level"] < 2).all(), kind
        assert out["score"].between(0, 1).all()


@pytest.mark.parametrize("seed", range(3))
def test_degrading_flagged_before_crossing(seed: int) -> None:
    # Drift reaches the limit 24 h after the last row: the last day must already be DEGRADING+.
    s = make_series("degrading", seed=seed, cross_in_hours=24, onset_days_before_end=4)
    out = score_series(s.index, s.to_numpy(), SETTINGS)
    assert (out["flag_level"].iloc[-36:] >= 2).all()
    assert out["hours_to_alarm"].iloc[-1] < 72
    assert out["score"].iloc[-1] > out["score"].iloc[:500].max()


def test_gaps_and_nan_rows() -> None:
    s = make_series("healthy", seed=2)
    v = s.to_numpy().copy()
    v[100:130] = np.nan
    out = score_series(s.index, v, SETTINGS)
    assert np.isfinite(out["score"]).all() and (out["flag_level"] < 2).all()


def _csv(tmp_path: Path, n: int = 2016) -> Path:
    s = make_series("degrading", seed=0, cross_in_hours=30)[-n:]
    path = tmp_path / "export.csv"
    pd.DataFrame({"ts": s.index.strftime("%Y-%m-%dT%H:%M:%SZ"), "vib": s.to_numpy()}).to_csv(path, index=False)
    return path


def test_cli_scores_csv(tmp_path: Path) -> None:
    out = tmp_path / "scored.csv"
    result = CliRunner().invoke(
        main, ["detect", "--csv", str(_csv(tmp_path)), "--time-col", "ts", "--value-col", "vib",
               "--alarm-high", str(HIGH), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    scored = pd.read_csv(out)
    assert list(scored.columns[:2]) == ["ts", "vib"] and len(scored) == 2016
    assert set(scored["flag"]) <= {"OK", "WATCH", "DEGRADING", "CRITICAL"}
    assert scored["score"].between(0, 1).all()
    assert scored["flag"].iloc[-1] in ("DEGRADING", "CRITICAL")
    assert "2016 rows scored" in result.output


def test_cli_watch_level_is_the_users_to_choose(tmp_path: Path) -> None:
    rows = [(f"2026-03-0{1 + m // 1440}T{m // 60 % 24:02d}:{m % 60:02d}:00Z", f"{10 + 0.1 * math.sin(m):.4f}")
            for m in range(2000)]
    rows[1500] = (rows[1500][0], "14.0")  # one wild reading in a calm series
    path = _write(tmp_path / "x.csv", rows)
    flags = {}
    for level in ("8", "1e6"):
        out = tmp_path / f"scored-{level}.csv"
        result = CliRunner().invoke(main, ["detect", "--csv", str(path), "--time-col", "ts", "--value-col", "vib",
                                           "--watch-surprise", level, "--out", str(out)])
        assert result.exit_code == 0, result.output
        flags[level] = pd.read_csv(out)["flag"].iloc[1500]
    assert flags == {"8": "WATCH", "1e6": "OK"}


def test_cli_bad_column_and_bad_time(tmp_path: Path) -> None:
    path = _csv(tmp_path, 50)
    result = CliRunner().invoke(main, ["detect", "--csv", str(path), "--time-col", "time", "--value-col", "vib"])
    assert result.exit_code != 0 and "no column 'time'" in result.output
    lines = path.read_text().splitlines()
    lines[5] = "not-a-time,1.0"
    path.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(main, ["detect", "--csv", str(path), "--time-col", "ts", "--value-col", "vib"])
    assert result.exit_code != 0 and "line 6" in result.output and "not-a-time" in result.output


def _write(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("ts,vib\n" + "".join(f"{t},{v}\n" for t, v in rows))
    return path


def test_out_of_order_and_repeated_times_refused_with_the_reason(tmp_path: Path) -> None:
    rows = [(f"2026-03-01T00:{m:02d}:00Z", "1.0") for m in range(10)]
    rows.insert(5, ("2026-03-01T00:02:00Z", "9.0"))  # merged file: back in time
    path = _write(tmp_path / "x.csv", rows)
    result = CliRunner().invoke(main, ["detect", "--csv", str(path), "--time-col", "ts", "--value-col", "vib"])
    assert result.exit_code != 0
    assert "line 7: time goes back to '2026-03-01T00:02:00Z'" in result.output
    assert "--fix-time-order" in result.output and "Traceback" not in result.output


def test_fix_time_order_sorts_dedupes_and_reports(tmp_path: Path) -> None:
    rows = [(f"2026-03-01T00:{m:02d}:00Z", str(float(m))) for m in range(20)]
    rows.insert(5, ("2026-03-01T00:02:00Z", "99.0"))  # repeat of minute 2, later in the file: kept
    rows.insert(12, ("2026-03-01T00:03:00Z", "98.0"))  # another repeat, of minute 3
    rows.append(("2026-03-01T00:07:30Z", "7.5"))  # out of order, new time
    path = _write(tmp_path / "x.csv", rows)
    out = tmp_path / "scored.csv"
    result = CliRunner().invoke(main, ["detect", "--csv", str(path), "--time-col", "ts", "--value-col", "vib",
                                       "--fix-time-order", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "sorted 3 out-of-order row(s), dropped 2 row(s) with a repeated timestamp" in result.output
    scored = pd.read_csv(out)
    assert len(scored) == 21 and pd.to_datetime(scored["ts"]).is_monotonic_increasing
    assert scored["vib"].iloc[2] == 99.0 and scored["vib"].iloc[3] == 98.0 and scored["vib"].iloc[8] == 7.5


def test_non_numeric_and_empty_values_counted(tmp_path: Path) -> None:
    rows = [(f"2026-03-01T00:{m:02d}:00Z", "1.0") for m in range(10)]
    rows[3] = (rows[3][0], "Bad")
    rows[6] = (rows[6][0], "#N/A")
    rows[8] = (rows[8][0], "")
    path = _write(tmp_path / "x.csv", rows)
    result = CliRunner().invoke(main, ["detect", "--csv", str(path), "--time-col", "ts", "--value-col", "vib",
                                       "--out", str(tmp_path / "o.csv")])
    assert result.exit_code == 0, result.output
    assert "2 non-numeric value(s) scored as missing (first at line 5: 'Bad')" in result.output
    assert "1 empty value(s) scored as missing" in result.output


def test_detect_help_is_fast() -> None:
    import subprocess
    import sys

    # The cause of a slow --help is a heavy import at module level: check that none happens.
    code = (
        "import sys, time; t = time.perf_counter(); from flowline.core.cli import main\n"
        "try: main(['detect', '--help'])\nexcept SystemExit: pass\n"
        "heavy = [m for m in ('pandas', 'scipy', 'statsmodels', 'rich') if m in sys.modules]\n"
        "print('HEAVY', heavy, time.perf_counter() - t)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--fix-time-order" in done.stdout
    heavy_line = done.stdout.strip().splitlines()[-1]
    assert heavy_line.startswith("HEAVY []"), heavy_line
    assert float(heavy_line.split()[-1]) < 1.0, heavy_line  # about 0.1 s on an idle machine


def test_surprise_alerts_once_per_episode_and_rarely_on_noise() -> None:
    rng = np.random.default_rng(3)
    n = 4 * 7 * 288  # four weeks of 5-minute rows
    times = pd.date_range("2026-01-01", periods=n, freq="5min", tz="UTC")
    noise = rng.normal(10.0, 1.0, n)
    settings = DetectorSettings(season_hours=0)
    quiet = score_series(times, noise, settings)
    # Gaussian noise: the nominal rate at the default level is far below one per week, and so is the real one.
    assert (quiet["alert"] >= settings.watch_surprise).sum() == 0
    assert (quiet["flag"] == "WATCH").sum() == 0
    shifted = noise.copy()
    shifted[n // 2 :] += 12.0  # a level shift: surprising for many rows, alerted at its start
    out = score_series(times, shifted, settings)
    assert (out["surprise"].iloc[n // 2 : n // 2 + 6] >= settings.watch_surprise).sum() >= 4
    alerts = np.nonzero(out["alert"].to_numpy() >= settings.watch_surprise)[0]
    # Once: the surprise grows for a few rows while the recent mean catches up, but never to
    # realert_factor times the episode's peak so far; then silence for the rest of the two weeks.
    assert list(alerts) == [n // 2], alerts
    assert out["false_alerts_per_week"].iloc[n // 2] < 1e-6
    assert out["flag"].iloc[n // 2] == "WATCH"


def test_small_shift_found_by_the_recent_mean_not_by_any_single_row() -> None:
    rng = np.random.default_rng(5)
    n = 2 * 7 * 288  # two weeks of 5-minute rows
    times = pd.date_range("2026-01-01", periods=n, freq="5min", tz="UTC")
    values = rng.normal(10.0, 1.0, n)
    values[n // 2 :] += 3.0  # three noise units: no single row is a 1-in-10^10 event
    settings = DetectorSettings(season_hours=0)
    one_step = score_series(times, values, replace(settings, shift_span=0))
    assert one_step["surprise"].max() < settings.watch_surprise
    out = score_series(times, values, settings)
    alerts = np.nonzero(out["alert"].to_numpy() >= settings.watch_surprise)[0]
    assert len(alerts) >= 1 and n // 2 <= alerts[0] <= n // 2 + 12, alerts  # within an hour of the step
    assert out["flag"].iloc[alerts[0]] == "WATCH"


def test_a_burst_the_tag_showed_within_days_stays_below_watch_a_new_one_alerts() -> None:
    rng = np.random.default_rng(7)
    n = 8 * 144  # eight days of 10-minute rows
    times = pd.date_range("2026-01-01", periods=n, freq="10min", tz="UTC")
    values = rng.normal(10.0, 1.0, n)
    first, again, larger, bigger = 288, 288 + 216, 288 + 432, 288 + 648  # 36 h apart: each after a quiet day
    for row, peak in ((first, 22.0), (again, 21.0), (larger, 23.0), (bigger, 36.0)):
        values[row - 7 : row] = 10.0  # the same quiet run-up before each burst
        values[row] = peak
    settings = DetectorSettings(season_hours=0)
    out = score_series(times, values, settings)
    alert = out["alert"].to_numpy()
    # The first burst (about 1 in 10^140 for Gaussian noise) is new. 36 h later a smaller one is within
    # the range of the last four days, and a slightly larger one repeats the pattern (a quiet run-up,
    # then a deviation in the same octave of the noise scale): both shown a decade below WATCH.
    assert alert[first] > 25 and out["flag"].iloc[first] == "WATCH"
    for row in (again, larger):
        assert out["surprise"].iloc[row] == settings.watch_surprise - 1 and out["flag"].iloc[row] == "OK"
    assert alert[bigger] > alert[first]  # a higher octave: a new range and a new pattern
    assert list(np.nonzero(alert[first:] >= settings.watch_surprise)[0] + first) == [first, bigger]
    without = score_series(times, values, replace(settings, novelty_days=0))
    assert without["alert"].iloc[again] > 25  # without novelty, each repeat looks as new as the first
    assert without["alert"].iloc[larger] > 25


def test_one_alert_per_episode_and_a_separate_event_within_the_day_still_alerts() -> None:
    rng = np.random.default_rng(11)
    n = 6 * 144  # six days of 10-minute rows
    times = pd.date_range("2026-01-01", periods=n, freq="10min", tz="UTC")
    values = rng.normal(10.0, 1.0, n)
    spike, aftershock, dip = 4 * 144, 4 * 144 + 2, 4 * 144 + 36  # the dip comes 6 h after the spike
    values[spike] += 22.0
    values[aftershock] += 25.0  # 20 minutes later, a thousand times less likely still: the same episode
    values[dip] -= 28.0  # a separate event, less surprising than the aftershock
    settings = DetectorSettings(season_hours=0)
    out = score_series(times, values, settings)
    surprise = out["surprise"].to_numpy()
    assert surprise[aftershock] > surprise[spike] + settings.realert_margin, surprise[[spike, aftershock]]
    other_episode_bar = surprise[aftershock] / settings.realert_factor + settings.realert_margin
    assert surprise[aftershock] > surprise[dip] > other_episode_bar
    alerts = np.nonzero(out["alert"].to_numpy() >= settings.watch_surprise)[0]
    assert list(alerts) == [spike, dip], alerts
    assert out["flag"].iloc[dip] == "WATCH" and out["flag"].iloc[aftershock] == "OK"
    # With one reference for the whole day (realert_factor 1) the aftershock re-alerts and the dip is lost.
    day_max = score_series(times, values, replace(settings, realert_factor=1.0))
    assert list(np.nonzero(day_max["alert"].to_numpy() >= settings.watch_surprise)[0]) == [spike, aftershock]


def test_an_oscillation_starting_at_the_same_level_alerts_by_its_count_of_large_steps() -> None:
    rng = np.random.default_rng(2)
    n = 2 * 7 * 288  # two weeks of 5-minute rows
    times = pd.date_range("2026-01-01", periods=n, freq="5min", tz="UTC")
    values = rng.normal(10.0, 1.0, n)
    start = n // 2
    # Up and down by 2.5 noise units every row: the level stays, no row reaches the WATCH level and
    # the 8-row mean averages the swing away, but every step is about 3.5 noise units of steps.
    values[start:] += 2.5 * np.where(np.arange(n - start) % 2 == 0, 1.0, -1.0)
    settings = DetectorSettings(season_hours=0)
    level_only = score_series(times, values, replace(settings, burst_rows=0, amplitude_span=0))
    assert level_only["surprise"].iloc[start : start + 288].max() < settings.watch_surprise
    for counted in (replace(settings, amplitude_span=0), settings):  # the count alone, and all looks
        out = score_series(times, values, counted)
        alerts = np.nonzero(out["alert"].to_numpy() >= settings.watch_surprise)[0]
        # Stationary noise before it: no alert; then one within 2 hours (a handful of large steps
        # among 48), and not again while the spell that raised it is still being counted.
        assert len(alerts) >= 1 and start <= alerts[0] <= start + 24, alerts
        assert out["flag"].iloc[alerts[0]] == "WATCH"
        assert not ((alerts > alerts[0]) & (alerts <= alerts[0] + settings.burst_rows)).any(), alerts


def test_the_noise_amplitude_falling_at_the_same_level_alerts() -> None:
    rng = np.random.default_rng(4)
    n = 2 * 7 * 288  # two weeks of 5-minute rows
    times = pd.date_range("2026-01-01", periods=n, freq="5min", tz="UTC")
    start = n // 2
    noise = rng.normal(0.0, 1.0, n)
    noise[start:] *= 0.25  # the same level, a quarter of the noise: no row and no mean stands out
    values = 10.0 + noise
    settings = DetectorSettings(season_hours=0)
    without = score_series(times, values, replace(settings, amplitude_span=0))
    assert (without["alert"] >= settings.watch_surprise).sum() == 0
    out = score_series(times, values, settings)
    alerts = np.nonzero(out["alert"].to_numpy() >= settings.watch_surprise)[0]
    # Stationary noise for a week: no alert; then one within 8 hours, as the day-long mean step
    # falls by more than the tag's own wander (about 5 hours here).
    assert len(alerts) >= 1 and start < alerts[0] <= start + 96, alerts
    assert out["flag"].iloc[alerts[0]] == "WATCH"


def test_a_burst_while_the_level_forms_does_not_make_a_later_one_familiar() -> None:
    n = 6 * 144  # six days of 10-minute rows
    times = pd.date_range("2026-01-01", periods=n, freq="10min", tz="UTC")
    settings = DetectorSettings(season_hours=0)
    alerted, out = {}, {}
    for first in (3, 60):  # within the first surprise_span (50) rows, and after them
        values = np.random.default_rng(9).normal(10.0, 1.0, n)
        values[first] += 22.0
        values[first + 432] += 21.0  # three days later, a burst of the same size
        out[first] = score_series(times, values, settings)
        alerted[first] = list(np.nonzero(out[first]["alert"].to_numpy() >= settings.watch_surprise)[0])
    # The fourth row gets no verdict (too few rows for a noise scale), and its deviation from a level
    # that is still its first value teaches no familiarity: the burst three days later alerts.
    assert out[3]["surprise"].iloc[3] == 0.0
    assert alerted[3] == [435], alerted
    assert out[3]["surprise"].iloc[435] > 50
    # Once the level has formed, the same burst is familiar for four days: a decade below WATCH.
    assert alerted[60] == [60], alerted
    assert out[60]["surprise"].iloc[60] > 50
    assert out[60]["surprise"].iloc[492] == settings.watch_surprise - 1


def test_an_alert_needs_the_recent_mean_to_back_the_rows_direction() -> None:
    n = 6 * 144  # six days of 10-minute rows
    times = pd.date_range("2026-01-01", periods=n, freq="10min", tz="UTC")
    values = np.random.default_rng(13).normal(10.0, 1.0, n)
    against, late, backed = 288, 504, 720  # 36 h apart, each larger than the one before (all new)
    values[against - 7 : against] = 6.5  # the spike comes straight out of a dip ...
    values[against] = 17.0
    values[against + 1] = 9.0  # ... and the next row is back below the level: the recent mean never follows
    values[late - 7 : late] = 5.5
    values[late] = 19.5
    values[late + 1] = 11.5  # the next row stays up: the recent mean follows one row later
    values[backed] = 34.0  # out of ordinary noise: the recent mean backs it at once
    # The deviation looks alone: the count of large steps would report each spike by itself (two
    # steps of ten noise units), and a behaviour look's alert needs no backing.
    settings = DetectorSettings(season_hours=0, burst_rows=0, amplitude_span=0)
    out = score_series(times, values, settings)
    surprise = out["surprise"].to_numpy()
    assert min(surprise[[against, late, backed]]) > settings.watch_surprise  # each one new and improbable
    alerts = np.nonzero(out["alert"].to_numpy() >= settings.watch_surprise)[0]
    assert list(alerts) == [late + 1, backed], alerts
    assert out["alert"].iloc[late + 1] == surprise[late]  # reported one row late, with its own surprise
    assert out["flag"].iloc[against] == "OK" and out["flag"].iloc[late + 1] == "WATCH"
    unchecked = score_series(times, values, replace(settings, confirm_z=0))
    assert list(np.nonzero(unchecked["alert"].to_numpy() >= settings.watch_surprise)[0]) == [against, late, backed]


@pytest.mark.parametrize("length", [1, 3, 8, 12])
def test_pattern_seen_matches_a_plain_search(length: int) -> None:
    from flowline.analytics.detect import _pattern_seen

    rng = np.random.default_rng(length)
    n = 600
    octave = rng.integers(-3, 4, n) * (rng.random(n) < 0.4)
    octave[[50, 51]] = [40, -40]  # beyond the packed range: clipped, still equal to themselves
    seen_from = np.maximum(np.arange(n) - rng.integers(1, 200, n), 0)
    padded = [0] * (length - 1) + [int(o) for o in octave]
    windows = [tuple(padded[i : i + length]) for i in range(n)]
    expected = [any(windows[j] == windows[i] for j in range(seen_from[i], i)) for i in range(n)]
    assert list(_pattern_seen(octave, length, seen_from)) == expected
