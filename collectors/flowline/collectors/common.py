"""What both collectors share: group commit into the OT spool, rejects with a dead-letter file, metrics.

The spool is the collectors' only output (the OT side connects to nothing upstream). Points are
appended in batches (at most ``max_points`` or ``max_latency_s`` old: one fsync per batch), and a
caller may attach a callback that runs once its points are durable; the MQTT collector acknowledges
QoS 1 messages there, so a crash never loses an acknowledged message. When the spool cannot store,
input is refused, never blocked on and never acknowledged (`SpoolSink`, docs/spool.md).
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
from flowline.core.points import TELEMETRY, FieldValue, Point, TagRef
from flowline.core.spool import SpoolError, SpoolFullError, SpoolWriter, encode_points
from flowline.core.status import ProcessStatus
from flowline.inventory import load_site

log = logging.getLogger(__name__)

MAX_UNKNOWN_ADDRESSES = 1000  # cap on distinct `address` label values (docs/measurements.md)
SPOOL_FULL_RETRY_S = 1.0
REFUSING_LOG_EVERY_S = 30.0  # while the spool refuses, one error line per this many seconds


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


def check_type(ref: TagRef, value: FieldValue) -> FieldValue:
    """One rule for every source: a value must fit its tag's ``type`` in the site file, or it is refused.

    ``number`` tags take numbers and booleans (stored as 1.0/0.0: PLC bits are trended as numbers),
    ``boolean`` tags take booleans and the numbers 0 and 1, ``string`` tags take strings. Anything else
    (``"high"`` or ``"NaN"`` on a number tag, 21.5 on a string tag) raises `Rejected` ``wrong_type``: it is
    counted and dead-lettered, never stored as a good value of the wrong kind.
    """
    kind = ref.value_type
    if kind == "number" and not isinstance(value, str):
        return value
    if kind == "boolean" and (isinstance(value, bool) or (not isinstance(value, str) and value in (0, 1))):
        return bool(value)
    if kind == "string" and isinstance(value, str):
        return value
    got = "a boolean" if isinstance(value, bool) else "a string" if isinstance(value, str) else "a number"
    raise Rejected(
        "wrong_type",
        f"{ref.asset}/{ref.tag} is a {kind} tag but got {got} ({value!r:.60}); "
        "if it really carries such values, set the tag's type in the site file",
    )


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

    Full-spool policy (docs/spool.md), the same for every input: when the spool cannot store a batch
    (full, disk full, disk error) the writer thread keeps that batch, unacknowledged, and retries it
    every second; from then until it is stored the sink *refuses* new input: `submit` and
    `try_submit` return False at once (never blocking the protocol's thread), the refused points
    are counted in ``flowline_refused_total{reason}`` and ``flowline_spool_refusing`` is 1. Each
    failed append is counted (``flowline_spool_full_total`` or ``flowline_spool_errors_total``).
    Callbacks registered with `on_accepting` run once the spool takes data again.
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
        self._refusing: str | None = None  # reason label while the spool cannot store, else None
        self._refusing_since = 0.0
        self._refused_points = 0  # in the current refusal
        self._last_log = 0.0
        self._listeners: list[Callable[[], object]] = []
        self.metrics.set("spool_refusing", 0, spool=spool_name)

    def start(self) -> SpoolSink:
        self._thread.start()
        return self

    @property
    def accepting(self) -> bool:
        """False while the spool cannot store (input is refused)."""
        return self._refusing is None

    def on_accepting(self, listener: Callable[[], object]) -> None:
        """Run ``listener`` (on the writer thread) each time the spool takes data again after refusing."""
        self._listeners.append(listener)

    def submit(
        self, points: Sequence[Point], on_durable: Callable[[], object] | None = None, hold: bool = False
    ) -> bool:
        """Queue points; ``on_durable`` runs once they are in the spool. Blocks only while the queue is
        full and the spool is storing; False (refused, counted, ``on_durable`` never runs) while the
        spool cannot store. ``hold`` queues them even then, without blocking: for input the protocol
        has already handed over (an MQTT QoS 2 message after PUBREC), bounded by the sender's window."""
        size = max(1, len(points))  # an item without points (rejected messages to ack) still takes room
        if hold:
            with self._room:
                self._queued_points += size
        elif not self._reserve(size, block=True):
            self.refuse(len(points))
            return False
        self._queue.put(_Item(points, on_durable, size))
        return True

    def try_submit(self, points: Sequence[Point]) -> bool:
        """Non-blocking submit for event-loop callers; False (and counted) when refused or the queue is full."""
        size = max(1, len(points))
        if self._refusing is not None:
            self.refuse(len(points))
            return False
        if not self._reserve(size, block=False):
            if self._refusing is not None:
                self.refuse(len(points))
                return False
            self.metrics.inc("points_in_total", len(points))
            self.metrics.inc("dropped_total", len(points), reason="queue_full")
            log.error("collector queue full: %d points dropped (spool writer cannot keep up)", len(points))
            return False
        self._queue.put(_Item(points, None, size))
        return True

    def submit_metrics(self, points: Sequence[Point]) -> None:
        """Queue the collector's own metric points (not counted as telemetry input, nor bounded: few).
        While the spool refuses they are not queued: they are snapshots, the next one says the same."""
        if self._refusing is None:
            self._queue.put(_Item(points, None))

    def _reserve(self, count: int, block: bool) -> bool:
        """Room for ``count`` points; an item larger than the bound still goes in when the queue is empty.
        False when the spool refuses (also for a producer that was waiting for room)."""
        with self._room:
            while (
                self._refusing is None
                and self._queued_points
                and self._queued_points + count > self.max_queued_points
            ):
                if not block:
                    return False
                self._room.wait()
            if self._refusing is not None:
                return False
            self._queued_points += count
            return True

    def refuse(self, points: int) -> None:
        """Count points refused at the input (also by a caller that refuses on its own)."""
        reason = self._refusing or "spool_full"
        self.metrics.inc("refused_total", points, reason=reason)
        self._refused_points += points

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

    def _store(self, payload: bytes, points: int) -> bool:
        """Append until it succeeds (the spool cut back or sealed whatever a failed attempt left, so a
        retry is safe); False if the sink is stopped first: the batch was never acknowledged."""
        while True:
            try:
                self.writer.append([payload])
            except (OSError, SpoolError) as exc:
                # a disk error must not kill the writer thread (input would stall silently)
                if isinstance(exc, SpoolFullError):
                    self.metrics.inc("spool_full_total", spool=self.spool_name)
                    self._set_refusing("spool_full", exc, points)
                else:
                    self.metrics.inc("spool_errors_total", spool=self.spool_name, error=type(exc).__name__)
                    self._set_refusing("spool_error", exc, points)
                if self._stopping.wait(SPOOL_FULL_RETRY_S):
                    log.error(
                        "stopping with %d points not stored in spool %s (%s); they were not acknowledged",
                        points,
                        self.writer.folder,
                        exc,
                    )
                    return False
                continue
            if self._refusing is not None:
                self._set_accepting()
            return True

    def _set_refusing(self, reason: str, exc: Exception, points: int) -> None:
        now = time.monotonic()
        with self._room:
            first = self._refusing is None
            if first:
                self._refusing_since, self._refused_points = now, 0
            self._refusing = reason
            self._room.notify_all()  # producers waiting for room are refused now
        self.metrics.set("spool_refusing", 1, spool=self.spool_name)
        if first or now - self._last_log >= REFUSING_LOG_EVERY_S:
            self._last_log = now
            log.error(
                "cannot store %d points in spool %s: %s; refusing new input (not acknowledged) until it can "
                "(%.0f s so far, %d points refused)",
                points,
                self.writer.folder,
                exc,
                now - self._refusing_since,
                self._refused_points,
            )

    def _set_accepting(self) -> None:
        with self._room:
            self._refusing = None
            self._room.notify_all()
        self.metrics.set("spool_refusing", 0, spool=self.spool_name)
        log.warning(
            "spool %s takes data again after %.1f s; %d points were refused meanwhile",
            self.writer.folder,
            time.monotonic() - self._refusing_since,
            self._refused_points,
        )
        for listener in self._listeners:
            try:
                listener()
            except Exception:  # a listener must not stop the writer thread
                log.exception("spool-accepting callback failed")

    def _commit(self, batch: list[_Item]) -> None:
        try:
            points = [p for item in batch for p in item.points]
            if points:
                if not self._store(encode_points(points), len(points)):
                    return  # stopped while the spool refused: never acknowledged
                telemetry = [p.timestamp_ns for p in points if p.measurement == TELEMETRY]
                if telemetry:
                    # counted once per batch, not per message: the per-call lock is measurable at 10k+/s
                    self.metrics.inc("points_in_total", len(telemetry))
                    self.metrics.inc("points_out_total", len(telemetry))
                    self.metrics.set("lag_seconds", max(0.0, (time.time_ns() - max(telemetry)) / 1e9))
            for item in batch:
                if item.on_durable is not None:
                    item.on_durable()
        finally:
            with self._room:
                self._queued_points -= sum(item.reserved for item in batch)
                self._room.notify_all()

    def stop(self) -> None:
        """Flush everything queued so far, then stop the writer thread; while the spool refuses, what
        is left is given up unacknowledged instead of waiting for room forever."""
        if self._thread.is_alive():
            self._stopping.set()
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
        # Brokers and servers are the sources; the file is written only once the CLI starts it.
        self.status = ProcessStatus(config.data_dir, f"collector-{name}").watch(self.metrics, "source")
        self.status.spool(name, config.spool_dir(name))

    def _sink_metrics(self, points: list[Point]) -> None:
        self.sink.submit_metrics(points)

    def start(self) -> None:
        self.sink.start()
        self.reporter.start()

    def stop(self) -> None:
        self.reporter.stop()
        self.sink.stop()
        self.writer.close()
