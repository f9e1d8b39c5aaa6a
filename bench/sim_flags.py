"""Flag accuracy on the plant simulator: lead time before each injected fault's crossing, false flags.

For each seed, the example site's plant (flowline/sim/plant.py) is sampled every 10 minutes; the
analytics assessment (the job's, in memory, no InfluxDB) runs over the trailing 14 days at every
evaluation time from 12 h before the earliest fault onset up to the last fault crossing. A fault's lead
time is its crossing time minus the first evaluation from which it stays DEGRADING or worse until
the crossing; it passes with a lead of at least 24 h. A false flag is DEGRADING or worse on a tag of
an asset with no fault, at any evaluation time.

Forecast accuracy: for each fault, the forecast time to alarm (``hours_to_alarm``) against the truth
(crossing minus evaluation time), at the evaluation from which it stays flagged and at the plant's
"now" (the epoch, where the demo runs its pass): absolute errors in hours (median, max), how many
faults whose truth crosses within the horizon have a forecast crossing at "now", and how many of
their prediction intervals contain the alarm limit at the true crossing time.

    .venv/bin/python bench/sim_flags.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results

from flowline.analytics.assess import Assessment, SeriesSpec
from flowline.analytics.job import assess_many, series_specs
from flowline.analytics.rules import AssessmentRules, Flag
from flowline.inventory import load_site
from flowline.lab.sim.plant import Plant

REPO = Path(__file__).resolve().parent.parent
SITE_FILE = REPO / "lab" / "flowline" / "lab" / "examples" / "north-field.yaml"
EPOCH = pd.Timestamp("2026-01-15T00:00:00Z")
HISTORY = pd.Timedelta(days=14)
STEP = pd.Timedelta(minutes=10)


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


def _error_figures(prefix: str, errors: list[float]) -> dict[str, float | int]:
    finite = np.array([e for e in errors if math.isfinite(e)])
    out: dict[str, float | int] = {f"{prefix}_crossing_forecast": len(finite)}
    if len(finite):
        out[f"{prefix}_abs_error_median_h"] = round(float(np.median(np.abs(finite))), 1)
        out[f"{prefix}_abs_error_max_h"] = round(float(np.max(np.abs(finite))), 1)
        out[f"{prefix}_error_median_h"] = round(float(np.median(finite)), 1)  # > 0: forecast late
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds, evaluations every 12 h")
    parser.add_argument("--seeds", type=int, default=None)
    args = parser.parse_args()
    seeds = args.seeds or (3 if args.quick else 10)
    every = pd.Timedelta(hours=12 if args.quick else 6)
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
    first_errors: list[float] = []  # signed, forecast minus truth, hours; inf = no crossing forecast
    now_errors: list[float] = []
    covered: list[bool] = []
    for seed in range(seeds):
        plant = Plant(site, seed=seed, epoch_ns=int(EPOCH.value))
        last_cross = max(pd.Timestamp(f.crossing_ns, tz="UTC") for f in plant.faults)
        # From before the earliest fault onset, so lead times are not cut short by the window.
        first_start = min(pd.Timestamp(f.start_ns, tz="UTC") for f in plant.faults)
        evals = pd.date_range(first_start.floor("h") - pd.Timedelta(hours=12), last_cross, freq=every)
        evals = evals.union(pd.DatetimeIndex([EPOCH]))
        grid = pd.date_range(evals[0] - HISTORY, evals[-1], freq=STEP, inclusive="left")
        values = {
            (s.asset, s.tag): pd.Series(plant.series(s.asset, s.tag, grid.as_unit("ns").asi8), index=grid)
            for s in specs
        }
        items: list[tuple[SeriesSpec, pd.Series]] = []
        at: list[pd.Timestamp] = []
        for t in evals:
            for s in specs:
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
                    continue
                false_flags += flagged
                false_watch += sum(a.flag == Flag.WATCH for _, a in timeline)
                healthy_evaluations += len(timeline)
                continue
            crossing = pd.Timestamp(fault.crossing_ns, tz="UTC")
            before = [(t, a) for t, a in timeline if t < crossing]
            first = None
            for t, a in reversed(before):
                if a.flag < Flag.DEGRADING:
                    break
                first = t
            lead_h = (crossing - first) / pd.Timedelta(hours=1) if first is not None else 0.0
            leads.append(lead_h)
            if lead_h < 24:
                missed.append(f"seed {seed} {key[0]}/{key[1]} lead {lead_h:.0f} h")
            at_first = next((a for t, a in timeline if t == first), None)
            if at_first is not None:
                first_errors.append(_tta_error(at_first, crossing))
            now = next(a for t, a in timeline if t == EPOCH)
            truth_now = (crossing - EPOCH) / pd.Timedelta(hours=1)
            within = 0 < truth_now <= rules.horizon_hours
            error_now = _tta_error(now, crossing)
            if within:
                now_errors.append(error_now)
                covered.append(_interval_contains(now, crossing, fault.limit))
            forecast_now = f"{now.hours_to_alarm:6.1f}" if now.hours_to_alarm is not None else "  none"
            print(
                f"seed {seed:2d} {key[0]:6s} {key[1]:22s} {fault.kind.value:16s} lead {lead_h:6.1f} h"
                f"  at now: truth {truth_now:6.1f} h forecast {forecast_now} h ({now.model})"
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
        **_error_figures("tta_at_first_flag", first_errors),
        **_error_figures("tta_at_now", now_errors),
        "faults_crossing_within_horizon_at_now": len(now_errors),
        "interval_contains_limit_at_true_crossing_now": sum(covered),
        "evaluation_every_h": every / pd.Timedelta(hours=1),
        "elapsed_s": round(elapsed, 1),
    }
    print()
    for name, value in figures.items():
        print(f"{name:44s} {value}")
    for line in missed:
        print("MISSED:", line)
    write_results("sim_flags", figures)


if __name__ == "__main__":
    main()
