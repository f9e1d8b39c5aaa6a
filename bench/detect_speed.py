"""`flowline detect` throughput: rows per second, scoring alone and end to end from a CSV file.

Target (issue 5): at least 20,000 rows/s. The series is 10-minute data with noise, a daily cycle
and a drift, so every estimator (profile, level, trend, hours to alarm) is exercised.

    .venv/bin/python bench/detect_speed.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results

from flowline.analytics.detect import DetectorSettings, score_csv, score_series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="200,000 rows instead of 2,000,000")
    args = parser.parse_args()
    n = 200_000 if args.quick else 2_000_000
    rng = np.random.default_rng(0)
    index = pd.date_range("2020-01-01", periods=n, freq="10min", tz="UTC")
    hours = np.arange(n) / 6.0
    drift = np.clip(hours - hours[-1] * 0.9, 0, None) * 0.05
    values = 50 + 3 * np.sin(2 * np.pi * hours / 24) + rng.normal(0, 1, n) + drift
    settings = DetectorSettings(alarm_high=80.0)

    t0 = time.perf_counter()
    scored = score_series(index, values, settings)
    scoring_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "series.csv"
        pd.DataFrame({"time": index.strftime("%Y-%m-%dT%H:%M:%SZ"), "value": values}).to_csv(path, index=False)
        out = Path(tmp) / "scored.csv"
        t0 = time.perf_counter()
        score_csv(str(path), "time", "value", settings)[0].to_csv(out)
        csv_s = time.perf_counter() - t0
    figures: dict[str, float | int | str] = {
        "rows": n,
        "scoring_rows_per_s": round(n / scoring_s),
        "csv_in_to_csv_out_rows_per_s": round(n / csv_s),
        "scoring_s": round(scoring_s, 3),
        "csv_end_to_end_s": round(csv_s, 3),
        "rows_degrading_or_worse": int((scored["flag_level"] >= 2).sum()),
    }
    for key, value in figures.items():
        print(f"{key:32s} {value}")
    write_results("detect_speed", figures)


if __name__ == "__main__":
    main()
