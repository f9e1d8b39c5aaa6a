"""A fault-injecting file layer for the spool (`flowline.core.spool.FileOps`), for the model and crash tests.

It writes real files and can, on request, fail the next operation the way disks and kernels do:
a short write followed by ENOSPC, EIO after part of a write, ENOSPC with nothing written, a failed
fsync, a failed truncate, a failed segment creation or folder fsync, and silent corruption (a byte
of a record flipped on its way to disk, the write reporting success).

It also simulates power loss, which ``kill -9`` does not: it remembers what each file held at its
last successful fsync and which files have a durable folder entry, and `power_loss` puts the disk
back to that state plus, per file, a random part of what was written since (possibly garbled).
A failed fsync behaves as on Linux: the bytes it should have written are lost at power loss even
if a later fsync of the same file succeeds.
"""

from __future__ import annotations

import errno
import os
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flowline.core.spool import OS_FILE_OPS, SegmentFile

WRITE_FAULTS = ("short_write", "eio_write", "enospc_write", "fsync_fail", "corrupt")
OTHER_FAULTS = ("truncate_fail", "create_fail", "dir_fsync_fail")


class PowerLoss(Exception):
    """Raised by the layer when the simulated power goes off in the middle of an operation."""


@dataclass
class _FileState:
    durable: bytes = b""  # content as of the last successful fsync
    lost: list[tuple[int, int]] = field(default_factory=list)  # ranges a failed fsync dropped
    dir_durable: bool = False


class FaultyFileOps:
    def __init__(self, seed: int = 0, fsync_delay_s: float = 0.0) -> None:
        self.rng = random.Random(seed)
        self.fsync_delay_s = fsync_delay_s  # a slow disk
        self.armed: list[str] = []  # faults for the next operations that can have them, in order
        self.injected: dict[str, int] = {}
        self.files: dict[Path, _FileState] = {}
        self.power_off_after: int | None = None  # operations left before a simulated power loss
        self.corrupted: list[bytes] = []  # payloads of the records corrupted on their way to disk
        self.after_partial_write: Callable[[], None] | None = None  # e.g. a reader racing the cut-back

    # --- arming --------------------------------------------------------------------------------

    def arm(self, *faults: str) -> None:
        self.armed.extend(faults)

    def _take(self, *kinds: str) -> str | None:
        if self.armed and self.armed[0] in kinds:
            kind = self.armed.pop(0)
            self.injected[kind] = self.injected.get(kind, 0) + 1
            return kind
        return None

    def _tick(self) -> None:
        if self.power_off_after is not None:
            if self.power_off_after <= 0:
                raise PowerLoss()
            self.power_off_after -= 1

    # --- FileOps -------------------------------------------------------------------------------

    def open_segment(self, path: Path) -> SegmentFile:
        self._tick()
        if self._take("create_fail"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        if path not in self.files:
            # A file that existed before the layer saw it is taken as durable as it is.
            existed = path.exists()
            self.files[path] = _FileState(path.read_bytes() if existed else b"", dir_durable=existed)
        return FaultySegment(self, path, OS_FILE_OPS.open_segment(path))

    def fsync_dir(self, folder: Path) -> None:
        self._tick()
        if self._take("dir_fsync_fail"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        OS_FILE_OPS.fsync_dir(folder)
        for path, state in self.files.items():
            if path.parent == folder and path.exists():
                state.dir_durable = True

    # --- power loss ----------------------------------------------------------------------------

    def power_loss(self) -> dict[str, int]:
        """Put every file back to what survives a power cut; returns what was thrown away."""
        lost = {"files": 0, "bytes": 0}
        for path, state in self.files.items():
            if not path.exists():
                continue
            if not state.dir_durable:
                lost["files"] += 1
                lost["bytes"] += path.stat().st_size
                path.unlink()
                continue
            current = path.read_bytes()
            keep = state.durable
            if len(current) > len(keep) and current[: len(keep)] == keep and self.rng.random() < 0.5:
                # Part of what was written after the last fsync may have reached the disk anyway,
                # possibly with garbage at its end.
                extra = current[len(keep) : len(keep) + self.rng.randint(0, len(current) - len(keep))]
                if extra and self.rng.random() < 0.5:
                    extra = extra[:-1] + bytes([extra[-1] ^ 0x5A])
                keep += extra
            lost["bytes"] += max(0, len(current) - len(keep))
            path.write_bytes(keep)
        self.files.clear()
        self.power_off_after = None
        return lost


class FaultySegment:
    def __init__(self, ops: FaultyFileOps, path: Path, inner: SegmentFile) -> None:
        self.ops = ops
        self.path = path
        self.inner = inner

    def write(self, data: memoryview) -> int:
        try:
            self.ops._tick()
        except PowerLoss:
            self.inner.write(data[: self.ops.rng.randint(0, len(data))])  # half written when the power went
            raise
        (first,) = struct.unpack_from("<I", data, 0) if len(data) >= 4 else (len(data),)
        if self.ops.armed[:1] == ["corrupt"] and 8 + first >= len(data):
            # Corrupt only a batch of two records or more: then an intact record follows the damaged
            # one, so the reader passes it at once (see docs/spool.md for a damaged last record).
            return self.inner.write(data)
        kind = self.ops._take("short_write", "eio_write", "enospc_write", "corrupt")
        if kind == "enospc_write":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if kind in ("short_write", "eio_write"):
            part = self.ops.rng.randint(1, max(1, len(data) - 1))
            self.inner.write(data[:part])
            if self.ops.after_partial_write is not None:
                self.ops.after_partial_write()
            if kind == "short_write":
                # A short write; the retry of the rest then finds the disk full.
                self.ops.armed.insert(0, "enospc_write")
                return part
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        if kind == "corrupt":
            # Flip one byte of the first record's CRC or payload (not its length: see docs/spool.md).
            damaged = bytearray(data)
            damaged[self.ops.rng.randint(4, 7 + first)] ^= 0xFF
            self.ops.corrupted.append(bytes(data[8 : 8 + first]))
            self.inner.write(memoryview(bytes(damaged)))
            return len(data)
        return self.inner.write(data)

    def fsync(self) -> None:
        self.ops._tick()
        state = self.ops.files[self.path]
        current = self.path.read_bytes()
        if self.ops._take("fsync_fail"):
            # Linux marks the pages clean after a failed writeback: what they held is gone at
            # power loss, whatever a later fsync says.
            if len(current) > len(state.durable):
                state.lost.append((len(state.durable), len(current)))
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self.inner.fsync()
        time.sleep(self.ops.fsync_delay_s)
        durable = bytearray(current)
        for start, end in state.lost:
            durable[start : min(end, len(durable))] = bytes(max(0, min(end, len(durable)) - start))
        state.durable = bytes(durable)

    def truncate(self, size: int) -> None:
        self.ops._tick()
        if self.ops._take("truncate_fail"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self.inner.truncate(size)

    def close(self) -> None:
        self.inner.close()
