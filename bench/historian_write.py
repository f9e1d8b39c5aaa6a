"""Historian writer speed: line-protocol encoding, and HistorianWriter vs raw posts to a real InfluxDB.

Run from the repo root: ``.venv/bin/python bench/historian_write.py [--quick]``.
Writes ``bench/results/historian_write.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results

from flowline.core.points import Point, TagRef, encode_lines, telemetry_point
from flowline.historian import Connection, HistorianWriter
from flowline.lab.services import InfluxDServer

T0 = 1_700_000_000_000_000_000


def make_points(n: int, offset: int = 0) -> list[Point]:
    refs = [TagRef("north-field", f"P-{a:03d}", f"tag{t}", "degC") for a in range(100) for t in range(10)]
    return [
        telemetry_point(refs[i % len(refs)], i * 0.37, T0 + offset + (i // len(refs)) * 1_000_000_000)
        for i in range(n)
    ]


def best_of(runs: int, func: Callable[[], object]) -> float:
    """The fastest of ``runs`` timings: the machine is shared, the minimum is the least disturbed."""
    return min(timeit.repeat(func, number=1, repeat=runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (< 1 minute)")
    args = parser.parse_args()
    n = 100_000 if args.quick else 1_000_000

    points = make_points(100_000)
    encode_s = best_of(5, lambda: encode_lines(points))
    figures: dict[str, float | int | str] = {
        "encode_points_per_s": round(len(points) / encode_s),
        "encode_100k_points_s": round(encode_s, 4),
    }

    with tempfile.TemporaryDirectory() as tmp:
        server = InfluxDServer(Path(tmp), auth=True)
        server.start()
        try:
            server.create_database("bench")
            conn = Connection(server.url, "bench", username=server.admin.name, password=server.admin.password)
            writer_s = {}
            for offset, use_gzip in ((2, True), (3, False)):
                writer = HistorianWriter(conn, batch_max_points=10_000, gzip=use_gzip)
                data = make_points(n, offset=offset)
                start = time.perf_counter()
                result = writer.write(data)
                writer_s[use_gzip] = time.perf_counter() - start
                writer.close()
                assert result.written == n

            # Raw ingest of the same InfluxDB: pre-encoded 10k-point bodies posted directly, no gzip.
            raw = make_points(n, offset=1)
            bodies = [encode_lines(raw[i : i + 10_000]) for i in range(0, n, 10_000)]
            session = requests.Session()
            session.auth = (server.admin.name, server.admin.password)
            start = time.perf_counter()
            for body in bodies:
                session.post(f"{server.url}/write", params={"db": "bench"}, data=body, timeout=60).raise_for_status()
            raw_s = time.perf_counter() - start
        finally:
            server.stop()

    figures.update(
        {
            "points": n,
            "writer_points_per_s": round(n / writer_s[True]),
            "writer_no_gzip_points_per_s": round(n / writer_s[False]),
            "raw_post_points_per_s": round(n / raw_s),
            "writer_ratio_vs_raw": round(raw_s / writer_s[True], 3),
        }
    )
    width = max(len(k) for k in figures)
    print(f"{'figure':<{width}}  value")
    for key, value in figures.items():
        print(f"{key:<{width}}  {value:,}" if isinstance(value, int) else f"{key:<{width}}  {value}")
    print(f"wrote {write_results('historian_write', figures)}")


if __name__ == "__main__":
    main()
