"""Hostile traffic at the DMZ during a real stream: datagrams absorbed per second, memory, completeness.

Diode phase: forged, replayed and malformed datagrams at ``diode-receive`` (1,000,000 by default,
paced at ``--rate``) while ``diode-send`` streams 500,000 points. TCP phase: half-open connections
and failed TLS handshakes at ``relay dmz`` (20,000, at most 500 held open) while ``relay ot``
streams 500,000 points. See tests/flood_helpers.py.

    python bench/flood.py [--quick] [--rate 30000]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import repo_on_path, write_results
from rich.console import Console
from rich.table import Table

repo_on_path()

from flowline.lab.pki import CertificateAuthority  # noqa: E402
from tests.flood_helpers import diode_flood, gateway_flood  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100,000 datagrams, 2,000 connections, 100,000 points")
    parser.add_argument("--rate", type=float, default=20_000, help="flood datagrams per second")
    args = parser.parse_args()
    datagrams, connections, stream = (100_000, 2_000, 100_000) if args.quick else (1_000_000, 20_000, 500_000)
    with tempfile.TemporaryDirectory(prefix="flowline-bench-") as tmp:
        pki = CertificateAuthority(Path(tmp) / "pki")
        diode = diode_flood(Path(tmp) / "diode", pki, datagrams, stream, args.rate)
        tcp = gateway_flood(Path(tmp) / "tcp", pki, connections, stream)
    figures: dict[str, float | int | str] = {f"diode_{k}": v for k, v in diode.items()}
    figures.update({f"gateway_{k}": v for k, v in tcp.items()})
    table = Table(title="flood at the DMZ during a real stream")
    for col in ("target", "hostile traffic", "absorbed", "RSS before / peak / after", "stream", "audit"):
        table.add_column(col)
    table.add_row(
        "diode-receive",
        f"{diode['datagrams_sent']:,} datagrams in {diode['flood_seconds']} s",
        f"{diode['datagrams_absorbed']:,} ({diode['absorbed_per_s']:,}/s)",
        f"{diode['rss_before_mib']} / {diode['rss_peak_mib']} / {diode['rss_after_mib']} MiB",
        f"{diode['stream_delivered']:,} of {diode['stream_points']:,} ({diode['stream_lost']:,} lost)",
        f"{diode['audit_lines']} lines, {diode['audit_bytes']:,} B",
    )
    table.add_row(
        "relay dmz",
        f"{tcp['connections']:,} half-open / failed handshakes",
        f"{tcp['connections_per_s']:,}/s",
        f"{tcp['rss_before_mib']} / {tcp['rss_peak_mib']} / {tcp['rss_after_mib']} MiB",
        f"{tcp['stream_delivered']:,} of {tcp['stream_points']:,}",
        f"{tcp['audit_lines']} lines, {tcp['audit_bytes']:,} B",
    )
    Console().print(table)
    Console().print(f"results: {write_results('flood', figures)}")


if __name__ == "__main__":
    main()
