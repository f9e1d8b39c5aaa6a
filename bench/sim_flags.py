"""Flag accuracy on the plant simulator: lead time before each injected fault's crossing, false flags.

For each seed, the example site's plant (flowline/sim/plant.py) is sampled every 10 minutes; the
analytics assessment (the job's, in memory, no InfluxDB) runs over the trailing 14 days at every
evaluation time from 12 h before the earliest fault onset up to the last fault crossing. A fault's lead
time is its crossing time minus the first evaluation from which it stays DEGRADING or worse until
the crossing; it passes with a lead of at least 24 h. A false flag is DEGRADING or worse on a tag of
an asset with no fault, at any evaluation time.

    .venv/bin/python bench/sim_flags.py [--quick]
"""

from __future__ import annotations

import argparse
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
from flowline.sim.plant import Plant

REPO = Path(__file__).resolve().parent.parent
SITE_FILE = REPO / "flowline" / "examples" / "north-field.yaml"
EPOCH = pd.Timestamp("2026-01-15T00:00:00Z")
HISTORY = pd.Timedelta(days=14)
STEP = pd.Timedelta(minutes=10)


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
    for seed in range(seeds):
        plant = Plant(site, seed=seed, epoch_ns=int(EPOCH.value))
        last_cross = max(pd.Timestamp(f.crossing_ns, tz="UTC") for f in plant.faults)
        # From before the earliest fault onset, so lead times are not cut short by the window.
        first_start = min(pd.Timestamp(f.start_ns, tz="UTC") for f in plant.faults)
        evals = pd.date_range(first_start.floor("h") - pd.Timedelta(hours=12), last_cross, freq=every)
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
            print(f"seed {seed:2d} {key[0]:6s} {key[1]:22s} {fault.kind.value:16s} lead {lead_h:6.1f} h")

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
        "evaluation_every_h": every / pd.Timedelta(hours=1),
        "elapsed_s": round(elapsed, 1),
    }
    print()
    for key, value in figures.items():
        print(f"{key:40s} {value}")
    for line in missed:
        print("MISSED:", line)
    write_results("sim_flags", figures)


if __name__ == "__main__":
    main()
