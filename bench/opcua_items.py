"""OPC UA collector capacity: monitored items changing at 1 Hz that one collector process keeps up with.

"Keeps up" = p99 lag (spool commit time minus the value's source timestamp) below 1 s and no
dropped notification: every tick the server reports having written entirely inside the measuring
window is found in the spool for every item (a window with nothing in it fails). The server is
a plain asyncua server in a separate process, so its CPU is not counted as the collector's; CPU and
memory are the collector's (this process: the collector runs in a thread, the bench loop sleeps).

Run from the repo root: ``.venv/bin/python bench/opcua_items.py [--quick]``.
Writes ``bench/results/opcua_items.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results

from flowline.core.config import load_config
from flowline.core.spool import SpoolReader, decode_points
from flowline.lab.services import free_port, port_open, wait_until

NS_URI = "urn:flowline:bench"
FOLDER_SIZE = 250
YIELD_EVERY = 500


# --- server process ----------------------------------------------------------------------------


async def serve(items: int, port: int) -> None:
    from asyncua import Server, ua

    logging.getLogger("asyncua").setLevel(logging.ERROR)
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/bench/")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    ns = await server.register_namespace(NS_URI)
    # at most FOLDER_SIZE children per folder: adding a reference scans the parent's list (quadratic)
    folders = [
        await server.nodes.objects.add_folder(ua.NodeId(f"f{k}", ns), ua.QualifiedName(f"f{k}", ns))
        for k in range((items + FOLDER_SIZE - 1) // FOLDER_SIZE)
    ]
    ids = [ua.NodeId(i + 1, ns) for i in range(items)]
    requests = []
    for i, node_id in enumerate(ids):  # one AddNodes call: add_variable per node takes minutes at 20k
        item = ua.AddNodesItem(
            RequestedNewNodeId=node_id,
            BrowseName=ua.QualifiedName(f"v{i}", ns),
            NodeClass=ua.NodeClass.Variable,
            ParentNodeId=folders[i // FOLDER_SIZE].nodeid,
            ReferenceTypeId=ua.NodeId(ua.ObjectIds.HasComponent),
            TypeDefinition=ua.NodeId(ua.ObjectIds.BaseDataVariableType),
        )
        attrs = ua.VariableAttributes(
            DisplayName=ua.LocalizedText(f"v{i}"),
            DataType=ua.NodeId(ua.ObjectIds.Double),
            Value=ua.Variant(0.0, ua.VariantType.Double),
            ValueRank=ua.ValueRank.Scalar,
            AccessLevel=ua.AccessLevel.CurrentRead.mask,
            UserAccessLevel=ua.AccessLevel.CurrentRead.mask,
        )
        item.NodeAttributes = attrs
        requests.append(item)
    for result in await server.iserver.isession.add_nodes(requests):
        result.StatusCode.check()
    async with server:
        print("ready", flush=True)
        tick = 0
        while True:
            await asyncio.sleep(1 - time.time() % 1)
            tick += 1
            started = time.time()
            value = ua.Variant(float(tick), ua.VariantType.Double)
            for i, node_id in enumerate(ids):
                if i % YIELD_EVERY == 0:
                    # let the server's publish task run, as a server fed by a PLC does between updates
                    await asyncio.sleep(0)
                # stamped at the write, so the collector's lag excludes this loop's own duration
                now = dt.datetime.now(dt.UTC)
                await server.write_attribute_value(
                    node_id, ua.DataValue(value, SourceTimestamp=now, ServerTimestamp=now)
                )
            # the collector side reads these lines: which ticks were written completely, and when
            print(f"tick {tick} start {started:.3f} end {time.time():.3f}", flush=True)


# --- collector side ----------------------------------------------------------------------------


def _config(folder: Path, items: int, port: int) -> Path:
    tags = [{"name": f"v{i}", "source": {"opcua": {"node": f"ns=2;i={i + 1}"}}} for i in range(items)]
    site = {
        "site": "bench",
        "assets": [{"id": "B-1", "name": "bench", "type": "bench", "criticality": "C", "tags": tags}],
    }
    (folder / "site.yaml").write_text(yaml.safe_dump(site))
    config = {
        "site_file": "site.yaml",
        "data_dir": "data",
        "metrics_interval_s": 1,
        "collectors": {
            "opcua": {
                "servers": {
                    "default": {
                        "url": f"opc.tcp://127.0.0.1:{port}/bench/",
                        "security": {"policy": "None", "mode": "None"},
                    }
                },
                # values change at 1 Hz; a short publishing interval keeps delivery latency out of the lag
                "publishing_interval_ms": 100,
                "sampling_interval_ms": 0,
                "history_backfill": False,
            }
        },
    }
    (folder / "flowline.yaml").write_text(yaml.safe_dump(config))
    return folder / "flowline.yaml"


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of another process (the server), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _read_ticks(stream: IO[str], written: list[tuple[int, float, float]]) -> None:
    """Collect the server's "tick N start S end E" lines (and keep its stdout pipe from filling)."""
    for line in stream:
        parts = line.split()
        if len(parts) == 6 and parts[0] == "tick":
            written.append((int(parts[1]), float(parts[3]), float(parts[5])))


def run_level(items: int, measure_s: float, warmup_s: float) -> dict[str, float]:
    from flowline.collectors.opcua import OpcUaCollectorProcess

    with tempfile.TemporaryDirectory(prefix="bench-opcua-") as tmp:
        folder = Path(tmp)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(items), "--port", str(port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            server.stdout.readline()  # "ready"
            written: list[tuple[int, float, float]] = []  # (tick, write started, write ended), epoch s
            threading.Thread(target=_read_ticks, args=(server.stdout, written), daemon=True).start()
            wait_until(lambda: port_open(port), 60, "bench server")
            config = load_config(_config(folder, items, port))
            collector = OpcUaCollectorProcess(config)
            started = time.monotonic()
            collector.start()
            session = collector.collector.sessions[0]
            wait_until(lambda: session.connected.is_set(), 300, "collector subscribed")
            setup_s = time.monotonic() - started
            time.sleep(warmup_s)
            lags: list[float] = []
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            server_cpu0 = _proc_cpu_s(server.pid)
            t0 = time.time_ns()
            wall0 = time.monotonic()
            while time.monotonic() - wall0 < measure_s:
                time.sleep(0.25)
                lag = collector.metrics.gauge("lag_seconds")
                if lag is not None:
                    lags.append(lag)
            t1 = time.time_ns()
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            server_cpu = (_proc_cpu_s(server.pid) - server_cpu0) / (time.monotonic() - wall0)
            wall = time.monotonic() - wall0
            rss = _rss_mib()
            time.sleep(2)  # let the last ticks of the window reach the spool
            dropped = collector.metrics.total("dropped_total")
            collector.stop()
        finally:
            server.terminate()
            server.wait(10)
        # Every tick the server wrote entirely inside the window must be in the spool, complete. The
        # expected ticks come from the server, not from what arrived: a collector that delivered
        # nothing in the window must fail, not pass with an empty list of ticks.
        tags: dict[float, set[str]] = {}  # tick value -> items that delivered it (a repeat counts once)
        reader = SpoolReader(config.spool_dir("opcua"))
        after = None
        while records := reader.read(after=after, max_records=1000):
            for record in records:
                for p in decode_points(record.payload):
                    if p.measurement == "telemetry" and isinstance(value := p.fields.get("value"), float):
                        tags.setdefault(value, set()).add(p.tags["tag"])
            after = records[-1].end
    ticks = [float(tick) for tick, start, end in written if t0 / 1e9 <= start and end <= t1 / 1e9]
    # A server that cannot write all items once a second does not test the collector at this level:
    # not a pass either (the machine, not the collector, is the limit; said so in the output).
    server_kept_pace = len(ticks) >= measure_s / 2
    missing = sum(items - len(tags.get(v, ())) for v in ticks) + dropped
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    lags.sort()
    p99 = lags[min(len(lags) - 1, int(len(lags) * 0.99))] if lags else float("inf")
    return {
        "items": items,
        "ticks": len(ticks),
        "server_kept_pace": int(server_kept_pace),
        "values_per_s": sum(len(tags.get(v, ())) for v in ticks) / max(1, len(ticks)),
        "missing": missing,
        "p99_lag_s": p99,
        "max_lag_s": lags[-1] if lags else float("inf"),
        "cpu_cores": cpu / wall,
        "server_cpu_cores": server_cpu,
        "rss_mib": rss,
        "setup_s": setup_s,
    }


def passed(row: dict[str, float]) -> bool:
    """Every expected tick complete, p99 lag under 1 s, and a server that really wrote at 1 Hz."""
    return bool(row["server_kept_pace"]) and row["ticks"] > 0 and row["missing"] == 0 and row["p99_lag_s"] < 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, under a minute")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--levels", help="comma-separated item counts to try")
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.port))
        return
    logging.basicConfig(level=logging.ERROR)
    levels = (
        [int(x) for x in args.levels.split(",")]
        if args.levels
        else ([2000, 5000] if args.quick else [5000, 10000, 20000, 40000, 60000, 80000, 100000, 120000, 150000])
    )
    measure_s, warmup_s = (8.0, 3.0) if args.quick else (20.0, 5.0)
    rows = []
    print(
        f"{'items':>7} {'ticks':>5} {'values/s':>9} {'missing':>8} {'p99 lag s':>10} {'max lag s':>10} "
        f"{'CPU cores':>10} {'RSS MiB':>8} {'setup s':>8} {'server CPU':>10}"
    )
    for items in levels:
        row = run_level(items, measure_s, warmup_s)
        rows.append(row)
        print(
            f"{items:>7} {row['ticks']:>5} {row['values_per_s']:>9.0f} {row['missing']:>8.0f} "
            f"{row['p99_lag_s']:>10.2f} {row['max_lag_s']:>10.2f} {row['cpu_cores']:>10.2f} {row['rss_mib']:>8.0f} "
            f"{row['setup_s']:>8.1f} {row['server_cpu_cores']:>10.2f}",
            flush=True,
        )
        if not row["server_kept_pace"]:
            print(f"the bench server wrote only {row['ticks']} complete ticks of {items} items in {measure_s:.0f} s: "
                  "it cannot drive this level on this machine now (not counted as kept up)")
        if not passed(row):
            break  # lost notifications or lag past the limit: larger sizes cannot do better
    ok = [r for r in rows if passed(r)]
    best = max(ok, key=lambda r: r["items"]) if ok else rows[0]
    figures = {
        "max_items_kept_up": best["items"] if ok else 0,
        "values_per_s_at_max": best["values_per_s"],
        "p99_lag_s_at_max": best["p99_lag_s"],
        "cpu_cores_at_max": best["cpu_cores"],
        "rss_mib_at_max": best["rss_mib"],
        "subscribe_setup_s_at_max": best["setup_s"],
        "largest_tried_items": rows[-1]["items"],
        "largest_tried_missing": rows[-1]["missing"],
        "largest_tried_p99_lag_s": rows[-1]["p99_lag_s"],
        "quick": int(args.quick),
    }
    path = write_results("opcua_items", figures)
    print(f"kept up with {figures['max_items_kept_up']} items at 1 Hz; wrote {path}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
