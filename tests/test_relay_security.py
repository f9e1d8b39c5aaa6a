"""What the DMZ gateway refuses, and that it keeps serving good senders after each refusal."""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowline.lab.pki import CertificateAuthority
from flowline.lab.services import wait_until
from flowline.relay.body import encode_body
from flowline.relay.frames import FrameType, encode_frame
from tests.relay_helpers import SENDER, GatewayThread, RelayRig, dmz_points, points, read_ack, tls_client

SEQ = iter(range(1000, 10**6))


@pytest.fixture
def rig(tmp_path: Path, pki: CertificateAuthority) -> Iterator[RelayRig]:
    rig = RelayRig(tmp_path, pki)
    rig.gw = GatewayThread(rig.dmz)  # type: ignore[attr-defined]
    yield rig
    rig.gw.close()  # type: ignore[attr-defined]


def key(rig: RelayRig) -> bytes:
    return rig.key_file.read_text().strip().encode()


def send_good(rig: RelayRig, n: int = 10, asset: str = "P-101") -> int:
    """A well-behaved sender's batch goes through and is acked; returns its sequence number."""
    seq = next(SEQ)
    with tls_client(rig, rig.client) as sock:
        sock.sendall(encode_frame(key(rig), FrameType.BATCH, SENDER, seq, n, encode_body(points(n, asset=asset))))
        assert read_ack(sock, key(rig)) == seq
    return seq


def events(rig: RelayRig, reason: str) -> list[dict[str, object]]:
    return [
        {**p.tags, **p.fields}
        for p in dmz_points(rig.dmz)
        if p.measurement == "security_event" and p.tags["reason"] == reason
    ]


def refused(sock: ssl.SSLSocket, rig: RelayRig) -> bool:
    """The gateway closes the connection instead of acknowledging."""
    try:
        read_ack(sock, key(rig))
    except (ConnectionError, OSError):
        return True
    return False


def test_client_without_certificate_is_rejected(rig: RelayRig) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)), tls_client(rig, None) as sock:
        sock.sendall(encode_frame(key(rig), FrameType.BATCH, SENDER, 1, 1, encode_body(points(1))))
        read_ack(sock, key(rig))
    send_good(rig)
    assert events(rig, "bad_certificate")


def test_certificate_from_another_ca_is_rejected(rig: RelayRig, tmp_path: Path) -> None:
    rogue = CertificateAuthority(tmp_path / "rogue").issue(SENDER, stem="rogue")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)), tls_client(rig, rogue) as sock:
        sock.sendall(encode_frame(key(rig), FrameType.BATCH, SENDER, 1, 1, encode_body(points(1))))
        read_ack(sock, key(rig))
    send_good(rig)
    assert events(rig, "bad_certificate")


def test_valid_certificate_with_wrong_signing_key(rig: RelayRig) -> None:
    with tls_client(rig, rig.client) as sock:
        sock.sendall(encode_frame(os.urandom(32), FrameType.BATCH, SENDER, 5, 3, encode_body(points(3))))
        assert refused(sock, rig)
    send_good(rig)
    assert len(events(rig, "bad_signature")) == 1
    assert len([p for p in dmz_points(rig.dmz) if p.measurement == "telemetry"]) == 10


def test_certificate_may_only_send_as_its_own_sender_id(rig: RelayRig) -> None:
    other = rig.pki.issue("ot-other", stem="other", server=False)
    with tls_client(rig, other) as sock:
        sock.sendall(encode_frame(key(rig), FrameType.BATCH, SENDER, 5, 3, encode_body(points(3))))
        assert refused(sock, rig)
    send_good(rig)
    assert "may not send as" in str(events(rig, "bad_certificate")[0]["message"])


def test_replayed_batch_is_acked_but_not_rewritten(rig: RelayRig) -> None:
    seq = next(SEQ)
    frame = encode_frame(key(rig), FrameType.BATCH, SENDER, seq, 20, encode_body(points(20)))
    for _ in range(3):
        with tls_client(rig, rig.client) as sock:
            sock.sendall(frame)
            assert read_ack(sock, key(rig)) == seq
    assert len(dmz_points(rig.dmz)) == 20
    assert rig.gw.gateway.metrics.counter("replays_total", sender=SENDER) == 2  # type: ignore[attr-defined]


def test_sequence_gap_is_reported(rig: RelayRig) -> None:
    first = send_good(rig)
    for _ in range(4):
        next(SEQ)
    send_good(rig)
    gaps = events(rig, "sequence_gap")
    assert len(gaps) == 1 and f"expected {first + 1}" in str(gaps[0]["message"])
    assert rig.gw.gateway.metrics.counter("sequence_gaps_total", sender=SENDER) == 1  # type: ignore[attr-defined]


def test_unapproved_asset_is_dropped_and_recorded(rig: RelayRig) -> None:
    seq = next(SEQ)
    mixed = (
        points(5) + points(7, asset="X-900", tag="secret_tag") + points(3, asset="X-900", tag="secret_tag", start_ns=1)
    )
    with tls_client(rig, rig.client) as sock:
        sock.sendall(encode_frame(key(rig), FrameType.BATCH, SENDER, seq, len(mixed), encode_body(mixed)))
        assert read_ack(sock, key(rig)) == seq
    stored = [p for p in dmz_points(rig.dmz) if p.measurement == "telemetry"]
    assert {p.tags["asset"] for p in stored} == {"P-101"} and len(stored) == 5
    (event,) = events(rig, "unapproved_flow")
    assert (event["sender"], event["asset"], event["tag"], event["count"]) == (SENDER, "X-900", "secret_tag", 10)
    audit = [json.loads(line) for line in (rig.root / "dmz" / "relay-dmz" / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["asset"] == "X-900" and audit[-1]["count"] == 10 and audit[-1]["sequence"] == seq
    send_good(rig)


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(struct.pack(">I", (8 << 20) + 1) + b"x" * 64, id="oversized"),
        pytest.param(struct.pack(">I", 5000) + b"FL" + b"\0" * 100, id="truncated"),
        pytest.param(b"\x00\x00", id="truncated-prefix"),
        pytest.param(os.urandom(2000), id="garbage"),
        pytest.param(struct.pack(">I", 100) + os.urandom(100), id="garbage-with-plausible-length"),
    ],
)
def test_bad_frames_close_the_connection(rig: RelayRig, wire: bytes) -> None:
    with tls_client(rig, rig.client) as sock:
        sock.sendall(wire)
        if wire.startswith((b"\x00\x00", struct.pack(">I", 5000))):
            with contextlib.suppress(OSError):
                sock.unwrap()  # end the stream cleanly in the middle of the frame
        else:
            assert refused(sock, rig)
    wait_until(lambda: bool(events(rig, "bad_frame") or events(rig, "bad_signature")), 10, "a bad_frame event")
    send_good(rig)
    assert len([p for p in dmz_points(rig.dmz) if p.measurement == "telemetry"]) == 10
