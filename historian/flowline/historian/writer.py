"""The historian writer: points -> line protocol -> InfluxDB, in batches, with retries and a dead letter.

Guarantees (see DESIGN.md):

- One bad point never blocks the stream: a 400 (field type conflict, point outside the retention
  period or time range, parse error) makes the writer bisect the batch until the refused points are
  isolated; those go to the dead-letter file with the server's message, the rest is written.
- Transient trouble (5xx, 429 honouring ``Retry-After``, network errors) is retried with
  exponential back-off and full jitter until ``retry_deadline_s``; then `HistorianUnavailableError`
  tells the caller to keep the data in its spool and try again later.
- 401/403 raise `HistorianAuthError` at once (no retry loop on a wrong credential); a missing
  database raises `HistorianNotFoundError`. Neither dead-letters anything: the data stays spooled.
- Idempotent: the same points give the same lines (same series, same timestamp, same values), so a
  replayed batch rewrites identical points.

Use one writer per thread: `write` is not reentrant (requests go out one at a time on the writer's
own poster thread, which overlaps posting a batch with encoding the next).
"""

from __future__ import annotations

import email.utils
import gzip
import logging
import random
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import requests

from flowline.core.config import HistorianConfig
from flowline.core.deadletter import DeadLetterFile
from flowline.core.errors import network_reason
from flowline.core.metrics import Metrics
from flowline.core.points import LineProtocolError, Point, encode_line
from flowline.historian.connection import Api, Connection, error_message, raise_for_access
from flowline.historian.errors import HistorianUnavailableError

log = logging.getLogger(__name__)

Precision = Literal["s", "ms", "ns"]
# InfluxDB 1.6 reads precision=us as nanoseconds, so only these three are offered.
_PRECISION_DIVISOR: dict[str, int] = {"s": 1_000_000_000, "ms": 1_000_000, "ns": 1}
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# InfluxDB 1.x ends a partial-write error with how many points it dropped.
_DROPPED = re.compile(r"dropped=(\d+)\s*$")


@dataclass(frozen=True)
class WriteResult:
    written: int = 0
    dead_lettered: int = 0
    requests: int = 0

    def __add__(self, other: WriteResult) -> WriteResult:
        return WriteResult(
            self.written + other.written,
            self.dead_lettered + other.dead_lettered,
            self.requests + other.requests,
        )


@dataclass(frozen=True)
class _Response:
    status: int  # 0 for a network error
    message: str
    retry_after_s: float | None = None


class _Transport(Protocol):
    def post(self, body: bytes) -> _Response: ...

    def close(self) -> None: ...


class _V1Transport:
    """``POST /write?db=&rp=&precision=`` (InfluxDB 1.x; the v1-compatible API of 2.x and 3.x)."""

    def __init__(self, conn: Connection, precision: Precision, use_gzip: bool) -> None:
        self.conn = conn
        self.params = {"db": conn.database, "precision": precision}
        if conn.retention_policy:
            self.params["rp"] = conn.retention_policy
        self.use_gzip = use_gzip

    def post(self, body: bytes) -> _Response:
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        if self.use_gzip:
            body = gzip.compress(body, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        try:
            response = self.conn.session.post(
                f"{self.conn.url}/write",
                params=self.params,
                data=body,
                headers=headers,
                timeout=self.conn.timeout_s,
            )
        except requests.RequestException as exc:
            return _Response(0, f"{type(exc).__name__}: {network_reason(exc)}")
        if response.status_code == 204:
            return _Response(204, "")
        return _Response(
            response.status_code,
            error_message(response.content),
            _parse_retry_after(response.headers.get("Retry-After")),
        )

    def close(self) -> None:
        self.conn.close()


class _V2Transport:
    """``POST /api/v2/write`` through influxdb-client's synchronous write API (InfluxDB 2.x/3.x).

    Not exercised by the test suite: only InfluxDB 1.6 (no v2 API) is installable here.
    """

    def __init__(self, conn: Connection, org: str, bucket: str, precision: Precision, use_gzip: bool) -> None:
        from influxdb_client.client.influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS
        from influxdb_client.domain.write_precision import WritePrecision

        self.conn = conn
        self.org, self.bucket = org, bucket
        self.precision = {"s": WritePrecision.S, "ms": WritePrecision.MS, "ns": WritePrecision.NS}[precision]
        token = conn.token if conn.token is not None else f"{conn.username}:{conn.password}"
        # retries=False: retrying and bisecting is this module's job, with its own deadline.
        self.client = InfluxDBClient(
            url=conn.url, token=token, org=org, enable_gzip=use_gzip,
            timeout=int(conn.timeout_s * 1000), retries=False,
        )
        self.api = self.client.write_api(write_options=SYNCHRONOUS)

    def post(self, body: bytes) -> _Response:
        import urllib3
        from influxdb_client.rest import ApiException

        try:
            # WritePrecision's members are plain strings, though write() is annotated with the class.
            self.api.write(self.bucket, self.org, record=body, write_precision=self.precision)  # type: ignore[arg-type]
        except ApiException as exc:
            headers: dict[str, str] = dict(exc.headers or {})
            return _Response(
                int(exc.status or 0), error_message(exc.body), _parse_retry_after(headers.get("Retry-After"))
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            return _Response(0, f"{type(exc).__name__}: {exc}")
        return _Response(204, "")

    def close(self) -> None:
        self.client.close()  # type: ignore[no-untyped-call]


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed is not None else None


def dead_letter_reason(message: str) -> str:
    """A short label for the ``flowline_dead_letter_total{reason}`` metric from the server's message."""
    lowered = message.lower()
    for needle, reason in (
        ("field type conflict", "field_type_conflict"),
        ("beyond retention", "out_of_range"),
        ("time outside range", "out_of_range"),
        ("out of range", "out_of_range"),
        ("unable to parse", "parse_error"),
        ("invalid field", "invalid_name"),
        ("invalid tag", "invalid_name"),
        ("too large", "too_large"),
    ):
        if needle in lowered:
            return reason
    return "bad_request"


class _Rejected(Exception):
    """The server refused the request's content (400/413): bisect it."""

    def __init__(self, response: _Response) -> None:
        super().__init__(response.message)
        self.response = response


class HistorianWriter:
    """Write `Point`s to InfluxDB. Build with `from_config` in services, or directly in tests."""

    def __init__(
        self,
        conn: Connection,
        *,
        api: Api = "v1",
        org: str | None = None,
        bucket: str | None = None,
        precision: Precision = "ns",
        batch_max_points: int = 10_000,
        batch_max_bytes: int = 8 << 20,
        gzip: bool = True,
        retry_deadline_s: float = 60.0,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 10.0,
        dead_letter: DeadLetterFile | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if precision not in _PRECISION_DIVISOR:
            raise ValueError(f"precision must be one of s, ms, ns (not {precision!r})")
        self.conn = conn
        self.precision: Precision = precision
        self.batch_max_points = batch_max_points
        self.batch_max_bytes = batch_max_bytes
        self.retry_deadline_s = retry_deadline_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.dead_letter = dead_letter
        self.metrics = metrics
        self._closed = threading.Event()
        self._poster = ThreadPoolExecutor(max_workers=1, thread_name_prefix="historian-post")
        self._transport: _Transport
        if api == "v2":
            if not (org and bucket):
                raise ValueError("the v2 API needs 'org' and 'bucket'")
            self._transport = _V2Transport(conn, org, bucket, precision, gzip)
        else:
            self._transport = _V1Transport(conn, precision, gzip)

    @classmethod
    def from_config(
        cls,
        config: HistorianConfig,
        *,
        dead_letter_path: str | Path | None = None,
        metrics: Metrics | None = None,
    ) -> HistorianWriter:
        """``dead_letter_path`` is used when the config names no ``dead_letter_file``."""
        path = config.dead_letter_file or dead_letter_path
        return cls(
            Connection.from_config(config),
            api=config.api,
            org=config.org,
            bucket=config.bucket,
            precision=config.precision,
            batch_max_points=config.batch_max_points,
            batch_max_bytes=config.batch_max_bytes,
            gzip=config.gzip,
            retry_deadline_s=config.retry_deadline_s,
            dead_letter=DeadLetterFile(path, config.dead_letter_max_bytes) if path is not None else None,
            metrics=metrics,
        )

    # --- public API ------------------------------------------------------------------------------

    def write(self, points: Sequence[Point]) -> WriteResult:
        """Write all points or raise; returns how many were written and how many dead-lettered.

        Raises `HistorianAuthError`, `HistorianNotFoundError` or `HistorianUnavailableError`; then
        the caller keeps (and later replays) the whole input: replays are idempotent.
        """
        return self._pipeline(self._encoded(points))

    def write_lines(self, lines: Sequence[str]) -> WriteResult:
        """Write already-encoded lines (one point each, no trailing newline) at this writer's precision."""
        return self._pipeline((batch, 0) for batch in self._batches(lines))

    def check(self) -> None:
        """One empty write, no retry: proves InfluxDB is reachable, the credential is accepted with
        write access and the database exists, without writing anything (1.x answers 204).

        Raises `HistorianAuthError`, `HistorianNotFoundError`, or `HistorianUnavailableError`
        (network error, 5xx). On the v2 API the client library may send nothing for an empty write,
        so there this proves less.
        """
        response = self._transport.post(b"")
        if response.status // 100 == 2:
            return
        self._count_error(response.status)
        raise_for_access(self.conn, response.status, response.message, "write")
        what = f"answered {response.status}" if response.status else "is not reachable"
        raise HistorianUnavailableError(f"InfluxDB at {self.conn.url} {what} ({response.message or 'no message'})")

    def close(self) -> None:
        """Abort any back-off sleep (the pending write raises `HistorianUnavailableError`) and disconnect."""
        self._closed.set()
        self._poster.shutdown(wait=True, cancel_futures=True)
        self._transport.close()

    def __enter__(self) -> HistorianWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -------------------------------------------------------------------------------

    def _encoded(self, points: Sequence[Point]) -> Iterator[tuple[Sequence[str], int]]:
        """(lines of one request, points refused while encoding them), one batch at a time."""
        divisor = _PRECISION_DIVISOR[self.precision]
        for start in range(0, len(points), self.batch_max_points):
            lines: list[str] = []
            refused = 0
            for point in points[start : start + self.batch_max_points]:
                try:
                    ts = point.timestamp_ns if divisor == 1 else point.timestamp_ns // divisor
                    lines.append(encode_line(point.measurement, point.tags, point.fields, ts))
                except (LineProtocolError, TypeError) as exc:  # TypeError: a malformed timestamp
                    refused += 1
                    self._dead_letter(repr(point.to_wire()), "unrepresentable", str(exc), None)
            batches = list(self._batches(lines)) or [[]]
            yield batches[0], refused
            for batch in batches[1:]:
                yield batch, 0

    def _pipeline(self, batches: Iterable[tuple[Sequence[str], int]]) -> WriteResult:
        """Post batch k on the poster thread while this thread encodes batch k+1 (one request at a time).

        Encoding is CPU work and posting mostly waits on InfluxDB, so overlapping them raises throughput.
        """
        deadline = time.monotonic() + self.retry_deadline_s
        result = WriteResult()
        outstanding: list[Future[WriteResult]] = []
        try:
            for lines, refused in batches:
                result += WriteResult(dead_lettered=refused)
                if lines:
                    outstanding.append(self._poster.submit(self._write_batch, lines, deadline))
                while len(outstanding) > 1:
                    result += outstanding.pop(0).result()
            while outstanding:
                result += outstanding.pop(0).result()
        except BaseException:
            for future in outstanding:  # a later batch may still be in flight: let it finish first
                if not future.cancel():
                    wait([future])
            raise
        return result

    def _batches(self, lines: Sequence[str]) -> Iterator[Sequence[str]]:
        start, size = 0, 0
        for i, line in enumerate(lines):
            length = len(line) + 1  # bytes >= chars; a close bound is enough for batching
            if i > start and (i - start >= self.batch_max_points or size + length > self.batch_max_bytes):
                yield lines[start:i]
                start, size = i, 0
            size += length
        if start < len(lines):
            yield lines[start:]

    def _write_batch(self, lines: Sequence[str], deadline: float) -> WriteResult:
        try:
            body = ("\n".join(lines) + "\n").encode("utf-8")
        except UnicodeEncodeError:
            return self._write_encodable(lines, deadline)
        try:
            requests_made = self._post(body, deadline)
        except _Rejected as rejected:
            response = rejected.response
            dropped = _DROPPED.search(response.message)
            if len(lines) == 1 or (dropped is not None and int(dropped.group(1)) == len(lines)):
                # Every point of the request was refused (e.g. all of one wrong type): no need to bisect.
                reason = dead_letter_reason(response.message)
                for line in lines:
                    self._dead_letter(line, reason, response.message, response.status)
                return WriteResult(dead_lettered=len(lines), requests=1)
            mid = len(lines) // 2
            return (
                WriteResult(requests=1)
                + self._write_batch(lines[:mid], deadline)
                + self._write_batch(lines[mid:], deadline)
            )
        if self.metrics is not None:
            self.metrics.inc("points_out_total", len(lines))
            self.metrics.inc("batches_total")
        return WriteResult(written=len(lines), requests=requests_made)

    def _write_encodable(self, lines: Sequence[str], deadline: float) -> WriteResult:
        """Dead-letter lines that are not valid Unicode (lone surrogates from JSON), write the rest."""
        good: list[str] = []
        for line in lines:
            try:
                line.encode("utf-8")
            except UnicodeEncodeError as exc:
                self._dead_letter(line.encode("utf-8", "backslashreplace").decode(), "unrepresentable", str(exc), None)
            else:
                good.append(line)
        result = WriteResult(dead_lettered=len(lines) - len(good))
        return result + self._write_batch(good, deadline) if good else result

    def _post(self, body: bytes, deadline: float) -> int:
        """Send one request until it succeeds; return the number of attempts."""
        attempt = 0
        while True:
            if self._closed.is_set():
                raise HistorianUnavailableError("historian writer was closed while a write was pending")
            response = self._transport.post(body)
            attempt += 1
            if response.status // 100 == 2:
                return attempt
            self._count_error(response.status)
            raise_for_access(self.conn, response.status, response.message, "write")
            if response.status in (400, 413):
                raise _Rejected(response)
            if response.status and response.status not in _RETRY_STATUSES:
                raise HistorianUnavailableError(
                    f"InfluxDB at {self.conn.url} answered {response.status}: {response.message}"
                )
            delay = random.uniform(0, min(self.backoff_max_s, self.backoff_initial_s * 2 ** (attempt - 1)))
            if response.retry_after_s is not None:
                delay = max(delay, response.retry_after_s)
            if time.monotonic() + delay > deadline:
                what = f"answered {response.status}" if response.status else "unreachable"
                raise HistorianUnavailableError(
                    f"InfluxDB at {self.conn.url} {what} ({response.message}); gave up after "
                    f"{attempt} attempts within the {self.retry_deadline_s:g}s retry deadline"
                )
            self._closed.wait(delay)

    def _count_error(self, status: int) -> None:
        if self.metrics is not None:
            self.metrics.inc("write_errors_total", status=str(status) if status else "network")

    def _dead_letter(self, line: str, reason: str, message: str, status: int | None) -> None:
        if self.metrics is not None:
            self.metrics.inc("dead_letter_total", reason=reason)
        if self.dead_letter is not None:
            self.dead_letter.add(reason, message, where="influxdb", line=line, status=status)
        else:
            log.warning("dropped a point InfluxDB refused (%s: %s): %.300s", reason, message, line)
