"""Remaining useful life on NASA C-MAPSS FD001 with Flowline's fleet RUL model.

Data: a folder with ``train_FD001.txt``, ``test_FD001.txt``, ``RUL_FD001.txt`` (NASA's files) and
optionally ``published_results.csv``, given by ``--data`` or ``FLOWLINE_CMAPSS_DIR``; the bench
exits with a clear message when it is missing.

Method: `flowline.analytics.rul.RulModel` (see its docstring), fitted on the 100 training engines
only: the 14 informative sensors smoothed per engine over 5, 15 and 40 cycles, an additive hinge
model of ``min(RUL, 125)`` and a calibration of it, intervals from out-of-fold errors. The RUL at
each test engine's last cycle is compared with the true RUL. The previous approach (a linear
health indicator of levels and trends) is printed too, for reference.

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=os.environ.get("FLOWLINE_CMAPSS_DIR"),
                        help="C-MAPSS folder (default: $FLOWLINE_CMAPSS_DIR)")
    parser.add_argument("--quick", action="store_true", help="same as the full run (it takes seconds)")
    args = parser.parse_args()
    if args.data is None or not (args.data / "train_FD001.txt").exists():
        sys.exit("C-MAPSS data not found: give --data DIR or set FLOWLINE_CMAPSS_DIR to a folder with NASA's "
                 "train_FD001.txt, test_FD001.txt and RUL_FD001.txt")
    train, test = load(args.data, "train_FD001.txt"), load(args.data, "test_FD001.txt")
    truth = np.loadtxt(args.data / "RUL_FD001.txt")
    started = time.perf_counter()
    settings = RulSettings()
    model = RulModel.fit(train, unit_col="unit", time_col="cycle", sensors=SENSORS, settings=settings)
    out = model.predict(test)
    elapsed = time.perf_counter() - started
    pred = out["rul"].to_numpy()
    d = pred - truth
    rmse, score = float(np.sqrt(np.mean(d**2))), nasa_score(d)
    flagged = pred <= FLAG_RUL
    near = truth <= FLAG_RUL
    tp = int(np.sum(flagged & near))
    precision = tp / max(1, int(flagged.sum()))
    recall = tp / max(1, int(near.sum()))
    inside = float(np.mean((truth >= out["lower"].to_numpy()) & (truth <= out["upper"].to_numpy())))
    below_upper = float(np.mean(truth <= out["upper"].to_numpy()))

    print(f"{'method':40s} {'FD001 RMSE':>10s} {'score':>10s}")
    for method, p_rmse, p_score in published(args.data):
        print(f"{method:40s} {p_rmse:>10s} {p_score:>10s}")
    print(f"{'Flowline fleet RUL model':40s} {rmse:10.2f} {score:10.1f}   <- this bench")
    print(f"out-of-fold RMSE on the training engines (every cycle, capped target): {model.cv_rmse:.2f}")
    print(f"DEGRADING flag (predicted RUL <= {FLAG_RUL}) for engines with true RUL <= {FLAG_RUL}: "
          f"precision {precision:.2f}, recall {recall:.2f} ({tp} of {int(near.sum())} engines, "
          f"{int(flagged.sum())} flagged)")
    print(f"95% interval holds the true RUL for {inside:.0%} of engines; its upper bound for {below_upper:.0%}")
    write_results(
        "cmapss",
        {
            "method": "flowline.analytics.rul.RulModel (EWMA 5/15/40, additive hinge ridge, calibrated)",
            "fd001_rmse_cycles": round(rmse, 3),
            "fd001_nasa_score": round(score, 1),
            "train_cv_rmse_cycles": round(model.cv_rmse, 3),
            "target_rmse_cycles": 12.6,
            "flag_precision_rul_le_30": round(precision, 3),
            "flag_recall_rul_le_30": round(recall, 3),
            "engines_true_rul_le_30": int(near.sum()),
            "interval95_coverage": round(inside, 3),
            "upper95_coverage": round(below_upper, 3),
            "fit_and_predict_s": round(elapsed, 2),
        },
    )


if __name__ == "__main__":
    main()
