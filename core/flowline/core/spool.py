"""Durable store-and-forward spool: append-only segment files with a CRC per record.

Guarantees (the contract the collectors, the relay and their tests rely on):

* ``SpoolWriter.append(records)`` returns only after the records are written and fsynced (one
  ``fsync`` per call: callers group-commit by batching). A record is never half-visible: a torn
  tail left by ``kill -9`` or power loss fails its length/CRC check, is never handed to a reader,
  and is cut when the writer reopens the spool (which then starts a fresh segment).
* One writer process and one reader process per spool folder. The writer holds an exclusive lock.
  The reader persists its acknowledged position atomically (write, fsync, rename) and deletes a
  segment only once everything in it is acknowledged, so data survives both processes' crashes.
* Bounded by size. When full, ``on_full="refuse"`` (the default) raises `SpoolFullError` so the
  producer can push back loudly; ``"drop_oldest"`` deletes the oldest segment and counts the
  records it held in ``dropped_records`` (persisted, so the reader can report the loss too).

Record layout: ``<u32 payload length><u32 crc32(length || payload)><payload>``, little-endian.
The spool stores any bytes; point records (`encode_points`) are the compact JSON wire form of the
points, zlib-compressed at level 1: 17.5 bytes per telemetry point instead of 168 on the simulator's
data, for about 0.5 µs per point, so a 1 GiB spool rides out an outage nine times longer. Uncompressed JSON records
(they start with ``[``; spools written before compression) are still read.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import orjson

from flowline.core.errors import FlowlineError
from flowline.core.files import atomic_write_json, atomic_write_text, fsync_dir
from flowline.core.points import Point

_HEADER = struct.Struct("<II")
_SEGMENT_GLOB = "seg-*.log"
MAX_RECORD_BYTES = 64 * 1024 * 1024


class SpoolError(FlowlineError):
    """Base class of spool failures."""


class SpoolFullError(SpoolError):
    """The spool reached its size limit and the policy is to refuse new data."""


class SpoolLockedError(SpoolError):
    """Another writer process already owns this spool folder."""


@dataclass(frozen=True, order=True)
class Position:
    """A place in the spool: segment number and byte offset inside it."""

    segment: int
    offset: int


@dataclass(frozen=True)
class SpoolRecord:
    position: Position  # where the record starts
    end: Position  # where the next record starts: acknowledge this to consume the record
    payload: bytes


def _segment_path(folder: Path, number: int) -> Path:
    return folder / f"seg-{number:012d}.log"


def _segments(folder: Path) -> list[int]:
    return sorted(int(p.name[4:16]) for p in folder.glob(_SEGMENT_GLOB))


def encode_record(payload: bytes) -> bytes:
    if len(payload) > MAX_RECORD_BYTES:
        raise SpoolError(f"record of {len(payload)} bytes exceeds the {MAX_RECORD_BYTES}-byte limit")
    length = struct.pack("<I", len(payload))
    return _HEADER.pack(len(payload), zlib.crc32(payload, zlib.crc32(length))) + payload


def scan_records(data: bytes, start: int = 0) -> Iterable[tuple[int, int, bytes]]:
    """Yield (offset, end, payload) for each intact record from ``start``; stop at the first bad one."""
    offset = start
    while offset + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, offset)
        end = offset + _HEADER.size + length
        if length > MAX_RECORD_BYTES or end > len(data):
            return
        payload = data[offset + _HEADER.size : end]
        if zlib.crc32(payload, zlib.crc32(struct.pack("<I", length))) != crc:
            return
        yield offset, end, payload
        offset = end


def _read_records(fh: BinaryIO, start: int) -> Iterator[tuple[int, int, bytes]]:
    """Like `scan_records`, reading a file from ``start``; stops at the first torn or bad record."""
    fh.seek(start)
    offset = start
    while True:
        header = fh.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        length, crc = _HEADER.unpack(header)
        if length > MAX_RECORD_BYTES:
            return
        payload = fh.read(length)
        if len(payload) < length or zlib.crc32(payload, zlib.crc32(header[:4])) != crc:
            return
        end = offset + _HEADER.size + length
        yield offset, end, payload
        offset = end


def encode_points(points: Sequence[Point]) -> bytes:
    """A point record: the points' JSON wire form, zlib level 1 (a stream that starts with 0x78)."""
    wire = [p.to_wire() for p in points]
    try:
        text = orjson.dumps(wire)  # same bytes as the standard encoder with compact separators, 7x faster
    except orjson.JSONEncodeError:
        # An integer beyond 64 bits or a lone surrogate (not UTF-8): the standard encoder writes the
        # first, and the second becomes "?" rather than a record the relay could not read.
        text = json.dumps(wire, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "replace")
    return zlib.compress(text, 1)


def points_json(payload: bytes) -> bytes:
    """The JSON wire form inside a point record, compressed or not; raises `SpoolError` if neither."""
    if payload[:1] == b"[":
        return payload
    try:
        return zlib.decompress(payload)
    except zlib.error as exc:
        raise SpoolError(f"not a point record: {exc}") from exc


def decode_points(payload: bytes) -> list[Point]:
    return [Point.from_wire(item) for item in orjson.loads(points_json(payload))]


class SpoolWriter:
    def __init__(
        self,
        folder: str | Path,
        max_bytes: int = 1 << 30,
        segment_bytes: int = 16 << 20,
        on_full: Literal["refuse", "drop_oldest"] = "refuse",
        fsync: bool = True,
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.on_full = on_full
        self.fsync = fsync
        self._lock_fd = os.open(self.folder / "writer.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(self._lock_fd)
            raise SpoolLockedError(
                f"spool {self.folder} is already open for writing by another process"
            ) from exc
        self.dropped_records = _read_counter(self.folder / "dropped")
        self._recover_tail()
        numbers = _segments(self.folder)
        self._size = sum(_segment_path(self.folder, n).stat().st_size for n in numbers)
        self._number = (numbers[-1] + 1) if numbers else 0
        self._file = open(_segment_path(self.folder, self._number), "ab")  # noqa: SIM115 (kept open)
        if self.fsync:
            fsync_dir(self.folder)

    def _recover_tail(self) -> None:
        """Cut a torn tail of the newest segment, so the reader never waits on it forever."""
        numbers = _segments(self.folder)
        if not numbers:
            return
        path = _segment_path(self.folder, numbers[-1])
        data = path.read_bytes()
        good = 0
        for _, end, _ in scan_records(data):
            good = end
        if good != len(data):
            with open(path, "r+b") as fh:
                fh.truncate(good)
                os.fsync(fh.fileno())

    @property
    def size_bytes(self) -> int:
        return self._size

    def append(self, records: Sequence[bytes]) -> None:
        """Append and make durable; raises `SpoolFullError` (policy "refuse") when over the limit."""
        if not records:
            return
        blob = b"".join(encode_record(r) for r in records)
        self._make_room(len(blob))
        if self._file.tell() > 0 and self._file.tell() + len(blob) > self.segment_bytes:
            self._roll()
        self._file.write(blob)
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())
        self._size += len(blob)

    def append_points(self, points: Sequence[Point]) -> None:
        if points:
            self.append([encode_points(points)])

    def _disk_size(self) -> int:
        total = 0
        for number in _segments(self.folder):
            with contextlib.suppress(FileNotFoundError):  # deleted by the reader meanwhile
                total += _segment_path(self.folder, number).stat().st_size
        return total

    def _make_room(self, needed: int) -> None:
        if self._size + needed > self.max_bytes:
            # The reader deletes acknowledged segments behind our back: look at the disk before refusing.
            self._size = self._disk_size()
        while self._size + needed > self.max_bytes:
            if self.on_full == "refuse":
                raise SpoolFullError(
                    f"spool {self.folder} is full ({self._size} of {self.max_bytes} bytes); refusing new data"
                )
            if not self._drop_oldest():
                raise SpoolFullError(
                    f"spool {self.folder}: a single batch of {needed} bytes exceeds max_bytes"
                )

    def _drop_oldest(self) -> bool:
        numbers = [n for n in _segments(self.folder) if n != self._number]
        if not numbers:
            return False
        path = _segment_path(self.folder, numbers[0])
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # the reader deleted it meanwhile: that freed the space
            self._size = self._disk_size()
            return True
        self.dropped_records += sum(1 for _ in scan_records(data))
        _write_counter(self.folder / "dropped", self.dropped_records)
        path.unlink(missing_ok=True)
        self._size -= len(data)
        return True

    def _roll(self) -> None:
        self._file.close()
        self._number += 1
        self._file = open(_segment_path(self.folder, self._number), "ab")  # noqa: SIM115
        if self.fsync:
            fsync_dir(self.folder)
        # The reader deletes acknowledged segments; refresh the size from disk at each roll.
        self._size = self._disk_size()

    def close(self) -> None:
        """Close the segment and release the writer lock; a second call does nothing."""
        if self._lock_fd < 0:
            return  # closing the descriptor number twice could close a file someone else opened since
        self._file.close()
        os.close(self._lock_fd)
        self._lock_fd = -1

    def __enter__(self) -> SpoolWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SpoolReader:
    """Reads records in order from the acknowledged position; `ack` persists progress and frees disk."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._ack_path = self.folder / "ack.json"
        self.acked = self._load_ack()
        self._cache: tuple[int, bytes] | None = None

    def _load_ack(self) -> Position:
        try:
            raw = json.loads(self._ack_path.read_text())
            return Position(int(raw["segment"]), int(raw["offset"]))
        except FileNotFoundError:
            numbers = _segments(self.folder)
            return Position(numbers[0] if numbers else 0, 0)

    def read(
        self, after: Position | None = None, max_records: int = 1000, max_bytes: int = 8 << 20
    ) -> list[SpoolRecord]:
        """Up to ``max_records`` intact records starting at ``after`` (default: the acknowledged position)."""
        position = after or self.acked
        out: list[SpoolRecord] = []
        size = 0
        numbers = _segments(self.folder)
        for number in (n for n in numbers if n >= position.segment):
            offset = position.offset if number == position.segment else 0
            try:
                fh = open(_segment_path(self.folder, number), "rb", buffering=1 << 20)  # noqa: SIM115
            except FileNotFoundError:  # dropped by the writer's drop-oldest policy
                continue
            with fh:
                # Read record by record from the position: a segment can be large and a reader that
                # re-read whole files would spend its time on bytes it has already delivered.
                for start, end, payload in _read_records(fh, offset):
                    out.append(SpoolRecord(Position(number, start), Position(number, end), payload))
                    size += len(payload)
                    if len(out) >= max_records or size >= max_bytes:
                        return out
            if number == numbers[-1]:
                break
            # A torn record is only legitimate at the very end of the newest segment; older segments
            # are complete, so move on.
        return out

    def ack(self, position: Position) -> None:
        """Everything before ``position`` is safely delivered: persist it and delete finished segments."""
        if position <= self.acked:
            return
        atomic_write_json(self._ack_path, {"segment": position.segment, "offset": position.offset})
        self.acked = position
        for number in _segments(self.folder):
            if number < position.segment:
                _segment_path(self.folder, number).unlink(missing_ok=True)

    def pending_bytes(self) -> int:
        """Bytes not yet acknowledged (spool depth), as persisted: also right for a monitoring process."""
        acked = self._load_ack()
        total = 0
        for number in _segments(self.folder):
            if number < acked.segment:
                continue
            try:
                size = _segment_path(self.folder, number).stat().st_size
            except FileNotFoundError:  # acknowledged and deleted meanwhile
                continue
            total += size - (acked.offset if number == acked.segment else 0)
        return max(total, 0)

    @property
    def dropped_records(self) -> int:
        return _read_counter(self.folder / "dropped")


def _read_counter(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except FileNotFoundError:
        return 0


def _write_counter(path: Path, value: int) -> None:
    atomic_write_text(path, str(value))
