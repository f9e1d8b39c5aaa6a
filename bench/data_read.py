"""Reading one asset's tags over 90 days: time and peak memory of `flowline export` (streamed) and
of `DataSource.load` (all in memory), raw and at the automatic resolution.

    .venv/bin/python bench/data_read.py [--quick]

Full: 90 days of pump P-102's 6 tags at a 10 s step (4.67 M points) in a local InfluxDB; quick: a
1-minute step (0.78 M points). Each read runs in a fresh process, so its peak RSS (``ru_maxrss``)
is its own; the idle figure is that process after its imports.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_figures

from flowline.core.points import Quality, telemetry_point
from flowline.historian.connection import Connection
from flowline.historian.writer import HistorianWriter
from flowline.inventory import load_site
from flowline.lab.services import InfluxDServer
from flowline.lab.sim.plant import Plant
from flowline.lab.stack import EXAMPLE_SITE

SITE_FILE = EXAMPLE_SITE
END = pd.Timestamp("2026-01-15T00:00:00Z")
DAYS = 90
ASSET = "P-102"
DB = "flowline"


def fill(influx: InfluxDServer, step_s: int) -> int:
    """90 days of the asset's tags from the simulator, written a day at a time; every 1,000th bad."""
    site = load_site(SITE_FILE)
    plant = Plant(site, seed=7, epoch_ns=int(END.value))
    asset = site.assets_by_id[ASSET]
    conn = Connection(url=influx.url, database=DB)
    total = 0
    with HistorianWriter(conn) as writer:
        for day in range(DAYS):
            start = END - pd.Timedelta(days=DAYS - day)
            times = pd.date_range(start, periods=86_400 // step_s, freq=f"{step_s}s").as_unit("ns").asi8
            for tag in asset.tags:
                ref = site.tag_ref(asset, tag)
                values = plant.series(ASSET, tag.name, times)
                bad = np.arange(len(times)) % 1000 == 0
                points = [
                    telemetry_point(ref, float(v), int(t), Quality.BAD if b else Quality.GOOD)
                    for t, v, b in zip(times, values, bad, strict=True)
                ]
                total += writer.write(points).written
    return total


def measure(config: str, what: str, out: str) -> dict[str, float | int]:
    """One read in this process: seconds, rows, peak RSS (MiB) and RSS after imports."""
    from flowline.analytics.data import connect

    source = connect(config)
    idle = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start, end = END - pd.Timedelta(days=DAYS), END
    began = time.perf_counter()
    if what == "export-raw":
        rows = source.export(out, source.plan(ASSET, start=start, end=end, resolution="raw"), progress=False).rows
    elif what == "load-raw":
        rows = len(source.load(ASSET, start=start, end=end, resolution="raw", progress=False))
    else:
        frame = source.load(ASSET, start=start, end=end, progress=False)
        rows = len(frame)
        assert frame.attrs["resolution"] == "1h"
    seconds = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": round(seconds, 2), "rows": rows, "peak_rss_mib": round(peak), "idle_rss_mib": round(idle)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1-minute step instead of 10 s")
    parser.add_argument("--measure", nargs=3, metavar=("CONFIG", "WHAT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    step_s = 60 if args.quick else 10
    figures: dict[str, float | int | str] = {"days": DAYS, "asset": ASSET, "step_s": step_s}
    with tempfile.TemporaryDirectory() as folder:
        influx = InfluxDServer(Path(folder) / "influxd")
        influx.start()
        try:
            influx.create_database(DB)
            began = time.perf_counter()
            figures["points"] = fill(influx, step_s)
            figures["fill_s"] = round(time.perf_counter() - began, 1)
            config = Path(folder) / "flowline.yaml"
            config.write_text(yaml.safe_dump({"site_file": str(SITE_FILE), "historian": {"url": influx.url}}))
            for what in ("export-raw", "load-raw", "load-auto"):
                out = Path(folder) / "p102.parquet"
                done = subprocess.run(
                    [sys.executable, __file__, "--measure", str(config), what, str(out)],
                    capture_output=True, text=True, check=True,
                )
                for key, value in json.loads(done.stdout).items():
                    figures[f"{what}_{key}"] = value
                if what == "export-raw":
                    figures["export-raw_parquet_mib"] = round(out.stat().st_size / 2**20, 1)
        finally:
            influx.stop()
    print_figures("data_read", figures)


if __name__ == "__main__":
    main()
