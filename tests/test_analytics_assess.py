"""Pure logic of the assessment and the flag rules, on synthetic series with known truth."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from flowline.analytics.api import assess, plot_assessment, report_figure, write_report_png
from flowline.analytics.assess import Assessment, SeriesSpec, assess_series, regularise
from flowline.analytics.job import assess_many, event_point, health_point
from flowline.analytics.rules import AssessmentRules, Flag, decide_flag, health_score
from flowline.analytics.synthetic import HIGH, LEVEL, Kind, make_series
from flowline.inventory import load_site
from tests.conftest import EXAMPLE_SITE

SPEC = SeriesSpec("s", "P-1", "vib", high=HIGH, consequence_weight=3.0, criticality="A")
END = pd.Timestamp("2026-01-15T00:00:00Z")


@pytest.mark.parametrize("kind", ["healthy", "daily"])
@pytest.mark.parametrize("seed", range(8))
def test_no_false_flags_on_healthy_noisy_and_daily_cycle(kind: Kind, seed: int) -> None:
    a = assess_series(make_series(kind, seed=seed), SPEC)
    assert a.result == "ok"
    assert a.flag == Flag.OK, a
    assert a.hours_to_alarm is None and a.p_cross < 0.01 and a.health_score > 90


def test_daily_cycle_near_a_limit_is_not_degrading() -> None:
    # Peaks of a daily cycle (54) 3 units under the limit: the seasonal model knows they are peaks.
    spec = SeriesSpec("s", "P-1", "vib", high=57.0)
    a = assess_series(make_series("daily", seed=3), spec, screen=False)
    assert a.flag <= Flag.WATCH and not (a.trend_significant and a.flag >= Flag.DEGRADING)
    assert a.model.startswith("stl+"), a.model


MODELS = {f"{prefix}{name}" for prefix in ("", "stl+") for name in ("holt", "damped", "log-holt")}


def _band_at(a: Assessment, hours_after_end: float) -> tuple[float, float, float]:
    assert a.forecast is not None
    row = a.forecast.iloc[round(hours_after_end) - 1]  # hourly steps, the first one hour after the end
    return float(row["lower"]), float(row["yhat"]), float(row["upper"])


@pytest.mark.parametrize("cross_in_hours", [30, 60, 100])
@pytest.mark.parametrize("seed", range(3))
def test_degrading_flagged_with_a_crossing_near_the_truth(cross_in_hours: float, seed: int) -> None:
    a = assess_series(make_series("degrading", seed=seed, cross_in_hours=cross_in_hours), SPEC)
    assert a.flag >= Flag.DEGRADING, a
    assert a.trend_significant and a.trend_per_day > 0
    # The reported time is the 10 % quantile of the crossing time: early rather than late, and the
    # further the crossing, the earlier (the trend's spread grows with the horizon).
    assert a.hours_to_alarm is not None and 0.5 * cross_in_hours <= a.hours_to_alarm <= 1.1 * cross_in_hours + 3, a
    lower, _, upper = _band_at(a, cross_in_hours)
    assert lower <= HIGH <= upper, (lower, upper)  # the interval holds the truth at the true crossing
    assert a.risk == pytest.approx(a.p_cross * 3.0, abs=1e-5)
    assert a.model in MODELS


@pytest.mark.parametrize("seed", range(3))
def test_degrading_under_a_daily_cycle_forecasts_the_trend_not_the_cycle(seed: int) -> None:
    # A drift on top of a daily cycle: a trend model fed the raw cycle chases its last swing (down
    # as often as up) with intervals wider than the whole range; deseasonalised, it sees the drift.
    cycle = make_series("daily", seed=seed) - make_series("healthy", seed=seed)
    a = assess_series(make_series("degrading", seed=seed, cross_in_hours=60) + cycle, SPEC)
    assert a.model.startswith("stl+"), a.model
    # The truth: the first hour at which the noise-free drift plus the cycle's peak reaches HIGH.
    hours = np.arange(1, 100)
    expected = LEVEL + (HIGH - LEVEL) * (hours + 120) / 180 + 4.0 * np.sin(2 * np.pi * hours / 24)
    truth = int(hours[np.argmax(expected >= HIGH)])
    assert a.flag >= Flag.DEGRADING and a.hours_to_alarm is not None
    # Early rather than late: the 10 % quantile of the crossing time may be the cycle's peak before.
    assert truth - 24 <= a.hours_to_alarm <= truth + 6, (a.hours_to_alarm, truth)
    # The interval holds the true value at that hour (the cycle's rise takes it 0.4 past HIGH there).
    lower, _, upper = _band_at(a, truth)
    assert lower <= expected[truth - 1] <= upper and upper - lower < 0.75 * (HIGH - LEVEL)


def _accelerating(seed: int, cross_in_hours: float, growth: float = 2.0) -> pd.Series:
    """Healthy noise plus an exponential rise (bearing wear) from 5 days before END to HIGH at the crossing."""
    healthy = make_series("healthy", seed=seed)
    hours = np.asarray((healthy.index - END) / pd.Timedelta(1, "h"))
    u = np.clip((hours + 120.0) / (cross_in_hours + 120.0), 0.0, None)
    return healthy + (HIGH - LEVEL) * np.expm1(growth * u) / np.expm1(growth)


@pytest.mark.parametrize("seed", range(3))
def test_accelerating_rise_gets_a_growing_trend_and_a_crossing(seed: int) -> None:
    a = assess_series(_accelerating(seed, cross_in_hours=30), SPEC)
    assert a.flag >= Flag.DEGRADING and a.model == "log-holt", a
    # A linear trend extrapolates acceleration too slowly and the log model alone still errs late; the
    # reported time, the early quantile of the crossing time, does not.
    assert a.hours_to_alarm is not None and 15 <= a.hours_to_alarm <= 30, a
    assert a.forecast is not None and a.forecast["yhat"].diff().iloc[1:].is_monotonic_increasing


def test_damped_model_is_not_a_flat_forecast() -> None:
    # The failure this guards: a damped trend with phi near 0 winning on one-step error and
    # forecasting the last value for a week, with no crossing.
    a = assess_series(make_series("degrading", seed=5, cross_in_hours=80), SPEC, screen=False)
    assert a.forecast is not None
    yhat = a.forecast["yhat"].to_numpy()
    assert yhat[-1] - yhat[0] > 0.5 * (HIGH - yhat[0]), a.model


def test_distant_crossing_is_at_least_watch() -> None:
    a = assess_series(make_series("degrading", seed=0, cross_in_hours=150), SPEC)
    assert a.flag >= Flag.WATCH and a.trend_significant


def test_beyond_limit_is_critical() -> None:
    s = make_series("degrading", seed=1, cross_in_hours=-10)
    a = assess_series(s, SPEC)
    assert a.flag == Flag.CRITICAL and a.hours_to_alarm == 0.0


def test_low_limit_side() -> None:
    s = 100.0 - make_series("degrading", seed=2, cross_in_hours=60)  # falls toward 30
    a = assess_series(s, SeriesSpec("s", "P-1", "suction", low=30.0))
    assert a.flag >= Flag.DEGRADING and a.alarm_limit == 30.0 and a.trend_per_day < 0


def test_gappy_series_is_filled_and_assessed() -> None:
    s = make_series("degrading", seed=4, cross_in_hours=80)
    keep = np.ones(len(s), dtype=bool)
    keep[200:500] = False  # a 2-day outage
    keep[np.random.default_rng(0).random(len(s)) < 0.3] = False  # and 30% random loss
    a = assess_series(s[keep], SPEC)
    assert a.result == "ok" and a.flag >= Flag.DEGRADING


def test_too_gappy_too_short_stale_and_empty_are_reported_not_raised() -> None:
    s = make_series("healthy")
    assert "too short" in assess_series(s.iloc[-100:], SPEC).reason
    sparse = s.iloc[::30]  # one value every 5 h: most hourly steps empty
    assert "too many gaps" in assess_series(sparse, SPEC).reason
    stale = assess_series(s.iloc[:-100], SPEC, end=END)
    assert stale.result == "skipped" and "no data in the last" in stale.reason
    empty = assess_series(pd.Series([], dtype=float, index=pd.DatetimeIndex([], tz="UTC")), SPEC)
    assert empty.result == "failed"
    nan = assess_series(s * np.nan, SPEC, end=END)
    assert nan.result == "skipped"


def test_constant_series() -> None:
    a = assess_series(make_series("constant"), SPEC)
    assert (a.result, a.model, a.flag, a.health_score) == ("ok", "constant", Flag.OK, 100.0)
    stuck_high = assess_series(make_series("constant") + 30, SPEC)
    assert stuck_high.flag == Flag.CRITICAL


def test_no_limits_only_trend_and_anomaly() -> None:
    a = assess_series(make_series("degrading", seed=1), SeriesSpec("s", "P-1", "flow"))
    assert a.alarm_limit is None and a.p_cross == 0 and a.flag == Flag.OK and a.trend_significant


def test_regularise_bins_end_at_the_assessment_time() -> None:
    idx = pd.date_range("2026-01-01T00:05Z", periods=12, freq="10min")
    reg = regularise(pd.Series(np.arange(12.0), index=idx), "1h", pd.Timestamp("2026-01-01T02:00Z"))
    assert list(reg.index) == [pd.Timestamp("2026-01-01T00:00Z"), pd.Timestamp("2026-01-01T01:00Z")]
    assert list(reg) == [2.5, 8.5]


def test_deterministic_and_same_in_pool() -> None:
    kinds: list[Kind] = ["healthy", "degrading", "daily", "degrading"]
    items = [(SPEC, make_series(k, seed=i)) for i, k in enumerate(kinds)]
    rules = AssessmentRules()
    local = assess_many(items, rules, workers=1)
    pooled = assess_many(items, rules, workers=2)
    assert [health_point(a) for a in local] == [health_point(a) for a in pooled]


def test_rules_are_configurable_and_documented_order() -> None:
    strict = AssessmentRules(degrading_p=0.99, horizon_hours=48)
    a = assess_series(make_series("degrading", seed=0, cross_in_hours=100), SPEC, strict)
    assert a.flag == Flag.WATCH
    rules = AssessmentRules()

    def flag(p_cross: float = 0.0, hours_to_alarm: float | None = None, surprise: float = 0.0) -> Flag:
        return decide_flag(
            rules,
            beyond_limit=False,
            p_cross=p_cross,
            hours_to_alarm=hours_to_alarm,
            trend_toward_limit=False,
            surprise=surprise,
        )

    assert flag() is Flag.OK
    assert flag(surprise=7.99) is Flag.OK
    assert flag(surprise=8.0) is Flag.WATCH
    assert flag(p_cross=0.6) is Flag.WATCH  # no trend: not DEGRADING
    assert flag(p_cross=0.95, hours_to_alarm=10.0) is Flag.CRITICAL
    assert health_score(rules, 0.0, 0.0, None) == 100.0
    assert health_score(rules, 0.0, 4.0, None) == 85.0  # half-way to WATCH costs half of 30 %
    assert health_score(rules, 0.0, 25.0, None) == 70.0
    assert health_score(rules, 0.5, 0.0, 0.0) == 25.0


def test_events_raised_and_cleared() -> None:
    a = assess_series(make_series("degrading", seed=0), SPEC)
    raised = event_point(a, Flag.OK)
    assert raised is not None and raised.tags["kind"] == "flag_raised" and raised.fields["previous_flag"] == "OK"
    assert event_point(a, a.flag) is None
    healthy = assess_series(make_series("healthy", seed=0), SPEC)
    cleared = event_point(healthy, Flag.DEGRADING)
    assert cleared is not None and cleared.tags["kind"] == "flag_cleared"


def test_api_assess_uses_good_quality_and_plots(tmp_path: Path) -> None:
    s = make_series("degrading", seed=2)
    frame = pd.DataFrame({"value": s, "quality": 0})
    frame.iloc[::50, 0] = 1e9
    frame.iloc[::50, 1] = 2  # bad values are stored, and must be ignored
    a = assess(frame, SPEC)
    assert a.flag >= Flag.DEGRADING and a.history is not None and a.history.max() < 1e3
    fig = plot_assessment(a)
    assert fig.axes[0].get_title().startswith("P-1 (criticality A) vib: ")
    out = tmp_path / "report.png"
    assert write_report_png([a, assess_series(make_series("healthy"), SPEC)], out) == 1
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert write_report_png([], tmp_path / "empty.png") == 0


def _texts(fig: Any) -> list[str]:
    texts = [t.get_text() for t in fig.findobj(lambda o: hasattr(o, "get_text"))]
    return [t for t in texts if t]


def test_report_names_site_time_asset_criticality_units_and_the_now_line() -> None:
    site = load_site(EXAMPLE_SITE)
    spec = SeriesSpec("north-field", "P-102", "vibration_rms", high=HIGH, criticality="A", unit="mm/s")
    a = assess_series(make_series("degrading", seed=2), spec)
    assert a.flag >= Flag.DEGRADING
    fig, plotted = report_figure([a], site=site)
    texts = _texts(fig)
    assert plotted == 1
    assert f"Flowline reliability report: north-field, assessed {a.assessed_at:%Y-%m-%d %H:%M} UTC" in texts
    assert any(t.startswith("P-102 Crude export pump B (criticality A) vibration_rms: ") for t in texts)
    assert f"alarm limit {HIGH:g} mm/s" in texts and "now" in texts
    assert f"now (assessed {a.assessed_at:%Y-%m-%d %H:%M} UTC)" in texts


def test_report_says_when_analysis_was_skipped_or_nothing_is_flagged() -> None:
    site = load_site(EXAMPLE_SITE)
    fig, plotted = report_figure([], site=site, skipped_reason="analysis skipped: InfluxDB at x is unreachable")
    assert plotted == 0
    texts = _texts(fig)
    assert "Analysis skipped: no tag was assessed" in texts
    assert any("InfluxDB at x is unreachable" in t for t in texts)
    short = SeriesSpec("north-field", "P-101", "vibration_rms", high=4.5, criticality="A", unit="mm/s")
    skipped = assess_series(make_series("healthy")[:5], short)
    assert skipped.result != "ok"
    texts = _texts(report_figure([skipped], site=site)[0])
    assert "Analysis skipped: no tag was assessed" in texts
    assert "north-field/P-101/vibration_rms: failed: too short: 1 h of history, need 48 h" in texts
    healthy = assess_series(make_series("healthy"), SPEC)
    texts = _texts(report_figure([healthy], site=site)[0])
    assert "No asset at DEGRADING or worse" in texts and "1 tags assessed, all below DEGRADING" in texts


def test_analyze_writes_a_skipped_report_when_influxdb_is_unreachable(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from flowline.analytics.cli import analyze
    from flowline.lab.services import free_port

    config = tmp_path / "flowline.yaml"
    config.write_text(
        f"site_file: {EXAMPLE_SITE}\ndata_dir: {tmp_path}\n"
        f"historian: {{url: 'http://127.0.0.1:{free_port()}', database: flowline, timeout_s: 2}}\n"
    )
    report = tmp_path / "report.png"
    result = CliRunner().invoke(analyze, ["--config", str(config), "--once", "--report", str(report)])
    assert result.exit_code == 1 and "unreachable" in result.output and "Traceback" not in result.output
    assert report.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_surprise_is_the_detectors_alert_in_the_latest_window() -> None:
    from flowline.analytics.detect import DetectorSettings, score_series

    healthy = make_series("healthy", seed=4)
    quiet = assess_series(healthy, SPEC)
    assert quiet.surprise < DetectorSettings().watch_surprise
    spiked = healthy.copy()
    spiked.iloc[-3] += 40 * float(healthy.diff().std())  # one wild reading two rows ago
    a = assess_series(spiked, SPEC)
    same = score_series(spiked.index, spiked.to_numpy(), DetectorSettings())["alert"].iloc[-3]
    assert a.surprise == pytest.approx(same, abs=1e-3) and a.surprise >= DetectorSettings().watch_surprise
    assert health_point(a).fields["surprise"] == a.surprise
    # The alert is what raises WATCH in the job, at the same level as `flowline detect`'s WATCH.
    assert quiet.flag is Flag.OK and a.flag is Flag.WATCH and a.health_score == 70.0
    calmer = assess_series(spiked, SPEC, AssessmentRules(watch_surprise=a.surprise + 1))
    assert calmer.flag is Flag.OK


def test_accelerating_wear_from_a_healthy_baseline_is_not_forecast_late() -> None:
    # Exponential wear rising from the healthy level (not from zero): the log scale under-states the
    # acceleration (log-holt alone says 144 h for seed 0); the reported time is no later than the truth.
    for seed in range(3):
        a = assess_series(_accelerating(seed, cross_in_hours=72, growth=2.0), SPEC)
        assert a.flag >= Flag.DEGRADING and a.hours_to_alarm is not None
        assert 36 <= a.hours_to_alarm <= 72, (seed, a.hours_to_alarm, a.model)


def test_accelerating_wear_not_yet_curved_is_not_forecast_late() -> None:
    # Earlier in the wear (120 h before the crossing), where its curvature is barely visible: the
    # trend models extrapolate it late; the exponential rise from the healthy level that its slope and
    # excess imply, and the early quantile of the crossing time, do not.
    for seed in range(2):
        a = assess_series(_accelerating(seed, cross_in_hours=120, growth=2.0), SPEC)
        assert a.flag >= Flag.WATCH and a.hours_to_alarm is not None
        assert 50 <= a.hours_to_alarm <= 120 * 1.1, (seed, a.hours_to_alarm, a.model)  # the target: <= 10 % late


def test_bursts_shorter_than_a_step_are_forecast_by_their_samples() -> None:
    from flowline.lab.sim.faults import bursts

    # An intermittent fault (the simulator's bursts: an hour or two, a third of the time) at the full
    # fault, half of it between them, rising linearly to HIGH (in a burst) 80 h after the end. Hourly
    # means average the bursts away and cross late; each step's highest sample does not, and the band
    # holds the burst level at the crossing.
    healthy = make_series("healthy", seed=1)
    hours = np.asarray((healthy.index - END) / pd.Timedelta(1, "h"))
    u = np.clip((hours + 120.0) / 200.0, 0.0, None)
    burst = bursts(healthy.index.as_unit("ns").asi8)
    a = assess_series(healthy + (HIGH - LEVEL) * u * np.where(burst, 1.0, 0.5), SPEC)
    assert a.flag >= Flag.DEGRADING and a.hours_to_alarm is not None
    assert 40 <= a.hours_to_alarm <= 80 * 1.1, (a.hours_to_alarm, a.model)
    lower, _, upper = _band_at(a, 80)
    assert lower <= HIGH <= upper, (lower, upper)


def test_onset_of_a_linear_drift_is_not_taken_for_exponential_growth() -> None:
    # Flat, then a straight-line rise that reaches HIGH in 300 h: curved at the kink, but no exponential
    # (which would cross within about 100 h); the quadratic over the last 3 days errs early, not wildly.
    healthy = make_series("healthy", seed=5)
    hours = np.asarray((healthy.index - END) / pd.Timedelta(1, "h"))
    drift = np.clip(hours + 60.0, 0.0, None) * (HIGH - LEVEL) / 360.0
    a = assess_series(healthy + drift, SPEC)
    assert a.hours_to_alarm is None or a.hours_to_alarm > 140, (a.hours_to_alarm, a.model)


def test_band_is_narrowed_to_the_backtest_errors_without_moving_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    # A straight drift: the trend model's own 95 % interval grows fast with the horizon and is far
    # wider than its backtest errors (1..48 h ahead) were. The band is scaled to those errors (the
    # bench then finds the stated rate); the flag, crossing probability and time to alarm keep the
    # widen-only spread, so they do not change.
    import flowline.analytics.assess as assess_module

    series = make_series("degrading", seed=0, cross_in_hours=60)
    a = assess_series(series, SPEC)
    monkeypatch.setattr(assess_module._Backtest, "ratio", lambda self, sd: 1.0)  # the model's own interval
    own = assess_series(series, SPEC)
    (lower, _, upper), (own_lower, _, own_upper) = _band_at(a, 60), _band_at(own, 60)
    assert lower <= HIGH <= upper, (lower, upper)
    assert upper - lower < 0.8 * (own_upper - own_lower), (upper - lower, own_upper - own_lower)
    assert (a.flag, a.p_cross, a.hours_to_alarm) == (own.flag, own.p_cross, own.hours_to_alarm)
