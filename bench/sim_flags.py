"""Flag accuracy on the plant simulator: lead time before each injected fault's crossing, false flags.

For each seed, the example site's plant (lab/flowline/lab/sim/plant.py) is sampled every 10 minutes; the
analytics assessment (the job's, in memory, no InfluxDB) runs over the trailing 14 days at every
evaluation time from 12 h before the earliest fault onset up to the last fault crossing. A fault's lead
time is its crossing time minus the first evaluation from which it stays DEGRADING or worse until
the crossing; it passes with a lead of at least 24 h. A false flag is DEGRADING or worse on a tag of
an asset with no fault, at any evaluation time.

Fault shapes (lab/flowline/lab/sim/faults.py): every seed runs twice, each time giving the three faulty
tags two of the six shapes in turn (exponential bearing wear, falling-rate fouling, power-law
clogging, linear drift, step then drift, intermittent bursts), so 10 seeds give 10 faults per shape.

Forecast accuracy: for each fault, the forecast time to alarm (``hours_to_alarm``) against the truth
(crossing minus evaluation time), at the evaluation from which it stays flagged and at the plant's
"now" (the epoch, where the demo runs its pass): SIGNED errors in hours (forecast minus truth, so
> 0 is late, the unsafe side) and relative to the truth, per shape (median, latest), and whether the
95 % prediction interval at the forecast step nearest the true crossing contains the alarm limit
(coverage, at "now" and at the first flag). At the first flag many crossings lie beyond the forecast
horizon (168 h), where the band ends short of them: its coverage is also given over the faults whose
crossing is within the horizon (``..._within_horizon``, with their count), the rate the band states.

    .venv/bin/python bench/sim_flags.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results

from flowline.analytics.assess import Assessment, SeriesSpec
from flowline.analytics.job import assess_many, series_specs
from flowline.analytics.rules import AssessmentRules, Flag
from flowline.inventory import load_site
from flowline.lab.sim.faults import FaultKind, make_faults
from flowline.lab.sim.plant import Plant

REPO = Path(__file__).resolve().parent.parent
SITE_FILE = REPO / "lab" / "flowline" / "lab" / "examples" / "north-field.yaml"
EPOCH = pd.Timestamp("2026-01-15T00:00:00Z")
HISTORY = pd.Timedelta(days=14)
STEP = pd.Timedelta(minutes=10)
SHAPES = (
    FaultKind.BEARING_WEAR, FaultKind.FOULING, FaultKind.FILTER_CLOGGING,
    FaultKind.LINEAR_DRIFT, FaultKind.STEP_THEN_DRIFT, FaultKind.INTERMITTENT,
)
FAULTY = ("P-102", "E-201", "F-401")


def _tta_error(a: Assessment, crossing: pd.Timestamp) -> float:
    """Forecast minus true hours to alarm; inf when no crossing is forecast."""
    if a.hours_to_alarm is None:
        return math.inf
    return a.hours_to_alarm - float((crossing - a.assessed_at) / pd.Timedelta(hours=1))


def _interval_contains(a: Assessment, crossing: pd.Timestamp, limit: float) -> bool:
    """Whether the prediction interval at the forecast step nearest the true crossing holds the limit."""
    if a.forecast is None:
        return False
    step = int(np.argmin(np.abs((a.forecast.index - crossing) / pd.Timedelta(hours=1))))
    row = a.forecast.iloc[step]
    return bool(row["lower"] <= limit <= row["upper"])


def _within_horizon(a: Assessment, crossing: pd.Timestamp) -> bool:
    return a.forecast is not None and crossing <= a.forecast.index[-1] + pd.Timedelta(minutes=30)


def _error_figures(prefix: str, errors: list[tuple[float, float]]) -> dict[str, float | int]:
    """``errors``: (signed error h, truth h) pairs; an infinite error = no crossing forecast."""
    finite = np.array([e for e in errors if math.isfinite(e[0])]).reshape(-1, 2)
    out: dict[str, float | int] = {f"{prefix}_crossing_forecast": len(finite)}
    if len(finite):
        err, truth = finite[:, 0], finite[:, 1]
        rel = err / np.maximum(truth, 1.0)
        out[f"{prefix}_abs_error_median_h"] = round(float(np.median(np.abs(err))), 1)
        out[f"{prefix}_error_median_h"] = round(float(np.median(err)), 1)  # > 0: forecast late
        out[f"{prefix}_error_max_late_h"] = round(float(np.max(err)), 1)
        out[f"{prefix}_error_max_late_pct"] = round(100 * float(np.max(rel)), 1)
        out[f"{prefix}_late_over_10pct"] = int(np.sum(rel > 0.10))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds, evaluations every 12 h, results not written")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--every-hours", type=float, default=None, help="evaluation interval (default 6, quick 12)")
    args = parser.parse_args()
    seeds = args.seeds or (3 if args.quick else 10)
    every = pd.Timedelta(hours=args.every_hours or (12 if args.quick else 6))
    site = load_site(SITE_FILE)
    specs = series_specs(site)
    rules = AssessmentRules()
    started = time.perf_counter()

    leads: list[float] = []
    missed: list[str] = []
    false_flags = 0
    false_watch = 0
    healthy_evaluations = 0
    coupled_flags = 0
    by_shape: dict[str, dict[str, list[Any]]] = {k.value: {"lead": [], "first": [], "now": [], "cov_now": [],
                                                          "cov_first": [], "cov_first_in": []} for k in SHAPES}
    for seed in range(seeds):
        for turn in range(2):
            # Turn 0 assesses every tag (the false-flag count); turn 1 the faulty assets' tags only,
            # with the next shapes (healthy tags are the same series as in turn 0).
            kinds = {asset: SHAPES[(2 * seed + 3 * turn + i) % len(SHAPES)] for i, asset in enumerate(FAULTY)}
            faults = make_faults(site, seed, int(EPOCH.value), kinds=kinds)
            plant = Plant(site, seed=seed, epoch_ns=int(EPOCH.value), faults=faults)
            chosen = [s for s in specs if turn == 0 or s.asset in plant.faulty_assets]
            last_cross = max(pd.Timestamp(f.crossing_ns, tz="UTC") for f in plant.faults)
            # From before the earliest fault onset, so lead times are not cut short by the window.
            first_start = min(pd.Timestamp(f.start_ns, tz="UTC") for f in plant.faults)
            evals = pd.date_range(first_start.floor("h") - pd.Timedelta(hours=12), last_cross, freq=every)
            evals = evals.union(pd.DatetimeIndex([EPOCH]))
            grid = pd.date_range(evals[0] - HISTORY, evals[-1], freq=STEP, inclusive="left")
            values = {
                (s.asset, s.tag): pd.Series(plant.series(s.asset, s.tag, grid.as_unit("ns").asi8), index=grid)
                for s in chosen
            }
            items: list[tuple[SeriesSpec, pd.Series]] = []
            at: list[pd.Timestamp] = []
            for t in evals:
                for s in chosen:
                    series = values[(s.asset, s.tag)]
                    items.append((s, series[(series.index >= t - HISTORY) & (series.index < t)]))
                    at.append(t)
            results = assess_many(items, rules)
            by_tag: dict[tuple[str, str], list[tuple[pd.Timestamp, Assessment]]] = {}
            for t, a in zip(at, results, strict=True):
                by_tag.setdefault((a.spec.asset, a.spec.tag), []).append((t, a))
            for key, timeline in by_tag.items():
                fault = plant.fault(*key)
                if fault is None:
                    flagged = sum(a.flag >= Flag.DEGRADING for _, a in timeline)
                    if key[0] in plant.faulty_assets:
                        coupled_flags += flagged
                        if flagged:
                            print(f"seed {seed:2d} {key[0]:6s} {key[1]:22s} (coupled to the fault) flagged {flagged}x")
                        continue
                    false_flags += flagged
                    false_watch += sum(a.flag == Flag.WATCH for _, a in timeline)
                    healthy_evaluations += len(timeline)
                    continue
                shape = by_shape[fault.kind.value]
                crossing = pd.Timestamp(fault.crossing_ns, tz="UTC")
                before = [(t, a) for t, a in timeline if t < crossing]
                first = None
                for t, a in reversed(before):
                    if a.flag < Flag.DEGRADING:
                        break
                    first = t
                lead_h = (crossing - first) / pd.Timedelta(hours=1) if first is not None else 0.0
                leads.append(lead_h)
                shape["lead"].append(lead_h)
                if lead_h < 24:
                    missed.append(f"seed {seed} {key[0]}/{key[1]} {fault.kind.value} lead {lead_h:.0f} h")
                at_first = next((a for t, a in timeline if t == first), None)
                if at_first is not None:
                    shape["first"].append((_tta_error(at_first, crossing), lead_h))
                    shape["cov_first"].append(_interval_contains(at_first, crossing, fault.limit))
                    if _within_horizon(at_first, crossing):
                        shape["cov_first_in"].append(shape["cov_first"][-1])
                now = next(a for t, a in timeline if t == EPOCH)
                truth_now = (crossing - EPOCH) / pd.Timedelta(hours=1)
                if 0 < truth_now <= rules.horizon_hours:
                    shape["now"].append((_tta_error(now, crossing), truth_now))
                    shape["cov_now"].append(_interval_contains(now, crossing, fault.limit))
                forecast_now = f"{now.hours_to_alarm:6.1f}" if now.hours_to_alarm is not None else "  none"
                first_txt = "none" if at_first is None or at_first.hours_to_alarm is None else (
                    f"{at_first.hours_to_alarm:6.1f}")
                print(
                    f"seed {seed:2d} {key[0]:6s} {key[1]:22s} {fault.kind.value:16s} lead {lead_h:6.1f} h"
                    f" (forecast {first_txt} h)  at now: truth {truth_now:6.1f} h forecast {forecast_now} h"
                    f" ({now.model})", flush=True,
                )

    elapsed = time.perf_counter() - started
    figures: dict[str, float | int | str] = {
        "seeds": seeds,
        "faults": len(leads),
        "faults_flagged_24h_ahead": sum(lead >= 24 for lead in leads),
        "lead_time_min_h": float(np.min(leads)),
        "lead_time_median_h": float(np.median(leads)),
        "lead_time_max_h": float(np.max(leads)),
        "false_flags_degrading_or_worse": false_flags,
        "false_watch": false_watch,
        "healthy_evaluations": healthy_evaluations,
        "other_tags_of_faulty_assets_flagged": coupled_flags,
        "interval_coverage_at_now": round(float(np.mean([c for v in by_shape.values() for c in v["cov_now"]])), 3),
        "interval_coverage_at_first_flag": round(
            float(np.mean([c for v in by_shape.values() for c in v["cov_first"]])), 3),
        "interval_coverage_at_first_flag_within_horizon": round(
            float(np.mean([c for v in by_shape.values() for c in v["cov_first_in"]])), 3),
        "faults_crossing_within_horizon_at_first_flag": sum(len(v["cov_first_in"]) for v in by_shape.values()),
        "evaluation_every_h": every / pd.Timedelta(hours=1),
        "elapsed_s": round(elapsed, 1),
    }
    all_first = [e for v in by_shape.values() for e in v["first"]]
    all_now = [e for v in by_shape.values() for e in v["now"]]
    figures.update(_error_figures("tta_at_first_flag", all_first))
    figures.update(_error_figures("tta_at_now", all_now))
    for kind, v in by_shape.items():
        if not v["lead"]:
            continue
        figures[f"{kind}_faults"] = len(v["lead"])
        figures[f"{kind}_flagged_24h_ahead"] = sum(lead >= 24 for lead in v["lead"])
        figures[f"{kind}_lead_time_min_h"] = round(float(np.min(v["lead"])), 1)
        figures.update(_error_figures(f"{kind}_tta_at_first_flag", v["first"]))
        figures.update(_error_figures(f"{kind}_tta_at_now", v["now"]))
        for cov, when in (("cov_now", "now"), ("cov_first", "first_flag")):
            figures[f"{kind}_interval_coverage_at_{when}"] = round(float(np.mean(v[cov])), 3) if v[cov] else 0.0
    print()
    for name, value in figures.items():
        print(f"{name:44s} {value}")
    for line in missed:
        print("MISSED:", line)
    if not args.quick:
        write_results("sim_flags", figures)


if __name__ == "__main__":
    main()
