"""A recording HTTP proxy in front of a real influxd: the writer-side ledger the chaos tests reconcile.

InfluxDB keeps one value per (series, timestamp), so a point written twice looks exactly like a
point written once when the test queries it back: a duplicate check on query results cannot fail.
The tap sits where duplicates happen, between a writer and InfluxDB, and counts every line of every
``/write`` that InfluxDB accepted (2xx), so ``written - unique`` is the number of points the
pipeline really wrote more than once. It also counts the writes it could not deliver (InfluxDB
down), which proves an outage was seen by the writer rather than just scheduled by the test.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# Hop-by-hop headers are the proxy's own business (RFC 9110 7.6.1); everything else passes through.
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host"}

SeriesTime = tuple[str, int]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # A writer killed mid-request resets its connection: expected under chaos, not worth a traceback.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


def _unescaped(line: str, stop: str) -> int:
    """Index of the first ``stop`` character not escaped by a backslash (line protocol), or -1."""
    i = 0
    while i < len(line):
        if line[i] == "\\":
            i += 2
            continue
        if line[i] == stop:
            return i
        i += 1
    return -1


def line_key(line: str) -> tuple[str, SeriesTime]:
    """(measurement, (series key, timestamp)) of one line-protocol line that carries a timestamp."""
    series = line[: _unescaped(line, " ")]
    comma = _unescaped(series, ",")
    measurement = series if comma < 0 else series[:comma]
    return measurement, (series, int(line.rsplit(" ", 1)[1]))


@dataclass(frozen=True)
class Ledger:
    """Points of one measurement that InfluxDB accepted through the tap."""

    written: int
    unique: int
    keys: frozenset[SeriesTime]

    @property
    def duplicates(self) -> int:
        return self.written - self.unique


class InfluxWriteTap:
    """``url`` forwards to ``target`` (an influxd base URL); accepted ``/write`` lines are counted."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        assert parts.scheme == "http" and parts.hostname and parts.port, target
        self._upstream = (parts.hostname, parts.port)
        self._lock = threading.Lock()
        self._counts: dict[str, Counter[SeriesTime]] = {}
        self.accepted_writes = 0
        self.failed_writes = 0  # InfluxDB unreachable or answering an error: the writer must retry
        # Telemetry points InfluxDB took whose answer never reached the writer (killed, timed out):
        # it must write them again, so they are duplicates the pipeline is allowed.
        self.unanswered_points = 0
        tap = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like the writer's requests session expects

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                tap._forward(self)

            def do_POST(self) -> None:
                tap._forward(self)

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="influx-tap", daemon=True)

    def start(self) -> InfluxWriteTap:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _forward(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        is_write = request.command == "POST" and urlsplit(request.path).path == "/write"
        try:
            upstream = http.client.HTTPConnection(*self._upstream, timeout=30)
            upstream.request(request.command, request.path, body=body, headers=headers)
            response = upstream.getresponse()
            payload = response.read()
            upstream.close()
        except OSError:
            # InfluxDB is down: drop the connection without an answer, as the real server would.
            if is_write:
                with self._lock:
                    self.failed_writes += 1
            request.close_connection = True
            return
        recorded = self._record(body, headers, response.status) if is_write else 0
        # A writer killed mid-request is gone: InfluxDB took the points (counted) but it never learns.
        answered = False
        with contextlib.suppress(OSError):
            request.send_response(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    request.send_header(name, value)
            request.send_header("Content-Length", str(len(payload)))
            request.end_headers()
            request.wfile.write(payload)
            request.wfile.flush()
            answered = True
        if recorded and not answered:
            with self._lock:
                self.unanswered_points += recorded

    def _record(self, body: bytes, headers: dict[str, str], status: int, measurement: str = "telemetry") -> int:
        """Count an accepted write's lines; the number of ``measurement`` points it carried."""
        if status // 100 != 2:
            with self._lock:
                self.failed_writes += 1
            return 0
        if any(k.lower() == "content-encoding" and v == "gzip" for k, v in headers.items()):
            body = gzip.decompress(body)
        keys = [line_key(line) for line in body.decode().splitlines() if line and not line.startswith("#")]
        with self._lock:
            self.accepted_writes += 1
            for name, key in keys:
                self._counts.setdefault(name, Counter())[key] += 1
        return sum(1 for name, _ in keys if name == measurement)

    def ledger(self, measurement: str = "telemetry") -> Ledger:
        with self._lock:
            counts = Counter(self._counts.get(measurement, Counter()))
        return Ledger(sum(counts.values()), len(counts), frozenset(counts))

    def duplicated(self, measurement: str = "telemetry") -> list[SeriesTime]:
        """The (series, timestamp) keys InfluxDB accepted more than once."""
        with self._lock:
            counts = self._counts.get(measurement, Counter())
            return sorted(key for key, n in counts.items() if n > 1)
