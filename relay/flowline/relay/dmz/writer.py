"""DMZ spool -> historian: the ``flowline relay writer`` process.

Reads the DMZ spool in order, writes through the historian writer (batching, retries, dead
letters), and acknowledges the spool only after InfluxDB took the points. An InfluxDB outage
therefore fills the DMZ spool (the gateway keeps acking its senders until that is full), and a
crash replays at most the unacknowledged records, which InfluxDB absorbs idempotently.

At start, and after 30 s without a write, one empty write checks InfluxDB (`HistorianWriter.check`).
A wrong credential or a missing database is a deployment error: the process says so and exits
with status 2 (systemd does not restart it in a loop; a person must fix the config). An
unreachable InfluxDB is expected to come back (start order, maintenance): the writer runs
degraded, logs every failed attempt with the next retry delay, shows "disconnected since" in its
status file, and keeps the data in the DMZ spool.
"""

from __future__ import annotations

import logging
import threading
import time

from flowline.core.backoff import Backoff
from flowline.core.config import FlowlineConfig
from flowline.core.errors import FlowlineError
from flowline.core.metrics import Metrics, MetricsReporter
from flowline.core.points import Point
from flowline.core.spool import SpoolReader, SpoolRecord
from flowline.core.status import ProcessStatus
from flowline.historian.errors import HistorianAuthError, HistorianError, HistorianNotFoundError
from flowline.historian.paths import dead_letter_path
from flowline.historian.writer import HistorianWriter
from flowline.inventory import load_site
from flowline.relay.body import body_lines, decode_body

log = logging.getLogger("flowline.relay.writer")

CHECK_IDLE_EVERY_S = 30.0  # an idle writer still finds out that InfluxDB went away or the token was revoked


class Forwarder:
    def __init__(
        self,
        config: FlowlineConfig,
        stop: threading.Event | None = None,
        max_records: int = 64,
        max_bytes: int = 8 << 20,
    ) -> None:
        if config.historian is None:
            raise ValueError("the config has no historian section")
        self.stop = stop or threading.Event()
        self.reader = SpoolReader(config.spool_dir("dmz"))
        self.metrics = Metrics("historian", load_site(config.site_file).site, config.instance)
        # Bodies carry nanosecond timestamps, so the writer posts at ns whatever the section says.
        self.historian = HistorianWriter.from_config(
            config.historian.model_copy(update={"precision": "ns"}),
            dead_letter_path=dead_letter_path(config),
            metrics=self.metrics,
        )
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.backoff = Backoff(0.5, 10.0)  # on top of the historian writer's own retry deadline
        self._lock = threading.Lock()  # the historian writer holds one HTTP session
        self.reporter = MetricsReporter(self.metrics, self._write_metrics, config.metrics_interval_s)
        self.target = self.historian.conn.url
        self.status = ProcessStatus(config.data_dir, "relay-writer").watch(self.metrics, "sink")
        self.status.spool("dmz", config.spool_dir("dmz"))
        self._reachable = False
        self._last_contact = 0.0  # monotonic time of the last successful check or write

    def _write_metrics(self, points: list[Point]) -> None:
        with self._lock:
            self.historian.write(points)

    def _decode(self, records: list[SpoolRecord]) -> tuple[list[str], list[Point], int]:
        lines: list[str] = []
        points: list[Point] = []
        newest = 0
        for record in records:
            series, raw = decode_body(record.payload)
            lines += body_lines(series)
            for item in raw:
                try:
                    points.append(Point.from_wire(item))
                except (FlowlineError, ValueError, TypeError) as exc:
                    log.error("DMZ spool record at %s: malformed point skipped: %s", record.position, exc)
                    self.metrics.inc("rejected_total", reason="bad_payload")
        if lines:
            newest = int(lines[-1].rsplit(" ", 1)[1])
        return lines, points, newest

    def step(self) -> int:
        """Forward one read's worth of records; returns the number of points written (0 when idle)."""
        records = self.reader.read(max_records=self.max_records, max_bytes=self.max_bytes)
        if not records:
            return 0
        lines, points, newest = self._decode(records)
        with self._lock:
            result = self.historian.write_lines(lines)
            if points:
                result += self.historian.write(points)
        self.reader.ack(records[-1].end)
        self.metrics.inc("points_in_total", len(lines) + len(points))
        self.metrics.set("spool_bytes", self.reader.pending_bytes(), spool="dmz")
        self.metrics.set("spool_skipped_bytes_total", self.reader.skipped_bytes, spool="dmz")
        if newest:
            self.metrics.set("lag_seconds", max(0.0, time.time() - newest / 1e9))
        return result.written + result.dead_lettered

    def check(self) -> None:
        """Check InfluxDB once (see the module docstring); a failure raises `HistorianError`."""
        self.metrics.inc("connect_attempts_total", target=self.target)
        with self._lock:
            self.historian.check()
        self._contact()

    def _contact(self) -> None:
        self._last_contact = time.monotonic()
        if not self._reachable:
            self._reachable = True
            self.metrics.set("connected", 1, target=self.target)
            log.info("InfluxDB at %s accepts writes; forwarding the DMZ spool", self.target)

    def _unreachable(self, exc: HistorianError) -> float:
        """Log and count a failed contact; returns the back-off delay before the next attempt."""
        self._reachable = False
        self.metrics.inc("connect_failures_total", target=self.target)
        self.metrics.set("connected", 0, target=self.target)
        self.status.connected(self.target, "sink", False, error=str(exc))
        delay = self.backoff.next_delay()
        log.error(
            "%s; running degraded: data stays in the DMZ spool (%d bytes waiting), retrying in %.1f s",
            exc, self.reader.pending_bytes(), delay,
        )  # fmt: skip
        return delay

    def run(self) -> None:
        self.reporter.start()
        self.status.start()
        try:
            try:
                self.check()
            except (HistorianAuthError, HistorianNotFoundError):
                raise
            except HistorianError as exc:
                self.stop.wait(self._unreachable(exc))
            print(f"READY relay-writer -> {self.target}", flush=True)  # for supervisors
            while not self.stop.is_set():
                try:
                    if not self._reachable or time.monotonic() - self._last_contact > CHECK_IDLE_EVERY_S:
                        self.check()
                    if not self.step():
                        self.stop.wait(0.05)
                    else:
                        self._contact()
                        self.status.ok(self.target, "sink")
                        self.backoff.reset()
                except (HistorianAuthError, HistorianNotFoundError):
                    raise  # a wrong credential or a missing database needs a person, not a retry loop
                except HistorianError as exc:
                    self.stop.wait(self._unreachable(exc))
        except (HistorianAuthError, HistorianNotFoundError) as exc:
            self.status.fail(str(exc))
            raise
        finally:
            if not self._reachable:
                # Abort first: the final metrics flush would otherwise wait out the retry deadline (60 s).
                self.historian.close()
            self.reporter.stop()
            self.historian.close()
            self.status.stop()
