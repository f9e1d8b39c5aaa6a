"""Sustained durable ingest: OT spool -> sender -> gateway -> DMZ spool -> writer -> InfluxDB.

Next to it, in the same run and against the same InfluxDB, the raw ingest rate: pre-encoded
line protocol posted directly in large batches. Targets: >= 100,000 points/s and >= 25 % of raw.

    python bench/ingest.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import requests
from _common import repo_on_path, write_results
from rich.console import Console
from rich.table import Table

repo_on_path()

from flowline.core.points import encode_lines  # noqa: E402
from flowline.lab.pki import CertificateAuthority  # noqa: E402
from flowline.lab.services import InfluxDServer, wait_until  # noqa: E402
from tests.relay_helpers import RelayRig, points  # noqa: E402

SERIES = 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dataset(n: int, base_ns: int) -> list[list]:  # type: ignore[type-arg]
    """``n`` points over SERIES series (one asset per series), in records of 5,000."""
    per_series = n // SERIES
    out = []
    for start in range(0, per_series, 50):
        chunk = []
        for s in range(SERIES):
            chunk += points(min(50, per_series - start), start_ns=base_ns + start * 1_000_000, asset=f"P-{s:03d}")
        out.append(chunk)
    return out


def newest(rig: RelayRig, since_ns: int) -> int:
    """Newest queryable timestamp at or after ``since_ns`` (0 when none yet)."""
    assert rig.influx is not None
    q = f'SELECT last("quality") FROM "telemetry" WHERE time >= {since_ns}'
    series = rig.influx.query(q, db=rig.database)["results"][0].get("series")  # type: ignore[index]
    return int(series[0]["values"][0][0]) if series else 0


def raw_rate(influx: InfluxDServer, db: str, n: int, batch: int) -> float:
    body = encode_lines([p for chunk in dataset(n, 1_600_000_000_000_000_000) for p in chunk])
    lines = body.rstrip(b"\n").split(b"\n")
    bodies = [b"\n".join(lines[i : i + batch]) for i in range(0, len(lines), batch)]
    session = requests.Session()
    t0 = time.perf_counter()
    for b in bodies:
        r = session.post(f"{influx.url}/write", params={"db": db, "precision": "ns"}, data=b, timeout=120)
        r.raise_for_status()
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller run (< 1 minute)")
    args = parser.parse_args()
    n = 200_000 if args.quick else 1_000_000
    console = Console()
    with tempfile.TemporaryDirectory(prefix="flowline-bench-") as tmp:
        root = Path(tmp)
        influx = InfluxDServer(root / "influxd", auth=False)
        influx.start()
        try:
            influx.create_database("raw")
            influx.create_database("relay")
            raw = raw_rate(influx, "raw", n, 10_000)
            console.print(f"raw InfluxDB ingest: {raw:,.0f} points/s")
            rig = RelayRig(root / "rig", CertificateAuthority(root / "pki"), influx, "relay")
            chunks = dataset(n, 1_700_000_000_000_000_000)
            with rig.ot_spool() as spool:
                for chunk in chunks:
                    spool.append_points(chunk)
            stamps = sorted(p.timestamp_ns for chunk in chunks for p in chunk)
            ts10, ts_last = stamps[n // 10 - 1], stamps[-1]
            n10 = sum(1 for ts in stamps if ts <= ts10)  # points at or before ts10 (ties included)
            rig.start_gateway()
            rig.start("writer", "--config", str(rig.dmz_path))
            t0 = time.perf_counter()
            rig.start("ot", "--config", str(rig.ot_path))
            try:
                # Sustained rate: from the first 10 % landing (processes started, connected) to the end.
                # The clock stops only when the points are counted, not when the newest timestamp
                # shows: arrival order is not guaranteed (a retried write lands after later ones),
                # and a run once showed the newest point with 190,000 of 200,000 counted. Counting
                # starts once the newest is there, so the polling does not load InfluxDB during the run.
                wait_until(lambda: newest(rig, ts10) >= ts10, 600, "10% of the points in InfluxDB", interval=0.1)
                where10 = f"WHERE time <= {ts10}"
                wait_until(lambda: rig.count(where=where10) >= n10, 600, "the first 10% counted", interval=0.1)
                t10 = time.perf_counter()
                wait_until(lambda: newest(rig, ts_last) >= ts_last, 600, "the newest point in InfluxDB", interval=0.1)
                t_newest = time.perf_counter()
                counted: list[int] = []

                def complete() -> bool:
                    counted.append(rig.count())
                    return counted[-1] >= n

                try:
                    wait_until(complete, 120, f"all {n} points counted in InfluxDB", interval=0.1)
                except TimeoutError:
                    raise SystemExit(f"only {counted[-1]} of {n} points in InfluxDB 120 s after the newest") from None
                t100 = time.perf_counter()
                if counted[-1] != n:
                    raise SystemExit(f"{counted[-1]} points in InfluxDB for {n} written")
                cpu = {
                    f"cpu_s_{name}": cpu_seconds(pid)
                    for name, pid in [
                        ("sender", rig.procs[2].pid),
                        ("gateway", rig.procs[0].pid),
                        ("writer", rig.procs[1].pid),
                        ("influxd", influx._proc.pid if influx._proc else 0),
                    ]
                }
            finally:
                rig.stop_all()
            relay = (n - n // 10) / (t100 - t10)
            overall = n / (t100 - t0)
        finally:
            influx.stop()
    figures = {
        "points": n,
        "relay_points_per_s": round(relay),
        "relay_incl_startup_points_per_s": round(overall),
        "raw_influx_points_per_s": round(raw),
        "ratio_vs_raw": round(relay / raw, 3),
        "newest_to_all_counted_s": round(t100 - t_newest, 2),
        **{k: round(v, 2) for k, v in cpu.items()},
    }
    table = Table(title="ingest: sender -> gateway -> InfluxDB (fsync on)")
    for col in ("figure", "value"):
        table.add_column(col)
    for key, value in figures.items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    console.print(table)
    console.print(f"results: {write_results('ingest', figures)}")


if __name__ == "__main__":
    main()
