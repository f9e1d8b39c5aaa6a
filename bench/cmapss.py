"""Remaining useful life on NASA C-MAPSS FD001 with Flowline's fleet RUL model.

Data: a folder with ``train_FD001.txt``, ``test_FD001.txt``, ``RUL_FD001.txt`` (NASA's files) and
optionally ``published_results.csv``, given by ``--data`` or ``FLOWLINE_CMAPSS_DIR``; the bench
exits with a clear message when it is missing.

Method: `flowline.analytics.rul.RulModel` (see its docstring), fitted on the 100 training engines
only: the 14 sensors that vary (the other 7 are constant in FD001), smoothed per engine over 5, 15
and 40 cycles, their mean and slope over the last 20 cycles and the engine's age, five small
perceptrons averaged, trained on ``min(RUL, 125)``; intervals from out-of-fold errors. The RUL at
each test engine's last cycle is compared with the true RUL.

Validation that mimics the test set (its engines stop at random points, many early in life): the
training engines in 5 groups; for each, a model fitted on the other 80 engines predicts the group's
engines cut at 10 random cycles each where the true RUL is at most 150 (1.2 x the cap), from the
engine's first cycle. The settings were chosen on this figure only (`--quick` skips it).

Reports RMSE and the NASA score (d = predicted - true; exp(-d/13)-1 early, exp(d/10)-1 late) next
to the published table, precision/recall of the flag (predicted RUL <= 30) for engines whose true
RUL is <= 30, and the coverage of the 95 % interval and of its upper bound.

    FLOWLINE_CMAPSS_DIR=/path/to/cmapss .venv/bin/python bench/cmapss.py [--data DIR]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results

from flowline.analytics.rul import RulModel, RulSettings

COLUMNS = ["unit", "cycle", "setting1", "setting2", "setting3"] + [f"s{i}" for i in range(1, 22)]
SENSORS = ["s2", "s3", "s4", "s7", "s8", "s9", "s11", "s12", "s13", "s14", "s15", "s17", "s20", "s21"]
FLAG_RUL = 30


def load(data: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(data / name, sep=r"\s+", header=None, names=COLUMNS)


def nasa_score(d: np.ndarray) -> float:
    return float(np.sum(np.where(d < 0, np.exp(-d / 13) - 1, np.exp(d / 10) - 1)))


def published(data: Path) -> list[tuple[str, str, str]]:
    path = data / "published_results.csv"
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return [(row["method"], row["FD001_RMSE"], row["FD001_score"]) for row in csv.DictReader(handle)]


def scores(pred: np.ndarray, truth: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> dict[str, float]:
    d = pred - truth
    flagged, near = pred <= FLAG_RUL, truth <= FLAG_RUL
    tp = int(np.sum(flagged & near))
    return {
        "rmse": float(np.sqrt(np.mean(d**2))),
        "nasa": nasa_score(d),
        "precision": tp / max(1, int(flagged.sum())),
        "recall": tp / max(1, int(near.sum())),
        "tp": tp,
        "count": len(d),
        "near": int(near.sum()),
        "flagged": int(flagged.sum()),
        "inside": float(np.mean((truth >= lower) & (truth <= upper))),
        "below_upper": float(np.mean(truth <= upper)),
    }


def cross_validate(train: pd.DataFrame, settings: RulSettings, folds: int = 5, cuts: int = 10) -> dict[str, float]:
    """Grouped by engine; each held-out engine cut at `cuts` random cycles with true RUL <= 1.2 x cap."""
    rng = np.random.default_rng(0)
    engines = rng.permutation(train["unit"].unique())
    pred, truth, lower, upper = [], [], [], []
    for k in range(folds):
        held = train["unit"].isin(engines[k::folds])
        model = RulModel.fit(train[~held], unit_col="unit", time_col="cycle", sensors=SENSORS, settings=settings)
        pieces, rul = [], []
        for number, (_engine, g) in enumerate(train[held].groupby("unit")):
            life = len(g)
            ends = rng.choice(np.arange(max(1, life - int(1.2 * settings.cap)), life + 1), size=cuts, replace=False)
            for j, end in enumerate(ends):
                pieces.append(g.iloc[:end].assign(unit=number * cuts + j))
                rul.append(life - end)
        out = model.predict(pd.concat(pieces, ignore_index=True))
        pred.append(out["rul"].to_numpy())
        lower.append(out["lower"].to_numpy())
        upper.append(out["upper"].to_numpy())
        truth.append(np.array(rul, dtype=float))
    return scores(*(np.concatenate(a) for a in (pred, truth, lower, upper)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=os.environ.get("FLOWLINE_CMAPSS_DIR"),
                        help="C-MAPSS folder (default: $FLOWLINE_CMAPSS_DIR)")
    parser.add_argument("--quick", action="store_true", help="skip the cross-validation on the training engines")
    args = parser.parse_args()
    if args.data is None or not (args.data / "train_FD001.txt").exists():
        sys.exit("C-MAPSS data not found: give --data DIR or set FLOWLINE_CMAPSS_DIR to a folder with NASA's "
                 "train_FD001.txt, test_FD001.txt and RUL_FD001.txt")
    train, test = load(args.data, "train_FD001.txt"), load(args.data, "test_FD001.txt")
    truth = np.loadtxt(args.data / "RUL_FD001.txt")
    started, cpu = time.perf_counter(), time.process_time()
    settings = RulSettings()
    model = RulModel.fit(train, unit_col="unit", time_col="cycle", sensors=SENSORS, settings=settings)
    out = model.predict(test)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    test_scores = scores(out["rul"].to_numpy(), truth, out["lower"].to_numpy(), out["upper"].to_numpy())
    cv = None if args.quick else cross_validate(train, settings)

    print(f"{'method':40s} {'FD001 RMSE':>10s} {'score':>10s}")
    for method, p_rmse, p_score in published(args.data):
        print(f"{method:40s} {p_rmse:>10s} {p_score:>10s}")
    t = test_scores
    print(f"{'Flowline fleet RUL model':40s} {t['rmse']:10.2f} {t['nasa']:10.1f}   <- this bench")
    for name, f in (("test engines", t), ("cross-validation, cut training engines", cv)):
        if f is None:
            continue
        print(f"{name}: RMSE {f['rmse']:.2f}, NASA score {f['nasa']:.1f}; DEGRADING flag (predicted RUL <= {FLAG_RUL}) "
              f"for true RUL <= {FLAG_RUL}: precision {f['precision']:.2f}, recall {f['recall']:.2f} "
              f"({f['tp']:.0f} of {f['near']:.0f}, {f['flagged']:.0f} flagged); 95% interval holds the true RUL "
              f"for {f['inside']:.0%}, its upper bound for {f['below_upper']:.0%}")
    print(f"out-of-fold RMSE of one network, every training cycle with true RUL <= 150: {model.cv_rmse:.2f}")
    print(f"fit and predict: {elapsed:.1f} s ({cpu:.1f} s of CPU; the machine may be shared)")
    figures: dict[str, float | int | str] = {
        "method": "flowline.analytics.rul.RulModel (EWMA 5/15/40, 20-cycle mean and slope, age; 5 MLPs averaged)",
        "fd001_rmse_cycles": round(t["rmse"], 3),
        "fd001_nasa_score": round(t["nasa"], 1),
        "target_rmse_cycles": 12.6,
        "flag_precision_rul_le_30": round(t["precision"], 3),
        "flag_recall_rul_le_30": round(t["recall"], 3),
        "engines_true_rul_le_30": int(t["near"]),
        "interval95_coverage": round(t["inside"], 3),
        "upper95_coverage": round(t["below_upper"], 3),
        "oof_rmse_one_network_cycles": round(model.cv_rmse, 3),
        "fit_and_predict_s": round(elapsed, 2),
        "fit_and_predict_cpu_s": round(cpu, 2),
    }
    if cv is not None:
        figures.update({
            "train_cv_rmse_cycles": round(cv["rmse"], 3),
            "train_cv_nasa_score_per_100": round(100 * cv["nasa"] / cv["count"], 1),
            "train_cv_flag_precision": round(cv["precision"], 3),
            "train_cv_flag_recall": round(cv["recall"], 3),
            "train_cv_interval95_coverage": round(cv["inside"], 3),
        })
    write_results("cmapss", figures)


if __name__ == "__main__":
    main()
