"""Plant simulator speed: model values per second, backfill points per second into a real spool.

    .venv/bin/python bench/sim_speed.py [--quick]

Full: 14 days x every tag of the example site at a 1-minute step (the demo's backfill); quick: 2 days.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_figures

from flowline.inventory import load_site
from flowline.lab.sim.backfill import backfill, backfill_times
from flowline.lab.sim.plant import Plant
from flowline.lab.stack import EXAMPLE_SITE

SITE_FILE = EXAMPLE_SITE
EPOCH_NS = 1_768_435_200 * 10**9  # 2026-01-15T00:00:00Z


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 days instead of 14")
    args = parser.parse_args()
    days = 2.0 if args.quick else 14.0
    site = load_site(SITE_FILE)
    plant = Plant(site, seed=1, epoch_ns=EPOCH_NS)
    pairs = site.iter_tags()
    times = backfill_times(EPOCH_NS, days, 60.0)

    started = time.perf_counter()
    total = sum(len(plant.series(a.id, t.name, times)) for a, t in pairs)
    model_s = time.perf_counter() - started

    started = time.perf_counter()
    one = np.array([EPOCH_NS], dtype=np.int64)
    for a, t in pairs:
        plant.series(a.id, t.name, one)
    live_step_ms = (time.perf_counter() - started) * 1000

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        result = backfill(plant, Path(folder) / "spool", days=days, step_s=60.0, end_ns=EPOCH_NS)
        backfill_s = time.perf_counter() - started
        spool_bytes = sum(p.stat().st_size for p in (Path(folder) / "spool").glob("seg-*.log"))

    figures: dict[str, float | int | str] = {
        "days": days,
        "tags": len(pairs),
        "model_values": total,
        "model_values_per_s": round(total / model_s),
        "model_14d_all_tags_s": round(model_s * 14 / days, 3),
        "live_step_all_tags_ms": round(live_step_ms, 2),
        "backfill_points": result.points,
        "backfill_points_per_s": round(result.points / backfill_s),
        "backfill_s": round(backfill_s, 2),
        "backfill_spool_bytes_per_point": round(spool_bytes / result.points, 1) if spool_bytes else 0,
    }
    print_figures("sim_speed", figures)


if __name__ == "__main__":
    main()
