"""OPC UA collector (asyncua): subscriptions, secure sessions, self-healing, backfill.

One `ServerSession` per configured server keeps a session alive for as long as the collector runs:
connect (security + trust list), resolve node ids (browse paths are re-resolved on every connect,
so a PLC download that renumbers nodes does not break collection), create one subscription with
monitored items in batches of the server's ``MaxMonitoredItemsPerCall``, then wait until the
keep-alive watchdog reports the session dead; reconnect with exponential back-off and jitter, and
read the outage gap back with HistoryRead (points tagged ``origin=backfill``).

Notifications are converted on the event loop straight from asyncua's publish callback (no task per
value, no iterator queue that silently drops) and handed to the collector's own bounded queue, whose
overflow is counted (``flowline_dropped_total``) and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.node import Node
from asyncua.common.subscription import DataChangeEvent, DataChangeNotif, SubEvent, Subscription
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError, UaStatusCodeError

from flowline.collectors import opcua_deadband
from flowline.collectors.common import CollectorRuntime, Rejected, check_timestamp, check_type
from flowline.collectors.opcua_security import OpcUaSecurityError, apply_security, offered_endpoints
from flowline.core.config import FlowlineConfig, OpcUaCollectorConfig, OpcUaEndpoint
from flowline.core.errors import FlowlineError
from flowline.core.points import FieldValue, Point, Quality, TagRef, telemetry_point
from flowline.inventory import OpcUaSource, Site

log = logging.getLogger(__name__)

MAX_MONITORED_ITEMS_PER_CALL = ua.NodeId(ua.Int32(11714))  # Server_ServerCapabilities_OperationLimits_...
DEFAULT_ITEMS_PER_CALL = 1000
BACKFILL_CONCURRENCY = 16
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_SCALARS = (bool, int, float, str)
_CERT_REFUSALS = {
    StatusCodes.BadCertificateUntrusted,
    StatusCodes.BadCertificateInvalid,
    StatusCodes.BadCertificateUriInvalid,
    StatusCodes.BadSecurityChecksFailed,
}
# read results that mean the node cannot be polled at all (not a bad value to store)
_UNREADABLE = {
    StatusCodes.BadNodeIdUnknown,
    StatusCodes.BadNodeIdInvalid,
    StatusCodes.BadAttributeIdInvalid,
    StatusCodes.BadNotReadable,
}
# the server will not talk with our security policy/mode: a configuration error, not an outage
_MODE_REFUSALS = {StatusCodes.BadSecurityModeRejected, StatusCodes.BadSecurityPolicyRejected}
_USER_REFUSALS = {
    StatusCodes.BadUserAccessDenied,
    StatusCodes.BadIdentityTokenInvalid,
    StatusCodes.BadIdentityTokenRejected,
}


class OpcUaCollectorError(FlowlineError):
    """The OPC UA collector cannot start (missing config section, unknown server names)."""


@dataclass
class MonitoredTag:
    ref: TagRef
    source: OpcUaSource
    node_id: ua.NodeId | None = None
    last_ts_ns: int | None = None  # newest live sample spooled, the start of a backfill
    resumed_ts_ns: int | None = None  # first live sample after a reconnect, the end of a backfill
    # Newest sample a backfill stored. A live notification that arrives only after the backfill
    # ran (a slow server or host) repeats such a sample; it is dropped, not stored twice.
    backfilled_to_ns: int | None = None
    live_since_reconnect: bool = False  # any live notification since the last (re)subscription


def _to_ns(value: dt.datetime | None) -> int | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    delta = value - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def _scalar(value: Any) -> FieldValue:
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, dt.datetime):
        return (_to_ns(value) or 0) / 1e9  # DateTime values become epoch seconds
    raise Rejected("wrong_type", f"value of type {type(value).__name__} is not supported")


class ValueConverter:
    """DataValue -> telemetry points, per the config's timestamp, array and window settings."""

    def __init__(self, cfg: OpcUaCollectorConfig) -> None:
        self.cfg = cfg

    def timestamp(self, dv: ua.DataValue) -> int:
        if self.cfg.timestamp == "collector":
            return time.time_ns()
        first, second = (
            (dv.SourceTimestamp, dv.ServerTimestamp)
            if self.cfg.timestamp == "source"
            else (dv.ServerTimestamp, dv.SourceTimestamp)
        )
        ts = _to_ns(first) or _to_ns(second) or time.time_ns()
        return check_timestamp(ts, self.cfg.timestamp_window_s)

    def points(self, ref: TagRef, dv: ua.DataValue, origin: str | None = None) -> list[Point]:
        status = dv.StatusCode.value if dv.StatusCode is not None else 0
        quality = Quality.from_status_code(status)
        ts = self.timestamp(dv)
        if origin is not None:
            ref = dataclasses.replace(ref, extra={**ref.extra, "origin": origin})
        code = status or None
        value = dv.Value.Value if dv.Value is not None else None
        if value is None:
            # a bad value often carries no value at all: store the status so the gap is explained
            return [telemetry_point(ref, "", ts, Quality.BAD if quality is Quality.GOOD else quality, status)]
        if isinstance(value, list):
            if self.cfg.arrays == "reject":
                raise Rejected("array_rejected", f"array of {len(value)} values (config arrays: reject)")
            return [
                telemetry_point(
                    dataclasses.replace(ref, extra={**ref.extra, "index": str(i)}),
                    check_type(ref, _scalar(v)),
                    ts,
                    quality,
                    code,
                )
                for i, v in enumerate(value)
            ]
        return [telemetry_point(ref, check_type(ref, _scalar(value)), ts, quality, code)]


class ServerSession:
    """Keeps one OPC UA server's session and subscription alive; see the module docstring."""

    def __init__(
        self, name: str, endpoint: OpcUaEndpoint, tags: list[MonitoredTag], cfg: OpcUaCollectorConfig,
        runtime: CollectorRuntime, rejected_dir: Any,
    ) -> None:  # fmt: skip
        self.name = name
        self.endpoint = endpoint
        self.tags = tags
        self.cfg = cfg
        self.runtime = runtime
        self.metrics = runtime.metrics
        self.rejected_dir = rejected_dir
        self.converter = ValueConverter(cfg)
        self.target = endpoint.url
        self.connected = asyncio.Event()
        self.last_error: Exception | None = None
        self.connections = 0
        self._by_handle: dict[int, MonitoredTag] = {}
        self._pending: list[Point] = []
        self._flush_scheduled = False
        self._history_supported = True
        self._poll_task: asyncio.Task[None] | None = None  # referenced so the loop cannot drop it
        # Values refused while the spool could not store them: tag -> backfill start (exclusive), read
        # back by HistoryRead once the spool takes data again (docs/spool.md, full-spool policy).
        self._by_ref = {(t.ref.asset, t.ref.tag): t for t in tags}
        self._refused_from: dict[int, int] = {}
        self._refused_until: dict[int, int] = {}  # first value stored again, per refused tag
        self._client: Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._refusal_backfill: asyncio.Task[None] | None = None
        runtime.sink.on_accepting(self._spool_accepting)
        self._told: str | None = None  # the failure last logged, not repeated until something changes
        self._failures_seen = 0.0  # connect failures counted before the last successful connect

    def _tell(self, level: int, message: str) -> None:
        """One line per event: a retry that fails the same way again is logged at DEBUG only."""
        log.log(level if message != self._told else logging.DEBUG, "%s", message)
        self._told = message

    # --- main loop -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        delay = self.cfg.reconnect_min_s
        self._loop = asyncio.get_running_loop()
        while not stop.is_set():
            lost = asyncio.Event()
            client = Client(
                self.endpoint.url,
                timeout=self.cfg.keepalive_timeout_s,
                watchdog_intervall=self.cfg.keepalive_timeout_s / 2,
            )
            self.metrics.inc("connect_attempts_total", target=self.target)
            misconfigured = False  # a configuration error is its one ERROR line: the retries are not news
            try:
                await self._connect(client, lost)
                delay = self.cfg.reconnect_min_s
                self._told = None
                self._failures_seen = self.metrics.counter("connect_failures_total", target=self.target)
                await _wait_any(stop, lost)
                if not stop.is_set():
                    log.warning("OPC UA session to %s (%s) lost; reconnecting", self.name, self.target)
            except OpcUaSecurityError as exc:
                misconfigured = True
                self._failed(exc)
                self._tell(logging.ERROR, str(exc))
            except (TimeoutError, OSError, UaError, ConnectionError) as exc:
                self._failed(exc)
                self._tell(
                    logging.WARNING,
                    f"OPC UA server {self.name} ({self.target}) unavailable: {type(exc).__name__}: {exc}".rstrip(": ")
                    + f"; retrying with back-off ({self.cfg.reconnect_min_s:g} to {self.cfg.reconnect_max_s:g} s)",
                )
            except Exception as exc:
                self._failed(exc)
                log.exception("OPC UA session to %s (%s) failed", self.name, self.target)
            finally:
                self._client = None
                self.connected.clear()
                self.metrics.set("connected", 0, target=self.target)
                self._flush()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.disconnect(), timeout=2)
            if stop.is_set():
                return
            # full jitter: replicas restarting together do not hammer the server in lock-step
            wait = random.uniform(delay / 2, delay)
            attempts = self.metrics.counter("connect_attempts_total", target=self.target)
            # The first retry of an outage is a WARNING; later ones, and those after a configuration
            # error (logged once at ERROR), are DEBUG (one line per event): the status file and the
            # periodic status line keep counting the attempts.
            failures_in_a_row = self.metrics.counter("connect_failures_total", target=self.target) - self._failures_seen
            log.log(
                logging.WARNING if failures_in_a_row <= 1 and not misconfigured else logging.DEBUG,
                "OPC UA %s (%s): retrying in %.1f s (back-off up to %g s; attempt %d failed)",
                self.name, self.target, wait, self.cfg.reconnect_max_s, attempts,
            )  # fmt: skip
            await _sleep_or_stop(stop, wait)
            delay = min(delay * 2, self.cfg.reconnect_max_s)

    def _failed(self, exc: Exception) -> None:
        """Keep and count why the session failed or ended; the status file shows it on the link."""
        self.last_error = exc
        if not self.connected.is_set():
            self.metrics.inc("connect_failures_total", target=self.target)
        self.runtime.status.connected(self.target, "source", False, error=f"{type(exc).__name__}: {exc}"[:300])

    async def _connect(self, client: Client, lost: asyncio.Event) -> None:
        await apply_security(client, self.endpoint, self.name, self.rejected_dir, self.cfg.keepalive_timeout_s)

        async def on_lost(exc: Exception) -> None:
            lost.set()

        client.connection_lost_callback = on_lost
        try:
            await client.connect()
        except AssertionError as exc:
            # asyncua's open_secure_channel asserts on the server's error reply instead of raising it
            raise self._refused("refused the secure channel") from exc
        except UaStatusCodeError as exc:
            if exc.code in _MODE_REFUSALS:
                raise await self._mismatch(type(exc).__name__) from exc
            if exc.code in _CERT_REFUSALS:
                raise self._refused(f"refused the session ({type(exc).__name__})") from exc
            if exc.code in _USER_REFUSALS:
                raise OpcUaSecurityError(
                    f"OPC UA server {self.name!r} ({self.target}) rejected user {self.endpoint.username!r}: "
                    f"{type(exc).__name__}; check servers.{self.name}.username and password"
                ) from exc
            raise
        except UaError as exc:
            # asyncua's own check after CreateSession: the server has no endpoint for our policy and mode
            if str(exc).startswith("No matching endpoints"):
                raise await self._mismatch("no matching endpoint") from exc
            raise
        self.connections += 1
        if self.connections > 1:
            self.metrics.inc("reconnects_total", target=self.target)
        self.metrics.set("connected", 1, target=self.target)
        outage_end = time.time_ns()
        gap_start = {id(t): t.last_ts_ns for t in self.tags}
        for tag in self.tags:
            tag.resumed_ts_ns = None
            tag.backfilled_to_ns = None
            tag.live_since_reconnect = False
        await self._resolve(client)
        await self._subscribe(client)
        self._client = client
        self.connected.set()
        sec = self.endpoint.security
        log.info(
            "connected to OPC UA server %s (%s, security %s/%s): %d monitored items",
            self.name, self.target, sec.policy, sec.mode, len(self._by_handle),
        )  # fmt: skip
        if self.connections > 1 and self.cfg.history_backfill:
            await self._await_first_live([t for t in self.tags if gap_start.get(id(t)) is not None])
            await self._backfill(client, gap_start, outage_end)

    async def _await_first_live(self, tags: list[MonitoredTag]) -> None:
        """Wait for each tag's first live value after a gap: it is where the tag's backfill must stop.

        A fixed pause is not enough on a loaded host: a backfill read before the first notification
        arrived would read up to "now" and store that value twice (once as backfill). The server
        sends every new monitored item's current value, so the wait ends quickly; it is bounded for
        items that never report (their backfill then ends at the reconnect).
        """
        interval_s = self.cfg.publishing_interval_ms / 1000
        await asyncio.sleep(2 * interval_s)
        for _ in range(int(max(5.0, 10 * interval_s) / 0.05)):  # polled: set by the notification path
            if all(t.live_since_reconnect for t in tags):
                return
            await asyncio.sleep(0.05)

    async def _mismatch(self, refusal: str) -> OpcUaSecurityError:
        """A configuration error naming the settings, and what the server offers instead."""
        sec = self.endpoint.security
        try:
            offers = ", ".join(await offered_endpoints(self.target, self.cfg.keepalive_timeout_s))
        except (TimeoutError, OSError, UaError) as exc:
            offers = f"(cannot list its endpoints: {exc!r})"
        return OpcUaSecurityError(
            f"configuration error: OPC UA server {self.name!r} ({self.target}) does not accept security policy "
            f"{sec.policy} with mode {sec.mode} ({refusal}); it offers {offers}. Set "
            f"collectors.opcua.servers.{self.name}.security.policy and .mode to one of those"
        )

    def _refused(self, what: str) -> OpcUaSecurityError:
        return OpcUaSecurityError(
            f"OPC UA server {self.name!r} ({self.target}) {what}: it does not trust our client certificate "
            f"{self.endpoint.security.cert_file} (add it, or its CA, to the server's trust list), or the "
            f"certificate's SAN URI differs from security.application_uri "
            f"({self.endpoint.security.application_uri})"
        )

    # --- address space ---------------------------------------------------------------------------

    async def _resolve(self, client: Client) -> None:
        by_path = [t for t in self.tags if t.source.browse_path]
        for tag in self.tags:
            tag.node_id = ua.NodeId.from_string(tag.source.node) if tag.source.node else None
        if by_path:
            paths = [t.source.browse_path.split("/") for t in by_path if t.source.browse_path]
            found = await client.nodes.root.get_children_by_path(paths, raise_on_partial_error=False)
            for tag, nodes in zip(by_path, found, strict=True):
                if nodes and nodes[0] is not None:
                    tag.node_id = nodes[0].nodeid
        for tag in self.tags:
            if tag.node_id is None:
                self.runtime.rejects.reject(
                    "unknown_node", f"server {self.name}", f"{tag.ref.asset}/{tag.ref.tag}: browse path "
                    f"{tag.source.browse_path!r} not found on the server"
                )  # fmt: skip

    async def _items_per_call(self, client: Client) -> int:
        try:
            limit = await client.get_node(MAX_MONITORED_ITEMS_PER_CALL).read_value()
        except UaError:
            return DEFAULT_ITEMS_PER_CALL
        return int(limit) if limit else DEFAULT_ITEMS_PER_CALL

    def _request(self, handle: int, tag: MonitoredTag, deadband: bool = True) -> ua.MonitoredItemCreateRequest:
        src = tag.source
        params = ua.MonitoringParameters()
        params.ClientHandle = handle
        params.SamplingInterval = src.sampling_ms if src.sampling_ms is not None else self.cfg.sampling_interval_ms
        params.QueueSize = self.cfg.queue_size
        params.DiscardOldest = True
        data_change_filter = opcua_deadband.deadband_filter(src) if deadband else None
        if data_change_filter is not None:
            params.Filter = data_change_filter
        request = ua.MonitoredItemCreateRequest()
        request.ItemToMonitor = ua.ReadValueId(NodeId=tag.node_id, AttributeId=AttributeIds.Value)
        request.MonitoringMode = ua.MonitoringMode.Reporting
        request.RequestedParameters = params
        return request

    async def _subscribe(self, client: Client) -> None:
        keepalive = max(1, int(self.cfg.keepalive_timeout_s * 1000 / self.cfg.publishing_interval_ms / 2))
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=self.cfg.publishing_interval_ms,
            RequestedLifetimeCount=keepalive * 3,
            RequestedMaxKeepAliveCount=keepalive,
            MaxNotificationsPerPublish=0,  # no limit: large item counts need big publish responses
            PublishingEnabled=True,
            Priority=0,
        )
        sub = await client.create_subscription(params, _Handler(self))
        # Deliver straight from the publish callback instead of one asyncio task per notification (the
        # handler path stays as the fallback if asyncua stops routing through `_deliver`).
        sub._deliver = self._on_event  # type: ignore[method-assign]
        self._by_handle = {}
        monitored = [t for t in self.tags if t.node_id is not None and not t.source.poll]
        per_call = await self._items_per_call(client)
        opcua_deadband.warn_without_eurange(
            self.metrics, self.name, await opcua_deadband.without_eurange(client, monitored, per_call)
        )
        for start in range(0, len(monitored), per_call):
            await self._create_items(sub, list(enumerate(monitored[start : start + per_call], start + 1)))
        polled = [t for t in self.tags if t.node_id is not None and t.source.poll]
        if polled:
            self._poll_task = asyncio.get_running_loop().create_task(self._poll(client, sub, polled))

    async def _create_items(
        self, sub: Subscription, items: list[tuple[int, MonitoredTag]], deadband: bool = True
    ) -> None:
        """Create (handle, tag) items; those whose deadband filter is refused are re-created without it."""
        self._by_handle.update(items)
        requests = [self._request(handle, tag, deadband) for handle, tag in items]
        results = await sub.create_monitored_items(requests)
        refused: dict[str, list[tuple[int, MonitoredTag]]] = {}  # by status name
        for (handle, tag), request, result in zip(items, requests, results, strict=True):
            if not isinstance(result, ua.StatusCode):
                continue
            if result.value in opcua_deadband.FILTER_REFUSALS and isinstance(
                request.RequestedParameters.Filter, ua.DataChangeFilter
            ):
                refused.setdefault(result.name, []).append((handle, tag))
                continue
            self._by_handle.pop(handle, None)
            self.runtime.rejects.reject(
                "unknown_node", f"server {self.name} node {tag.node_id.to_string() if tag.node_id else '?'}",
                f"{tag.ref.asset}/{tag.ref.tag}: cannot monitor: {result.name}",
            )  # fmt: skip
        for status, again in refused.items():
            opcua_deadband.refused(self.metrics, self.name, status, [tag for _, tag in again])
            await self._create_items(sub, again, deadband=False)

    async def _poll(self, client: Client, sub: Subscription, tags: list[MonitoredTag]) -> None:
        """Tags that ask for polling are read at their sampling interval while this session lives.

        One Read request per round that does not raise on bad statuses: a bad value is stored like a
        subscribed one, and a node the server cannot read is rejected once and left out, so neither
        ends polling for the other tags.
        """
        interval = min((t.source.sampling_ms or self.cfg.sampling_interval_ms) for t in tags) / 1000
        nodes = [(t, client.get_node(t.node_id)) for t in tags if t.node_id is not None]
        while nodes and self.connected.is_set() and not sub.is_deleted:
            try:
                values = await client.read_attributes([n for _, n in nodes])
            except (TimeoutError, UaError, OSError):
                return  # the session is failing: the keep-alive watchdog reconnects and polling restarts
            readable = []
            for (tag, node), dv in zip(nodes, values, strict=True):
                if dv.StatusCode is not None and dv.StatusCode.value in _UNREADABLE:
                    self._reject(tag, dv, Rejected("unknown_node", f"cannot poll: {dv.StatusCode.name}"))
                else:
                    readable.append((tag, node))
                    self._accept(tag, dv)
            nodes = readable
            self._schedule_flush()
            await asyncio.sleep(max(interval, 0.05))

    # --- notifications -------------------------------------------------------------------------

    def _on_event(self, event: SubEvent) -> None:
        if not isinstance(event, DataChangeEvent):
            return
        tag = self._by_handle.get(event.data.monitored_item.ClientHandle)
        if tag is not None:
            self._accept(tag, event.data.monitored_item.Value)
            self._schedule_flush()

    def _accept(self, tag: MonitoredTag, dv: ua.DataValue, origin: str | None = None) -> None:
        try:
            points = self.converter.points(tag.ref, dv, origin)
        except Rejected as exc:
            self._reject(tag, dv, exc)
            return
        except (TypeError, ValueError, OverflowError) as exc:
            # anything unforeseen in one value must not lose the rest of its publish response
            self._reject(tag, dv, Rejected("wrong_type", f"cannot convert: {type(exc).__name__}: {exc}"))
            return
        repeated = tag.backfilled_to_ns is not None and (_to_ns(dv.SourceTimestamp) or 0) <= tag.backfilled_to_ns
        if origin is None and repeated:
            self.metrics.inc("backfill_overlap_total", server=self.name)
            return
        if dv.StatusCode is not None and Quality.from_status_code(dv.StatusCode.value) is Quality.BAD:
            # stored (quality 2, the raw code in `status`) and counted: data that explains a gap, not a reject
            self.metrics.inc("bad_status_total", len(points), server=self.name)
        if origin is None:
            tag.live_since_reconnect = True
        if origin is None and dv.SourceTimestamp is not None:
            # only the server's own sample times bound a HistoryRead (not a shutdown notice's local time)
            tag.last_ts_ns = max(tag.last_ts_ns or 0, points[0].timestamp_ns)
            if tag.resumed_ts_ns is None:
                tag.resumed_ts_ns = points[0].timestamp_ns
        self._pending.extend(points)

    def _reject(self, tag: MonitoredTag, dv: ua.DataValue, exc: Rejected) -> None:
        where = f"server {self.name} node {tag.node_id.to_string() if tag.node_id else '?'}"
        self.runtime.rejects.reject(exc.reason, where, f"{tag.ref.asset}/{tag.ref.tag}: {exc}", repr(dv).encode())

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._pending:
            points, self._pending = self._pending, []
            self.runtime.status.ok(self.target, "source")
            if self.runtime.sink.try_submit(points):
                if self._refused_from:
                    self._note_resumed(points)
            elif not self.runtime.sink.accepting:
                self._note_refused(points)

    def _note_refused(self, points: list[Point]) -> None:
        for point in points:
            tag = self._by_ref.get((point.tags.get("asset", ""), point.tags.get("tag", "")))
            if tag is not None:
                start = self._refused_from.get(id(tag), point.timestamp_ns)
                self._refused_from[id(tag)] = min(start, point.timestamp_ns - 1)

    def _note_resumed(self, points: list[Point]) -> None:
        """The first value of a refused tag stored again ends its backfill (no duplicates)."""
        for point in points:
            tag = self._by_ref.get((point.tags.get("asset", ""), point.tags.get("tag", "")))
            if tag is not None and id(tag) in self._refused_from and id(tag) not in self._refused_until:
                self._refused_until[id(tag)] = point.timestamp_ns

    def _spool_accepting(self) -> None:
        """Runs on the spool's writer thread when it takes data again: read back what was refused."""
        if self._refused_from and self._loop is not None:
            self._loop.call_soon_threadsafe(self._start_refusal_backfill)

    def _start_refusal_backfill(self) -> None:
        if self._refusal_backfill is None or self._refusal_backfill.done():
            self._refusal_backfill = asyncio.get_running_loop().create_task(self._backfill_refused())

    async def _backfill_refused(self) -> None:
        client = self._client
        if client is None or not self.cfg.history_backfill:
            if not self.cfg.history_backfill:
                log.warning("OPC UA %s: values refused while the spool was full are lost (no backfill)", self.name)
                self._refused_from.clear()
                self._refused_until.clear()
            return  # not connected: the reconnect's own backfill covers the gap from the last spooled value
        # the first live notifications after the refusal mark where the backfill must stop
        await asyncio.sleep(2 * self.cfg.publishing_interval_ms / 1000)
        gap_start: dict[int, int | None] = dict(self._refused_from)
        outage_end = time.time_ns()
        for tag in self.tags:
            if id(tag) in gap_start:
                tag.resumed_ts_ns = self._refused_until.get(id(tag))
        self._refused_from.clear()
        self._refused_until.clear()
        log.info("OPC UA %s: reading back %d tags' values refused while the spool was full", self.name, len(gap_start))
        await self._backfill(client, gap_start, outage_end)

    # --- backfill ------------------------------------------------------------------------------

    async def _backfill(self, client: Client, gap_start: dict[int, int | None], outage_end: int) -> None:
        """Read what each tag recorded between its last spooled sample and its first live one."""
        gaps = [t for t in self._by_handle.values() if gap_start.get(id(t)) is not None and t.node_id is not None]
        if not gaps or not self._history_supported:
            return
        limiter = asyncio.Semaphore(BACKFILL_CONCURRENCY)

        async def one(tag: MonitoredTag) -> int:
            start_ns = gap_start[id(tag)] or 0
            assert tag.node_id is not None
            async with limiter:
                values = await client.get_node(tag.node_id).read_raw_history(
                    dt.datetime.fromtimestamp(start_ns / 1e9, dt.UTC),
                    dt.datetime.fromtimestamp((tag.resumed_ts_ns or outage_end) / 1e9, dt.UTC),
                    return_bounds=False,
                )
            # Bounded again after the read: a live value that arrived meanwhile is already stored.
            end_ns = tag.resumed_ts_ns or outage_end
            fresh = [dv for dv in values if start_ns < (_to_ns(dv.SourceTimestamp) or 0) < end_ns]
            for dv in fresh:
                self._accept(tag, dv, origin="backfill")
            if fresh:
                newest = max(_to_ns(dv.SourceTimestamp) or 0 for dv in fresh)
                tag.backfilled_to_ns = max(tag.backfilled_to_ns or 0, newest)
            return len(fresh)

        results = await asyncio.gather(*(one(t) for t in gaps), return_exceptions=True)
        self._flush()
        failures = [r for r in results if isinstance(r, BaseException)]
        read = sum(r for r in results if isinstance(r, int))
        if failures:
            codes = {getattr(f, "code", None) for f in failures}
            if StatusCodes.BadHistoryOperationUnsupported in codes:
                self._history_supported = False
            log.warning("backfill from %s: %d of %d tags failed (%r)", self.name, len(failures), len(gaps), failures[0])
        log.info("backfill from %s: %d values for %d tags", self.name, read, len(gaps))
        self.metrics.inc("backfilled_total", read)


class _Handler:
    """asyncua callback-mode handler (see `ServerSession._subscribe` for the faster direct path)."""

    def __init__(self, session: ServerSession) -> None:
        self.session = session

    def datachange_notification(self, node: Node, val: Any, data: DataChangeNotif) -> None:
        self.session._on_event(DataChangeEvent(node=node, value=val, data=data))


class _OneLine(logging.Handler):
    """asyncua's records as one line each on our logger, at DEBUG and without their tracebacks.

    asyncua logs a 25-line traceback for every refused secure channel, a "Publish iteration crashed"
    traceback on every server death and a session-timeout warning on every connect: events the
    collector already reports in one line of its own (connected, lost, unavailable, refused). Only a
    crash in a callback of ours (asyncua says "callback") stays an error.
    """

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        text = record.getMessage() + (f" ({type(exc).__name__}: {exc})" if exc is not None else "")
        ours = record.levelno >= logging.ERROR and "callback" in text
        log.log(logging.ERROR if ours else logging.DEBUG, "asyncua: %s", text)


def quiet_asyncua() -> None:
    """Route asyncua's logging through `_OneLine` (idempotent)."""
    library = logging.getLogger("asyncua")
    library.setLevel(logging.WARNING)  # INFO formats every publish response
    library.propagate = False
    if not any(isinstance(h, _OneLine) for h in library.handlers):
        library.addHandler(_OneLine())


async def _wait_any(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


def monitored_tags(site: Site, server: str) -> list[MonitoredTag]:
    return [
        MonitoredTag(site.tag_ref(asset, tag), tag.source.opcua)
        for asset, tag in site.iter_tags("opcua")
        if tag.source.opcua is not None and tag.source.opcua.server == server
    ]


class OpcUaCollector:
    """All configured servers, on one asyncio loop; `run` until ``stop`` is set."""

    def __init__(self, config: FlowlineConfig) -> None:
        if config.collectors.opcua is None:
            raise OpcUaCollectorError("the config file has no collectors.opcua section")
        self.cfg = config.collectors.opcua
        self.runtime = CollectorRuntime(
            config, "opcua", self.cfg.batch_max_points, self.cfg.batch_max_latency_ms / 1000
        )
        self.metrics = self.runtime.metrics
        site_servers = {t.source.opcua.server for _, t in self.runtime.site.iter_tags("opcua") if t.source.opcua}
        missing = sorted(site_servers - set(self.cfg.servers))
        if missing:
            raise OpcUaCollectorError(
                f"the site file uses OPC UA servers {missing} that collectors.opcua.servers does not define"
            )
        rejected = config.data_dir / "pki" / "rejected"
        self.sessions = [
            ServerSession(name, ep, monitored_tags(self.runtime.site, name), self.cfg, self.runtime, rejected)
            for name, ep in self.cfg.servers.items()
        ]

    async def run(self, stop: asyncio.Event) -> None:
        self.runtime.start()
        try:
            await asyncio.gather(*(s.run(stop) for s in self.sessions))
        finally:
            await asyncio.to_thread(self.runtime.stop)


class OpcUaCollectorProcess:
    """`OpcUaCollector` on its own thread and event loop, with the start/stop shape the CLI uses."""

    def __init__(self, config: FlowlineConfig) -> None:
        self.collector = OpcUaCollector(config)
        self.metrics = self.collector.metrics
        self.status = self.collector.runtime.status
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._main, name="opcua-collector", daemon=True)

    def _main(self) -> None:
        self._loop.run_until_complete(self.collector.run(self._stop))

    def start(self) -> None:
        quiet_asyncua()
        self._thread.start()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()
