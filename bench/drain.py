"""Backlog drain after an outage, at a live rate of 10,000 points/s.

The DMZ gateway is down for the outage while the producer keeps appending to the OT spool; then
it comes back and the sender drains the backlog while live data keeps arriving. Drain rate =
points delivered during the catch-up / its duration, as a multiple of the live rate (target >= 10x).

    python bench/drain.py [--quick] [--outage-s 600]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import write_results
from latency import Producer, newest_visible, start_pipeline
from rich.console import Console

from flowline.lab.services import wait_until


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 s outage")
    parser.add_argument("--outage-s", type=float, default=600.0, help="outage length (default 10 minutes)")
    parser.add_argument("--rate", type=int, default=10_000, help="live points per second")
    args = parser.parse_args()
    outage = 20.0 if args.quick else args.outage_s
    console = Console()
    with tempfile.TemporaryDirectory(prefix="flowline-bench-") as tmp:
        influx, rig = start_pipeline(Path(tmp))
        gateway = rig.procs[0]
        try:
            # About 180 bytes of spool per point: 10 minutes at 10,000 points/s need more than 1 GiB.
            with rig.ot_spool(max_bytes=8 << 30) as spool:
                producer = Producer(spool, args.rate).start()
                wait_until(lambda: rig.count() > 0, 60, "live data to flow")
                gateway.kill()
                gateway.wait()
                console.print(f"gateway down for {outage:.0f} s at {args.rate:,} points/s ...")
                time.sleep(outage)
                rig.start_gateway()  # returns once it listens: the drain starts here
                t0 = time.monotonic()
                delivered0 = rig.count()
                backlog = producer.count - delivered0

                # Caught up once everything appended until a second ago is counted. The newest
                # timestamp showing is the cheap first sign (a count over millions of points on every
                # poll would load InfluxDB more than the drain itself), but order is not guaranteed:
                # the count decides.
                def caught_up() -> bool:
                    k = next(k for k in reversed(range(len(producer.appended))) if
                             producer.appended[k][1] <= time.monotonic() - 1.0)
                    return newest_visible(rig) >= producer.appended[k][0] and rig.count() >= producer.totals[k]

                wait_until(caught_up, outage * 2 + 120, "the backlog to drain", interval=0.25)
                drain_s = time.monotonic() - t0
                delivered = rig.count() - delivered0
                producer.stop()
        finally:
            rig.stop_all()
            influx.stop()
    drain_rate = delivered / drain_s
    figures = {
        "live_points_per_s": args.rate,
        "outage_s": outage,
        "backlog_points": backlog,
        "drain_s": round(drain_s, 2),
        "drain_points_per_s": round(drain_rate),
        "drain_multiple_of_live": round(drain_rate / args.rate, 1),
    }
    console.print("drain: backlog after an outage")
    for key, value in figures.items():
        console.print(f"  {key:24} {value:,}" if isinstance(value, int) else f"  {key:24} {value}")
    console.print(f"results: {write_results('drain', figures)}")


if __name__ == "__main__":
    main()
