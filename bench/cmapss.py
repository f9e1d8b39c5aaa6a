"""Remaining useful life on NASA C-MAPSS FD001 with Flowline's degradation approach.

Data: ``../shared/data/cmapss`` relative to the repo root (read-only, see its README); the bench
exits with a clear message when it is missing.

Method (statsmodels throughout):

1. Health indicator HI in [0, 1] (1 healthy, 0 failed) from the 14 informative sensors: an OLS
   regression, fitted on the 100 training engines, of the piecewise-linear degradation target
   ``min(RUL, 125) / 125`` on the standardised sensor levels and their recent trends (mean of the
   last W cycles minus mean of the last 3W, per sensor: a causal local-trend estimate). W is chosen
   among 0 (levels only), 10, 20, 30 by 5-fold cross-validation over the *training* engines.
2. Trend forecast to the failure threshold: on the training engines the HI falls at 1/125 per
   cycle once degradation has started and reaches the threshold 0 at failure; the RUL at a test
   engine's last cycle is the number of cycles for its HI to reach 0 at that rate
   (``HI x 125``), with the OLS prediction interval as its uncertainty.
3. Flag: DEGRADING or worse when the predicted RUL is at most 30 cycles (the issue's definition).

Reports RMSE and the NASA score (d = predicted - true; exp(-d/13)-1 early, exp(d/10)-1 late) next
to the published table, and precision/recall of the flag for engines whose true RUL is <= 30.
The test figures of every candidate window are printed too, for transparency; the choice uses
training data only.

    .venv/bin/python bench/cmapss.py [--quick]   (--quick is the same: it takes a few seconds)
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import statsmodels.api as sm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cmapss"
COLUMNS = ["unit", "cycle", "setting1", "setting2", "setting3"] + [f"s{i}" for i in range(1, 22)]
SENSORS = ["s2", "s3", "s4", "s7", "s8", "s9", "s11", "s12", "s13", "s14", "s15", "s17", "s20", "s21"]
CAP = 125
FLAG_RUL = 30


def load(name: str) -> pd.DataFrame:
    return pd.read_csv(DATA / name, sep=r"\s+", header=None, names=COLUMNS)


def features(frame: pd.DataFrame, mean: pd.Series, std: pd.Series, window: int) -> np.ndarray:
    z = (frame[SENSORS] - mean) / std
    parts = [z.to_numpy()]
    if window:
        by_unit = z.groupby(frame["unit"])
        recent = by_unit.transform(lambda c: c.rolling(window, min_periods=1).mean())
        longer = by_unit.transform(lambda c: c.rolling(3 * window, min_periods=1).mean())
        parts.append((recent - longer).to_numpy())
    return np.asarray(sm.add_constant(np.hstack(parts), has_constant="add"))


def nasa_score(d: np.ndarray) -> float:
    return float(np.sum(np.where(d < 0, np.exp(-d / 13) - 1, np.exp(d / 10) - 1)))


def _fit_hi(train: pd.DataFrame, window: int) -> tuple[Any, pd.Series, pd.Series]:
    mean, std = train[SENSORS].mean(), train[SENSORS].std()
    rul = train.groupby("unit")["cycle"].transform("max") - train["cycle"]
    hi_target = np.minimum(rul.to_numpy(), CAP) / CAP
    return sm.OLS(hi_target, features(train, mean, std, window)).fit(), mean, std


def choose_window(train: pd.DataFrame, windows: tuple[int, ...], folds: int = 5) -> dict[int, float]:
    """Cross-validated RMSE (cycles) per trend window, on training engines only: fit on 4/5 of the
    engines, predict every cycle of the rest (the features are causal, so a cycle's prediction is
    what a truncated series would give) against the capped RUL."""
    units = train["unit"].unique()
    out = {}
    for window in windows:
        errors = []
        for k in range(folds):
            held = np.isin(train["unit"], units[k::folds])
            model, mean, std = _fit_hi(train[~held], window)
            part = train[held].reset_index(drop=True)
            rul = (part.groupby("unit")["cycle"].transform("max") - part["cycle"]).to_numpy()
            pred = np.clip(model.predict(features(part, mean, std, window)), 0, 1) * CAP
            errors.append(pred - np.minimum(rul, CAP))
        out[window] = float(np.sqrt(np.mean(np.concatenate(errors) ** 2)))
    return out


def predict(train: pd.DataFrame, test: pd.DataFrame, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Predicted RUL and its 95% upper bound at each test engine's last cycle."""
    model, mean, std = _fit_hi(train, window)
    last = test.groupby("unit").tail(1).index
    x_last = features(test, mean, std, window)[test.index.get_indexer(last)]
    frame = model.get_prediction(x_last).summary_frame(alpha=0.05)
    hi = np.clip(frame["mean"].to_numpy(), 0, 1)
    upper = np.clip(frame["obs_ci_upper"].to_numpy(), 0, 1)
    return hi * CAP, upper * CAP  # cycles for the HI to fall to 0 at 1/CAP per cycle


def published() -> list[tuple[str, str, str]]:
    with (DATA / "published_results.csv").open(newline="") as handle:
        return [(row["method"], row["FD001_RMSE"], row["FD001_score"]) for row in csv.DictReader(handle)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="same as the full run (it is fast)")
    parser.parse_args()
    if not (DATA / "train_FD001.txt").exists():
        sys.exit(f"C-MAPSS data not found in {DATA}: this bench needs ../shared/data/cmapss (see its README)")
    train, test = load("train_FD001.txt"), load("test_FD001.txt")
    truth = np.loadtxt(DATA / "RUL_FD001.txt")

    windows = (0, 10, 20, 30)
    cv = choose_window(train, windows)
    chosen = min(cv, key=lambda w: cv[w])
    by_window = {}
    for window in windows:
        pred, _ = predict(train, test, window)
        d = pred - truth
        by_window[window] = (float(np.sqrt(np.mean(d**2))), nasa_score(d))
    pred, upper = predict(train, test, chosen)
    d = pred - truth
    rmse, score = float(np.sqrt(np.mean(d**2))), nasa_score(d)
    flagged = pred <= FLAG_RUL
    near = truth <= FLAG_RUL
    tp = int(np.sum(flagged & near))
    precision = tp / max(1, int(flagged.sum()))
    recall = tp / max(1, int(near.sum()))

    print(f"{'method':40s} {'FD001 RMSE':>10s} {'score':>10s}")
    for method, p_rmse, p_score in published():
        print(f"{method:40s} {p_rmse:>10s} {p_score:>10s}")
    print(f"{'Flowline HI + trend to threshold':40s} {rmse:10.2f} {score:10.1f}   <- this bench")
    print(f"trend window chosen by 5-fold CV on the training engines: {chosen} cycles")
    for window, (w_rmse, w_score) in by_window.items():
        print(f"  (window {window:2d}: CV RMSE on train {cv[window]:.2f}; test RMSE {w_rmse:.2f}, score {w_score:.1f})")
    print(f"DEGRADING flag (predicted RUL <= {FLAG_RUL}) for engines with true RUL <= {FLAG_RUL}: "
          f"precision {precision:.2f}, recall {recall:.2f} ({tp} of {int(near.sum())} engines, "
          f"{int(flagged.sum())} flagged)")
    print(f"95% upper bound covers the true RUL for {np.mean(truth <= upper):.0%} of engines")
    write_results(
        "cmapss",
        {
            "fd001_rmse_cycles": round(rmse, 3),
            "fd001_nasa_score": round(score, 1),
            "fd001_rmse_no_trend_features_cycles": round(by_window[0][0], 3),
            "fd001_rmse_window10_cycles": round(by_window[10][0], 3),
            "trend_window_cycles": chosen,
            "train_cv_rmse_cycles": round(cv[chosen], 3),
            "target_rmse_cycles": 18.45,
            "flag_precision_rul_le_30": round(precision, 3),
            "flag_recall_rul_le_30": round(recall, 3),
            "engines_true_rul_le_30": int(near.sum()),
            "upper95_coverage": round(float(np.mean(truth <= upper)), 3),
        },
    )


if __name__ == "__main__":
    main()
