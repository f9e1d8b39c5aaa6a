"""The pipeline's own metrics (``flowline_*`` measurements), reported as ordinary points.

Every stage keeps a `Metrics` registry and periodically turns it into points. OT stages put those
points into their spool, so they cross the DMZ like any other data (the OT side never connects to
IT); DMZ and IT stages hand them to the historian. Counters are cumulative (``*_total``), so Grafana
takes ``non_negative_derivative`` for rates and a restart shows as a reset, not a loss.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from flowline.core.points import Point

LabelKey = tuple[tuple[str, str], ...]
# Called after every gauge update with (name, value, labels): how the status file follows connections.
GaugeListener = Callable[[str, float, dict[str, str]], None]


class Metrics:
    def __init__(self, stage: str, site: str, instance: str) -> None:
        self.base_tags = {"stage": stage, "site": site, "instance": instance}
        self._counters: dict[tuple[str, LabelKey], float] = {}
        self._gauges: dict[tuple[str, LabelKey], float] = {}
        self._lock = threading.Lock()
        self._listeners: list[GaugeListener] = []

    def add_listener(self, listener: GaugeListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: GaugeListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    @staticmethod
    def _key(name: str, labels: dict[str, str]) -> tuple[str, LabelKey]:
        return name, tuple(sorted(labels.items()))

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = self._key(name, labels)
        with self._lock:
            self._counters[key] = self._counters.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._gauges[self._key(name, labels)] = float(value)
        for listener in self._listeners:
            listener(name, float(value), labels)

    def counter(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters.get(self._key(name, labels), 0.0)

    def gauge(self, name: str, **labels: str) -> float | None:
        with self._lock:
            return self._gauges.get(self._key(name, labels))

    def total(self, name: str) -> float:
        """Sum of a counter over all its label sets."""
        with self._lock:
            return sum(v for (n, _), v in self._counters.items() if n == name)

    def snapshot(self, timestamp_ns: int | None = None) -> list[Point]:
        ts = timestamp_ns if timestamp_ns is not None else time.time_ns()
        with self._lock:
            items = list(self._counters.items()) + list(self._gauges.items())
        return [
            Point(f"flowline_{name}", {**self.base_tags, **dict(labels)}, {"value": value}, ts)
            for (name, labels), value in items
        ]


class MetricsReporter:
    """Calls ``sink(metrics.snapshot())`` every ``interval_s`` on a daemon thread until stopped."""

    def __init__(
        self, metrics: Metrics, sink: Callable[[list[Point]], None], interval_s: float = 5.0
    ) -> None:
        self.metrics = metrics
        self.sink = sink
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-reporter", daemon=True)

    def start(self) -> MetricsReporter:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush()

    def flush(self) -> None:
        try:
            self.sink(self.metrics.snapshot())
        except Exception as exc:  # metrics must never take the pipeline down
            self.metrics.inc("metrics_report_errors_total", error=type(exc).__name__)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 5)
        self.flush()
