"""The DMZ gateway under hostile connections: bounded, rate-limited in its audit trail, still serving."""

from __future__ import annotations

import contextlib
import json
import math
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowline.lab.pki import CertificateAuthority
from flowline.lab.services import wait_until
from flowline.relay.dmz.audit import AuditLog
from tests.relay_helpers import GatewayThread, RelayRig, dmz_points
from tests.test_relay_security import send_good

ATTACKER = "127.0.0.2"  # another loopback address: per-source limits must not hit the real sender


def audit(rig: RelayRig) -> list[dict[str, object]]:
    path = rig.root / "dmz" / "relay-dmz" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def rig(tmp_path: Path, pki: CertificateAuthority) -> Iterator[RelayRig]:
    rig = RelayRig(tmp_path, pki)
    rig.update_dmz(security_event_interval_s=1, max_handshakes_per_source=8, handshake_timeout_s=30)
    rig.gw = GatewayThread(rig.dmz)  # type: ignore[attr-defined]
    yield rig
    rig.gw.close()  # type: ignore[attr-defined]


def connect_from_attacker(rig: RelayRig) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((ATTACKER, 0))
    sock.connect(("127.0.0.1", rig.port))
    return sock


def test_half_open_handshakes_are_bounded_per_source_and_a_sender_still_gets_through(rig: RelayRig) -> None:
    started = time.monotonic()
    half_open = [connect_from_attacker(rig) for _ in range(200)]  # connect, then say nothing
    refusing_s = time.monotonic() - started  # refusals happen at accept, while these connect
    try:
        closed = 0
        for sock in half_open:
            sock.settimeout(0.5)
            with contextlib.suppress(TimeoutError):  # still waiting for its handshake: one of the 8 allowed
                closed += sock.recv(1) == b""
        assert closed >= 192
        send_good(rig)  # the real sender, from its own address, is served meanwhile
        gateway = rig.gw.gateway  # type: ignore[attr-defined]
        assert gateway.metrics.counter("connections_refused_total") >= 192

        def limit_lines() -> list[dict[str, object]]:
            return [a for a in audit(rig) if a["reason"] == "connection_limit"]

        wait_until(lambda: sum(int(str(a["count"])) for a in limit_lines()) == 192, 15, "192 refusals audited")
        # One line at the first refusal, then one with the count of the others per 1 s interval
        # (2 lines when the connects take under a second; a loaded host spreads them over more).
        assert 2 <= len(limit_lines()) <= 2 + math.ceil(refusing_s) and {a["source"] for a in limit_lines()} == {
            ATTACKER
        }
    finally:
        for sock in half_open:
            sock.close()


def test_failed_handshakes_become_one_line_per_source_and_interval(rig: RelayRig) -> None:
    for _ in range(100):
        with connect_from_attacker(rig) as sock:
            sock.sendall(b"\x16\x03\x01\x00\x05hello")  # a TLS record header and then nonsense
            sock.settimeout(5)
            with contextlib.suppress(OSError):
                sock.recv(100)

    def total() -> int:
        return sum(int(str(a["count"])) for a in audit(rig) if a["reason"] == "bad_certificate")

    wait_until(lambda: total() == 100, 15, "100 failed handshakes in the audit trail")
    lines = [a for a in audit(rig) if a["reason"] == "bad_certificate"]
    assert 2 <= len(lines) <= 4 and {a["source"] for a in lines} == {ATTACKER}
    stored = [p for p in dmz_points(rig.dmz) if p.measurement == "security_event"]
    assert {p.tags.get("source") for p in stored} == {ATTACKER}


def test_audit_log_rotates_within_its_bound(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=10_000, keep=3)
    for i in range(2000):
        log.write([{"reason": "bad_certificate", "n": i, "message": "x" * 40}])
    log.close()
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.3"]
    assert all(f.stat().st_size < 10_000 + 200 for f in files)
    newest = [json.loads(line)["n"] for f in reversed(files) for line in f.read_text().splitlines()]
    assert newest == sorted(newest) and newest[-1] == 1999  # readable, in order, nothing torn


def test_a_misconfigured_flow_is_one_warning_per_interval(rig: RelayRig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="flowline.relay.dmz")
    for _ in range(20):
        send_good(rig, asset="X-900")  # X-900 is in no approved flow
    time.sleep(0.2)
    warnings = [r for r in caplog.records if "unapproved" in r.getMessage()]
    assert len(warnings) == 1
    lines = [a for a in audit(rig) if a["reason"] == "unapproved_flow"]
    assert len(lines) == 1
    wait_until(
        lambda: sum(int(str(a["count"])) for a in audit(rig) if a["reason"] == "unapproved_flow") == 200,
        15,
        "the aggregated count",
    )


def test_gateway_fails_closed_when_it_cannot_store(tmp_path: Path, pki: CertificateAuthority) -> None:
    """A full DMZ spool or an unwritable audit trail: no ack, nothing stored, the next good batch passes."""
    import os
    import ssl

    from flowline.relay.body import encode_body
    from flowline.relay.frames import FrameType, encode_frame
    from tests.relay_helpers import SENDER, points, read_ack, tls_client

    rig = RelayRig(tmp_path, pki)
    rig.update_dmz(spool={"max_bytes": 200_000, "segment_bytes": 64_000})
    gw = GatewayThread(rig.dmz)
    key = rig.key_file.read_text().strip().encode()
    try:
        big = encode_body(points(20_000, asset="P-101", step_ns=7_777))
        with tls_client(rig, rig.client) as sock:
            sock.sendall(encode_frame(key, FrameType.BATCH, SENDER, 1, 20_000, big, compress_level=0))
            with pytest.raises((ConnectionError, OSError, ssl.SSLError)):
                read_ack(sock, key)
        metrics = gw.gateway.metrics
        # Every batch that is not made durable counts once in store_errors_total, whatever the cause;
        # spool_full_total / spool_errors_total say which failure it was.
        assert metrics.counter("spool_full_total", spool="dmz") == 1
        assert metrics.counter("store_errors_total") == 1
        assert [p for p in dmz_points(rig.dmz) if p.measurement == "telemetry"] == []
        # The audit trail cannot be written: the batch that needs an audit line is not acknowledged.
        gw.gateway.acceptor.audit._fh.close()
        gw.gateway.acceptor.audit._fh = open(os.devnull)  # noqa: SIM115 (read-only: every write fails)
        mixed = encode_body(points(5, asset="X-900", tag="secret_tag"))
        with tls_client(rig, rig.client) as sock:
            sock.sendall(encode_frame(key, FrameType.BATCH, SENDER, 2, 5, mixed))
            with pytest.raises((ConnectionError, OSError, ssl.SSLError)):
                read_ack(sock, key)
        assert metrics.counter("store_errors_total") == 2  # batches 1 and 2, each once
        assert metrics.counter("spool_full_total", spool="dmz") == 1  # the audit write failed, not a full disk
        assert metrics.total("spool_errors_total") == 1
        assert gw.gateway.acceptor.last_seq.get(SENDER) is None  # batch 2 was not taken
    finally:
        gw.close()
