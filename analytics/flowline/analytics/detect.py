"""Causal row-by-row scoring of one series: what the live system would have said at each row.

Every estimate at row ``i`` is a recursive (exponentially weighted) filter over rows ``0..i``, run
with `scipy.signal.lfilter`, so it is vectorised and provably causal: changing a later row cannot
change an earlier score.

- Level and trend: Brown's double exponential smoothing with ``alpha = 2 / (span + 1)`` (equal to
  an exponentially weighted linear regression on the row number).
- Noise: exponentially weighted RMS of the one-step prediction errors, each scored against the
  noise known *before* that row. ``anomaly`` = two-sided normal probability of that z.
- Trend significance: ``t = trend / (sigma x C)``, where ``C`` is the exact standard error factor
  of the exponentially weighted regression slope for unit white noise.
- Hours to alarm: (limit - level) / trend rows, times the exponentially weighted row spacing.

Flags (the same vocabulary as the job): CRITICAL when the level is beyond the limit, or a
significant trend reaches it within ``critical_hours``; DEGRADING when a significant trend
reaches it within the horizon; WATCH within ``watch_horizons`` horizons, or on an anomalous row
(``anomaly >= anomaly_watch``); OK otherwise. Rows before ``warmup`` rows have no trend verdict.

``score`` in [0, 1]: 1 beyond the limit; ``exp(-hours_to_alarm / horizon)`` for a significant trend
toward the limit; at least ``0.5 x clip((anomaly - 0.99) / 0.01, 0, 1)``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.signal import lfilter
from scipy.special import erf

from flowline.analytics.rules import Flag

FLAG_NAMES = np.array([f.name for f in Flag])


@dataclass(frozen=True)
class DetectorSettings:
    span: float = 144.0  # rows; 144 = one day of 10-minute data
    horizon_hours: float = 168.0
    critical_hours: float = 48.0
    watch_horizons: float = 3.0
    trend_t: float = 4.0
    anomaly_watch: float = 0.9999
    warmup: int | None = None  # rows; default = span
    season_hours: float = 24.0  # 0 disables the causal daily-profile removal
    season_days: float = 3.0  # memory of the per-hour-of-day profile, in cycles
    alarm_high: float | None = None
    alarm_low: float | None = None


def _ewma(x: np.ndarray, alpha: float, first: float) -> np.ndarray:
    out, _ = lfilter([alpha], [1.0, alpha - 1.0], x, zi=np.array([(1.0 - alpha) * first]))
    return np.asarray(out, dtype=float)


def _slope_se_factor(alpha: float) -> float:
    """Standard error of the exponentially weighted LS slope for unit white noise (steady state)."""
    lam = 1.0 - alpha
    k = np.arange(int(50 / alpha) + 10, dtype=float)
    w = lam**k
    t = -k
    tbar = float((w * t).sum() / w.sum())
    d = t - tbar
    return math.sqrt(float((w**2 * d**2).sum())) / float((w * d**2).sum())


def _causal_profile(x: np.ndarray, t_ns: np.ndarray, settings: DetectorSettings, alpha: float) -> np.ndarray:
    """Per hour-of-cycle mean deviation from a slow level, from *earlier cycles only*; a daily cycle
    would otherwise read as alternating trends. Zero until a phase has been seen once."""
    slow = _ewma(x, alpha / 4, x[0])
    dev = x - slow
    period_h = settings.season_hours
    phase = np.floor((t_ns / 3.6e12) % period_h).astype(np.int64)
    gamma = 2.0 / (settings.season_days * 6 + 1.0)  # about 6 rows per phase per cycle at 10 minutes
    profile = np.zeros(len(x))
    # Running sum of every phase's latest value, so the profile can be centred (a drift raises all
    # phases alike and must stay in the level, not in the profile).
    table_delta = np.zeros(len(x))
    order = np.argsort(phase, kind="stable")
    bounds = np.searchsorted(phase[order], np.arange(math.ceil(period_h) + 1))
    for start, stop in itertools.pairwise(bounds):
        rows = order[start:stop]
        if len(rows) < 2:
            continue
        smoothed = _ewma(dev[rows], gamma, 0.0)
        profile[rows[1:]] = smoothed[:-1]
        table_delta[rows] = np.diff(smoothed, prepend=0.0)
    table_sum = np.cumsum(table_delta)
    mean_before = np.zeros(len(x))
    mean_before[1:] = table_sum[:-1] / math.ceil(period_h)
    return profile - mean_before


def score_series(times: pd.DatetimeIndex | np.ndarray, values: np.ndarray, settings: DetectorSettings) -> pd.DataFrame:
    """Score each row causally; returns level, trend_per_hour, sigma, anomaly, hours_to_alarm, score, flag."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        raise ValueError("no rows to score")
    finite = np.isfinite(x)
    if not finite.all():
        # Carry the last finite value forward (causal); a leading gap takes the first finite value.
        idx = np.where(finite, np.arange(n), 0)
        np.maximum.accumulate(idx, out=idx)
        first_finite = int(np.argmax(finite)) if finite.any() else 0
        idx[: first_finite] = first_finite
        x = x[idx] if finite.any() else np.zeros(n)
    t_ns = np.asarray(pd.DatetimeIndex(times).as_unit("ns").asi8, dtype=float)
    alpha = 2.0 / (settings.span + 1.0)
    if settings.season_hours > 0:
        x = x - _causal_profile(x, t_ns, settings, alpha)
    s1 = _ewma(x, alpha, x[0])
    s2 = _ewma(s1, alpha, x[0])
    level = 2 * s1 - s2
    trend = alpha / (1 - alpha) * (s1 - s2)  # per row
    pred = np.empty(n)
    pred[0] = x[0]
    pred[1:] = level[:-1] + trend[:-1]
    err = x - pred
    beta = alpha / 4  # noise adapts slower than the level so a drift is not absorbed as noise
    var = _ewma(err**2, beta, float(err[1] ** 2) if n > 1 else 0.0)
    prior_var = np.empty(n)
    prior_var[0] = var[0]
    prior_var[1:] = var[:-1]
    sigma = np.sqrt(prior_var)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(sigma > 0, err / sigma, 0.0)
    anomaly = erf(np.abs(z) / math.sqrt(2))
    # Row spacing in hours, a bias-corrected EWMA of the gaps seen so far (row 0 has none).
    gaps = np.zeros(n)
    gaps[1:] = np.diff(t_ns) / 3.6e12
    seen = np.ones(n)
    seen[0] = 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        dt_h = np.nan_to_num(_ewma(gaps, alpha, 0.0) / _ewma(seen, alpha, 0.0))
    se = np.sqrt(var) * _slope_se_factor(alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        tstat = np.where(se > 0, trend / se, 0.0)
    warm = np.arange(n) >= (settings.warmup if settings.warmup is not None else int(settings.span))
    significant = warm & (np.abs(tstat) >= settings.trend_t)

    hours = np.full(n, np.inf)
    beyond = np.zeros(n, dtype=bool)
    for limit, sign in ((settings.alarm_high, 1.0), (settings.alarm_low, -1.0)):
        if limit is None:
            continue
        beyond |= warm & (sign * (level - limit) >= 0)
        toward = significant & (sign * trend > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = np.where(toward, (limit - level) / trend * dt_h, np.inf)
        hours = np.minimum(hours, np.where(h >= 0, h, np.inf))
    hours[beyond] = 0.0

    horizon = settings.horizon_hours
    excess = np.clip((anomaly - 0.99) / 0.01, 0, 1)
    score = np.maximum(np.where(np.isfinite(hours), np.exp(-hours / horizon), 0.0), 0.5 * excess)
    flag = np.full(n, int(Flag.OK))
    flag[(hours <= settings.watch_horizons * horizon) | (anomaly >= settings.anomaly_watch)] = int(Flag.WATCH)
    flag[hours <= horizon] = int(Flag.DEGRADING)
    flag[hours <= settings.critical_hours] = int(Flag.CRITICAL)
    to_per_hour = np.where(dt_h > 0, 1.0 / np.where(dt_h > 0, dt_h, 1.0), 0.0)
    return pd.DataFrame(
        {
            "level": level,
            "trend_per_hour": trend * to_per_hour,
            "sigma": sigma,
            "anomaly": anomaly,
            "hours_to_alarm": np.where(np.isfinite(hours), hours, np.nan),
            "score": np.clip(score, 0, 1),
            "flag_level": flag,
            "flag": FLAG_NAMES[flag],
        },
        index=pd.DatetimeIndex(times),
    )


def score_csv(path: str, time_col: str, value_col: str, settings: DetectorSettings) -> pd.DataFrame:
    """Read a CSV export and score it; raises `ValueError` naming the missing column or bad rows."""
    frame = pd.read_csv(path)
    for col in (time_col, value_col):
        if col not in frame.columns:
            raise ValueError(f"{path}: no column {col!r} (columns: {', '.join(map(str, frame.columns))})")
    times = pd.to_datetime(frame[time_col], utc=True, errors="coerce")
    bad = times.isna()
    if bad.any():
        row = int(np.argmax(bad.to_numpy())) + 2  # +1 header, +1 one-based
        raise ValueError(f"{path}: line {row}: cannot parse time {frame[time_col].iloc[row - 2]!r}")
    if not times.is_monotonic_increasing:
        raise ValueError(f"{path}: column {time_col!r} is not in time order; sort the export first")
    values = pd.to_numeric(frame[value_col], errors="coerce").to_numpy(dtype=float)
    scored = score_series(pd.DatetimeIndex(times), values, settings)
    scored.insert(0, value_col, values)
    scored.index.name = time_col
    return scored
