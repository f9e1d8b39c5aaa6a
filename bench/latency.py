"""End-to-end latency at a steady 10,000 points/s: OT spool append -> queryable in InfluxDB.

A producer appends 1,000-point batches every 100 ms (like a collector) stamped with the append
time; a poller asks InfluxDB for the newest visible timestamp every few milliseconds. The relay
keeps order (one sender, one writer), so a batch is queryable once a newer-or-equal timestamp is.
Target: p99 <= 1 s.

    python bench/latency.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from _common import repo_on_path, write_results
from rich.console import Console

repo_on_path()

from flowline.core.spool import SpoolWriter  # noqa: E402
from flowline.lab.pki import CertificateAuthority  # noqa: E402
from flowline.lab.services import InfluxDServer, wait_until  # noqa: E402
from tests.relay_helpers import RelayRig, points  # noqa: E402

SERIES = 10


class Producer:
    """Appends ``rate`` points/s to a spool in batches every ``tick_s``; remembers each batch's time."""

    def __init__(self, spool: SpoolWriter, rate: int, tick_s: float = 0.1) -> None:
        self.spool, self.rate, self.tick_s = spool, rate, tick_s
        self.appended: list[tuple[int, float]] = []  # (newest timestamp ns, monotonic append time)
        self.totals: list[int] = []  # points appended so far, after each entry of `appended`
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        per_tick = int(self.rate * self.tick_s)
        per_series = per_tick // SERIES
        next_t = time.monotonic()
        while not self._stop.is_set():
            now_ns = time.time_ns()
            batch = []
            for s in range(SERIES):
                batch += points(per_series, start_ns=now_ns, asset=f"P-{s:03d}", step_ns=1000)
            self.spool.append_points(batch)
            self.count += len(batch)
            self.totals.append(self.count)
            self.appended.append((now_ns + (per_series - 1) * 1000, time.monotonic()))
            next_t += self.tick_s
            self._stop.wait(max(0.0, next_t - time.monotonic()))

    def start(self) -> Producer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def newest_visible(rig: RelayRig, since: str = "now() - 30s") -> int:
    """Newest timestamp queryable (cheap: only looks at recent data, unlike a count over everything)."""
    assert rig.influx is not None
    result = rig.influx.query(f'SELECT last("quality") FROM "telemetry" WHERE time > {since}', db=rig.database)
    series = result["results"][0].get("series")  # type: ignore[index]
    return int(series[0]["values"][0][0]) if series else 0


def start_pipeline(root: Path) -> tuple[InfluxDServer, RelayRig]:
    influx = InfluxDServer(root / "influxd", auth=False)
    influx.start()
    influx.create_database("relay")
    rig = RelayRig(root / "rig", CertificateAuthority(root / "pki"), influx, "relay")
    rig.start_gateway()
    rig.start("writer", "--config", str(rig.dmz_path))
    rig.start("ot", "--config", str(rig.ot_path))
    return influx, rig


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="15 s of load instead of 60 s")
    parser.add_argument("--rate", type=int, default=10_000, help="points per second")
    args = parser.parse_args()
    duration = 15 if args.quick else 60
    console = Console()
    with tempfile.TemporaryDirectory(prefix="flowline-bench-") as tmp:
        influx, rig = start_pipeline(Path(tmp))
        try:
            with rig.ot_spool() as spool:
                # Warm up: wait until a first point crossed (processes imported, TLS connected).
                spool.append_points(points(1, start_ns=time.time_ns()))
                wait_until(lambda: newest_visible(rig) > 0, 60, "the pipeline to come up")
                producer = Producer(spool, args.rate).start()
                seen: list[tuple[int, float]] = []
                end = time.monotonic() + duration
                while time.monotonic() < end:
                    seen.append((newest_visible(rig), time.monotonic()))
                    time.sleep(0.005)
                producer.stop()
                final = producer.appended[-1][0]
                wait_until(lambda: newest_visible(rig) >= final, 30, "the last batch")
                seen.append((newest_visible(rig), time.monotonic()))
                # The figures assume each batch landed whole when its newest point showed; at least
                # check that every point did land (1 for the warm-up point).
                wait_until(lambda: rig.count() >= producer.count + 1, 60, f"all {producer.count} points counted")
        finally:
            rig.stop_all()
            influx.stop()
    latencies = []
    i = 0
    for newest, appended_at in producer.appended:
        while seen[i][0] < newest:
            i += 1
        latencies.append(max(0.0, seen[i][1] - appended_at))
    figures = {
        "rate_points_per_s": args.rate,
        "duration_s": duration,
        "batches": len(latencies),
        "p50_latency_s": round(percentile(latencies, 0.5), 3),
        "p99_latency_s": round(percentile(latencies, 0.99), 3),
        "max_latency_s": round(max(latencies), 3),
    }
    console.print("latency: spool append -> queryable in InfluxDB")
    for key, value in figures.items():
        console.print(f"  {key:22} {value}")
    console.print(f"results: {write_results('latency', figures)}")


if __name__ == "__main__":
    main()
