"""`flowline detect`: causal row-by-row scoring of a CSV series."""

from __future__ import annotations

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


def test_cli_bad_column_and_bad_time(tmp_path: Path) -> None:
    path = _csv(tmp_path, 50)
    result = CliRunner().invoke(main, ["detect", "--csv", str(path), "--time-col", "time", "--value-col", "vib"])
    assert result.exit_code != 0 and "no column 'time'" in result.output
    lines = path.read_text().splitlines()
    lines[5] = "not-a-time,1.0"
    path.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(main, ["detect", "--csv", str(path), "--time-col", "ts", "--value-col", "vib"])
    assert result.exit_code != 0 and "line 6" in result.output and "not-a-time" in result.output
