"""The diode receiver under hostile datagrams: nothing unauthenticated keeps state, every bound holds.

The receiver runs in this process on real files (spool, audit log, session state) so its state can
be read directly; datagrams go through `DiodeReceiver.handle` exactly as the socket thread queues them.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowline.core.config import load_config
from flowline.lab.pki import CertificateAuthority
from flowline.relay.body import encode_body
from flowline.relay.diode_wire import encode_heartbeat, encode_shares
from flowline.relay.dmz.diode_receive import DiodeReceiver
from flowline.relay.frames import FrameType, encode_frame
from tests.relay_helpers import SENDER, RelayRig, points


@pytest.fixture
def rig(tmp_path: Path, pki: CertificateAuthority) -> RelayRig:
    return RelayRig(tmp_path, pki)


def make_receiver(rig: RelayRig, **overrides: object) -> DiodeReceiver:
    rig.update_dmz(**overrides)
    return DiodeReceiver(load_config(rig.dmz_path))


def close(receiver: DiodeReceiver) -> None:
    receiver.sock.close()
    receiver._save_sessions()
    receiver.acceptor.close()
    receiver.acceptor.spool.close()


@pytest.fixture
def receiver(rig: RelayRig) -> Iterator[DiodeReceiver]:
    r = make_receiver(rig, security_event_interval_s=3600)
    yield r
    close(r)


def key(rig: RelayRig) -> bytes:
    return rig.key_file.read_text().strip().encode()


def batch(rig: RelayRig, session: int, seq: int, before: int, n: int, chunk: int = 300) -> list[bytes]:
    frame = encode_frame(key(rig), FrameType.BATCH, SENDER, seq, n, encode_body(points(n, start_ns=(seq + 1) * 10**9)))
    return encode_shares(SENDER, key(rig), session, seq, before, n, frame, chunk=chunk, k=4, m=6)


def kinds(receiver: DiodeReceiver) -> dict[str, float]:
    names = ("malformed", "bad_tag", "unknown_sender", "replayed", "evicted_batch", "received", "duplicate")
    return {kind: receiver.metrics.counter("diode_datagrams_total", kind=kind) for kind in names}


def audit_lines(rig: RelayRig) -> list[dict[str, object]]:
    path = rig.root / "dmz" / "relay-dmz" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_forged_malformed_and_replayed_datagrams_keep_no_state(rig: RelayRig, receiver: DiodeReceiver) -> None:
    real = batch(rig, session=1, seq=0, before=0, n=50)
    for share in real:
        receiver.handle(share, "10.0.0.9")
    assert receiver.delivered_points == 50
    rng = random.Random(3)
    forged_key = b"x" * 32
    for i in range(3000):
        receiver.handle(rng.randbytes(rng.randrange(0, 1300)), "10.6.6.6")  # garbage
        receiver.handle(encode_heartbeat(SENDER, forged_key, 100 + i, 10**9, 10**12), "10.6.6.6")  # forged heartbeat
        receiver.handle(encode_heartbeat("intruder", key(rig), 5000 + i, 1, 0), "10.6.6.6")  # unknown sender
    for session in range(2, 500):  # an old stream replayed under new session ids: authentic but stored
        receiver.handle(batch(rig, session, 0, 0, 50)[0], "10.6.6.7")
    receiver.account()  # refusals are counted locally per datagram and handed over here
    seen = kinds(receiver)
    assert seen["malformed"] >= 2900 and seen["bad_tag"] == 3000 and seen["unknown_sender"] == 3000
    assert seen["replayed"] == 498
    # No forged heartbeat moved anything, and nothing unauthenticated opened a session or held bytes.
    assert list(receiver.sessions) == [1] and receiver.sessions[1].next_seq == 1
    assert receiver.pending_bytes == 0
    # Each kind is audited once now; the repeats become one line with their count at the interval's end.
    before = audit_lines(rig)
    assert sorted(str(r["reason"]) for r in before) == [
        "diode_bad_tag", "diode_malformed", "diode_replayed", "diode_unknown_sender",
    ]  # fmt: skip
    receiver.acceptor.flush_events(force=True)
    after = audit_lines(rig)
    assert len(after) == 8
    total = {
        r: sum(int(str(x["count"])) for x in after if x["reason"] == f"diode_{r}") for r in ("bad_tag", "replayed")
    }
    assert total == {"bad_tag": 3000, "replayed": 498}


def test_sessions_per_sender_are_bounded(rig: RelayRig, receiver: DiodeReceiver) -> None:
    for session in range(10, 16):  # six restarts of the sender, each a new session
        receiver.handle(encode_heartbeat(SENDER, key(rig), session, 0, 0))
    assert len(receiver.sessions) == 2 and set(receiver.sessions) == {14, 15}
    assert receiver.metrics.counter("diode_sessions_evicted_total") == 4


def test_unfinished_batches_are_bounded_and_accounted_as_lost(rig: RelayRig) -> None:
    receiver = make_receiver(rig, diode_max_pending_bytes=20_000, diode_gap_timeout_s=1)
    try:
        before = 0
        for seq in range(40):  # only 3 of the 4 shares needed of the first block of each batch
            for share in batch(rig, 1, seq, before, 200)[:3]:
                receiver.handle(share)
            before += 200
            assert receiver.pending_bytes <= 20_000
        assert kinds(receiver)["evicted_batch"] > 0
        receiver.handle(encode_heartbeat(SENDER, key(rig), 1, 40, before))
        receiver.account(time.monotonic() + 60)
        assert receiver.lost_points == 40 * 200 and receiver.sessions[1].next_seq == 40
        assert receiver.pending_bytes == 0
    finally:
        close(receiver)


def test_session_state_survives_a_receiver_restart(rig: RelayRig) -> None:
    first = make_receiver(rig)
    before = 0
    for seq in range(3):
        for share in batch(rig, 7, seq, before, 100):
            first.handle(share)
        before += 100
    first.account()
    close(first)
    assert json.loads((rig.root / "dmz" / "relay-dmz" / "diode-sessions.json").read_text())["sessions"] == [
        {"session": 7, "sender": SENDER, "next_seq": 3, "resolved_points": 300}
    ]
    second = make_receiver(rig)
    try:
        # Batches 3 and 4 were sent while the receiver was down; 5 arrives after its restart.
        for share in batch(rig, 7, 5, before + 250, 100):
            second.handle(share)
        second.account(time.monotonic() + 60)
        assert second.lost_points == 250  # exactly the two missing batches, known from the saved state
        assert second.delivered_points == 100 and second.sessions[7].next_seq == 6
    finally:
        close(second)


def test_datagrams_from_other_sources_are_dropped_before_parsing(rig: RelayRig) -> None:
    import socket
    import threading

    from flowline.lab.services import wait_until

    receiver = make_receiver(rig, diode_allowed_sources=["127.0.0.9"])
    thread = threading.Thread(target=receiver._receive, daemon=True)
    thread.start()
    try:
        port = receiver.sock.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for share in batch(rig, 1, 0, 0, 50) * 20:
                sock.sendto(share, ("127.0.0.1", port))
        wait_until(lambda: receiver._foreign == 20 * len(batch(rig, 1, 0, 0, 50)), 10, "every datagram refused")
        receiver.account()
        assert receiver.metrics.counter("diode_datagrams_total", kind="foreign_source") == 20 * len(
            batch(rig, 1, 0, 0, 50)
        )
        assert not receiver._queue and receiver.sessions == {} and receiver.delivered_points == 0
    finally:
        receiver.stop.set()
        close(receiver)
        thread.join(2)
