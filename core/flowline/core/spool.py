"""Durable store-and-forward spool: append-only segment files with a CRC per record.

The full contract (what is guaranteed, what happens when the spool or the disk is full, which
faults are survived and which are counted as loss) is in docs/spool.md; in short:

* ``SpoolWriter.append(records)`` returns only after the records are written and fsynced (one
  ``fsync`` per call: callers group-commit by batching). If it raises, the records are not stored
  (some may still be read once: delivery is at least once) and the caller must not acknowledge them.
* A failed write is cut back (truncated to where the batch started). A failed ``fsync`` is never
  retried: the kernel may have dropped the dirty pages and report success next time, so the segment
  is cut back and sealed, and the next append starts a new segment. A segment that cannot be cut
  back is sealed as it is; the reader skips its torn tail.
* The reader never hands out a record that fails its length/CRC check. Bad bytes in the middle of a
  segment (disk corruption) or at the end of a sealed segment are skipped up to the next intact
  record and counted in ``SpoolReader.skipped_bytes`` (persisted with the acknowledged position);
  at the end of the segment being written they are waited on (a record may still be in flight).
* One writer process and one reader process per spool folder. The writer holds an exclusive lock.
  The reader persists its acknowledged position (in place, alternating between two CRC-checked
  slots, so acknowledging needs no free disk space) and deletes a segment only once everything in
  it is acknowledged, so data survives both processes' crashes.
* Bounded by size. When full, ``on_full="refuse"`` (the default) raises `SpoolFullError` so the
  producer can push back loudly; a full disk (ENOSPC) raises `SpoolDiskFullError`, which is both a
  `SpoolFullError` and a `SpoolWriteError`. ``"drop_oldest"`` deletes the oldest segment and counts
  the records it held in ``dropped_records`` (persisted, so the reader can report the loss too).

All segment writes go through a `FileOps` object (default `OS_FILE_OPS`): the seam where the tests
inject short writes, EIO, ENOSPC, failed fsyncs, corruption and power loss.

Record layout: ``<u32 payload length><u32 crc32(length || payload)><payload>``, little-endian.
The spool stores any bytes; point records (`encode_points`) are the compact JSON wire form of the
points, zlib-compressed at level 1: 17.5 bytes per telemetry point instead of 168 on the simulator's
data, for about 0.5 µs per point, so a 1 GiB spool rides out an outage nine times longer. Uncompressed JSON records
(they start with ``[``; spools written before compression) are still read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import orjson

from flowline.core.errors import FlowlineError
from flowline.core.files import atomic_write_text, fsync_dir
from flowline.core.points import Point

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<II")
_SEGMENT_GLOB = "seg-*.log"
MAX_RECORD_BYTES = 64 * 1024 * 1024
_READ_CHUNK = 1 << 20
_ACK_SLOT = 256  # bytes per slot of the ack file (two slots, written alternately in place)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # errno values that mean "the disk is full"


class SpoolError(FlowlineError):
    """Base class of spool failures."""


class SpoolFullError(SpoolError):
    """The spool reached its size limit (or its disk is full) and the policy is to refuse new data."""


class SpoolWriteError(SpoolError):
    """A write, fsync or segment creation failed; the batch is not stored (``errno`` says why)."""

    def __init__(self, message: str, error: int | None = None) -> None:
        super().__init__(message)
        self.errno = error


class SpoolDiskFullError(SpoolWriteError, SpoolFullError):
    """The disk under the spool is full (ENOSPC, EDQUOT) before ``max_bytes`` was reached."""


class SpoolLockedError(SpoolError):
    """Another writer process already owns this spool folder."""


# --- the file layer (the seam for fault injection) -------------------------------------------------


class SegmentFile(Protocol):
    """An open segment, appended to at its end."""

    def write(self, data: memoryview) -> int:
        """Write some of ``data`` at the end (like ``os.write``: may write fewer bytes); raises OSError."""

    def fsync(self) -> None: ...

    def truncate(self, size: int) -> None: ...

    def close(self) -> None: ...


class FileOps(Protocol):
    """How the writer touches the disk: one object, so tests can inject faults without patching ``os``."""

    def open_segment(self, path: Path) -> SegmentFile:
        """Open ``path`` for appending, creating it if needed."""

    def fsync_dir(self, folder: Path) -> None: ...


class OsSegmentFile:
    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)

    def write(self, data: memoryview) -> int:
        return os.write(self.fd, data)

    def fsync(self) -> None:
        os.fsync(self.fd)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def close(self) -> None:
        os.close(self.fd)


class OsFileOps:
    def open_segment(self, path: Path) -> SegmentFile:
        return OsSegmentFile(path)

    def fsync_dir(self, folder: Path) -> None:
        fsync_dir(folder)


OS_FILE_OPS: FileOps = OsFileOps()


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


# --- reading segments --------------------------------------------------------------------------------

ReadAt = Callable[[int, int], bytes]  # (offset, size) -> up to size bytes


def _find_record(data: bytes, start: int) -> int | None:
    """Offset of the first intact record at or after ``start`` in ``data`` (resynchronisation)."""
    n = len(data)
    view = memoryview(data)
    for p in range(start, n - _HEADER.size + 1):
        length, crc = _HEADER.unpack_from(data, p)
        end = p + _HEADER.size + length
        if end <= n and zlib.crc32(view[p + _HEADER.size : end], zlib.crc32(view[p : p + 4])) == crc:
            return p
    return None


def scan_segment(read_at: ReadAt, offset: int, size: int, sealed: bool) -> Iterator[tuple[int, int, bytes | None]]:
    """``(start, end, payload)`` for each intact record of a segment from ``offset`` to ``size``, and
    ``(start, end, None)`` for each run of bad bytes passed over.

    Bad bytes are passed over up to the next intact record (a CRC-32 with the length makes a false
    match about 1 in 4 billion per position). At the end of the segment being written
    (``sealed`` false) a record that runs past the end may still be in flight, and bad bytes with no
    intact record after them may be a tail the writer is cutting back: both are waited on, not skipped.
    """
    while offset < size:
        header = read_at(offset, _HEADER.size)
        if len(header) == _HEADER.size:
            length, crc = _HEADER.unpack(header)
            end = offset + _HEADER.size + length
            if length <= MAX_RECORD_BYTES and end <= size:
                payload = read_at(offset + _HEADER.size, length)
                if len(payload) == length and zlib.crc32(payload, zlib.crc32(header[:4])) == crc:
                    yield offset, end, payload
                    offset = end
                    continue
            elif length <= MAX_RECORD_BYTES and not sealed:
                return  # still being written
        elif not sealed:
            return
        # Corrupt bytes, or the torn tail of a sealed segment: resume at the next intact record.
        found = _find_record(read_at(offset + 1, size - offset - 1), 0)
        if found is None:
            if sealed:
                yield offset, size, None
            return
        yield offset, offset + 1 + found, None
        offset += 1 + found


def scan_bytes(data: bytes, sealed: bool = True) -> Iterator[tuple[int, int, bytes | None]]:
    """`scan_segment` over a whole segment in memory."""
    return scan_segment(lambda offset, size: data[offset : offset + size], 0, len(data), sealed)


class _FileWindow:
    """Positional reads of a segment through a 1 MiB window: few system calls for small records, and
    no file position shared with anyone."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.base = 0
        self.buf = b""

    def read_at(self, offset: int, size: int) -> bytes:
        lo = offset - self.base
        if lo < 0 or lo + size > len(self.buf):
            self.buf = os.pread(self.fd, max(size, _READ_CHUNK), offset)
            self.base, lo = offset, 0
        return self.buf[lo : lo + size]


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
        file_ops: FileOps = OS_FILE_OPS,
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.on_full = on_full
        self.fsync = fsync
        self.ops = file_ops
        self.write_errors = 0  # failed writes, fsyncs and segment creations (each one refused its batch)
        self.sealed_segments = 0  # segments closed early after a fault
        self.cut_bytes = 0  # torn or corrupt tail bytes cut when the spool was opened
        self._lock_fd = os.open(self.folder / "writer.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(self._lock_fd)
            raise SpoolLockedError(
                f"spool {self.folder} is already open for writing by another process"
            ) from exc
        self._segment: SegmentFile | None = None  # None: the next append opens a new segment
        self._offset = 0  # bytes of the open segment that hold whole, written (and fsynced) batches
        try:
            self.dropped_records = _read_counter(self.folder / "dropped")
            self._recover_tail()
            numbers = _segments(self.folder)
            self._size = self._disk_size()
            self._number = numbers[-1] if numbers else -1  # the newest segment (never reused)
            try:
                self._open_next()
            except SpoolWriteError as exc:  # e.g. a full disk: refuse appends until a segment can be made
                log.error("%s; appends are refused until it can be created", exc)
        except BaseException:
            self.close()  # the lock, so that a caller can retry
            raise

    def _recover_tail(self) -> None:
        """Cut a torn tail of the newest segment (an append that never returned), so the reader does
        not count it as skipped; bad bytes followed by intact records stay, the reader passes them."""
        numbers = _segments(self.folder)
        if not numbers:
            return
        path = _segment_path(self.folder, numbers[-1])
        data = path.read_bytes()
        good = 0
        for _, end, payload in scan_bytes(data):
            if payload is not None:
                good = end
        if good == len(data):
            return
        log.warning("spool %s: cutting %d bytes of torn tail from %s", self.folder, len(data) - good, path.name)
        try:
            segment = self.ops.open_segment(path)
            try:
                segment.truncate(good)
                segment.fsync()
            finally:
                segment.close()
            self.cut_bytes += len(data) - good
        except OSError as exc:  # a new segment starts anyway: the reader skips (and counts) the tail
            log.error("spool %s: cannot cut the torn tail of %s: %s", self.folder, path.name, exc)

    @property
    def size_bytes(self) -> int:
        return self._size

    def append(self, records: Sequence[bytes]) -> None:
        """Append and make durable. Raises `SpoolFullError` (policy "refuse", or a full disk) or
        `SpoolWriteError`; after either nothing of this call is acknowledged and the caller may retry."""
        if not records:
            return
        blob = b"".join(encode_record(r) for r in records)
        self._make_room(len(blob))
        if self._segment is not None and self._offset > 0 and self._offset + len(blob) > self.segment_bytes:
            self._roll()
        if self._segment is None:
            self._open_next()
        self._write(blob)

    def append_points(self, points: Sequence[Point]) -> None:
        if points:
            self.append([encode_points(points)])

    def _write(self, blob: bytes) -> None:
        segment = self._segment
        assert segment is not None
        start, done = self._offset, 0
        view = memoryview(blob)
        try:
            while done < len(blob):
                written = segment.write(view[done:])
                if written <= 0:
                    raise OSError(errno.EIO, "write made no progress")
                done += written
        except OSError as exc:
            self.write_errors += 1
            self._cut_back(start, done, exc)
            raise self._error(f"write to {self._name(self._number)}", exc) from exc
        if self.fsync:
            try:
                segment.fsync()
            except OSError as exc:
                # Never fsync again and trust it: after a failed writeback Linux marks the pages clean,
                # so a second fsync "succeeds" with the data gone. Nothing since the last good fsync is
                # trusted: cut back to it and seal the segment; the caller retries into a new one.
                self.write_errors += 1
                name = self._name(self._number)
                self._seal(cut_to=start)
                raise self._error(f"fsync {name} (segment sealed at byte {start})", exc) from exc
        self._offset += len(blob)
        self._size += len(blob)

    def _cut_back(self, start: int, written: int, cause: OSError) -> None:
        """Remove a partly written batch. The segment is then sealed unless nothing was written and the
        disk is merely full: a reader may have handed out whole records of the part written before
        the cut, and its position must not point into what is appended there next. A segment that
        cannot be cut is sealed too, and the reader skips what is left of the batch."""
        assert self._segment is not None
        try:
            # even when nothing was reported written: a failed write may still have left bytes behind
            self._segment.truncate(start)
        except OSError as exc:
            name = self._name(self._number)
            log.error("spool %s: cannot cut back %s to byte %d: %s", self.folder, name, start, exc)
            self._seal(cut_to=None)
            return
        if written or cause.errno not in DISK_FULL:
            self._seal(cut_to=None)

    def _seal(self, cut_to: int | None) -> None:
        """Stop writing to the open segment (optionally cutting it first); the next append opens a new one."""
        segment, self._segment = self._segment, None
        assert segment is not None
        if cut_to is not None:
            try:
                segment.truncate(cut_to)
            except OSError as exc:
                name = self._name(self._number)
                log.error("spool %s: cannot cut %s back to byte %d: %s", self.folder, name, cut_to, exc)
        with contextlib.suppress(OSError):
            segment.close()
        self.sealed_segments += 1
        name = self._name(self._number)
        log.error("spool %s: sealed %s after a disk error; appends go to a new segment", self.folder, name)
        self._size = self._disk_size()

    def _open_next(self) -> None:
        number = self._number + 1
        while _segment_path(self.folder, number).exists():  # left by a failed creation: never reuse a name
            number += 1
        self._number = number
        path = _segment_path(self.folder, number)
        try:
            segment = self.ops.open_segment(path)
        except OSError as exc:
            self.write_errors += 1
            raise self._error(f"create {path.name}", exc) from exc
        if self.fsync:
            try:
                self.ops.fsync_dir(self.folder)
            except OSError as exc:
                # Without a durable folder entry even fsynced records could vanish with the file.
                self.write_errors += 1
                with contextlib.suppress(OSError):
                    segment.close()
                with contextlib.suppress(OSError):
                    path.unlink()
                raise self._error(f"fsync the folder entry of {path.name}", exc) from exc
        self._segment, self._offset = segment, 0

    def _error(self, what: str, exc: OSError) -> SpoolWriteError:
        message = f"spool {self.folder}: cannot {what}: {exc.strerror or exc}; the batch is not stored"
        if exc.errno in DISK_FULL:
            return SpoolDiskFullError(message + " (disk full)", exc.errno)
        return SpoolWriteError(message, exc.errno)

    def _name(self, number: int) -> str:
        return _segment_path(self.folder, number).name

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
        self.dropped_records += sum(1 for _, _, payload in scan_bytes(data) if payload is not None)
        _write_counter(self.folder / "dropped", self.dropped_records)
        path.unlink(missing_ok=True)
        self._size -= len(data)
        return True

    def _roll(self) -> None:
        segment, self._segment = self._segment, None
        if segment is not None:
            with contextlib.suppress(OSError):  # everything in it was fsynced already
                segment.close()
        # The reader deletes acknowledged segments; refresh the size from disk at each roll.
        self._size = self._disk_size()
        self._open_next()

    def close(self) -> None:
        """Close the segment and release the writer lock; a second call does nothing."""
        if self._lock_fd < 0:
            return  # closing the descriptor number twice could close a file someone else opened since
        if self._segment is not None:
            with contextlib.suppress(OSError):
                self._segment.close()
            self._segment = None
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
        self._ack = SlotFile(self.folder / "ack.json", _ACK_SLOT)
        self.acked, self._skipped_acked = self._load_ack()
        self._skipped: dict[Position, int] = {}  # bad byte runs seen beyond the acknowledged position

    def _load_ack(self) -> tuple[Position, int]:
        """(position, skipped bytes) as last acknowledged; a spool never acknowledged starts at its oldest segment."""
        raw = self._ack.load() or {}
        try:
            return Position(int(raw["segment"]), int(raw["offset"])), int(raw.get("skipped_bytes", 0))
        except (KeyError, TypeError, ValueError):
            numbers = _segments(self.folder)
            return Position(numbers[0] if numbers else 0, 0), 0

    @property
    def skipped_bytes(self) -> int:
        """Torn or corrupt bytes passed over (never handed out), since the spool was created."""
        return self._skipped_acked + sum(self._skipped.values())

    def _note_skip(self, segment: int, start: int, end: int) -> None:
        where = Position(segment, start)
        if where < self.acked or self._skipped.get(where) == end - start:
            return
        self._skipped[where] = end - start
        log.error(
            "spool %s: %d bad bytes in %s from byte %d skipped (torn or corrupt; a record in them is lost)",
            self.folder,
            end - start,
            _segment_path(self.folder, segment).name,
            start,
        )

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
                fd = os.open(_segment_path(self.folder, number), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # dropped by the writer's drop-oldest policy
                continue
            try:
                # Only the newest segment is still written; an older one is complete (sealed), so bad
                # bytes at its end are a torn batch to skip, not a record to wait for.
                sealed = number != numbers[-1]
                window = _FileWindow(fd)
                for start, end, payload in scan_segment(window.read_at, offset, os.fstat(fd).st_size, sealed):
                    if payload is None:
                        self._note_skip(number, start, end)
                        continue
                    out.append(SpoolRecord(Position(number, start), Position(number, end), payload))
                    size += len(payload)
                    if len(out) >= max_records or size >= max_bytes:
                        return out
            finally:
                os.close(fd)
        return out

    def ack(self, position: Position) -> None:
        """Everything before ``position`` is safely delivered: persist it and delete finished segments."""
        if position <= self.acked:
            return
        passed = [where for where in self._skipped if where < position]
        skipped = self._skipped_acked + sum(self._skipped[where] for where in passed)
        # In place (`SlotFile`): acknowledging needs no free space, so a full disk can still be drained.
        self._ack.save({"segment": position.segment, "offset": position.offset, "skipped_bytes": skipped})
        self.acked, self._skipped_acked = position, skipped
        for where in passed:
            del self._skipped[where]
        for number in _segments(self.folder):
            if number < position.segment:
                _segment_path(self.folder, number).unlink(missing_ok=True)

    def pending_bytes(self) -> int:
        """Bytes not yet acknowledged (spool depth), as persisted: also right for a monitoring process."""
        acked, _ = self._load_ack()
        total = 0
        for number in _segments(self.folder):
            if number < acked.segment:
                continue
            try:
                size = _segment_path(self.folder, number).stat().st_size
            except FileNotFoundError:  # acknowledged and deleted meanwhile
                continue
            # a segment cut back after a failed fsync may end before the acknowledged offset
            total += max(0, size - (acked.offset if number == acked.segment else 0))
        return total

    @property
    def dropped_records(self) -> int:
        return _read_counter(self.folder / "dropped")

    def close(self) -> None:
        self._ack.close()


class SlotFile:
    """A small JSON state rewritten in place: two fixed-size slots, written alternately, each holding a
    generation number and a CRC, fsynced. A torn write spoils only the slot being written (the other
    still holds the previous state), and once the file exists a write needs no disk space. A file
    holding one plain JSON object (the earlier write-and-rename format) reads as generation 0."""

    def __init__(self, path: Path, slot_bytes: int) -> None:
        self.path = path
        self.slot_bytes = slot_bytes
        self._fd = -1
        self._generation = -1  # unknown until loaded

    def load(self) -> dict[str, Any] | None:
        """The newest intact state, or None."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            self._generation = 0
            return None
        best: tuple[int, dict[str, Any]] | None = None
        legacy = _json_object(data.rstrip(b"\0"))
        if legacy is not None and "n" not in legacy:
            best = (0, legacy)
        for start in range(0, len(data), self.slot_bytes):
            text = data[start : start + self.slot_bytes].rstrip(b"\0")
            body, _, crc = text.rpartition(b" ")
            if not body or len(crc) != 8 or crc.strip(b"0123456789abcdef") or int(crc, 16) != zlib.crc32(body):
                continue
            value = _json_object(body)
            if value is not None and isinstance(value.get("n"), int):
                generation = int(value.pop("n"))
                if best is None or generation > best[0]:
                    best = (generation, value)
        self._generation = best[0] if best else 0
        return best[1] if best else None

    def save(self, value: dict[str, Any]) -> None:
        if self._generation < 0:
            self.load()
        generation = self._generation + 1
        body = json.dumps({"n": generation, **value}, separators=(",", ":")).encode()
        slot = body + b" " + f"{zlib.crc32(body):08x}".encode()
        if len(slot) > self.slot_bytes:
            raise ValueError(f"{self.path}: state of {len(slot)} bytes does not fit a {self.slot_bytes}-byte slot")
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        os.pwrite(self._fd, slot.ljust(self.slot_bytes, b"\0"), (generation % 2) * self.slot_bytes)
        os.fsync(self._fd)
        self._generation = generation

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _json_object(text: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _read_counter(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except FileNotFoundError:
        return 0


def _write_counter(path: Path, value: int) -> None:
    atomic_write_text(path, str(value))
