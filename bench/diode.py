"""Diode mode: throughput and delivered fraction across a lossy UDP link at 0 %, 1 % and 5 % loss.

Real ``diode-send`` and ``diode-receive`` processes on loopback with a Python forwarder in between
that drops datagrams at random. Throughput counts points delivered into the DMZ spool or accounted
as lost, from the first to the last, over the pre-filled OT spool.

    python bench/diode.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import repo_on_path, write_results
from rich.console import Console
from rich.table import Table

repo_on_path()

from flowline.core.spool import SpoolReader  # noqa: E402
from flowline.lab.netem import LossyUdpProxy  # noqa: E402
from flowline.lab.pki import CertificateAuthority  # noqa: E402
from flowline.lab.services import wait_until  # noqa: E402
from flowline.relay.body import decode_body  # noqa: E402
from tests.relay_helpers import RelayRig, points  # noqa: E402


def run(root: Path, total: int, loss: float) -> dict[str, float]:
    rig = RelayRig(root, CertificateAuthority(root / "pki"))
    with rig.ot_spool() as spool:
        for i in range(total // 5000):
            spool.append_points(points(5000, start_ns=1_700_000_000_000_000_000 + i * 5_000_000_000))
    proxy = LossyUdpProxy(("127.0.0.1", rig.diode_port), loss=loss, seed=1).start()
    try:
        rig.start("diode-receive", "--config", str(rig.dmz_path))
        log = rig.root / "diode-receive-0.log"
        wait_until(lambda: "listening" in log.read_text(), 30, "the receiver")
        ot = rig.write_ot_config("ot-diode.yaml", diode_port=proxy.port)
        rig.start("diode-send", "--config", str(ot))
        state: dict[str, float] = {}

        reader = SpoolReader(rig.dmz.spool_dir("dmz"))
        position = reader.acked

        def done() -> bool:
            # Count from the grouped bodies directly: parsing every point would load this process.
            nonlocal position
            for record in reader.read(after=position, max_records=100_000, max_bytes=1 << 40):
                series, _ = decode_body(record.payload)
                for measurement, _tags, rests in series:
                    if measurement == "telemetry":
                        state["delivered"] = state.get("delivered", 0) + len(rests)
                    elif measurement == "flowline_diode_lost_total":
                        state["lost"] = max(
                            state.get("lost", 0.0), *(float(r.split("=")[1].split(" ")[0]) for r in rests)
                        )
                position = record.end
            if state.get("delivered") and "t0" not in state:
                state["t0"] = time.monotonic()
            return state.get("delivered", 0) + state.get("lost", 0.0) >= total

        wait_until(done, 300, "every point delivered or accounted", interval=0.5)
        elapsed = time.monotonic() - state["t0"]
    finally:
        rig.stop_all()
        proxy.stop()
    return {
        "delivered_fraction": state["delivered"] / total,
        "lost_points": state.get("lost", 0.0),
        "points_per_s": total / max(elapsed, 1e-9),
        "datagrams_dropped": proxy.dropped,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100,000 points per loss rate")
    args = parser.parse_args()
    total = 100_000 if args.quick else 500_000
    figures: dict[str, float] = {"points_per_run": total}
    table = Table(title=f"diode: {total:,} points per run, k=10 of m=16 shares (defaults)")
    for col in ("loss", "delivered", "lost (accounted)", "points/s", "datagrams dropped"):
        table.add_column(col)
    with tempfile.TemporaryDirectory(prefix="flowline-bench-") as tmp:
        for loss in (0.0, 0.01, 0.05):
            result = run(Path(tmp) / f"loss{loss}", total, loss)
            pct = int(loss * 100)
            figures[f"delivered_fraction_loss{pct}pct"] = round(result["delivered_fraction"], 6)
            figures[f"points_per_s_loss{pct}pct"] = round(result["points_per_s"])
            figures[f"lost_points_loss{pct}pct"] = result["lost_points"]
            table.add_row(
                f"{pct}%",
                f"{result['delivered_fraction']:.6f}",
                f"{result['lost_points']:.0f}",
                f"{result['points_per_s']:,.0f}",
                f"{result['datagrams_dropped']:,}",
            )
    Console().print(table)
    Console().print(f"results: {write_results('diode', figures)}")


if __name__ == "__main__":
    main()
