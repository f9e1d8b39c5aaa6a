"""The relay frame codec: round trip, and a strict decoder that only ever raises `FrameError`."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowline.relay.frames import (
    DEFAULT_MAX_FRAME_BYTES,
    FrameError,
    FrameType,
    decode_wire,
    encode_frame,
)

KEY = b"k" * 32


def keys(sender: str) -> bytes | None:
    return KEY if sender == "ot-1" else None


@given(payload=st.binary(max_size=4096), seq=st.integers(0, 2**64 - 1), count=st.integers(0, 2**32 - 1))
def test_round_trip(payload: bytes, seq: int, count: int) -> None:
    frame = decode_wire(encode_frame(KEY, FrameType.BATCH, "ot-1", seq, count, payload), keys)
    assert (frame.type, frame.sender, frame.sequence, frame.count) == (FrameType.BATCH, "ot-1", seq, count)
    assert frame.payload() == payload


@settings(max_examples=300)
@given(data=st.binary(max_size=2048))
def test_garbage_only_raises_frame_error(data: bytes) -> None:
    with pytest.raises(FrameError):
        decode_wire(data, keys)


@settings(max_examples=300)
@given(data=st.data())
def test_any_bit_flip_or_cut_is_refused(data: st.DataObject) -> None:
    wire = encode_frame(KEY, FrameType.BATCH, "ot-1", 7, 3, data.draw(st.binary(max_size=512)))
    if data.draw(st.booleans()):
        bit = data.draw(st.integers(0, len(wire) * 8 - 1))
        mangled = bytearray(wire)
        mangled[bit // 8] ^= 1 << (bit % 8)
        bad = bytes(mangled)
    else:
        bad = wire[: data.draw(st.integers(0, len(wire) - 1))]
    with pytest.raises(FrameError):
        decode_wire(bad, keys)


@given(prefix=st.integers(0, 2**32 - 1), tail=st.binary(max_size=64))
def test_length_prefix_bounds(prefix: int, tail: bytes) -> None:
    with pytest.raises(FrameError):
        decode_wire(struct.pack(">I", prefix) + tail, keys, max_frame_bytes=DEFAULT_MAX_FRAME_BYTES)


def test_wrong_key_and_unknown_sender_are_signature_errors() -> None:
    wire = encode_frame(b"other-key", FrameType.BATCH, "ot-1", 1, 0, b"[]")
    with pytest.raises(FrameError) as bad_key:
        decode_wire(wire, keys)
    assert bad_key.value.reason == "bad_signature"
    with pytest.raises(FrameError) as unknown:
        decode_wire(encode_frame(KEY, FrameType.BATCH, "intruder", 1, 0, b"[]"), keys)
    assert unknown.value.reason == "bad_signature"


def test_zlib_bomb_is_refused() -> None:
    wire = encode_frame(KEY, FrameType.BATCH, "ot-1", 1, 0, b"\0" * (4 << 20))
    with pytest.raises(FrameError, match="inflates past"):
        decode_wire(wire, keys).payload(max_bytes=1 << 20)
