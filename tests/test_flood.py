"""A smaller run of ``bench/flood.py``: hostile traffic at the real DMZ processes during a real stream."""

from __future__ import annotations

from pathlib import Path

from flowline.lab.pki import CertificateAuthority
from tests.flood_helpers import diode_flood, gateway_flood


def test_diode_receiver_absorbs_a_flood_with_bounded_memory_and_the_stream_complete(
    tmp_path: Path, pki: CertificateAuthority
) -> None:
    r = diode_flood(tmp_path, pki, datagrams=50_000, stream_points=60_000, rate=10_000)
    print(r)
    assert r["stream_delivered"] == r["stream_points"] and r["stream_lost"] == 0, r
    assert r["datagrams_absorbed"] >= 0.9 * r["datagrams_sent"]  # refused and counted, not just lost
    assert r["rss_peak_mib"] - r["rss_before_mib"] < 48
    assert r["audit_lines"] < 40  # one line per kind and interval, however many datagrams


def test_gateway_survives_half_open_and_failed_handshakes(tmp_path: Path, pki: CertificateAuthority) -> None:
    r = gateway_flood(tmp_path, pki, connections=3_000, stream_points=60_000)
    print(r)
    assert r["stream_delivered"] == r["stream_points"], r
    assert r["connections"] == 3_000
    assert r["rss_peak_mib"] - r["rss_before_mib"] < 48
    assert r["audit_lines"] < 60
