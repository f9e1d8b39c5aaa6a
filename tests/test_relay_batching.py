"""Batches from spools, the sender's sequence journal, and diode gap accounting (pure logic, real files)."""

from __future__ import annotations

import time
from pathlib import Path

import orjson

from flowline.core.backoff import Backoff
from flowline.core.config import load_config
from flowline.core.points import Point
from flowline.core.spool import SpoolReader, SpoolWriter, encode_points
from flowline.lab.pki import CertificateAuthority
from flowline.relay.body import body_lines, decode_body, encode_body
from flowline.relay.diode_wire import encode_heartbeat, encode_shares
from flowline.relay.dmz.diode_receive import DiodeReceiver
from flowline.relay.frames import FrameType, encode_frame
from flowline.relay.ot.batching import BatchBuilder, SequenceJournal
from tests.relay_helpers import SENDER, RelayRig, points


def builder(folder: Path, max_points: int = 1000) -> BatchBuilder:
    return BatchBuilder({"a": SpoolReader(folder / "a"), "b": SpoolReader(folder / "b")}, max_points, 1 << 20, 0.01)


def test_batches_respect_limits_and_cover_every_point_once(tmp_path: Path) -> None:
    with SpoolWriter(tmp_path / "a") as a, SpoolWriter(tmp_path / "b") as b:
        for i in range(10):
            a.append_points(points(300, start_ns=i * 10**9))
            b.append_points(points(200, start_ns=i * 10**9, tag="bearing_temp"))
    build = builder(tmp_path)
    seen: list[str] = []
    seq = 1
    while (batch := build.next_batch(seq, 0.05)) is not None:
        assert batch.count <= 1000 + 300  # whole records: at most one record over the limit
        series, raw = decode_body(batch.payload)
        assert not raw
        seen += body_lines(series)
        build.ack(batch)
        seq += 1
    assert len(seen) == len(set(seen)) == 5000


def test_compressed_records_old_json_records_and_garbage_in_one_spool(tmp_path: Path) -> None:
    fresh, older = points(300, start_ns=10**9), points(200, start_ns=2 * 10**9, tag="bearing_temp")
    with SpoolWriter(tmp_path / "a") as a:
        a.append_points(fresh)
        a.append([orjson.dumps([p.to_wire() for p in older])])  # a record from before compression
        a.append([b"\x78 not zlib", b"{}"])  # CRC-intact but not point records: skipped, logged
    batch = builder(tmp_path).next_batch(1, 0.05)
    assert batch is not None and batch.count == 500
    series, _ = decode_body(batch.payload)
    assert sorted(body_lines(series)) == sorted(p.to_line() for p in fresh + older)
    # the byte budget counts what the batch carries (uncompressed), not what the records took on disk
    on_disk, carried = len(encode_points(fresh)), len(orjson.dumps([p.to_wire() for p in fresh]))
    budget = (on_disk + carried) // 2  # fits the first record compressed, not uncompressed
    small = BatchBuilder({"a": SpoolReader(tmp_path / "a")}, 10**6, budget, 0.01).next_batch(1, 0.05)
    assert small is not None and small.count == 300
    assert on_disk * 4 < carried


def test_journal_resends_the_same_batch_under_the_same_number_after_a_crash(tmp_path: Path) -> None:
    with SpoolWriter(tmp_path / "a") as a:
        for i in range(5):
            a.append_points(points(400, start_ns=i * 10**9))
    journal = SequenceJournal(tmp_path / "state")
    first = journal.next
    batch = builder(tmp_path).next_batch(journal.next, 0.05)
    assert batch is not None
    journal.begin(batch)
    # crash: new process, new objects, and more data has arrived meanwhile
    with SpoolWriter(tmp_path / "a") as a:
        a.append_points(points(400, start_ns=99 * 10**9))
    journal2 = SequenceJournal(tmp_path / "state")
    again = builder(tmp_path).rebuild(journal2.inflight or {})
    assert again is not None and again.sequence == batch.sequence == first
    assert again.payload == batch.payload and again.ranges == batch.ranges
    # once acknowledged, the journal moves on and the rebuilt batch is gone
    rebuilt = builder(tmp_path)
    rebuilt.ack(again)
    journal2.done(again)
    assert SequenceJournal(tmp_path / "state").next == first + 1
    assert rebuilt.rebuild(again.journal()) is None


def test_unencodable_points_travel_as_wire_points() -> None:
    good = points(3)
    weird = [good[0].__class__("telemetry", {"asset": "P-101", "tag": "t"}, {"value_str": "two\nlines"}, 5)]
    series, raw = decode_body(encode_body(good + weird))
    assert len(body_lines(series)) == 3 and raw == [weird[0].to_wire()]


def test_diode_accounts_whole_and_partial_losses_exactly(tmp_path: Path, pki: CertificateAuthority) -> None:
    rig = RelayRig(tmp_path, pki)
    receiver = DiodeReceiver(load_config(rig.dmz_path))
    key = rig.key_file.read_text().strip().encode()
    try:
        sent = 0
        sizes = [100, 250, 300, 50, 120, 80]
        for seq, n in enumerate(sizes, start=10):
            frame = encode_frame(
                key, FrameType.BATCH, "ot-test-1", seq, n, encode_body(points(n, start_ns=seq * 10**9))
            )
            shares = encode_shares(SENDER, key, 1, seq, sent, n, frame, chunk=200, k=4, m=6)
            if seq == 11:
                # a heartbeat announces batch 11, then nothing of it arrives
                receiver.handle(encode_heartbeat(SENDER, key, 1, 11, sent))
                shares = []
            elif seq == 13:
                shares = shares[:3]  # too few shares of batch 13 to rebuild it
            elif seq == 15:
                shares = []  # the last batch vanishes too: only the heartbeat tells
            for share in shares:
                receiver.handle(share)
                receiver.handle(share)  # and every datagram twice: duplicates are ignored
            sent += n
        receiver.handle(encode_heartbeat(SENDER, key, 1, 16, sent))
        receiver.account(time.monotonic() + 60)
        assert receiver.lost_points == 250 + 50 + 80
        assert receiver.delivered_points == 100 + 300 + 120
        assert receiver.metrics.counter("diode_lost_batches_total") == 3
        assert receiver.sessions[1].next_seq == 16
    finally:
        receiver.sock.close()
        receiver.acceptor.close()
        receiver.acceptor.spool.close()


def test_grouped_body_gives_exactly_the_points_lines() -> None:
    odd = [
        Point("telemetry", {"asset": "P 101", "tag": "a,b=c", "site": "s"}, {"value": 1.5, "quality": 0}, 7),
        Point("my measurement", {"k": "v"}, {"text": 'say "hi"', "n": 3, "ok": True}, 8),
        Point("telemetry", {"asset": "P 101", "tag": "a,b=c", "site": "s"}, {"value": -2.0, "quality": 2}, 9),
    ]
    series, raw = decode_body(encode_body(odd))
    assert not raw and sorted(body_lines(series)) == sorted(p.to_line() for p in odd)


def test_backoff_stays_bounded_through_a_long_outage() -> None:
    backoff = Backoff(0.5, 30.0)
    delays = [backoff.next_delay() for _ in range(5000)]
    assert all(0.25 <= d <= 30.0 for d in delays) and max(delays[-100:]) > 15
    backoff.reset()
    assert backoff.next_delay() <= 0.5
