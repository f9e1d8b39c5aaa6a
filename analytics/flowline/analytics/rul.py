"""Remaining useful life learned from a fleet's run-to-failure history.

For assets with many similar units and recorded failures (engines, pumps of one model, filter
elements), the history of units that ran to failure teaches how sensor levels map to the life
left. `RulModel.fit` learns it; `RulModel.predict` gives every unit's RUL at its latest record with
an empirical interval. Pure: pandas in, pandas out; numpy only (no learning library).

1. Sensors are standardised on the training units, then smoothed per unit by causal exponentially
   weighted means over several spans (``spans``, in records): the short one follows the latest
   level, the long ones where it came from, so their differences carry the local trend.
2. An additive model: each smoothed sensor enters through a hinge basis (a line plus ``knots``
   kinks at its training quantiles), fitted by ridge regression to the piecewise-linear target
   ``min(RUL, cap)`` (the usual convention: early in life the sensors cannot tell RUL apart).
3. A monotone-ish calibration of that index to RUL by a second hinge fit (knots every ``cap``/6),
   then clipped to [0, cap].
4. Intervals from out-of-fold errors: the training units are split in ``folds``; each fold is
   predicted by a model fitted on the others, and the error quantiles per band of predicted RUL
   give the interval of a new prediction in that band.

No label of the predicted units is used; everything is fitted on the training units.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from flowline.core.errors import FlowlineError


class RulError(FlowlineError):
    """Training data that cannot be learned from (missing columns, too few units)."""


@dataclass(frozen=True)
class RulSettings:
    cap: float = 125.0  # records; target min(RUL, cap)
    spans: tuple[int, ...] = (5, 15, 40)  # EWMA spans, records
    knots: int = 3  # hinge knots per smoothed sensor
    ridge: float = 10.0
    interval: float = 0.95
    folds: int = 5
    bands: int = 4  # bands of predicted RUL with their own error quantiles


@dataclass
class _Fit:
    mean: np.ndarray
    std: np.ndarray
    knots: list[np.ndarray]
    coef: np.ndarray
    calib_knots: np.ndarray
    calib: np.ndarray


def _hinge(x: np.ndarray, knots: np.ndarray) -> np.ndarray:
    return np.column_stack([x, *(np.maximum(x - k, 0.0) for k in knots)])


def _ridge(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    penalty = lam * np.eye(x.shape[1])
    penalty[0, 0] = 0.0  # the intercept is not shrunk
    return np.asarray(np.linalg.solve(x.T @ x + penalty, x.T @ y), dtype=float)


@dataclass
class RulModel:
    """A fitted model; build it with `RulModel.fit`."""

    unit_col: str
    time_col: str
    sensors: list[str]
    settings: RulSettings
    _fit: _Fit
    error_bands: np.ndarray = field(repr=False)  # upper edges of predicted-RUL bands
    error_quantiles: np.ndarray = field(repr=False)  # per band: (lower, upper) error quantiles

    # --- features ---------------------------------------------------------------------------
    @staticmethod
    def _smoothed(frame: pd.DataFrame, unit_col: str, sensors: list[str], mean: np.ndarray, std: np.ndarray,
                  spans: Sequence[int]) -> np.ndarray:
        z = (frame[sensors].to_numpy(dtype=float) - mean) / std
        units = frame[unit_col].to_numpy()
        out = np.empty((len(frame), len(sensors) * len(spans)))
        for unit in pd.unique(units):
            rows = np.nonzero(units == unit)[0]
            block = pd.DataFrame(z[rows])
            out[rows] = np.hstack([block.ewm(span=s).mean().to_numpy() for s in spans])
        return out

    @staticmethod
    def _design(x: np.ndarray, knots: list[np.ndarray]) -> np.ndarray:
        return np.column_stack([np.ones(len(x)), *(_hinge(x[:, j], knots[j]) for j in range(x.shape[1]))])

    # --- fitting ----------------------------------------------------------------------------
    @staticmethod
    def _train(frame: pd.DataFrame, unit_col: str, time_col: str, sensors: list[str], s: RulSettings) -> _Fit:
        target = np.minimum(frame.groupby(unit_col)[time_col].transform("max") - frame[time_col], s.cap).to_numpy(
            dtype=float
        )
        values = frame[sensors].to_numpy(dtype=float)
        mean, std = values.mean(axis=0), values.std(axis=0)
        std = np.where(std > 0, std, 1.0)
        x = RulModel._smoothed(frame, unit_col, sensors, mean, std, s.spans)
        grid = np.linspace(0, 1, s.knots + 2)[1:-1]
        knots = [np.quantile(x[:, j], grid) for j in range(x.shape[1])]
        design = RulModel._design(x, knots)
        coef = _ridge(design, target, s.ridge)
        index = design @ coef
        calib_knots = np.linspace(0, s.cap, 7)[1:-1]
        calib_design = np.column_stack([np.ones(len(index)), _hinge(index, calib_knots)])
        calib = np.linalg.lstsq(calib_design, target, rcond=None)[0]
        return _Fit(mean, std, knots, coef, calib_knots, calib)

    @staticmethod
    def _apply(fit: _Fit, frame: pd.DataFrame, unit_col: str, sensors: list[str], s: RulSettings) -> np.ndarray:
        x = RulModel._smoothed(frame, unit_col, sensors, fit.mean, fit.std, s.spans)
        index = RulModel._design(x, fit.knots) @ fit.coef
        rul = np.column_stack([np.ones(len(index)), _hinge(index, fit.calib_knots)]) @ fit.calib
        return np.asarray(np.clip(rul, 0.0, s.cap), dtype=float)

    @classmethod
    def fit(
        cls, history: pd.DataFrame, *, unit_col: str, time_col: str, sensors: Sequence[str],
        settings: RulSettings | None = None,
    ) -> RulModel:
        """Learn from ``history``: one row per unit and time step, every unit run to failure (its last
        row is its failure)."""
        s = settings or RulSettings()
        sensors = list(sensors)
        missing = [c for c in (unit_col, time_col, *sensors) if c not in history.columns]
        if missing:
            raise RulError(f"training data lacks column(s) {', '.join(missing)}")
        frame = history.sort_values([unit_col, time_col], kind="stable").reset_index(drop=True)
        units = pd.unique(frame[unit_col])
        if len(units) < 2 * s.folds:
            raise RulError(f"need at least {2 * s.folds} run-to-failure units, got {len(units)}")
        # Out-of-fold errors for the intervals: what the model gets wrong on units it has not seen.
        target = np.minimum(frame.groupby(unit_col)[time_col].transform("max") - frame[time_col], s.cap).to_numpy(
            dtype=float
        )
        predicted = np.empty(len(frame))
        for k in range(s.folds):
            held = np.isin(frame[unit_col].to_numpy(), units[k :: s.folds])
            fold = cls._train(frame[~held].reset_index(drop=True), unit_col, time_col, sensors, s)
            predicted[held] = cls._apply(fold, frame[held].reset_index(drop=True), unit_col, sensors, s)
        errors = target - predicted
        edges = np.quantile(predicted, np.linspace(0, 1, s.bands + 1)[1:])
        band = np.minimum(np.searchsorted(edges, predicted), s.bands - 1)
        tail = (1 - s.interval) / 2
        # Many predictions sit at the cap, so a band can be (nearly) empty: it takes every error then.
        quantiles = np.array([
            np.quantile(errors[band == b] if np.sum(band == b) >= 20 else errors, [tail, 1 - tail])
            for b in range(s.bands)
        ])
        model = cls(unit_col, time_col, sensors, s, cls._train(frame, unit_col, time_col, sensors, s), edges, quantiles)
        model.cv_rmse = float(np.sqrt(np.mean(errors**2)))
        return model

    cv_rmse: float = float("nan")  # out-of-fold RMSE against the capped target, every record

    def predict(self, history: pd.DataFrame) -> pd.DataFrame:
        """RUL at each unit's latest row, with the ``interval`` band: columns rul, lower, upper (index: unit)."""
        frame = history.sort_values([self.unit_col, self.time_col], kind="stable").reset_index(drop=True)
        rul = self._apply(self._fit, frame, self.unit_col, self.sensors, self.settings)
        last = frame.groupby(self.unit_col, sort=False).tail(1).index.to_numpy()
        point = rul[last]
        band = np.minimum(np.searchsorted(self.error_bands, point), self.settings.bands - 1)
        lower = np.clip(point + self.error_quantiles[band, 0], 0.0, None)
        upper = point + self.error_quantiles[band, 1]
        return pd.DataFrame(
            {"rul": point, "lower": lower, "upper": upper},
            index=pd.Index(frame[self.unit_col].to_numpy()[last], name=self.unit_col),
        )
