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


@pytest.fixture(scope="module")
def fitted() -> tuple[RulModel, pd.DataFrame, np.ndarray]:
    """A model of a 40-unit fleet and 30 other units still running (truncated), with their true RUL."""
    train = _fleet(40, seed=1)
    test_full = _fleet(30, seed=2)
    rng = np.random.default_rng(3)
    cuts, truth = [], []
    for _unit, g in test_full.groupby("unit"):
        keep = int(rng.integers(40, len(g)))  # the unit is still running: truncated history
        cuts.append(g.iloc[:keep])
        truth.append(len(g) - keep)
    model = RulModel.fit(train, unit_col="unit", time_col="t", sensors=["a", "b", "c"],
                         settings=RulSettings(cap=60, members=2, epochs=40))
    return model, pd.concat(cuts), np.array(truth, dtype=float)


def test_learns_rul_from_the_fleet_and_its_intervals_hold(fitted: tuple[RulModel, pd.DataFrame, np.ndarray]) -> None:
    model, test, truth = fitted
    out = model.predict(test)
    expected = np.minimum(truth, 60)
    assert list(out.index) == list(range(30))
    rmse = float(np.sqrt(np.mean((out["rul"].to_numpy() - expected) ** 2)))
    assert rmse < 5, rmse  # a blind guess (the mean) is ~22
    assert ((out["lower"] <= out["rul"]) & (out["rul"] <= out["upper"])).all()
    covered = float(np.mean((expected >= out["lower"]) & (expected <= out["upper"])))
    assert covered >= 0.85, covered
    near = expected <= 10
    assert (out["rul"].to_numpy()[near] <= 20).all()
    assert 0 < model.cv_rmse < 8, model.cv_rmse  # out-of-fold, one network, true RUL <= 72


def test_a_units_rul_depends_only_on_its_own_history(fitted: tuple[RulModel, pd.DataFrame, np.ndarray]) -> None:
    """Shuffled rows, other units left out, or later records added to another unit: the same RUL."""
    model, test, truth = fitted
    together = model.predict(test)
    shuffled = model.predict(test.sample(frac=1.0, random_state=4))
    pd.testing.assert_frame_equal(together, shuffled)
    alone = model.predict(test[test["unit"] == 7])
    assert alone.loc[7, "rul"] == pytest.approx(together.loc[7, "rul"], abs=1e-9)
    # The same unit seen earlier in its life (half its records) has more life left.
    unit = int(np.argmin(truth))
    one = test[test["unit"] == unit]
    early = model.predict(one.iloc[: len(one) // 2])
    assert early.loc[unit, "rul"] > together.loc[unit, "rul"] + 20


def test_refuses_bad_training_data() -> None:
    train = _fleet(6, seed=1)
    with pytest.raises(RulError, match="at least 10 run-to-failure units, got 6"):
        RulModel.fit(train, unit_col="unit", time_col="t", sensors=["a"])
    with pytest.raises(RulError, match="lacks column"):
        RulModel.fit(train, unit_col="unit", time_col="t", sensors=["zz"])
