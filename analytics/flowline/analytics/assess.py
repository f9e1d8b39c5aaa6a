"""Per-series assessment: pandas in, `Assessment` out. Pure: no I/O, no clocks.

Pipeline for one series (see `rules` for the flag rules):

1. Regularise: re-aggregate to ``rules.model_step`` (mean per bin, bins aligned to the assessment
   time), interpolate gaps inside the history, refuse too short, too gappy or stale series.
2. Screen cheaply with numpy: daily profile (hour-of-day means of the series detrended by a centred
   one-cycle moving average, which follows a fault's curved rise), trend over the last
   ``trend_window_hours`` by OLS with a standard error widened for autocorrelated noise. A series
   with no trend evidence (|t| < ``screen_t``) whose limits are ``screen_sigmas`` noise sigmas away
   is settled here with a flat-plus-profile forecast; fitting it could not change its flag, and
   skipping the fit is what makes a fleet pass fast.
3. Otherwise fit statsmodels ETS models on the STL-deseasonalised series when the daily seasonal
   strength is at least ``seasonal_strength`` (the seasonal option): Holt (additive trend), damped
   additive trend (phi estimated within [``min_damping``, 0.9999], so it cannot flatten at once),
   and, for a positive series, Holt on the log scale (exponential growth: accelerating wear).
   Choose by backtest, not by one-step fit: the RMSE of the 1..``validation_hours`` ahead forecasts
   from each of the last day's origins that have that much data after them. AICc on one-step errors
   favours models that chase the latest value and then extrapolate a degradation flat. Forecast
   with the chosen model's own prediction intervals (on the log scale for the log model, so they
   stay positive), widened when the backtest errors were larger than the model's sd, and add the
   STL seasonal pattern back.
4. From the forecast: hours until the mean crosses a limit (extrapolated up to 4 horizons); when
   the trend points toward the limit, the earliest crossing within the horizon of the plausible
   models (ETS fits within ``plausible_factor`` of the best backtest error, a quadratic over the
   trend window, an exponential rise from a healthy baseline when the curvature is clear and two
   straight lines do not explain it) and of the ``upper_quantile`` trend of the values: the
   *central* time to alarm, which the flag rules use;
   probability of crossing within the horizon (worst step of the forecast distribution, a lower
   bound of the path probability), trend per day and its significance, anomaly score of the latest
   one-step residuals, and the detector's strongest alert over the latest ``anomaly_window`` steps
   (``surprise``, `detect.surprise`: the WATCH signal); then health score, flag and risk.
5. The reported ``hours_to_alarm`` errs early, never late (a late forecast is the unsafe error:
   wear accelerates, and its curvature is not visible when it is first flagged). When the trend
   points toward the limit it is the earliest of the central time and of:

   - the ``tta_quantile`` (10 %) quantile of the crossing time of the expected level: the chosen
     model's path with its trend ``z`` standard deviations faster (the trend's share of the forecast
     spread, after the one-step noise and the level's random walk; widened with the rest of the
     spread by the backtest errors, where a misspecified trend shape shows);
   - exponential growth from the healthy level (the lowest daily median), at the rate that each
     plausible path's current slope and excess over that level imply (``ln(d/e) e / s``: distance
     ``d`` to the limit, excess ``e``, slope ``s``), for a rise that already had a quarter of its
     excess a trend window ago; for any rise convex from the healthy level it is no later than the
     truth, and it needs no visible curvature;
   - the ``upper_quantile`` trend of each step's most extreme sample (alarms trip on samples; bursts
     shorter than a step average away in the step means).

6. The forecast band (``interval``, 95 %) is the chosen model's interval with its width calibrated
   by the backtest errors both ways: the model's sd times the RMS of the 1..``validation_hours``
   errors over it, which narrows it where a trend model's intervals, growing fast with the horizon,
   were wider than its errors (the crossing probability and times above keep the widen-only sd, so
   narrowing the band moves no flag). It then holds the plausible paths (which trend shape the plant
   follows is uncertain too) and, when the trend points toward the limit, the quantile lines of the
   values and of each step's extreme sample (a band of values cannot stop short of the level they
   regularly reach: bursts that the step means average away). On the simulator's 60 faults
   (``bench/sim_flags.py``) it holds the limit at the true crossing for 58 at "now" and 59 at the first
   flag (21 of the 22 whose crossing is within the horizon), for a stated 95 %; the model's own
   widen-only interval with the same lines held all 60 at "now".
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats

from flowline.analytics.rules import AssessmentRules, Flag, decide_flag, health_score
from flowline.core.errors import FlowlineError

Result = Literal["ok", "failed", "skipped"]
_EXTEND = 4  # hours to alarm are extrapolated up to this many horizons


class AssessmentError(FlowlineError):
    """The series cannot be assessed; the message says why (too short, gaps, ...)."""


class StaleSeriesError(AssessmentError):
    """The series has no recent data; reported as skipped rather than failed."""


@dataclass(frozen=True)
class SeriesSpec:
    """Identity and limits of one assessed series."""

    site: str
    asset: str
    tag: str
    high: float | None = None
    low: float | None = None
    consequence_weight: float = 1.0
    criticality: str = "C"
    unit: str | None = None

    @property
    def key(self) -> str:
        return f"{self.site}/{self.asset}/{self.tag}"


@dataclass
class Assessment:
    spec: SeriesSpec
    assessed_at: pd.Timestamp
    result: Result
    reason: str = ""
    flag: Flag = Flag.OK
    health_score: float = 100.0
    hours_to_alarm: float | None = None
    p_cross: float = 0.0
    trend_per_day: float = 0.0
    trend_significant: bool = False
    anomaly_score: float = 0.0
    surprise: float = 0.0  # the detector's (`flowline detect`) strongest alert in the latest anomaly window
    risk: float = 0.0
    alarm_limit: float | None = None
    model: str = ""
    last_value: float | None = None
    history: pd.Series | None = field(default=None, repr=False)
    forecast: pd.DataFrame | None = field(default=None, repr=False)  # yhat, lower, upper


@dataclass
class _Prepared:
    y: np.ndarray  # regular, gap-filled, model-step values
    index: pd.DatetimeIndex
    step_h: float


@dataclass
class _Screen:
    profile: np.ndarray  # seasonal value per position (len == len(y)), zeros when no season
    future_profile: np.ndarray  # continuation over the extended horizon
    strength: float
    slope: float  # per model step, deseasonalised, over the trend window
    t: float
    p_value: float
    level: float
    sigma: float
    r1: float
    resid: np.ndarray


def _as_utc(index: pd.Index) -> pd.DatetimeIndex:
    idx = pd.DatetimeIndex(index)
    return idx.tz_localize("UTC") if idx.tz is None else idx.tz_convert("UTC")


def default_end(raw: pd.Series, rules: AssessmentRules) -> pd.Timestamp:
    """The assessment time when the caller gives none: just after the newest value, on the model step."""
    last = _as_utc(raw.index).max()
    return (last + pd.Timedelta(1, "ns")).ceil(pd.Timedelta(rules.model_step))


def regularise(
    raw: pd.Series, step: str | pd.Timedelta, end: pd.Timestamp, how: Literal["mean", "max", "min"] = "mean"
) -> pd.Series:
    """Mean (or ``how``) per ``step`` bin, bins ending exactly at ``end`` (so reruns give identical
    bins); NaN = gap."""
    step_td = pd.Timedelta(step)
    values = pd.Series(pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float), index=_as_utc(raw.index))
    values = values[np.isfinite(values.to_numpy()) & (values.index < end)]
    if values.empty:
        return values
    binned = values.resample(step_td, origin=end, closed="left", label="left").agg(how)
    last_bin = end - step_td
    full = pd.date_range(binned.index[0], last_bin, freq=step_td)
    return binned.reindex(full)


def _prepare(raw: pd.Series, rules: AssessmentRules, end: pd.Timestamp) -> _Prepared:
    step = pd.Timedelta(rules.model_step)
    step_h = step / pd.Timedelta(1, "h")
    reg = regularise(raw, step, end)
    valid = reg.notna().to_numpy()
    if not valid.any():
        raise StaleSeriesError("no good-quality values in the history window")
    first, last = int(np.argmax(valid)), len(valid) - 1 - int(np.argmax(valid[::-1]))
    stale_h = (len(valid) - 1 - last) * step_h
    if stale_h > rules.max_stale_hours:
        raise StaleSeriesError(f"no data in the last {stale_h:g} h")
    reg = reg.iloc[first : last + 1]
    span_h = len(reg) * step_h
    if span_h < rules.min_history_hours:
        raise AssessmentError(f"too short: {span_h:g} h of history, need {rules.min_history_hours:g} h")
    missing = float(reg.isna().mean())
    if missing > rules.max_gap_fraction:
        raise AssessmentError(f"too many gaps: {missing:.0%} of {rules.model_step} steps empty")
    y = reg.interpolate(method="linear", limit_area="inside").to_numpy(dtype=float)
    return _Prepared(y=y, index=pd.DatetimeIndex(reg.index), step_h=step_h)


def _lag1(x: np.ndarray) -> float:
    if len(x) < 3:
        return 0.0
    d = x - x.mean()
    den = float(d @ d)
    return 0.0 if den == 0 else float(np.clip((d[1:] @ d[:-1]) / den, 0.0, 0.95))


def _long_run_ratio(x: np.ndarray, lags: int) -> float:
    d = x - x.mean()
    g0 = float(d @ d)
    if g0 == 0:
        return 1.0
    lrv = g0 + 2 * sum((1 - k / (lags + 1)) * float(d[k:] @ d[:-k]) for k in range(1, lags + 1))
    return max(1.0, lrv / g0)


def _screen(y: np.ndarray, rules: AssessmentRules, step_h: float, n_future: int) -> _Screen:
    n = len(y)
    x = np.arange(n, dtype=float)
    season = round(rules.season_hours / step_h)
    profile = np.zeros(n)
    future_profile = np.zeros(n_future)
    strength = 0.0
    if season >= 2 and n >= 2 * season:
        # Phase counted back from the newest bin so that the profile continues seamlessly.
        phase = (x[::-1] % season).astype(int)[::-1]
        # Detrended by a centred one-cycle moving average (classical decomposition): it follows a
        # fault's curved rise, where a straight line leaves the curvature in the residuals and
        # hides a strong daily cycle (the trend model then chases the cycle).
        weights = np.ones(season + 1 - season % 2)
        weights[[0, -1]] = 0.5 if season % 2 == 0 else 1.0
        ma = np.convolve(y, weights / weights.sum(), mode="valid")
        lo = (len(y) - len(ma)) // 2
        detr = y[lo : lo + len(ma)] - ma
        ph = phase[lo : lo + len(ma)]
        means = np.bincount(ph, weights=detr, minlength=season) / np.bincount(ph, minlength=season)
        means -= means.mean()
        resid0 = detr - means[ph]
        var_sr = float(np.var(detr))
        strength = 0.0 if var_sr == 0 else max(0.0, 1.0 - float(np.var(resid0)) / var_sr)
        if strength >= rules.seasonal_strength:
            profile = means[phase]
            future_phase = (phase[-1] + 1 + np.arange(n_future)) % season
            future_profile = means[future_phase]
    adj = y - profile
    w = adj[-max(3, round(rules.trend_window_hours / step_h)) :]
    m = len(w)
    xw = np.arange(m, dtype=float) - (m - 1) / 2
    sxx = float(xw @ xw)
    slope = float(xw @ (w - w.mean())) / sxx
    resid = w - w.mean() - slope * xw
    # Long-run (Newey-West, Bartlett kernel, one-cycle bandwidth) over short-run variance of the
    # noise widens the standard error for autocorrelated noise; periodic load swings largely cancel
    # in it, where an AR(1) correction would wrongly call every trend on them insignificant. The
    # noise is measured around a quadratic so an accelerating trend is not taken for noise.
    quad = w - np.polyval(np.polyfit(xw, w, 2), xw)
    inflation = _long_run_ratio(quad, min(max(1, season), m // 3))
    r1 = _lag1(quad)
    sigma = math.sqrt(float(resid @ resid) / max(1, m - 2))
    n_eff = max(3.0, m / inflation)
    se = sigma / math.sqrt(sxx) * math.sqrt(m / n_eff)
    t = 0.0 if se == 0 else slope / se
    if se == 0 and slope != 0:
        t = math.copysign(math.inf, slope)
    p_value = float(2 * stats.t.sf(abs(t), df=n_eff - 2)) if math.isfinite(t) else 0.0
    level = float(w.mean() + slope * (m - 1) / 2)
    return _Screen(profile, future_profile, strength, slope, t, p_value, level, sigma, r1, resid)


def _anomaly(resid: np.ndarray, k: int, r1: float) -> float:
    if len(resid) < k + 3:
        return 0.0
    sd = float(np.std(resid[:-k])) if len(resid) > 2 * k else float(np.std(resid))
    if sd == 0:
        return 0.0
    inflate = math.sqrt((1 + r1) / (1 - r1))
    z = float(np.mean(resid[-k:])) / (sd / math.sqrt(k) * inflate)
    return float(math.erf(abs(z) / math.sqrt(2)))


@dataclass
class _Forecast:
    """A forecast over the extended horizon. ``centre``/``sd`` are on the model's scale (log for
    the log model) without the seasonal pattern; ``seasonal`` is added back on the data's scale."""

    model: str
    centre: np.ndarray
    sd: np.ndarray
    seasonal: np.ndarray
    log: bool = False
    # The part of ``sd`` that is the trend's: what is left after the one-step noise and the level's
    # random walk (zeros when unknown). How fast the plant degrades is uncertain, how far it has got is
    # not: only this spread moves the expected level's crossing.
    trend_sd: np.ndarray | None = None
    # The prediction band's share of ``sd``: below 1 when the backtest errors were smaller than the
    # model's own sd (ETS intervals of a trend model grow fast with the horizon). ``sd`` itself stays
    # widen-only: the crossing probability and the early crossing time must not get later.
    band_scale: float = 1.0

    def _to_data(self, x: np.ndarray) -> np.ndarray:
        scaled: np.ndarray = np.exp(x) if self.log else x
        out: np.ndarray = scaled + self.seasonal[: len(x)]
        return out

    def mean(self, n: int | None = None) -> np.ndarray:
        """Mean (median of the log model) on the data's scale, first ``n`` steps."""
        return self._to_data(self.centre[:n])

    def band(self, n: int, z: float) -> tuple[np.ndarray, np.ndarray]:
        """The central ``z`` band of the first ``n`` steps, its width calibrated by ``band_scale``."""
        c, d = self.centre[:n], self.sd[:n] * self.band_scale
        return self._to_data(c - z * d), self._to_data(c + z * d)

    def p_beyond(self, limit: float, sign: int, n: int) -> float:
        """Worst-step probability of being beyond ``limit`` (``sign`` +1 above, -1 below)."""
        return float(np.max(self.p_steps(limit, sign, n)))

    def p_steps(self, limit: float, sign: int, n: int | None = None) -> np.ndarray:
        """Probability of being beyond ``limit`` at each of the first ``n`` steps."""
        n = len(self.centre) if n is None else n
        threshold = limit - self.seasonal[:n]
        if self.log:
            positive = threshold > 0
            # Positive by construction: a limit at or under zero is always above it, never below.
            threshold = np.where(positive, np.log(np.where(positive, threshold, 1.0)), -np.inf)
        sd = np.where(self.sd[:n] > 0, self.sd[:n], np.finfo(float).tiny)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            p = stats.norm.sf(sign * (threshold - self.centre[:n]) / sd)
        return np.asarray(np.nan_to_num(p, nan=0.0), dtype=float)


@dataclass
class _Backtest:
    """Forecasts from each of the last ``origins`` origins with ``hv`` observations after them:
    what the model would have said a day or two ago, against what happened."""

    rmse: float  # data scale, over 1..hv steps ahead: the model choice criterion
    errors: np.ndarray  # model scale, origins x hv

    def ratio(self, sd: np.ndarray) -> float:
        """RMS of the errors over the model's own h-step sd: 1 when its intervals were right, under 1
        when they were too wide (1 when it cannot be measured)."""
        hv = self.errors.shape[1]
        ratio = float(np.sqrt(np.mean((self.errors / np.maximum(sd[None, :hv], 1e-300)) ** 2)))
        return ratio if math.isfinite(ratio) and ratio > 0 else 1.0


def _backtest(states: pd.DataFrame, phi: float, z: np.ndarray, log: bool, hv: int, origins: int) -> _Backtest:
    # One-step fit criteria (AICc) favour models that chase the latest value; this rewards the
    # trend that carried on. The parameters are the full fit's, so it is cheap (no refits).
    level = states["level"].to_numpy(dtype=float)
    trend = states["trend"].to_numpy(dtype=float)
    h = np.arange(1, hv + 1)
    reach = np.cumsum(phi**h) if phi < 1 else h.astype(float)
    o = np.arange(len(z) - hv - origins, len(z) - hv)
    pred = level[o, None] + trend[o, None] * reach[None, :]
    actual = z[o[:, None] + h[None, :]]
    errors = actual - pred
    if log:
        pred, actual = np.exp(np.minimum(pred, 700.0)), np.exp(actual)
    return _Backtest(float(np.sqrt(np.mean((pred - actual) ** 2))), errors)


def _fit(
    prep: _Prepared, scr: _Screen, rules: AssessmentRules, n_h: int, n_ext: int
) -> tuple[_Forecast, np.ndarray, list[_Forecast]]:
    """Fit the candidates, choose by rolling-origin multi-step error; return the forecast, the
    chosen model's one-step residuals and the other plausible models' forecasts (backtest error
    within ``plausible_factor`` of the best)."""
    from statsmodels.tsa.exponential_smoothing.ets import ETSModel
    from statsmodels.tsa.seasonal import STL

    y = prep.y
    n = len(y)
    season = round(rules.season_hours / prep.step_h)
    prefix = ""
    seasonal = np.zeros(n)
    future = np.zeros(n_ext)
    if scr.strength >= rules.seasonal_strength:
        stl = STL(y, period=season, robust=True).fit()
        seasonal = np.asarray(stl.seasonal, dtype=float)
        future = np.resize(seasonal[-season:], n_ext)
        prefix = "stl+"
    adj = y - seasonal
    hv = max(1, min(round(rules.validation_hours / prep.step_h), n // 4))
    origins = max(1, min(round(rules.season_hours / prep.step_h), n // 4))
    candidates: list[tuple[str, bool, bool]] = [("holt", False, False), ("damped", True, False)]
    if float(adj.min()) > 0:
        # Exponential growth (and power laws, nearly) is a straight line on the log scale: the
        # accelerating rise of wear that a linear trend extrapolates too slowly.
        candidates.append(("log-holt", False, True))
    fitted: list[tuple[_Backtest, str, bool, Any]] = []
    with warnings.catch_warnings():
        # Convergence chatter from the optimiser; a poor fit loses on forecast error anyway.
        warnings.simplefilter("ignore")
        for name, damped, log in candidates:
            z = np.log(adj) if log else adj
            # Damping per model step is bounded near 1: fitted freely on hourly data it flattens a
            # real drift within a day and pushes the forecast crossing far past the truth.
            bounds = {"damping_trend": (rules.min_damping, 0.9999)} if damped else None
            res = ETSModel(pd.Series(z), error="add", trend="add", damped_trend=damped, bounds=bounds).fit(disp=False)
            if not math.isfinite(res.aicc):
                continue
            phi = float(res.params[list(res.param_names).index("damping_trend")]) if damped else 1.0
            bt = _backtest(res.states, phi, z, log, hv, origins)
            if math.isfinite(bt.rmse):
                fitted.append((bt, name, log, res))
    if not fitted:
        raise AssessmentError("no model converged")
    bt, name, log, res = min(fitted, key=lambda f: f[0].rmse)
    frame = res.get_prediction(start=n, end=n + n_ext - 1).summary_frame(alpha=1 - rules.interval)
    z_crit = stats.norm.ppf(0.5 + rules.interval / 2)
    centre = frame["mean"].to_numpy(dtype=float)
    sd = (frame["pi_upper"].to_numpy(dtype=float) - centre) / z_crit
    # A misspecified trend (acceleration the model does not have) shows in the backtest errors
    # before it shows in the model's own intervals: widen them by the measured excess.
    ratio = bt.ratio(sd)
    sd = sd * max(1.0, ratio)
    resid = np.asarray(res.resid, dtype=np.float64)
    alpha = float(res.params[list(res.param_names).index("smoothing_level")])
    level_var = sd[0] ** 2 * (1.0 + alpha**2 * np.arange(n_ext))
    trend_sd = np.sqrt(np.maximum(sd**2 - level_var, 0.0))
    # The band is calibrated both ways: narrowed to the backtest errors too, where they were smaller
    # than the model's sd (its stated rate then holds, where the widen-only sd over-covers).
    chosen = _Forecast(prefix + name, centre, sd, future, log, trend_sd, band_scale=min(1.0, ratio))
    # The other plausible trajectories: the ETS models and a quadratic in time over the trend window
    # (acceleration that the log scale under-states when the signal rises from a non-zero baseline).
    plausible = [
        _Forecast(prefix + f_name, np.asarray(f_res.forecast(n_ext), dtype=float), sd, future, f_log)
        for f_bt, f_name, f_log, f_res in fitted
        if f_bt.rmse <= rules.plausible_factor * bt.rmse and f_name != name
    ]
    window = max(6, round(rules.trend_window_hours / prep.step_h))
    # The exponential curve's error is in-sample (no refits: extrapolated from a few days before,
    # its rate is too unstable to judge it by), so it must beat the best model outright.
    for label, other, factor in (
        ("quadratic", _quadratic(adj, window, hv, origins, n_ext), rules.plausible_factor),
        ("exp-baseline", _exp_baseline(adj, 2 * window, hv, origins, n_ext), 1.0),
    ):
        if other is not None and other[0] <= factor * bt.rmse:
            plausible.append(_Forecast(prefix + label, other[1], sd, future))
    return chosen, resid, plausible


_EXP_RATES = np.linspace(-4.0, 4.0, 81)  # per window length: up to 55-fold growth over a window


def _exp_fit(y: np.ndarray, future: np.ndarray) -> np.ndarray:
    """Least-squares ``c + a exp(b x)`` (x = 0..1 over ``y``) evaluated at ``future`` (same units):
    for a fixed rate ``b`` it is a straight-line fit on exp(b x), closed form for every rate of a
    grid at once (the error surface in b can have several minima; a grid does not get stuck)."""
    x = np.arange(len(y), dtype=float) / len(y)
    rates = _EXP_RATES[np.abs(_EXP_RATES) > 1e-9]
    e = np.exp(rates[:, None] * x[None, :])
    ec = e - e.mean(axis=1, keepdims=True)
    yc = y - y.mean()
    sxx = np.einsum("ij,ij->i", ec, ec)
    sxy = ec @ yc
    sse = float(yc @ yc) - sxy**2 / sxx
    k = int(np.argmin(np.where(sxx > 0, sse, np.inf)))
    slope = sxy[k] / sxx[k]
    return np.asarray(y.mean() + slope * (np.exp(rates[k] * future) - e[k].mean()), dtype=float)


_CURVATURE_T = 6.0  # |t| of the quadratic term that makes an exponential trend plausible


def _curvature_t(y: np.ndarray, lags: int) -> float:
    """t statistic of the quadratic term of an OLS quadratic in time, its standard error widened for
    autocorrelated residuals (Newey-West, as for the trend screen)."""
    x = np.linspace(-1.0, 1.0, len(y))
    basis = np.column_stack([np.ones(len(y)), x, x**2])
    coef, *_ = np.linalg.lstsq(basis, y, rcond=None)
    resid = y - basis @ coef
    dof = max(1, len(y) - 3)
    cov = np.linalg.inv(basis.T @ basis) * float(resid @ resid) / dof * _long_run_ratio(resid, max(1, lags))
    se = math.sqrt(max(float(cov[2, 2]), 0.0))
    return float(coef[2] / se) if se > 0 else 0.0


def _exp_baseline(adj: np.ndarray, window: int, hv: int, origins: int, n_ext: int) -> tuple[float, np.ndarray] | None:
    """(error, forecast) of the exponential degradation model ``c + a exp(b t)`` over the last
    ``window`` steps: the baseline ``c`` is the healthy level the wear rises from (a plain log scale
    takes it for part of the growth and under-states the acceleration); ``b < 0`` is a falling-rate
    rise (fouling towards an asymptote). The error is the fitted curve's RMSE over the backtest's
    steps: like the ETS backtest, parameters from the full fit (a curve has no state to update)."""
    if len(adj) < window or abs(_curvature_t(adj[-window:], lags=hv // 2)) < _CURVATURE_T:
        # Without clear curvature the exponential's rate is fitted to noise: its extrapolation can
        # then cross anywhere, and it would only drag the earliest crossing with it.
        return None
    steps = (np.arange(window + n_ext, dtype=float)) / window
    y = adj[-window:]
    curve = _exp_fit(y, steps)
    if float(np.sum((curve[:window] - y) ** 2)) >= _HINGE_MARGIN * _hinge_sse(y):
        # A rise that starts from a flat line (a step in the drift rate, the onset of a fault) is
        # curved too, but it is no exponential: extrapolated as one, it crosses far too early.
        return None
    tail = min(window, hv + origins)
    rmse = float(np.sqrt(np.mean((curve[window - tail : window] - y[-tail:]) ** 2)))
    return rmse, curve[window:]


_HINGE_MARGIN = 1.0  # the exponential must fit better than two straight lines


def _hinge_sse(y: np.ndarray) -> float:
    """Smallest squared error of a continuous two-segment line (a change of slope at one of a grid of
    break points in the middle 80 % of ``y``)."""
    x = np.linspace(0.0, 1.0, len(y))
    best = math.inf
    for k in np.linspace(0.1, 0.9, 17):
        basis = np.column_stack([np.ones(len(y)), x, np.maximum(x - k, 0.0)])
        coef, *_ = np.linalg.lstsq(basis, y, rcond=None)
        r = y - basis @ coef
        best = min(best, float(r @ r))
    return best


def _quadratic(adj: np.ndarray, window: int, hv: int, origins: int, n_ext: int) -> tuple[float, np.ndarray] | None:
    """(backtest RMSE, forecast) of a quadratic in time fitted to the last ``window`` steps; the same
    rolling-origin backtest as the ETS models (refitted at each origin: a few tiny least squares)."""
    n = len(adj)
    if n < window + hv + origins:
        return None
    x = np.arange(window, dtype=float) / window
    basis = np.column_stack([np.ones(window), x, x**2])
    ahead = 1 + np.arange(max(hv, n_ext), dtype=float) / window
    future_basis = np.column_stack([np.ones(len(ahead)), ahead, ahead**2])
    pinv = np.linalg.pinv(basis)
    o = np.arange(n - hv - origins, n - hv)
    segments = np.stack([adj[i - window + 1 : i + 1] for i in o])
    coef = segments @ pinv.T
    pred = coef @ future_basis[:hv].T
    actual = np.stack([adj[i + 1 : i + 1 + hv] for i in o])
    rmse = float(np.sqrt(np.mean((pred - actual) ** 2)))
    last = pinv @ adj[-window:]
    return rmse, future_basis[:n_ext] @ last


@dataclass
class _QuantileLine:
    """The ``upper_quantile`` line of the values (the lower one for a low limit) over a window."""

    hours: float | None  # until it reaches the limit, within the extended horizon
    significant: bool  # its slope is significantly toward the limit
    end: float  # its value at the newest step
    slope: float  # per model step

    def path(self, n: int) -> np.ndarray:
        return np.asarray(self.end + self.slope * np.arange(1, n + 1), dtype=float)


def _upper_trend(
    adj: np.ndarray, window: int, quantile: float, limit: float, sign: int, step_h: float, max_steps: int,
    significance_p: float,
) -> _QuantileLine | None:
    """The level the values regularly reach (the upper line for a high limit, the lower for a low
    one) over the last ``window`` steps, by linear quantile regression; None unless it points toward
    ``limit``."""
    from statsmodels.regression.quantile_regression import QuantReg

    w = adj[-window:]
    x = np.arange(len(w), dtype=float)
    q = quantile if sign == 1 else 1 - quantile
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = QuantReg(w, np.column_stack([np.ones(len(w)), x])).fit(q=q, max_iter=200)
    intercept, slope = float(res.params[0]), float(res.params[1])
    if sign * slope <= 0:
        return None
    significant = bool(float(res.pvalues[1]) < significance_p)
    end = intercept + slope * (len(w) - 1)
    steps = (limit - end) / slope
    return _QuantileLine(float(max(steps, 0.0) * step_h) if steps <= max_steps else None, significant, end, slope)


def _trend_bound_crossing(fc: _Forecast, limit: float, sign: int, step_h: float, z: float) -> float | None:
    """Hours until the forecast path reaches ``limit`` with its trend ``z`` of the trend's standard
    deviations faster toward the limit: the ``q`` quantile (``z`` = its normal score) of the time the
    expected level crosses, so it errs early. The trend's spread is widened by the backtest errors
    with the rest of the forecast's, which is where a trend shape that is wrong (acceleration not yet
    visible as curvature) shows; it grows with the horizon, so a near crossing moves little and a far
    one, where unseen acceleration has time to act, moves most."""
    if fc.trend_sd is None:
        return None
    path = fc._to_data(fc.centre + sign * z * fc.trend_sd)
    hit = np.nonzero(sign * (path - limit) >= 0)[0]
    return float((hit[0] + 1) * step_h) if len(hit) else None


_GROWTH_PAST = 0.25


def _healthy_level(adj: np.ndarray, sign: int, season: int) -> float:
    """The level the series rose from: the lowest daily median (highest, toward a low limit). A
    degradation only moves the level toward the limit, so its healthy days are the furthest from it."""
    days = [adj[i - season : i] for i in range(len(adj), season - 1, -season)]
    medians = np.array([float(np.median(d)) for d in days])
    return float(np.min(medians) if sign == 1 else np.max(medians))


def _growth_crossing(
    fc: _Forecast, baseline: float, past: float, limit: float, sign: int, step_h: float
) -> float | None:
    """Hours until ``limit`` if the excess over the healthy ``baseline`` grows in proportion to itself
    (exponential degradation from a healthy level, the usual model of wear), at the rate that the
    forecast's current slope and excess imply: ``ln(distance / excess) / (slope / excess)``. A rise
    that is not yet visibly curved already fixes that rate, and for any rise that is convex from the
    healthy level (linear, accelerating) the time is no later than the truth (``ln x <= x - 1``).
    Only for a rise that had ``_GROWTH_PAST`` of today's excess a trend window ago (``past``): at the
    onset of a rise its slope over its small excess is the rate of a start, not of growth."""
    path = fc._to_data(fc.centre[:2]) - fc.seasonal[:2]
    excess, slope = sign * (path[0] - baseline), sign * (path[1] - path[0])
    distance = sign * (limit - baseline)
    if excess <= 0 or slope <= 0 or distance <= excess or sign * (past - baseline) < _GROWTH_PAST * excess:
        return None
    return float(math.log(distance / excess) * excess / slope * step_h)


def _first_crossing(fc: _Forecast, limit: float, sign: int, step_h: float) -> float | None:
    hit = np.nonzero(sign * (fc.mean() - limit) >= 0)[0]
    return float((hit[0] + 1) * step_h) if len(hit) else None


def _crossing(
    spec: SeriesSpec, fc: _Forecast, n_h: int, step_h: float, slope: float
) -> tuple[float | None, float, float | None, int]:
    """(alarm limit, p_cross, hours to alarm, direction +1 high / -1 low / 0 none) for the worse side."""
    sides: list[tuple[float, float, float | None, int]] = []
    for limit, sign in ((spec.high, 1), (spec.low, -1)):
        if limit is None:
            continue
        p = fc.p_beyond(limit, sign, n_h)
        hours = _first_crossing(fc, limit, sign, step_h)
        sides.append((p, 1.0 if slope * sign > 0 else 0.0, hours, sign))
    if not sides:
        return None, 0.0, None, 0
    p, _, hours, sign = max(sides, key=lambda s: (round(s[0], 6), s[1]))
    limit = spec.high if sign == 1 else spec.low
    return limit, p, hours, sign


def _latest_surprise(raw: pd.Series, end: pd.Timestamp, rules: AssessmentRules) -> float:
    """The strongest alert of `flowline detect`'s scorer (same code, the rules' WATCH level) over the rows of
    the last ``anomaly_window`` model steps: -log10 of a tail probability, see `detect.surprise`."""
    from flowline.analytics.detect import DetectorSettings, score_series

    values = pd.to_numeric(raw, errors="coerce")
    index = _as_utc(raw.index)
    keep = np.isfinite(values.to_numpy(dtype=float)) & (index < end)
    if keep.sum() < 3:
        return 0.0
    times = index[keep]
    settings = DetectorSettings(watch_surprise=rules.watch_surprise)
    alerts = score_series(times, values.to_numpy(dtype=float)[keep], settings)["alert"].to_numpy()
    recent = times >= end - rules.anomaly_window * pd.Timedelta(rules.model_step)
    return round(float(alerts[recent].max(initial=0.0)), 3)


def assess_series(
    raw: pd.Series,
    spec: SeriesSpec,
    rules: AssessmentRules | None = None,
    end: pd.Timestamp | None = None,
    *,
    screen: bool = True,
) -> Assessment:
    """Assess one series (DatetimeIndex, float values, good quality only). Never raises for bad data:
    a series that cannot be assessed comes back with ``result`` failed/skipped and the ``reason``."""
    rules = rules or AssessmentRules()
    end = default_end(raw, rules) if end is None and len(raw) else end
    if end is None:
        return Assessment(spec, pd.Timestamp(0, tz="UTC"), "failed", "no data")
    end = pd.Timestamp(end)
    end = end.tz_localize("UTC") if end.tzinfo is None else end.tz_convert("UTC")
    try:
        return _assess(raw, spec, rules, end, screen)
    except StaleSeriesError as exc:
        return Assessment(spec, end, "skipped", str(exc))
    except (AssessmentError, ValueError, np.linalg.LinAlgError) as exc:
        return Assessment(
            spec, end, "failed", f"{type(exc).__name__}: {exc}" if not isinstance(exc, AssessmentError) else str(exc)
        )


def _assess(raw: pd.Series, spec: SeriesSpec, rules: AssessmentRules, end: pd.Timestamp, screen: bool) -> Assessment:
    prep = _prepare(raw, rules, end)
    n_h = max(1, math.ceil(rules.horizon_hours / prep.step_h))
    n_ext = n_h * _EXTEND
    step = pd.Timedelta(rules.model_step)
    future_index = pd.date_range(prep.index[-1] + step, periods=n_h, freq=step)
    history = pd.Series(prep.y, index=prep.index, name=spec.tag)
    y = prep.y
    last = float(y[-1])
    span = float(np.ptp(y))
    if span <= 1e-12 * max(1.0, abs(last)):
        out = Assessment(spec, end, "ok", model="constant", last_value=last, history=history)
        flat = np.full(n_h, last)
        out.forecast = pd.DataFrame({"yhat": flat, "lower": flat, "upper": flat}, index=future_index)
        fixed = _Forecast("constant", np.full(n_ext, last), np.zeros(n_ext), np.zeros(n_ext))
        limit, p, hours, _ = _crossing(spec, fixed, n_h, prep.step_h, 0.0)
        out.alarm_limit, out.p_cross = limit, p
        out.hours_to_alarm = 0.0 if hours is not None else None
        out.flag = Flag.CRITICAL if hours is not None else Flag.OK
        out.health_score = health_score(rules, p, 0.0, out.hours_to_alarm)
        out.risk = p * spec.consequence_weight
        return out

    scr = _screen(y, rules, prep.step_h, n_ext)
    seasonal_extreme_hi = float(scr.future_profile.max(initial=0.0))
    seasonal_extreme_lo = float(scr.future_profile.min(initial=0.0))
    far = all(
        sign * (limit - (scr.level + (seasonal_extreme_hi if sign == 1 else seasonal_extreme_lo)))
        > rules.screen_sigmas * scr.sigma
        for limit, sign in ((spec.high, 1), (spec.low, -1))
        if limit is not None
    )
    anomaly = _anomaly(scr.resid, rules.anomaly_window, scr.r1)
    plausible: list[_Forecast] = []
    if screen and abs(scr.t) < rules.screen_t and far and anomaly < rules.anomaly_watch:
        sd_flat = scr.sigma * math.sqrt(1 + 1 / max(1, len(scr.resid)))
        fc = _Forecast("screen", np.full(n_ext, scr.level), np.full(n_ext, sd_flat), scr.future_profile)
    else:
        fc, resid, plausible = _fit(prep, scr, rules, n_h, n_ext)
        anomaly = _anomaly(resid, rules.anomaly_window, 0.0)

    limit, p_cross, hours, sign = _crossing(spec, fc, n_h, prep.step_h, scr.slope)
    significant = scr.p_value < rules.significance_p
    mean_toward = limit is not None and significant and scr.slope * sign > 0
    lines: list[_QuantileLine] = []
    upper_toward = False
    window = max(6, round(rules.trend_window_hours / prep.step_h))
    adj = y - scr.profile
    if limit is not None and fc.model != "screen":
        # Over the trend window (as the mean's trend) and twice that: bursts can be too few in one
        # window for a significant slope. Both lines are plausible: the earlier crossing counts.
        short = _upper_trend(adj, window, rules.upper_quantile, limit, sign, prep.step_h, n_ext, 1.0)
        long = _upper_trend(
            adj, 2 * window, rules.upper_quantile, limit, sign, prep.step_h, n_ext, rules.significance_p
        )
        lines = [line for line in (short, long) if line is not None]
        upper_toward = long is not None and long.significant
    sample_lines: list[_QuantileLine] = []
    if limit is not None and (mean_toward or upper_toward):
        # Alarms trip on samples, not on the step means the models see: a burst shorter than a step
        # is averaged away in them. The same quantile lines over each step's most extreme sample
        # (highest for a high limit) say when the samples will regularly reach the limit.
        extreme = regularise(raw, rules.model_step, end, "max" if sign == 1 else "min").reindex(prep.index)
        adj_extreme = extreme.interpolate(limit_area="inside").bfill().ffill().to_numpy(dtype=float) - scr.profile
        for span in (window, 2 * window):
            line = _upper_trend(adj_extreme, span, rules.upper_quantile, limit, sign, prep.step_h, n_ext, 1.0)
            sample_lines += [line] if line is not None else []
    # Toward the limit: the mean's trend, or the trend of the values that reach furthest (bursts of an
    # intermittent fault hide the mean's trend in their noise, not the quantile's).
    toward = sign != 0 and (mean_toward or upper_toward)
    central = hours
    if limit is not None and toward:
        # The safe side of the plausible trajectories: the earliest crossing of any of them, and of
        # the upper (lower) quantile trend of the values. Beyond the horizon the alternatives only
        # extrapolate their shape: they do not decide there.
        others = [_first_crossing(other, limit, sign, prep.step_h) for other in plausible] if mean_toward else []
        known = [h for h in (*others, *(line.hours for line in lines)) if h is not None and h <= rules.horizon_hours]
        central = min([h for h in (hours, *known) if h is not None], default=None)
        # The reported time is a low quantile of the crossing time, not its middle: wear that is
        # about to accelerate looks straight until it does, and only the forecast's spread (widened
        # by the backtest errors of that misspecification) says how soon it could get there.
        z = float(stats.norm.isf(rules.tta_quantile))
        early = [_trend_bound_crossing(fc, limit, sign, prep.step_h, z)]
        early += [line.hours for line in sample_lines if line.hours is not None and line.hours <= rules.horizon_hours]
        season = max(2, round(rules.season_hours / prep.step_h))
        if len(adj) >= window + season:  # a healthy day and the day a trend window ago to compare with
            baseline = _healthy_level(adj, sign, season)
            # The level a trend window ago: the median of the day centred there.
            past = float(np.median(adj[len(adj) - window - season // 2 : len(adj) - window + season // 2]))
            growth = [_growth_crossing(f, baseline, past, limit, sign, prep.step_h) for f in (fc, *plausible)]
            early += [h for h in growth if h is not None and h <= rules.horizon_hours]
        hours = min([h for h in (central, *early) if h is not None], default=None)
    beyond = limit is not None and sign * (last - limit) >= 0
    if beyond:
        hours = central = 0.0
    trend_hours = (limit - scr.level) / scr.slope * prep.step_h if mean_toward and limit is not None else None
    surprise = _latest_surprise(raw, end, rules)
    flag = decide_flag(
        rules,
        beyond_limit=beyond,
        p_cross=p_cross,
        hours_to_alarm=central,
        trend_toward_limit=toward,
        surprise=surprise,
        trend_hours_to_alarm=trend_hours,
    )
    lower, upper = fc.band(n_h, stats.norm.ppf(0.5 + rules.interval / 2))
    paths = [other.mean(n_h) for other in plausible]
    # The band holds every plausible model's path too: which trend shape the plant follows is part of
    # the uncertainty, and the one model's interval does not know about it. When the values' quantile
    # line leads toward the limit, so does its path: a band of values cannot stop short of the level
    # they regularly reach (bursts of an intermittent fault that the hourly mean smooths away).
    if toward:
        paths += [line.path(n_h) + scr.future_profile[:n_h] for line in (*lines, *sample_lines)]
    for path in paths:
        lower, upper = np.minimum(lower, path), np.maximum(upper, path)
    forecast = pd.DataFrame({"yhat": fc.mean(n_h), "lower": lower, "upper": upper}, index=future_index)
    return Assessment(
        spec=spec,
        assessed_at=end,
        result="ok",
        surprise=surprise,
        flag=flag,
        health_score=health_score(rules, p_cross, surprise, hours),
        hours_to_alarm=hours,
        p_cross=round(p_cross, 6),
        trend_per_day=scr.slope * 24.0 / prep.step_h,
        trend_significant=significant,
        anomaly_score=round(anomaly, 6),
        risk=round(p_cross * spec.consequence_weight, 6),
        alarm_limit=limit,
        model=fc.model,
        last_value=last,
        history=history,
        forecast=forecast,
    )
