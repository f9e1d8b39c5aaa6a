"""The product's detector on the Numenta Anomaly Benchmark (NAB), scored by NAB's rules.

Every data file of a NAB kit is scored causally by `flowline.analytics.detect.score_series` (the
code `flowline detect` runs) with the default `DetectorSettings`: no per-file settings, no labels.
The ``alert`` column (the row's surprise where it beats every surprise of the previous 24 h by
``realert_margin``, else 0) is the anomaly score. A NAB scorer then reports the three profiles with
one threshold per profile optimised over the files (what NAB's published scores do) and at the
product's default WATCH level (``watch_surprise``), the operating point a user gets. The alerts
outside labelled windows per tag and week at that level are the measured false-alert rate.

Needs a NAB kit (``data/``, ``labels/``, ``config/``) and a scorer that follows NAB's rules and
takes ``--nab DIR --results DIR --json OUT [--fixed-threshold X]``:

    FLOWLINE_NAB_DIR=/path/to/nab FLOWLINE_NAB_SCORER=/path/to/nab_score.py .venv/bin/python bench/nab.py
    .venv/bin/python bench/nab.py --nab DIR --scorer FILE [--quick]   (--quick: artificial files only, not written)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results

from flowline.analytics.detect import DetectorSettings, score_series

PROFILES = {"standard": "standard", "reward_low_FP_rate": "low_fp", "reward_low_FN_rate": "low_fn"}
PUBLISHED_NUMENTA = {"standard": 73.0, "low_fp": 66.6, "low_fn": 76.8}  # the kit README, optimised thresholds


def _score_files(nab: Path, names: list[str], out: Path, settings: DetectorSettings) -> dict[str, pd.DataFrame]:
    scored = {}
    for name in names:
        frame = pd.read_csv(nab / "data" / name)
        times = pd.DatetimeIndex(pd.to_datetime(frame["timestamp"]))
        result = score_series(times, frame["value"].to_numpy(float), settings)
        # Two decimals of -log10(p) are plenty and keep the scorer's exact threshold sweep short.
        frame["anomaly_score"] = np.round(result["alert"].to_numpy(), 2)
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(target, index=False)
        scored[name] = frame
    return scored


def _run_scorer(scorer: Path, nab: Path, results: Path, categories: list[str], extra: list[str]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as handle:
        cmd = [sys.executable, str(scorer), "--nab", str(nab), "--results", str(results),
               "--categories", ",".join(categories), "--json", handle.name, *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"the NAB scorer failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
        summary: dict[str, Any] = json.loads(Path(handle.name).read_text())
        return summary


def _false_alerts_per_week(nab: Path, scored: dict[str, pd.DataFrame], windows: dict[str, list[list[str]]],
                           threshold: float) -> float:
    """Alerts at or above ``threshold`` outside labelled windows, per tag and week of data."""
    alerts, weeks = 0, 0.0
    for name, frame in scored.items():
        t = pd.to_datetime(frame["timestamp"])
        inside = np.zeros(len(frame), dtype=bool)
        for start, end in windows.get(name, []):
            inside |= ((t >= pd.Timestamp(start)) & (t <= pd.Timestamp(end))).to_numpy()
        alerts += int(((frame["anomaly_score"] >= threshold) & ~inside).sum())
        weeks += (t.iloc[-1] - t.iloc[0]) / pd.Timedelta(days=7)
    return alerts / weeks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nab", type=Path, default=os.environ.get("FLOWLINE_NAB_DIR"),
                        help="NAB kit folder (default: $FLOWLINE_NAB_DIR)")
    parser.add_argument("--scorer", type=Path, default=os.environ.get("FLOWLINE_NAB_SCORER"),
                        help="NAB scorer script (default: $FLOWLINE_NAB_SCORER)")
    parser.add_argument("--quick", action="store_true", help="the artificial categories only; results not written")
    args = parser.parse_args()
    if args.nab is None or not (args.nab / "labels" / "combined_windows.json").is_file():
        sys.exit("NAB kit not found: give --nab DIR or set FLOWLINE_NAB_DIR to a folder with data/, labels/ "
                 "and config/ (e.g. a checkout of https://github.com/numenta/NAB)")
    if args.scorer is None or not args.scorer.is_file():
        sys.exit("NAB scorer not found: give --scorer FILE or set FLOWLINE_NAB_SCORER to a script that scores "
                 "a results folder by NAB's rules (--nab, --results, --json, --fixed-threshold)")
    windows = json.loads((args.nab / "labels" / "combined_windows.json").read_text())
    names = sorted(windows)
    if args.quick:
        names = [n for n in names if n.startswith("artificial")]
    categories = sorted({n.split("/")[0] for n in names})
    settings = DetectorSettings()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp)
        scored = _score_files(args.nab, names, results, settings)
        scoring_s = time.perf_counter() - started
        optimised = _run_scorer(args.scorer, args.nab, results, categories, [])
        default = _run_scorer(args.scorer, args.nab, results, categories,
                              ["--fixed-threshold", str(settings.watch_surprise)])
    figures: dict[str, float | int | str] = {
        "files": int(optimised["files"]),
        "windows": int(optimised["windows"]),
        "rows": int(sum(len(f) for f in scored.values())),
        "detector": "flowline.analytics.detect.score_series, default settings, column alert",
        "default_watch_surprise": settings.watch_surprise,
    }
    print(f"{'profile':20s} {'optimised':>10s} {'threshold':>10s} {'default':>8s} {'Numenta':>8s}")
    for profile, short in PROFILES.items():
        o, d = optimised["profiles"][profile], default["profiles"][profile]
        figures[f"{short}_optimised"] = round(float(o["normalised_score"]), 2)
        figures[f"{short}_optimised_threshold"] = o["threshold"] if o["threshold"] is not None else "none"
        figures[f"{short}_default"] = round(float(d["normalised_score"]), 2)
        figures[f"{short}_published_numenta"] = PUBLISHED_NUMENTA[short]
        print(f"{profile:20s} {o['normalised_score']:10.2f} {o['threshold']!s:>10s} {d['normalised_score']:8.2f} "
              f"{PUBLISHED_NUMENTA[short]:8.1f}")
    std_o, std_d = optimised["profiles"]["standard"], default["profiles"]["standard"]
    figures["standard_optimised_windows_hit"] = int(std_o["windows_hit"])
    figures["standard_optimised_fp_rows"] = int(std_o["fp_rows"])
    figures["default_windows_hit"] = int(std_d["windows_hit"])
    figures["default_fp_rows"] = int(std_d["fp_rows"])
    figures["default_false_alerts_per_tag_week"] = round(
        _false_alerts_per_week(args.nab, scored, windows, settings.watch_surprise), 3)
    figures["scoring_rows_per_s"] = round(figures["rows"] / scoring_s) if scoring_s > 0 else 0  # type: ignore[operator]
    figures["elapsed_s"] = round(time.perf_counter() - started, 1)
    for key in ("default_windows_hit", "default_fp_rows", "default_false_alerts_per_tag_week"):
        print(f"{key:36s} {figures[key]}")
    if not args.quick:
        write_results("nab", figures)


if __name__ == "__main__":
    main()
