"""The flag vocabulary and the configurable rules that turn statistics into a flag.

Rules, checked from the top; the first that matches sets the flag:

- **CRITICAL**: the latest level is already beyond an alarm limit, or the probability of crossing
  within the horizon is at least ``critical_p`` and the forecast mean crosses within
  ``critical_hours``.
- **DEGRADING**: the trend is significant (p < ``significance_p``) *and points toward the limit*
  (the mean's trend, or that of the ``upper_quantile`` line of the values: intermittent faults),
  and ``p_cross >= degrading_p``, or the forecast mean crosses within the horizon, or the linear
  trend of the trend window reaches the limit within the horizon (a fitted damped trend may level
  off sooner than the plant does, the recent linear trend is the early-warning check on it).
- **WATCH**: ``p_cross >= watch_p``; or a significant trend toward the limit whose forecast mean
  crosses within ``watch_horizons`` horizons; or the detector's alert over the latest
  ``anomaly_window`` model steps is at least ``watch_surprise`` (the same score and level as
  `flowline detect`, calibrated to a false-alert rate: docs/anomaly.md).
- **OK** otherwise.

``hours_to_alarm`` in these rules is the central time to alarm (the earliest crossing of the plausible
models and of the values' quantile trend, `assess`); the time reported to people errs earlier still
(the ``tta_quantile`` quantile of the crossing time, exponential growth from the healthy level), but
does not change the flag, so its caution adds no false flags.

A significant trend is required for DEGRADING so that noise and daily cycles, however close to a
limit, are at most WATCH; the probability alone only escalates to CRITICAL when a crossing is both
likely and close.

Health score (0-100, higher is healthier)::

    100 x (1 - p_cross) x (1 - 0.3 x excess) x urgency
    excess  = clip(surprise / watch_surprise, 0, 1)   (1 at the WATCH level; no alert costs nothing)
    urgency = 0.5 + 0.5 x min(1, hours_to_alarm / (2 x horizon))   (1 when no crossing is forecast)

Risk = ``p_cross`` x the asset's consequence weight (0-3, `Consequence.weight()`).
"""

from __future__ import annotations

from enum import IntEnum

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flowline.core.config import AnalyticsConfig
from flowline.core.errors import ConfigError

# The detector's WATCH level (-log10 of a probability), one value for `flowline detect` and the job;
# bench/nab.py measures its false-alert rate on real data, docs/anomaly.md explains the default.
DEFAULT_WATCH_SURPRISE = 8.0


class Flag(IntEnum):
    OK = 0
    WATCH = 1
    DEGRADING = 2
    CRITICAL = 3


class AssessmentRules(BaseModel):
    """Everything the pure assessment needs besides the data; all of it configurable per install."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    horizon_hours: float = Field(default=168, gt=0)
    model_step: str = "1h"  # models are fitted on the history re-aggregated to this step
    min_history_hours: float = Field(default=48, gt=0)
    max_gap_fraction: float = Field(default=0.5, ge=0, le=1)
    max_stale_hours: float = Field(default=6, gt=0)
    season_hours: int = Field(default=24, gt=1)
    seasonal_strength: float = Field(default=0.4, ge=0, le=1)
    min_damping: float = Field(default=0.99, gt=0, lt=1)  # lower bound of the damped trend's phi
    validation_hours: float = Field(default=48, gt=0)  # multi-step error horizon for model choice
    trend_window_hours: float = Field(default=72, gt=1)
    # Hours to alarm is the earliest crossing among the models whose backtest error is within this
    # factor of the best one's: a late forecast is the unsafe error (accelerating wear).
    plausible_factor: float = Field(default=1.5, ge=1)
    # ... and of the trend of this quantile over two trend windows (values, not the mean, trip alarms:
    # an intermittent fault reaches the limit in bursts long before its average does).
    upper_quantile: float = Field(default=0.9, gt=0.5, lt=1)
    # The reported time to alarm is no later than this quantile of the expected level's crossing time
    # (the forecast path with its trend at the matching normal score): it errs early.
    tta_quantile: float = Field(default=0.05, gt=0, lt=0.5)
    screen_t: float = Field(default=2.0, ge=0)  # |t| of the trend below which a fit may be skipped
    screen_sigmas: float = Field(default=6.0, ge=0)  # ... if the limit is this many sigmas away
    significance_p: float = Field(default=0.01, gt=0, lt=1)
    interval: float = Field(default=0.95, gt=0, lt=1)
    watch_p: float = Field(default=0.2, ge=0, le=1)
    degrading_p: float = Field(default=0.5, ge=0, le=1)
    critical_p: float = Field(default=0.9, ge=0, le=1)
    critical_hours: float = Field(default=48, ge=0)
    watch_horizons: float = Field(default=3, ge=1)
    anomaly_window: int = Field(default=6, ge=1)  # latest model steps whose alerts count as current
    # Residual anomaly (0-1) of the fitted model above which a quiet series is fitted in full anyway
    # rather than screened: an unusual recent residual deserves the models, not only the screen.
    anomaly_watch: float = Field(default=0.9999, ge=0, le=1)
    watch_surprise: float = Field(default=DEFAULT_WATCH_SURPRISE, gt=0)  # WATCH on the detector's alert


def decide_flag(
    rules: AssessmentRules,
    *,
    beyond_limit: bool,
    p_cross: float,
    hours_to_alarm: float | None,
    trend_toward_limit: bool,
    surprise: float,
    trend_hours_to_alarm: float | None = None,
) -> Flag:
    """Apply the rules of the module docstring."""
    horizon = rules.horizon_hours
    crosses_within = any(h is not None and h <= horizon for h in (hours_to_alarm, trend_hours_to_alarm))
    if beyond_limit or (
        p_cross >= rules.critical_p and hours_to_alarm is not None and hours_to_alarm <= rules.critical_hours
    ):
        return Flag.CRITICAL
    if trend_toward_limit and (p_cross >= rules.degrading_p or crosses_within):
        return Flag.DEGRADING
    if (
        p_cross >= rules.watch_p
        or (trend_toward_limit and hours_to_alarm is not None and hours_to_alarm <= rules.watch_horizons * horizon)
        or surprise >= rules.watch_surprise
    ):
        return Flag.WATCH
    return Flag.OK


def health_score(rules: AssessmentRules, p_cross: float, surprise: float, hours_to_alarm: float | None) -> float:
    urgency = 1.0
    if hours_to_alarm is not None:
        urgency = 0.5 + 0.5 * min(1.0, max(0.0, hours_to_alarm) / (2 * rules.horizon_hours))
    excess = min(1.0, max(0.0, surprise / rules.watch_surprise))
    return round(100.0 * (1.0 - p_cross) * (1.0 - 0.3 * excess) * urgency, 3)


def rules_for(analytics: AnalyticsConfig) -> AssessmentRules:
    """The rules of the config's ``analytics.rules`` section, with ``analytics.horizon_hours`` applied."""
    try:
        return AssessmentRules.model_validate({**analytics.rules, "horizon_hours": analytics.horizon_hours})
    except ValidationError as exc:
        problems = "; ".join(f"analytics.rules.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid analytics rules: {problems}") from None
