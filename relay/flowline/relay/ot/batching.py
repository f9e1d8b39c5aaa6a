"""Building relay batches from OT spools, and the sender's persistent sequence journal.

Shared by the TCP sender and the diode sender. A batch is a contiguous range of records from each
spool it draws on; its range and sequence number are journaled (fsync) before it is sent, so after
a crash the very same batch goes out again under the same number and the gateway recognises it as
a replay instead of storing it twice or dropping different data under a reused number.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from flowline.core.files import atomic_write_json
from flowline.core.spool import Position, SpoolError, SpoolReader, SpoolRecord, points_json
from flowline.relay.body import BodyBuilder

log = logging.getLogger("flowline.relay.ot")


@dataclass
class Batch:
    sequence: int
    ranges: dict[str, tuple[Position, Position]]  # spool name -> (start, end) positions
    payload: bytes  # a grouped body (flowline.relay.body)
    count: int = 0
    newest_ns: int = 0

    def journal(self) -> dict[str, object]:
        return {
            "sequence": self.sequence,
            "ranges": {n: [s.segment, s.offset, e.segment, e.offset] for n, (s, e) in self.ranges.items()},
        }


@dataclass
class _Parts:
    """What one batch has taken so far: a grouped body and, per spool, the records' total size."""

    body: BodyBuilder = field(default_factory=BodyBuilder)
    sizes: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, record: SpoolRecord) -> None:
        text = b""
        try:
            text = points_json(record.payload)
            items = orjson.loads(text)
        except (SpoolError, orjson.JSONDecodeError):
            items = None
        if isinstance(items, list):
            self.body.add_wire(items)
        else:  # CRC-intact but not wire points: a producer bug, never something to forward
            log.error("spool %s: record at %s is not a list of wire points; skipped", name, record.position)
        # counted uncompressed: batch_max_bytes bounds what the batch carries, not what it took on disk
        self.sizes[name] = self.sizes.get(name, 0) + max(len(text), len(record.payload))

    @property
    def size(self) -> int:
        return sum(self.sizes.values())


class SequenceJournal:
    """``next`` sequence number and the batch in flight, persisted atomically in ``state.json``.

    Without any state (first start, or state lost) numbering starts at the current time in
    microseconds, so it still increases past whatever the gateway saw before: a loss of state shows
    up as one reported gap, never as new data mistaken for replays.
    """

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "state.json"
        if self.path.exists():
            raw = json.loads(self.path.read_text())
            self.next = int(raw["next"])
            self.inflight: dict[str, object] | None = raw.get("inflight")
        else:
            self.next = time.time_ns() // 1000
            self.inflight = None

    def save(self) -> None:
        atomic_write_json(self.path, {"next": self.next, "inflight": self.inflight})

    def begin(self, batch: Batch) -> None:
        self.inflight = batch.journal()
        self.save()

    def done(self, batch: Batch) -> None:
        self.next = batch.sequence + 1
        self.inflight = None
        self.save()


class BatchBuilder:
    def __init__(self, readers: dict[str, SpoolReader], max_points: int, max_bytes: int, max_latency_s: float) -> None:
        self.readers = readers
        self.max_points = max_points
        self.max_bytes = max_bytes
        self.max_latency_s = max_latency_s

    def _full(self, parts: _Parts) -> bool:
        return parts.body.count >= self.max_points or parts.size >= self.max_bytes

    def _fill(self, parts: _Parts, cursors: dict[str, Position], limit: dict[str, Position] | None) -> None:
        for name, reader in self.readers.items():
            if limit is not None and name not in limit:
                continue
            while limit is not None or not self._full(parts):
                records = reader.read(
                    after=cursors[name], max_records=16, max_bytes=max(self.max_bytes - parts.size, 1)
                )
                if limit is not None:
                    records = [r for r in records if r.end <= limit[name]]
                if not records:
                    break
                for record in records:
                    parts.add(name, record)
                    cursors[name] = record.end
                    if limit is None and self._full(parts):
                        break

    @staticmethod
    def _batch(sequence: int, starts: dict[str, Position], cursors: dict[str, Position], parts: _Parts) -> Batch:
        return Batch(
            sequence,
            {n: (starts[n], cursors[n]) for n in parts.sizes},
            parts.body.encode(),
            parts.body.count,
            parts.body.newest_ns,
        )

    def next_batch(self, sequence: int, stop_wait: float, after: Batch | None = None) -> Batch | None:
        """Wait up to the latency bound for records; ``None`` when nothing arrived within ``stop_wait``.

        With ``after`` (the batch in flight) it starts where that one ends and takes only what is
        there right now: it is built while the gateway works on ``after``.
        """
        starts = {name: r.acked for name, r in self.readers.items()}
        if after is not None:
            starts.update({name: end for name, (_, end) in after.ranges.items()})
        cursors = dict(starts)
        parts = _Parts()
        first_seen: float | None = None
        give_up = time.monotonic() + stop_wait
        while True:
            self._fill(parts, cursors, None)
            if after is not None:
                return self._batch(sequence, starts, cursors, parts) if parts.sizes else None
            now = time.monotonic()
            if parts.sizes and first_seen is None:
                first_seen = now
            if self._full(parts):
                break
            if first_seen is not None and now - first_seen >= self.max_latency_s:
                break
            if first_seen is None and now >= give_up:
                return None
            time.sleep(0.01)
        return self._batch(sequence, starts, cursors, parts)

    def rebuild(self, journal: dict[str, object]) -> Batch | None:
        """The batch a journal entry describes, or ``None`` when the spools already acked past it."""
        ranges = {
            n: (Position(int(v[0]), int(v[1])), Position(int(v[2]), int(v[3])))
            for n, v in journal["ranges"].items()  # type: ignore[attr-defined]
        }
        if all(self.readers[n].acked >= end for n, (_, end) in ranges.items() if n in self.readers):
            return None
        starts = {n: s for n, (s, _) in ranges.items()}
        cursors = dict(starts)
        parts = _Parts()
        self._fill(parts, cursors, {n: e for n, (_, e) in ranges.items()})
        return self._batch(int(journal["sequence"]), starts, cursors, parts)  # type: ignore[call-overload]

    def ack(self, batch: Batch) -> None:
        for name, (_, end) in batch.ranges.items():
            self.readers[name].ack(end)
