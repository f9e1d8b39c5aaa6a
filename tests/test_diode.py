"""Diode mode: FEC shares, and a real sender/receiver pair across a lossy UDP link."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import zfec  # type: ignore[import-untyped]

from flowline.lab.netem import LossyUdpProxy
from flowline.lab.pki import CertificateAuthority
from flowline.lab.services import wait_until
from flowline.relay.diode_wire import DatagramError, Heartbeat, Share, encode_heartbeat, encode_shares, parse_datagram
from tests.relay_helpers import RelayRig, dmz_points, points

KEY = b"0123456789abcdef" * 2
KEYS = {"s1": KEY}


@pytest.mark.parametrize("size", [1, 999, 12_000, 100_003])
def test_any_k_of_m_shares_rebuild_the_frame(size: int) -> None:
    frame = random.randbytes(size)
    shares = [
        parse_datagram(d, KEYS.get) for d in encode_shares("s1", KEY, 7, 42, 1000, 55, frame, chunk=500, k=4, m=7)
    ]
    assert all(isinstance(s, Share) for s in shares)
    blocks: dict[int, list[Share]] = {}
    for share in shares:
        assert isinstance(share, Share) and (share.sequence, share.count, share.points_before) == (42, 55, 1000)
        blocks.setdefault(share.block, []).append(share)
    rebuilt = b""
    for b in sorted(blocks):
        keep = random.sample(blocks[b], 4)  # lose any three of seven
        chunks = zfec.Decoder(4, 7).decode([s.data for s in keep], [s.index for s in keep])
        rebuilt += b"".join(chunks)
    assert rebuilt[:size] == frame


def test_garbage_forged_and_altered_datagrams_are_refused() -> None:
    for data in (b"", b"FD", random.randbytes(40), b"FD\x01\x01" + bytes(60), b"FD\x02\x01\x00" + bytes(60)):
        with pytest.raises(DatagramError) as exc:
            parse_datagram(data, KEYS.get)
        assert exc.value.reason == "malformed"
    good = encode_shares("s1", KEY, 7, 42, 1000, 55, b"frame", chunk=500, k=4, m=7)[0]
    with pytest.raises(DatagramError) as exc:  # the same datagram under another key
        parse_datagram(encode_shares("s1", b"k" * 32, 7, 42, 1000, 55, b"frame", chunk=500, k=4, m=7)[0], KEYS.get)
    assert exc.value.reason == "bad_tag"
    altered = bytearray(good)
    altered[20] ^= 1
    with pytest.raises(DatagramError) as exc:
        parse_datagram(bytes(altered), KEYS.get)
    assert exc.value.reason == "bad_tag"
    with pytest.raises(DatagramError) as exc:
        parse_datagram(encode_heartbeat("stranger", KEY, 7, 1, 0), KEYS.get)
    assert exc.value.reason == "unknown_sender"
    assert parse_datagram(encode_heartbeat("s1", KEY, 7, 43, 1055), KEYS.get) == Heartbeat("s1", 7, 43, 1055)


@pytest.fixture
def rig(tmp_path: Path, pki: CertificateAuthority) -> Iterator[RelayRig]:
    rig = RelayRig(tmp_path, pki)
    yield rig
    rig.stop_all()


def latest(rig: RelayRig, measurement: str) -> float:
    values = [p for p in dmz_points(rig.dmz) if p.measurement == measurement]
    return float(max(values, key=lambda p: p.timestamp_ns).fields["value"]) if values else 0.0


def test_five_percent_loss_delivers_and_accounts_every_point(rig: RelayRig) -> None:
    total = 200_000
    with rig.ot_spool() as spool:
        for i in range(total // 2000):
            spool.append_points(points(2000, start_ns=1_700_000_000_000_000_000 + i * 2_000_000_000))
    proxy = LossyUdpProxy(("127.0.0.1", rig.diode_port), loss=0.05, seed=7).start()
    try:
        receiver = rig.start("diode-receive", "--config", str(rig.dmz_path))
        ot = rig.write_ot_config(
            "ot-diode.yaml", diode_port=proxy.port, diode_rate_bytes_s=4e6, batch_max_points=10_000
        )
        wait_until(lambda: (rig.root / "diode-receive-0.log").read_text().count("listening") > 0, 20, "receiver")
        rig.start("diode-send", "--config", str(ot))

        def telemetry() -> int:
            return len({p.timestamp_ns for p in dmz_points(rig.dmz) if p.measurement == "telemetry"})

        try:
            wait_until(
                lambda: telemetry() + latest(rig, "flowline_diode_lost_total") >= total,
                90,
                "every point delivered or accounted as lost",
            )
        except TimeoutError:
            print(rig.logs())
            raise
        delivered = telemetry()
        lost = latest(rig, "flowline_diode_lost_total")
        assert receiver.poll() is None
    finally:
        proxy.stop()
    assert proxy.dropped > 0
    assert delivered + lost == total  # every missing point is accounted, none counted twice
    assert delivered >= 0.9999 * total
    stored = [p for p in dmz_points(rig.dmz) if p.measurement == "telemetry"]
    assert len(stored) == delivered  # no duplicates
