"""The DMZ's audit trail under hostile traffic: rate-limited security events and a bounded, rotated log.

A flood of bad handshakes or forged datagrams must not turn into a flood of log lines, fsyncs and
disk: `EventLimiter` lets the first event of each key (reason, sender, source) through per interval
and counts the rest, which the caller records as one line with their count when the interval ends.
`AuditLog` appends JSON lines with an fsync per write and rotates at ``max_bytes``, keeping ``keep``
old files, so the trail stays readable and its disk use is bounded by ``(keep + 1) * max_bytes``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# reason, sender, asset, tag, source (peer address for connection-level events, "" otherwise)
LimitKey = tuple[str, str, str, str, str]
OVERFLOW_SOURCE = "other-sources"  # where keys go once ``max_keys`` are open in one interval


@dataclass
class _Open:
    started: float
    suppressed: int = 0
    message: str = ""
    extra: dict[str, object] = field(default_factory=dict)


class EventLimiter:
    """At most one immediate record per key and interval; repeats are counted until `due` returns them."""

    def __init__(self, interval_s: float, max_keys: int = 1024) -> None:
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._open: dict[LimitKey, _Open] = {}
        self._lock = threading.Lock()

    def admit(self, key: LimitKey, count: int, message: str, extra: dict[str, object]) -> LimitKey | None:
        """The key to record now (maybe folded into the overflow key), or None: counted for later."""
        now = time.monotonic()
        with self._lock:
            if key not in self._open and len(self._open) >= self.max_keys:
                key = (key[0], key[1], key[2], key[3], OVERFLOW_SOURCE)  # bounded, however many sources
            entry = self._open.get(key)
            if entry is None:
                self._open[key] = _Open(now)
                return key
            entry.suppressed += count
            entry.message, entry.extra = message, extra
            return None

    def due(self, force: bool = False) -> list[tuple[LimitKey, int, str, dict[str, object]]]:
        """Keys whose interval ended (all with ``force``), with the count of repeats not yet recorded."""
        now = time.monotonic()
        out = []
        with self._lock:
            for key, entry in list(self._open.items()):
                if force or now - entry.started >= self.interval_s:
                    del self._open[key]
                    if entry.suppressed:
                        out.append((key, entry.suppressed, entry.message, entry.extra))
        return out

    def __len__(self) -> int:
        return len(self._open)


class AuditLog:
    """Append-only JSON lines, fsynced per write, rotated at ``max_bytes`` keeping ``keep`` old files."""

    def __init__(self, path: Path, max_bytes: int, keep: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 (kept open)
        self.size = self._fh.tell()
        self.rotations = 0

    def write(self, records: list[dict[str, object]]) -> None:
        if not records:
            return
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        self._fh.write(text)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.size += len(text.encode())
        if self.size >= self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        self._fh.close()
        for i in range(self.keep, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                if i == self.keep:
                    older.unlink()
                else:
                    older.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the renames survive a crash
        finally:
            os.close(dir_fd)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open)
        self.size = 0
        self.rotations += 1

    def close(self) -> None:
        self._fh.close()
