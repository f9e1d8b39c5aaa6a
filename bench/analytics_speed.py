"""Assessment speed: N tags x 14 days of 10-minute data, Flowline's assessment vs a plain statsmodels loop.

The fleet: 95% healthy tags (half with a daily cycle), 5% degrading. Both contenders get the same
pandas Series. "plain loop" is what one writes without thinking about speed: per tag, in one
process, fit a damped-trend ETS model on the 10-minute series and forecast 7 days with prediction
intervals (BLAS limited to one thread, as in Flowline's workers, so the ratio is not a BLAS
setting; the out-of-the-box figure is reported beside it). Flowline: `assess_many` (regularise,
cheap screen, full model selection only where it can matter, process pool). Also reported:
Flowline in one process, how many tags got a full model fit, and the flags (so speed is not
bought with wrong answers).

    .venv/bin/python bench/analytics_speed.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results

from flowline.analytics.assess import SeriesSpec
from flowline.analytics.job import assess_many
from flowline.analytics.rules import AssessmentRules, Flag
from flowline.analytics.synthetic import HIGH, Kind, make_series


def fleet(n: int) -> list[tuple[SeriesSpec, pd.Series]]:
    items = []
    for i in range(n):
        kind: Kind = "degrading" if i % 20 == 0 else ("daily" if i % 2 else "healthy")
        spec = SeriesSpec("bench", f"A-{i:04d}", kind, high=HIGH)
        items.append((spec, make_series(kind, seed=i, cross_in_hours=40 + i % 100)))
    return items


def plain_loop(items: list[tuple[SeriesSpec, pd.Series]], horizon_steps: int) -> float:
    """Seconds for the loop."""
    from statsmodels.tsa.exponential_smoothing.ets import ETSModel

    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _, series in items:
            y = pd.Series(series.to_numpy())
            res = ETSModel(y, error="add", trend="add", damped_trend=True).fit(disp=False)
            res.get_prediction(start=len(y), end=len(y) + horizon_steps - 1).summary_frame(alpha=0.05)
    return time.perf_counter() - started


def peak_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 tags instead of 1,000")
    parser.add_argument("--tags", type=int, default=None)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    n = args.tags or (100 if args.quick else 1000)
    rules = AssessmentRules()
    items = fleet(n)
    mem_before = peak_mib(resource.RUSAGE_SELF)

    t0 = time.perf_counter()
    results = assess_many(items, rules, workers=args.workers)
    flowline_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = assess_many(items, rules, workers=1)
    single_s = time.perf_counter() - t0
    steps = int(rules.horizon_hours * 6)
    # The fair baseline: single-threaded BLAS like Flowline's workers. Out of the box, OpenBLAS
    # threads on these tiny matrices make the plain loop several times slower on a busy machine;
    # that is measured on a subset and reported separately, not used for the ratio.
    with threadpool_limits(limits=1, user_api="blas"):
        plain_s = plain_loop(items, steps)
    subset = items[: max(10, n // 20)]
    default_blas_per_tag = plain_loop(subset, steps) / len(subset)

    degrading = [a for a in results if a.spec.tag == "degrading"]
    healthy = [a for a in results if a.spec.tag != "degrading"]
    figures: dict[str, float | int | str] = {
        "tags": n,
        "days": 14,
        "workers": args.workers,
        "flowline_s": round(flowline_s, 2),
        "flowline_single_process_s": round(single_s, 2),
        "plain_statsmodels_loop_s": round(plain_s, 2),
        "ratio_vs_plain_loop": round(plain_s / flowline_s, 2),
        "plain_loop_default_blas_s_per_tag": round(default_blas_per_tag, 4),
        "plain_loop_single_thread_blas_s_per_tag": round(plain_s / n, 4),
        "tags_per_s": round(n / flowline_s, 1),
        "full_fits": sum(a.model not in ("screen", "constant") for a in results),
        "degrading_flagged": sum(a.flag >= Flag.DEGRADING for a in degrading),
        "degrading_tags": len(degrading),
        "healthy_flagged": sum(a.flag >= Flag.DEGRADING for a in healthy),
        "same_flags_pool_vs_single": int([a.flag for a in results] == [a.flag for a in single]),
        "peak_rss_main_mib": round(peak_mib(resource.RUSAGE_SELF), 1),
        "peak_rss_worker_mib": round(peak_mib(resource.RUSAGE_CHILDREN), 1),
        "input_rss_mib": round(mem_before, 1),
    }
    for key, value in figures.items():
        print(f"{key:30s} {value}")
    write_results("analytics_speed", figures)


if __name__ == "__main__":
    main()
