"""Diode mode's datagram format, shared by both ends: strictly one-way UDP with forward error correction.

The sender (`flowline.relay.ot.diode_send`) cuts each signed batch frame into blocks of ``k``
chunks, Reed-Solomon encodes every block into ``m`` shares (zfec: any ``k`` of the ``m`` rebuild the
block) and sends each share as one datagram. The receiver (`flowline.relay.dmz.diode_receive`)
rebuilds, verifies and accounts every gap exactly. Every datagram carries its batch's point count
and the number of points the session sent before it, so even a batch of which nothing arrived is
counted in points and sequence numbers.

Datagram: ``<2s "FD"><u8 version><u8 kind><u64 session><u64 sequence><u64 points before>...`` —
see `DATA`; a heartbeat (`HEARTBEAT`) carries the next sequence number and the points sent.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import zfec  # type: ignore[import-untyped]

from flowline.core.errors import FlowlineError

MAGIC = b"FD"
VERSION = 1
KIND_DATA = 1
KIND_HEARTBEAT = 2
# magic, version, kind, session, sequence, points before, count, frame length, block, blocks, share, k, m
DATA = struct.Struct(">2sBBQQQIIHHBBB")
# magic, version, kind, session, next sequence, points sent
HEARTBEAT = struct.Struct(">2sBBQQQ")


class DatagramError(FlowlineError):
    """A datagram that is not a well-formed diode datagram."""


@dataclass(frozen=True)
class Share:
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


def encode_shares(
    session: int, sequence: int, points_before: int, count: int, frame: bytes, chunk: int, k: int, m: int
) -> list[bytes]:
    """All datagrams of one frame: ``m`` shares per block of ``k`` chunks."""
    per_block = chunk * k
    blocks = max(1, -(-len(frame) // per_block))
    encoder = zfec.Encoder(k, m)
    out = []
    for b in range(blocks):
        piece = frame[b * per_block : (b + 1) * per_block].ljust(per_block, b"\0")
        shares = encoder.encode([piece[i * chunk : (i + 1) * chunk] for i in range(k)])
        for index, share in enumerate(shares):
            header = DATA.pack(
                MAGIC, VERSION, KIND_DATA, session, sequence, points_before, count, len(frame), b, blocks, index, k, m
            )
            out.append(header + share)
    return out


def parse_datagram(data: bytes) -> Share | tuple[int, int, int]:
    """A `Share`, or ``(session, next_sequence, points_sent)`` for a heartbeat."""
    if len(data) < HEARTBEAT.size or data[:2] != MAGIC:
        raise DatagramError(f"not a diode datagram ({len(data)} bytes)")
    if data[2] != VERSION:
        raise DatagramError(f"unsupported diode version {data[2]}")
    if data[3] == KIND_HEARTBEAT and len(data) == HEARTBEAT.size:
        _, _, _, session, next_seq, sent = HEARTBEAT.unpack(data)
        return session, next_seq, sent
    if data[3] != KIND_DATA or len(data) <= DATA.size:
        raise DatagramError(f"bad diode datagram kind {data[3]} / size {len(data)}")
    _, _, _, session, seq, before, count, frame_len, block, blocks, index, k, m = DATA.unpack_from(data)
    if not (0 < k <= m and index < m and block < blocks):
        raise DatagramError(f"inconsistent share header (k={k} m={m} share={index} block={block}/{blocks})")
    return Share(session, seq, before, count, frame_len, block, blocks, index, k, m, data[DATA.size :])


