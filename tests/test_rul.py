"""Fleet RUL model (analytics/flowline/analytics/rul.py) on a synthetic run-to-failure fleet with known truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from flowline.analytics.rul import RulError, RulModel, RulSettings


def _fleet(units: int, seed: int) -> pd.DataFrame:
    """Each unit lives 120-220 steps; two sensors rise exponentially towards failure, one is noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for unit in range(units):
        life = int(rng.integers(120, 220))
        t = np.arange(1, life + 1)
        wear = np.exp((t - life) / 25.0)  # 1 at failure, ~0 early
        rows.append(pd.DataFrame({
            "unit": unit, "t": t,
            "a": 10 + 5 * wear + rng.normal(0, 0.3, life),
            "b": 50 - 8 * wear + rng.normal(0, 0.5, life),
            "c": rng.normal(0, 1, life),
        }))
    return pd.concat(rows, ignore_index=True)


def test_learns_rul_from_the_fleet_and_its_intervals_hold() -> None:
    train = _fleet(40, seed=1)
    test_full = _fleet(30, seed=2)
    rng = np.random.default_rng(3)
    cuts, truth = [], []
    for _unit, g in test_full.groupby("unit"):
        keep = int(rng.integers(40, len(g)))  # the unit is still running: truncated history
        cuts.append(g.iloc[:keep])
        truth.append(len(g) - keep)
    test = pd.concat(cuts)
    model = RulModel.fit(train, unit_col="unit", time_col="t", sensors=["a", "b", "c"], settings=RulSettings(cap=60))
    out = model.predict(test)
    expected = np.minimum(np.array(truth), 60)
    assert list(out.index) == list(range(30))
    rmse = float(np.sqrt(np.mean((out["rul"].to_numpy() - expected) ** 2)))
    assert rmse < 12, rmse  # a blind guess (the mean) is ~22
    assert ((out["lower"] <= out["rul"]) & (out["rul"] <= out["upper"])).all()
    covered = float(np.mean((expected >= out["lower"]) & (expected <= out["upper"])))
    assert covered >= 0.8, covered
    near = expected <= 10
    assert (out["rul"].to_numpy()[near] <= 20).all()


def test_refuses_bad_training_data() -> None:
    train = _fleet(6, seed=1)
    with pytest.raises(RulError, match="at least 10 run-to-failure units, got 6"):
        RulModel.fit(train, unit_col="unit", time_col="t", sensors=["a"])
    with pytest.raises(RulError, match="lacks column"):
        RulModel.fit(train, unit_col="unit", time_col="t", sensors=["zz"])
