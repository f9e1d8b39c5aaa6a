"""Diode mode's datagram format, shared by both ends: strictly one-way UDP with forward error correction.

The sender is `flowline.relay.ot.diode_send`, the receiver `flowline.relay.dmz.diode_receive`.

Sender (OT): builds the same signed batch frames as the TCP relay, cuts each frame into blocks of
``k`` chunks, Reed-Solomon encodes every block into ``m`` shares (zfec: any ``k`` of the ``m``
rebuild the block) and sends each share as one datagram, paced to ``diode_rate_bytes_s``. It never
reads from the network; the spool is acknowledged once a batch is out (a data diode has no way to
say more). A heartbeat tells the receiver the next sequence number and how many points the
session has sent, so a silent link and a loss at the end of a burst are both visible.

Receiver (DMZ): reassembles, verifies the frame signature, hands batches to the same
`BatchAcceptor` as the gateway (policy, durable spool, replay detection) and accounts every gap
exactly: every datagram carries its batch's point count and the number of points the session sent
before it, so even a batch of which nothing arrived is counted in points and sequence numbers
(``flowline_diode_lost_total``, a log line per lost range).

Hostile traffic: every datagram, heartbeats included, carries its sender id and a truncated
HMAC-SHA256 under that sender's key, checked before the receiver keeps any state for it. A new
session is admitted only if it starts after the last batch stored for that sender (an old
session's datagrams replayed are dropped), each sender keeps at most ``diode_sessions_per_sender``
sessions (the least recently heard is evicted), shares waiting for their batch are bounded by
``diode_max_pending_bytes`` (the oldest batch is given up and counted lost), the queue between the
socket and the decoder by ``diode_queue_datagrams``; each refusal is counted in
``flowline_diode_datagrams_total{kind}`` and rate-limited into the audit trail. Sessions (next
sequence, points resolved) are persisted, so a restarted receiver goes on accounting where it was.

Datagram: ``<2s "FD"><u8 version 2><u8 kind><u8 sender length><sender>`` then, for data,
``<u64 session><u64 sequence><u64 points before><u32 count><u32 frame length><u16 block><u16
blocks><u8 share><u8 k><u8 m><share bytes>``, for a heartbeat ``<u64 session><u64 next
sequence><u64 points sent>``, and last a 16-byte HMAC-SHA256 tag over everything before it.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass

import zfec  # type: ignore[import-untyped]

from flowline.core.errors import FlowlineError

MAGIC = b"FD"
VERSION = 2
KIND_DATA = 1
KIND_HEARTBEAT = 2
TAG_BYTES = 16
_PREFIX = struct.Struct(">2sBBB")  # magic, version, kind, sender length
# session, sequence, points before, count, frame length, block, blocks, share, k, m
_DATA = struct.Struct(">QQQIIHHBBB")
# session, next sequence, points sent
_HEARTBEAT = struct.Struct(">QQQ")


class DatagramError(FlowlineError):
    """A datagram that is not a well-formed, authentic diode datagram."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # malformed | unknown_sender | bad_tag


@dataclass(frozen=True)
class Share:
    sender: str
    session: int
    sequence: int
    points_before: int
    count: int
    frame_len: int
    block: int
    blocks: int
    index: int
    k: int
    m: int
    data: bytes


@dataclass(frozen=True)
class Heartbeat:
    sender: str
    session: int
    next_sequence: int
    points_sent: int


def _prefix(kind: int, sender: bytes) -> bytes:
    return _PREFIX.pack(MAGIC, VERSION, kind, len(sender)) + sender


def _tag(key: bytes, signed: bytes) -> bytes:
    return hmac.digest(key, signed, "sha256")[:TAG_BYTES]  # one C call: this runs for every datagram


def overhead(sender: str) -> int:
    """Bytes of a data datagram that are not share data."""
    return _PREFIX.size + len(sender.encode()) + _DATA.size + TAG_BYTES


def encode_heartbeat(sender: str, key: bytes, session: int, next_sequence: int, points_sent: int) -> bytes:
    signed = _prefix(KIND_HEARTBEAT, sender.encode()) + _HEARTBEAT.pack(session, next_sequence, points_sent)
    return signed + _tag(key, signed)


def encode_shares(
    sender: str,
    key: bytes,
    session: int,
    sequence: int,
    points_before: int,
    count: int,
    frame: bytes,
    chunk: int,
    k: int,
    m: int,
) -> list[bytes]:
    """All datagrams of one frame: ``m`` shares per block of ``k`` chunks, each signed."""
    per_block = chunk * k
    blocks = max(1, -(-len(frame) // per_block))
    encoder = zfec.Encoder(k, m)
    prefix = _prefix(KIND_DATA, sender.encode())
    out = []
    for b in range(blocks):
        piece = frame[b * per_block : (b + 1) * per_block].ljust(per_block, b"\0")
        shares = encoder.encode([piece[i * chunk : (i + 1) * chunk] for i in range(k)])
        for index, share in enumerate(shares):
            signed = (
                prefix + _DATA.pack(session, sequence, points_before, count, len(frame), b, blocks, index, k, m) + share
            )
            out.append(signed + _tag(key, signed))
    return out


def parse_datagram(data: bytes, key_for: Callable[[str], bytes | None]) -> Share | Heartbeat:
    """Parse and authenticate one datagram; `DatagramError` says why it is refused (nothing is kept)."""
    if len(data) < _PREFIX.size + 1 + _HEARTBEAT.size + TAG_BYTES or data[:2] != MAGIC:
        raise DatagramError("malformed", f"not a diode datagram ({len(data)} bytes)")
    _, version, kind, sender_len = _PREFIX.unpack_from(data)
    if version != VERSION:
        raise DatagramError("malformed", f"unsupported diode version {version}")
    body = _PREFIX.size + sender_len
    if sender_len == 0 or len(data) < body + TAG_BYTES:
        raise DatagramError("malformed", f"bad sender length {sender_len} in {len(data)} bytes")
    try:
        sender = data[_PREFIX.size : body].decode()
    except UnicodeDecodeError as exc:
        raise DatagramError("malformed", "sender id is not UTF-8") from exc
    key = key_for(sender)
    if key is None:
        raise DatagramError("unknown_sender", f"datagram from unknown sender {sender!r}")
    signed = data[:-TAG_BYTES]
    if not hmac.compare_digest(_tag(key, signed), data[-TAG_BYTES:]):
        raise DatagramError("bad_tag", f"datagram claiming sender {sender!r} does not verify")
    if kind == KIND_HEARTBEAT and len(signed) == body + _HEARTBEAT.size:
        return Heartbeat(sender, *_HEARTBEAT.unpack_from(signed, body))
    if kind != KIND_DATA or len(signed) <= body + _DATA.size:
        raise DatagramError("malformed", f"bad diode datagram kind {kind} / size {len(data)}")
    session, seq, before, count, frame_len, block, blocks, index, k, m = _DATA.unpack_from(signed, body)
    if not (0 < k <= m and index < m and block < blocks):
        raise DatagramError(
            "malformed", f"inconsistent share header (k={k} m={m} share={index} block={block}/{blocks})"
        )
    return Share(
        sender, session, seq, before, count, frame_len, block, blocks, index, k, m, signed[body + _DATA.size :]
    )
