"""Remaining useful life learned from a fleet's run-to-failure history.

For assets with many similar units and recorded failures (engines, pumps of one model, filter
elements), the history of units that ran to failure teaches how sensor levels map to the life
left. `RulModel.fit` learns it; `RulModel.predict` gives every unit's RUL at its latest record with
an empirical interval. Pure: pandas in, pandas out; numpy only (no learning library).

1. Features per record, each from that unit's records up to it (causal, so a unit still running is
   described as a failed one was at the same point): the sensors standardised on the training
   units, smoothed by exponentially weighted means over several spans (``spans``, in records); the
   mean and least-squares slope over the last ``window`` records; and the unit's age (records since
   its first). The short spans follow the latest level, the long ones where it came from; the age
   tells a young unit with a noisy reading from a worn one.
2. The target is the piecewise-linear ``min(RUL, cap)`` (the usual convention: early in life the
   sensors cannot tell RUL apart). A small multilayer perceptron (``hidden`` ReLU layers, Adam,
   squared error) learns it; ``members`` of them with different seeds are averaged, which takes
   away most of the seed-to-seed scatter. The prediction is clipped to [0, cap].
3. Out-of-fold errors: the training units are split in ``folds``; each fold is predicted by a
   single network fitted on the others (cheaper than the ensemble, and it errs a little more, so
   the intervals lean wide). Their errors against the true (uncapped) RUL, at every record whose
   true RUL is at most 1.2 x ``cap`` (units near enough to failure to be told apart, seen at every
   point of that stretch, as units still running are), give per band of predicted RUL the interval
   of a new prediction in that band, and `cv_rmse`. A prediction at the cap means "at least about
   the cap": its upper bound assumes the unit is within that stretch of its failure.

No label of the predicted units is used; everything is fitted on the training units. The settings
were chosen by grouped cross-validation over C-MAPSS FD001's training engines (``bench/cmapss.py``).
"""

from __future__ import annotations

import itertools
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
    window: int = 20  # records for the recent mean and slope
    hidden: tuple[int, ...] = (32, 16)  # neurons per hidden layer
    members: int = 5  # networks averaged
    epochs: int = 70
    learning_rate: float = 3e-3
    l2: float = 1e-3
    batch: int = 256
    seed: int = 0
    interval: float = 0.95
    folds: int = 5
    bands: int = 4  # bands of predicted RUL with their own error quantiles


def _views(flat: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Consecutive pieces of ``flat`` shaped as ``shapes`` (views: writing to them writes to it)."""
    out, offset = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(flat[offset : offset + size].reshape(shape))
        offset += size
    return out


@dataclass
class _Net:
    """One fitted perceptron, with the scaling of its inputs and target."""

    x_mean: np.ndarray
    x_std: np.ndarray
    y_mean: float
    y_std: float
    weights: list[np.ndarray]
    biases: list[np.ndarray]

    @classmethod
    def train(cls, x: np.ndarray, y: np.ndarray, s: RulSettings, seed: int) -> _Net:
        rng = np.random.default_rng(seed)
        x_mean, x_std = x.mean(axis=0), x.std(axis=0)
        x_std = np.where(x_std > 0, x_std, 1.0)
        y_mean, y_std = float(y.mean()), float(y.std()) or 1.0
        xs, ys = (x - x_mean) / x_std, (y - y_mean) / y_std
        sizes = [x.shape[1], *s.hidden, 1]
        shapes = [*itertools.pairwise(sizes), *((b,) for b in sizes[1:])]
        # All parameters live in one flat vector (the weights and biases are views of it), so that an
        # Adam step is a few whole-vector operations rather than a few per layer.
        params = np.zeros(sum(int(np.prod(shape)) for shape in shapes))
        grads = np.zeros_like(params)
        layers = len(sizes) - 1
        views = _views(params, shapes)
        weights, biases = views[:layers], views[layers:]
        grad_views = _views(grads, shapes)
        for w in weights:
            w[:] = rng.normal(0.0, np.sqrt(2.0 / w.shape[0]), w.shape)
        first, second = np.zeros_like(params), np.zeros_like(params)
        step = 0
        for epoch in range(s.epochs):
            # Cosine decay: large steps first, then settle, without a schedule to tune.
            rate = s.learning_rate * 0.5 * (1.0 + np.cos(np.pi * epoch / s.epochs))
            order = rng.permutation(len(xs))
            for start in range(0, len(xs), s.batch):
                rows = order[start : start + s.batch]
                acts = [xs[rows]]
                for k in range(layers):
                    pre = acts[-1] @ weights[k] + biases[k]
                    acts.append(np.maximum(pre, 0.0) if k < layers - 1 else pre)
                grad = (acts[-1][:, 0] - ys[rows])[:, None] * (2.0 / len(rows))
                for k in range(layers - 1, -1, -1):
                    np.matmul(acts[k].T, grad, out=grad_views[k])
                    grad_views[k] += s.l2 * weights[k]
                    grad.sum(axis=0, out=grad_views[layers + k])
                    if k:
                        grad = (grad @ weights[k].T) * (acts[k] > 0)
                step += 1
                first *= 0.9  # Adam
                first += 0.1 * grads
                second *= 0.999
                second += 0.001 * grads * grads
                params -= rate * (first / (1 - 0.9**step)) / (np.sqrt(second / (1 - 0.999**step)) + 1e-8)
        return cls(x_mean, x_std, y_mean, y_std, [w.copy() for w in weights], [b.copy() for b in biases])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        act = (x - self.x_mean) / self.x_std
        for k, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            act = act @ w + b
            if k < len(self.weights) - 1:
                act = np.maximum(act, 0.0)
        return np.asarray(act[:, 0] * self.y_std + self.y_mean, dtype=float)


@dataclass
class _Fit:
    mean: np.ndarray  # sensor standardisation, from the training units
    std: np.ndarray
    nets: list[_Net]


def _life_left(frame: pd.DataFrame, unit_col: str) -> np.ndarray:
    """Records until each unit's last one (its failure); ``frame`` sorted by unit and time."""
    position = frame.groupby(unit_col, sort=False).cumcount().to_numpy()
    size = frame.groupby(unit_col, sort=False)[unit_col].transform("size").to_numpy()
    return np.asarray(size - 1 - position, dtype=float)


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
    def _features(frame: pd.DataFrame, unit_col: str, sensors: list[str], mean: np.ndarray, std: np.ndarray,
                  s: RulSettings) -> np.ndarray:
        """One row per record of ``frame`` (sorted by unit and time), from that unit's records up to it."""
        z = (frame[sensors].to_numpy(dtype=float) - mean) / std
        units = frame[unit_col].to_numpy()
        position = frame.groupby(unit_col, sort=False).cumcount().to_numpy()
        smoothed = [
            pd.DataFrame(z).groupby(units, sort=False).ewm(span=span).mean().reset_index(level=0, drop=True)
            .sort_index().to_numpy()
            for span in s.spans
        ]
        # Mean and slope over the last `window` records (fewer at a unit's start), from running sums;
        # the row number serves as time since records are equally spaced within a unit.
        n = len(z)
        row = np.arange(n, dtype=float)
        first = np.maximum(np.arange(n) - np.minimum(position, s.window - 1), 0)
        end = np.arange(1, n + 1)

        def window_sum(values: np.ndarray) -> np.ndarray:
            running = np.concatenate([np.zeros((1, *values.shape[1:])), np.cumsum(values, axis=0)])
            return np.asarray(running[end] - running[first])

        count = (end - first).astype(float)
        sum_z, sum_t = window_sum(z), window_sum(row)
        sum_tz, sum_tt = window_sum(row[:, None] * z), window_sum(row * row)
        spread = sum_tt - sum_t**2 / count
        slope = (sum_tz - sum_t[:, None] * sum_z / count[:, None]) / np.where(spread > 0, spread, 1.0)[:, None]
        slope[spread <= 0] = 0.0
        return np.hstack([*smoothed, sum_z / count[:, None], slope, (position + 1.0)[:, None]])

    # --- fitting ----------------------------------------------------------------------------
    @staticmethod
    def _train(frame: pd.DataFrame, unit_col: str, sensors: list[str], s: RulSettings, members: int) -> _Fit:
        values = frame[sensors].to_numpy(dtype=float)
        mean, std = values.mean(axis=0), values.std(axis=0)
        std = np.where(std > 0, std, 1.0)
        x = RulModel._features(frame, unit_col, sensors, mean, std, s)
        target = np.minimum(_life_left(frame, unit_col), s.cap)
        return _Fit(mean, std, [_Net.train(x, target, s, s.seed + k) for k in range(members)])

    @staticmethod
    def _apply(fit: _Fit, frame: pd.DataFrame, unit_col: str, sensors: list[str], s: RulSettings) -> np.ndarray:
        x = RulModel._features(frame, unit_col, sensors, fit.mean, fit.std, s)
        rul = np.mean([net(x) for net in fit.nets], axis=0)
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
        life_left = _life_left(frame, unit_col)
        predicted = np.empty(len(frame))
        for k in range(s.folds):
            held = np.isin(frame[unit_col].to_numpy(), units[k :: s.folds])
            fold = cls._train(frame[~held].reset_index(drop=True), unit_col, sensors, s, members=1)
            predicted[held] = cls._apply(fold, frame[held].reset_index(drop=True), unit_col, sensors, s)
        # Only records near enough to failure to be told apart: early in life every unit is predicted
        # at the cap whatever its life, and those errors would say nothing of the units that matter.
        near = life_left <= 1.2 * s.cap
        errors, predicted = life_left[near] - predicted[near], predicted[near]
        edges = np.quantile(predicted, np.linspace(0, 1, s.bands + 1)[1:])
        band = np.minimum(np.searchsorted(edges, predicted), s.bands - 1)
        tail = (1 - s.interval) / 2
        # Many predictions sit at the cap, so a band can be (nearly) empty: it takes every error then.
        quantiles = np.array([
            np.quantile(errors[band == b] if np.sum(band == b) >= 20 else errors, [tail, 1 - tail])
            for b in range(s.bands)
        ])
        model = cls(unit_col, time_col, sensors, s, cls._train(frame, unit_col, sensors, s, s.members), edges,
                    quantiles)
        model.cv_rmse = float(np.sqrt(np.mean(errors**2)))
        return model

    cv_rmse: float = float("nan")  # out-of-fold RMSE (one network) where the true RUL <= 1.2 x cap

    def predict(self, history: pd.DataFrame) -> pd.DataFrame:
        """RUL at each unit's latest row, with the ``interval`` band: columns rul, lower, upper (index: unit)."""
        frame = history.sort_values([self.unit_col, self.time_col], kind="stable").reset_index(drop=True)
        last = frame.groupby(self.unit_col, sort=False).tail(1).index.to_numpy()
        point = self._apply(self._fit, frame, self.unit_col, self.sensors, self.settings)[last]
        band = np.minimum(np.searchsorted(self.error_bands, point), self.settings.bands - 1)
        lower = np.clip(point + self.error_quantiles[band, 0], 0.0, None)
        upper = point + self.error_quantiles[band, 1]
        return pd.DataFrame(
            {"rul": point, "lower": lower, "upper": upper},
            index=pd.Index(frame[self.unit_col].to_numpy()[last], name=self.unit_col),
        )
