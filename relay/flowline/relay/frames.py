"""Relay wire format: length-prefixed, versioned, signed frames.

A frame on the wire::

    <u32 length of the rest>                       (big-endian, bounded by ``max_frame_bytes``)
    header  <2s magic "FL"><u8 version><u8 type><u8 flags><u8 sender length>
            <u64 sequence><u32 point count><u32 body length>
    sender  UTF-8 sender id (1..255 bytes)
    body    zlib-compressed batch body (BATCH, see flowline.relay.body), empty (ACK)
    mac     HMAC-SHA256(key, header || sender || body), 32 bytes

The MAC covers everything the receiver acts on, so a frame from a sender that does not hold the
key, or altered on the way, fails before its body is even decompressed. The decoder is strict:
anything that is not exactly a well-formed frame raises a `FrameError` saying what was wrong.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from flowline.core.errors import FlowlineError

MAGIC = b"FL"
VERSION = 1
_LENGTH = struct.Struct(">I")
_HEADER = struct.Struct(">2sBBBBQII")
MAC_BYTES = 32
DEFAULT_MAX_FRAME_BYTES = 64 << 20
DEFAULT_MAX_BODY_BYTES = 256 << 20  # after decompression: guards against zlib bombs
FLAG_ZLIB = 0x01


class FrameType(IntEnum):
    BATCH = 1
    ACK = 2


class FrameError(FlowlineError):
    """A frame that is truncated, oversized, malformed or not correctly signed."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # metric / security_event reason: "bad_frame" or "bad_signature"


@dataclass(frozen=True)
class Frame:
    type: FrameType
    sender: str
    sequence: int
    count: int  # points in the batch (0 for ACK)
    body: bytes  # as on the wire (compressed for BATCH)
    flags: int = 0

    def payload(self, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> bytes:
        """The decompressed body, refusing to inflate past ``max_bytes``."""
        if not self.flags & FLAG_ZLIB:
            return self.body
        inflater = zlib.decompressobj()
        try:
            out = inflater.decompress(self.body, max_bytes)
        except zlib.error as exc:
            raise FrameError("bad_frame", f"batch {self.sequence} from {self.sender}: corrupt body ({exc})") from exc
        if inflater.unconsumed_tail or not inflater.eof:
            raise FrameError(
                "bad_frame",
                f"batch {self.sequence} from {self.sender}: body inflates past {max_bytes} bytes or is cut short",
            )
        return out


def _sign(key: bytes, signed: bytes) -> bytes:
    return hmac.new(key, signed, hashlib.sha256).digest()


def encode_frame(
    key: bytes,
    type: FrameType,
    sender: str,
    sequence: int,
    count: int = 0,
    payload: bytes = b"",
    compress_level: int = 1,
) -> bytes:
    """A complete frame including its length prefix; BATCH payloads are zlib-compressed."""
    sender_b = sender.encode()
    if not 1 <= len(sender_b) <= 255:
        raise ValueError(f"sender id must be 1..255 bytes of UTF-8, got {len(sender_b)}")
    flags = 0
    body = payload
    if type is FrameType.BATCH:
        body = zlib.compress(payload, compress_level)
        flags = FLAG_ZLIB
    header = _HEADER.pack(MAGIC, VERSION, int(type), flags, len(sender_b), sequence, count, len(body))
    signed = header + sender_b + body
    rest = signed + _sign(key, signed)
    return _LENGTH.pack(len(rest)) + rest


def frame_length(prefix: bytes, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> int:
    """Length of the frame that follows a 4-byte prefix; refuses sizes out of bounds before reading."""
    if len(prefix) != _LENGTH.size:
        raise FrameError("bad_frame", f"truncated length prefix ({len(prefix)} of 4 bytes)")
    (length,) = _LENGTH.unpack(prefix)
    minimum = _HEADER.size + 1 + MAC_BYTES
    if length < minimum:
        raise FrameError("bad_frame", f"frame of {length} bytes is shorter than the {minimum}-byte minimum")
    if length > max_frame_bytes:
        raise FrameError("bad_frame", f"frame of {length} bytes exceeds the {max_frame_bytes}-byte limit")
    return int(length)


def decode_frame(rest: bytes, key_for: Callable[[str], bytes | None]) -> Frame:
    """Parse and verify the bytes after the length prefix; ``key_for(sender)`` gives that sender's key."""
    if len(rest) < _HEADER.size:
        raise FrameError("bad_frame", f"truncated header ({len(rest)} of {_HEADER.size} bytes)")
    magic, version, type_, flags, sender_len, sequence, count, body_len = _HEADER.unpack_from(rest)
    if magic != MAGIC:
        raise FrameError("bad_frame", f"bad magic {magic!r}: not a Flowline relay frame")
    if version != VERSION:
        raise FrameError("bad_frame", f"unsupported frame version {version} (this gateway speaks {VERSION})")
    if type_ not in FrameType._value2member_map_:
        raise FrameError("bad_frame", f"unknown frame type {type_}")
    if flags & ~FLAG_ZLIB:
        raise FrameError("bad_frame", f"unknown flags 0x{flags:02x}")
    expected = _HEADER.size + sender_len + body_len + MAC_BYTES
    if sender_len == 0 or len(rest) != expected:
        raise FrameError(
            "bad_frame",
            f"frame is {len(rest)} bytes but its header announces {expected} (sender {sender_len}, body {body_len})",
        )
    sender_end = _HEADER.size + sender_len
    try:
        sender = rest[_HEADER.size : sender_end].decode()
    except UnicodeDecodeError as exc:
        raise FrameError("bad_frame", "sender id is not UTF-8") from exc
    key = key_for(sender)
    if key is None:
        raise FrameError("bad_signature", f"unknown sender {sender!r}: no signing key configured")
    signed = rest[: sender_end + body_len]
    if not hmac.compare_digest(_sign(key, signed), rest[sender_end + body_len :]):
        raise FrameError("bad_signature", f"batch {sequence} from {sender!r}: signature does not verify")
    return Frame(FrameType(type_), sender, sequence, count, rest[sender_end : sender_end + body_len], flags)


def decode_wire(
    data: bytes, key_for: Callable[[str], bytes | None], max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> Frame:
    """Decode one complete frame including its length prefix (datagram or in-memory use)."""
    length = frame_length(data[: _LENGTH.size], max_frame_bytes)
    if len(data) != _LENGTH.size + length:
        raise FrameError("bad_frame", f"frame announces {length} bytes, {len(data) - _LENGTH.size} present")
    return decode_frame(data[_LENGTH.size :], key_for)


LENGTH_PREFIX_BYTES = _LENGTH.size
