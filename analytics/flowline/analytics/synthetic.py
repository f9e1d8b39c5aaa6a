"""Synthetic telemetry with known ground truth, for tests, benches and examples.

Each kind is a 10-minute series: ``healthy`` (AR(1) noise around a level), ``daily`` (plus a
daily cycle), ``degrading`` (healthy, then a drift that crosses ``high`` at a known time).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

Kind = Literal["healthy", "daily", "degrading", "constant"]

LEVEL = 50.0
NOISE = 1.0
HIGH = 70.0


def make_series(
    kind: Kind,
    *,
    days: float = 14,
    step: str = "10min",
    end: pd.Timestamp | str = "2026-01-15T00:00:00Z",
    seed: int = 0,
    cross_in_hours: float = 96.0,
    onset_days_before_end: float = 5.0,
) -> pd.Series:
    """A series ending just before ``end``. For ``degrading``, the drift starts
    ``onset_days_before_end`` days before ``end`` and reaches `HIGH` ``cross_in_hours`` after ``end``."""
    rng = np.random.default_rng(seed)
    end_ts = pd.Timestamp(end)
    n = int(pd.Timedelta(days=days) / pd.Timedelta(step))
    index = pd.date_range(end=end_ts - pd.Timedelta(step), periods=n, freq=step)
    hours = (index - end_ts) / pd.Timedelta(1, "h")  # negative: hours before end
    if kind == "constant":
        return pd.Series(np.full(n, LEVEL), index=index)
    eps = rng.normal(0, NOISE, n)
    noise = np.empty(n)
    acc = 0.0
    for i, e in enumerate(eps):  # AR(1), phi 0.6, unit marginal variance
        acc = 0.6 * acc + e * 0.8
        noise[i] = acc
    values = LEVEL + noise
    if kind == "daily":
        values += 4.0 * np.sin(2 * np.pi * np.asarray(hours) / 24.0)
    if kind == "degrading":
        onset = -onset_days_before_end * 24.0
        rate = (HIGH - LEVEL) / (cross_in_hours - onset)
        values += np.clip(np.asarray(hours) - onset, 0, None) * rate
    return pd.Series(values, index=index)
