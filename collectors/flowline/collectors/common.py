"""What both collectors share: group commit into the OT spool, rejects with a dead-letter file, metrics.

The spool is the collectors' only output (the OT side connects to nothing upstream). Points are
appended in batches (at most ``max_points`` or ``max_latency_s`` old: one fsync per batch), and a
caller may attach a callback that runs once its points are durable; the MQTT collector acknowledges
QoS 1 messages there, so a crash never loses an acknowledged message.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from flowline.core.config import FlowlineConfig
from flowline.core.deadletter import DeadLetterFile
from flowline.core.errors import FlowlineError
from flowline.core.metrics import Metrics, MetricsReporter
from flowline.core.points import TELEMETRY, Point
from flowline.core.spool import SpoolError, SpoolFullError, SpoolWriter, encode_points
from flowline.inventory import load_site

log = logging.getLogger(__name__)

MAX_UNKNOWN_ADDRESSES = 1000  # cap on distinct `address` label values (docs/measurements.md)
SPOOL_FULL_RETRY_S = 1.0


class Rejected(FlowlineError):
    """Bad input: ``reason`` is the `flowline_rejected_total` label (docs/measurements.md)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Rejects:
    """Log, count and dead-letter bad input; the stream goes on."""

    def __init__(self, metrics: Metrics, dead_letter: DeadLetterFile) -> None:
        self.metrics = metrics
        self.dead_letter = dead_letter
        self._unknown: set[str] = set()

    def reject(self, reason: str, where: str, message: str, payload: bytes | None = None) -> None:
        log.warning("rejected (%s) at %s: %s", reason, where, message)
        self.metrics.inc("rejected_total", reason=reason)
        self.dead_letter.add(reason, message, where=where, payload=payload)

    def unknown_source(self, source: str, address: str) -> None:
        """Count a value from an address the inventory lacks (label values capped)."""
        if address not in self._unknown:
            if len(self._unknown) >= MAX_UNKNOWN_ADDRESSES:
                address = "(other)"
            else:
                self._unknown.add(address)
        self.metrics.inc("unknown_sources_total", source=source, address=address)


def check_timestamp(ts_ns: int, window_s: float) -> int:
    """Refuse timestamps further than ``window_s`` from now (clock errors, unit mix-ups)."""
    if abs(ts_ns - time.time_ns()) > window_s * 1e9:
        raise Rejected(
            "timestamp_out_of_window",
            f"timestamp {datetime.fromtimestamp(ts_ns / 1e9, UTC).isoformat() if abs(ts_ns) < 1e20 else ts_ns}"
            f" is more than {window_s:.0f}s away from now",
        )
    return ts_ns


def check_finite(value: float) -> float:
    if not math.isfinite(value):
        raise Rejected("not_finite", f"value {value!r} is not a finite number")
    return value


@dataclass
class _Item:
    points: Sequence[Point]
    on_durable: Callable[[], object] | None
    reserved: int = 0  # room taken in the bounded queue (metric items take none)


class SpoolSink:
    """Group commit to a spool on a writer thread; the queue is bounded in points (not in items, which
    may be one value or a thousand messages) so producers feel back-pressure and memory stays bounded.

    A full spool is never silent: every refused append is logged and counted
    (``flowline_spool_full_total``), and the batch is retried until it fits, holding the producers.
    """

    def __init__(
        self,
        writer: SpoolWriter,
        metrics: Metrics,
        spool_name: str,
        max_points: int,
        max_latency_s: float,
        max_queued_points: int = 200_000,
    ) -> None:
        self.writer = writer
        self.metrics = metrics
        self.spool_name = spool_name
        self.max_points = max_points
        self.max_latency_s = max_latency_s
        self.max_queued_points = max_queued_points
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._room = threading.Condition()
        self._queued_points = 0
        self._thread = threading.Thread(target=self._run, name=f"spool-{spool_name}", daemon=True)
        self._stopping = threading.Event()

    def start(self) -> SpoolSink:
        self._thread.start()
        return self

    def submit(self, points: Sequence[Point], on_durable: Callable[[], object] | None = None) -> None:
        """Queue points (blocks while the queue is full); ``on_durable`` runs once they are in the spool."""
        size = max(1, len(points))  # an item without points (rejected messages to ack) still takes room
        self._reserve(size, block=True)
        self._queue.put(_Item(points, on_durable, size))

    def try_submit(self, points: Sequence[Point]) -> bool:
        """Non-blocking submit for event-loop callers; False (and counted) when the queue is full."""
        size = max(1, len(points))
        if not self._reserve(size, block=False):
            self.metrics.inc("points_in_total", len(points))
            self.metrics.inc("dropped_total", len(points), reason="queue_full")
            log.error("collector queue full: %d points dropped (spool writer cannot keep up)", len(points))
            return False
        self._queue.put(_Item(points, None, size))
        return True

    def submit_metrics(self, points: Sequence[Point]) -> None:
        """Queue the collector's own metric points (not counted as telemetry input, nor bounded: few)."""
        self._queue.put(_Item(points, None))

    def _reserve(self, count: int, block: bool) -> bool:
        """Room for ``count`` points; an item larger than the bound still goes in when the queue is empty."""
        with self._room:
            while self._queued_points and self._queued_points + count > self.max_queued_points:
                if not block:
                    return False
                self._room.wait()
            self._queued_points += count
            return True

    def _run(self) -> None:
        """Group commit: a batch ends when the queue is empty, at max points, or after max latency.

        Never lingers on an empty queue: an MQTT broker stops sending once its in-flight window
        (e.g. 1,000 unacknowledged messages) is full, so waiting for more would only add latency.
        """
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            count = len(item.points)
            deadline = time.monotonic() + self.max_latency_s
            stop = False
            while count < self.max_points and time.monotonic() < deadline:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
                count += len(nxt.points)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Item]) -> None:
        points = [p for item in batch for p in item.points]
        if points:
            payload = encode_points(points)
            while True:
                try:
                    self.writer.append([payload])
                    break
                except SpoolFullError:
                    self.metrics.inc("spool_full_total", spool=self.spool_name)
                    log.error(
                        "spool %s is full (%d points waiting): holding input until the relay drains it",
                        self.writer.folder,
                        len(points),
                    )
                    time.sleep(SPOOL_FULL_RETRY_S)
                except (OSError, SpoolError) as exc:
                    # a disk error must not kill the writer thread (input would stall silently): retry loudly
                    self.metrics.inc("spool_errors_total", spool=self.spool_name, error=type(exc).__name__)
                    log.error("cannot append to spool %s: %s; retrying", self.writer.folder, exc)
                    time.sleep(SPOOL_FULL_RETRY_S)
            telemetry = [p.timestamp_ns for p in points if p.measurement == TELEMETRY]
            if telemetry:
                # counted here, once per batch, not per message: the per-call lock is measurable at 10k+/s
                self.metrics.inc("points_in_total", len(telemetry))
                self.metrics.inc("points_out_total", len(telemetry))
                self.metrics.set("lag_seconds", max(0.0, (time.time_ns() - max(telemetry)) / 1e9))
        for item in batch:
            if item.on_durable is not None:
                item.on_durable()
        with self._room:
            self._queued_points -= sum(item.reserved for item in batch)
            self._room.notify_all()

    def stop(self) -> None:
        """Flush everything queued so far, then stop the writer thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


class CollectorRuntime:
    """Spool writer, sink, metrics reporter and rejects for one collector (``opcua`` or ``mqtt``)."""

    def __init__(self, config: FlowlineConfig, name: str, max_points: int, max_latency_s: float) -> None:
        self.site = load_site(config.site_file)
        self.metrics = Metrics(f"collector-{name}", self.site.site, config.instance)
        self.writer = SpoolWriter(
            config.spool_dir(name),
            max_bytes=config.spool.max_bytes,
            segment_bytes=config.spool.segment_bytes,
            on_full=config.spool.on_full,
            fsync=config.spool.fsync,
        )
        self.sink = SpoolSink(self.writer, self.metrics, name, max_points, max_latency_s)
        self.rejects = Rejects(self.metrics, DeadLetterFile(config.data_dir / "deadletter" / f"{name}.jsonl", 32 << 20))
        # Metrics go through the same spool, but not the same counters: they are not telemetry.
        self.reporter = MetricsReporter(self.metrics, self._sink_metrics, config.metrics_interval_s)

    def _sink_metrics(self, points: list[Point]) -> None:
        self.sink.submit_metrics(points)

    def start(self) -> None:
        self.sink.start()
        self.reporter.start()

    def stop(self) -> None:
        self.reporter.stop()
        self.sink.stop()
        self.writer.close()
