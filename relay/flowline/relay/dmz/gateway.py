"""DMZ gateway: a TLS 1.3 server that takes signed batches from OT senders and acks them once durable.

Each connection: TLS handshake with a mandatory client certificate from the configured CA, then
a stream of BATCH frames; every frame is verified (size, structure, HMAC with that sender's key,
certificate CN == sender id), passed to the `BatchAcceptor` on one worker thread (ordered, keeps
the event loop free for handshakes) and answered with a signed ACK carrying its sequence number.
Anything wrong closes that connection with a log line and a ``security_event``; other
connections carry on.

Under hostile traffic: at most ``max_connections`` connections and ``max_handshakes_per_source``
TLS handshakes in progress per peer address (more are closed at once, counted), a handshake
timeout, and security events rate-limited per (reason, sender, source) by the acceptor's
`EventLimiter`; the audit writes (fsync) run on the worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor

from flowline.core.config import FlowlineConfig, RelayDmzConfig
from flowline.core.metrics import Metrics, MetricsReporter
from flowline.core.spool import DISK_FULL, SpoolError, SpoolFullError, SpoolWriter
from flowline.core.status import ProcessStatus
from flowline.inventory import load_site
from flowline.relay.dmz.acceptor import BatchAcceptor
from flowline.relay.dmz.audit import LimitKey
from flowline.relay.frames import (
    LENGTH_PREFIX_BYTES,
    FrameError,
    FrameType,
    decode_frame,
    encode_frame,
    frame_length,
)
from flowline.relay.tls import peer_common_name, server_context

log = logging.getLogger("flowline.relay.dmz")


def load_sender_keys(cfg: RelayDmzConfig) -> dict[str, bytes]:
    return {sender: ref.read().encode() for sender, ref in cfg.sender_keys.items()}


def open_acceptor(config: FlowlineConfig, metrics: Metrics) -> BatchAcceptor:
    """The DMZ spool plus sequence/audit state under ``data_dir/relay-dmz``."""
    cfg = config.relay_dmz
    assert cfg is not None
    spool = SpoolWriter(
        config.spool_dir("dmz"),
        max_bytes=cfg.spool.max_bytes,
        segment_bytes=cfg.spool.segment_bytes,
        on_full=cfg.spool.on_full,
        fsync=cfg.spool.fsync,
    )
    return BatchAcceptor(
        load_site(config.site_file),
        spool,
        metrics,
        config.data_dir / "relay-dmz",
        cfg.max_body_bytes,
        event_interval_s=cfg.security_event_interval_s,
        audit_max_bytes=cfg.audit_max_bytes,
        audit_keep_files=cfg.audit_keep_files,
    )


class Gateway:
    def __init__(self, config: FlowlineConfig) -> None:
        if config.relay_dmz is None:
            raise ValueError("the config has no relay_dmz section")
        self.cfg = config.relay_dmz
        self.keys = load_sender_keys(self.cfg)
        self.ssl = server_context(self.cfg.tls)
        site = load_site(config.site_file)
        self.metrics = Metrics("relay-dmz", site.site, config.instance)
        self.acceptor = open_acceptor(config, self.metrics)
        self.reporter = MetricsReporter(self.metrics, self.acceptor.append_points, config.metrics_interval_s)
        # Sources are the OT senders (by certificate name); the DMZ spool's depth is what the writer owes.
        self.status = ProcessStatus(config.data_dir, "relay-dmz").watch(self.metrics, "source")
        self.status.spool("dmz", config.spool_dir("dmz"))
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="dmz-accept")
        self.port: int | None = None
        self._handshaking: dict[str, int] = {}  # peer address -> TLS handshakes in progress

    async def _handle(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        where = f"{peer[0]}:{peer[1]}"
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 16)
        protocol = asyncio.StreamReaderProtocol(reader)
        # The handshake runs on the accepted socket before any byte reaches a stream reader
        # (``StreamWriter.start_tls`` after ``start_server`` races with the ClientHello), and its
        # failure comes back here, where it becomes a security event.
        try:  # counted in `_accept` already, so a burst of connections cannot overtake the count
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, conn, ssl=self.ssl, ssl_handshake_timeout=self.cfg.handshake_timeout_s
            )
        except (ssl.SSLEOFError, ConnectionError) as exc:
            # A peer that hangs up before saying anything (port probe, load balancer check) is no attack;
            # counted, and logged at debug level only: a flood of them must not flood the log.
            log.debug("connection from %s closed during the TLS handshake (%s)", where, exc or type(exc).__name__)
            self.metrics.inc("handshakes_abandoned_total")
            conn.close()
            return
        except TimeoutError:
            self._record("handshake_timeout", "unknown", f"no TLS handshake from {where} within the timeout", peer[0])
            conn.close()
            return
        except (ssl.SSLError, OSError) as exc:
            message = f"TLS handshake with {where} failed: {getattr(exc, 'reason', None) or exc or type(exc).__name__}"
            self._record("bad_certificate", "unknown", message, peer[0])
            conn.close()
            return
        finally:
            left = self._handshaking[peer[0]] - 1
            if left:
                self._handshaking[peer[0]] = left
            else:
                del self._handshaking[peer[0]]
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        cn = peer_common_name(writer.get_extra_info("peercert"))
        sender = cn or "unknown"
        log.info("sender %s connected from %s", sender, where)
        self.metrics.inc("connections_total", sender=sender)
        self.status.connected(f"sender {sender}", "source", True)
        try:
            await self._serve(reader, writer, sender, where)
            self.status.connected(f"sender {sender}", "source", False, error="closed the connection")
        except FrameError as exc:
            self._record(exc.reason, sender, f"{exc} (from {where}); connection closed", peer[0])
            writer.close()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, ssl.SSLError) as exc:
            log.info("sender %s at %s disconnected: %s", sender, where, exc or type(exc).__name__)
            self.status.connected(f"sender {sender}", "source", False, error=f"{type(exc).__name__}: {exc}")
            writer.close()
        except (SpoolError, OSError) as exc:
            # Not acknowledged: the sender keeps the batch in its own spool and retries later. A plain
            # OSError (ENOSPC, EIO) comes from the sequence file or the audit log on the same disk.
            # One failed batch (one connection: it closes here) counts once by cause (spool_full_total
            # or spool_errors_total) and once in store_errors_total, the total of batches not stored.
            if isinstance(exc, SpoolFullError) or (isinstance(exc, OSError) and exc.errno in DISK_FULL):
                self.metrics.inc("spool_full_total", spool="dmz")
            else:
                self.metrics.inc("spool_errors_total", spool="dmz", error=type(exc).__name__)
            # Fail closed: a batch whose spool record, sequence or audit line cannot be written is
            # not acknowledged; the sender keeps it and retries (a replay if it was stored after all).
            log.error("cannot store batch from %s: %s; closing the connection without ack", sender, exc)
            self.metrics.inc("store_errors_total")
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cn: str, where: str) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                prefix = await asyncio.wait_for(reader.readexactly(LENGTH_PREFIX_BYTES), self.cfg.idle_timeout_s)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise FrameError("bad_frame", f"truncated length prefix ({len(exc.partial)} of 4 bytes)") from exc
                log.info("sender %s at %s closed the connection", cn, where)
                writer.close()
                return
            length = frame_length(prefix, self.cfg.max_frame_bytes)
            try:
                rest = await asyncio.wait_for(reader.readexactly(length), self.cfg.idle_timeout_s)
            except asyncio.IncompleteReadError as exc:
                raise FrameError("bad_frame", f"truncated frame: {len(exc.partial)} of {length} bytes") from exc
            frame = decode_frame(rest, self.keys.get)
            if frame.sender != cn:
                raise FrameError("bad_certificate", f"certificate CN {cn!r} may not send as {frame.sender!r}")
            if frame.type is not FrameType.BATCH:
                raise FrameError("bad_frame", f"unexpected {frame.type.name} frame from a sender")
            result = await loop.run_in_executor(self._worker, self.acceptor.accept, frame)
            writer.write(encode_frame(self.keys[frame.sender], FrameType.ACK, frame.sender, result.sequence))
            await writer.drain()
            self.status.ok(f"sender {cn}", "source")

    def _record(self, reason: str, sender: str, message: str, source: str) -> None:
        """Count the event here (cheap); log, audit and store it on the worker (fsync) if it is a first."""
        key = self.acceptor.admit_event(reason, sender, message, source)
        if key is not None:
            self._worker.submit(self._record_blocking, key, message)

    def _record_blocking(self, key: LimitKey, message: str) -> None:
        try:
            self.acceptor.record_event(key, 1, message, {})
        except Exception:  # a full DMZ spool must not stop the gateway from closing connections
            log.exception("could not record security event %s", key[0])

    def _flush_events(self) -> None:
        try:
            self.acceptor.flush_events()
        except Exception:
            log.exception("could not record the repeated security events")

    async def _flush_periodically(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(5.0, self.cfg.security_event_interval_s))
            await loop.run_in_executor(self._worker, self._flush_events)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        while True:
            conn, peer = await loop.sock_accept(listener)
            refuse = None
            if len(tasks) >= self.cfg.max_connections:
                refuse = f"{len(tasks)} connections open (max_connections)"
            elif self._handshaking.get(peer[0], 0) >= self.cfg.max_handshakes_per_source:
                refuse = f"{self._handshaking[peer[0]]} TLS handshakes in progress from {peer[0]}"
            if refuse is not None:
                conn.close()
                self.metrics.inc("connections_refused_total")
                self._record("connection_limit", "unknown", f"connection from {peer[0]} closed: {refuse}", peer[0])
                continue
            self._handshaking[peer[0]] = self._handshaking.get(peer[0], 0) + 1
            task = asyncio.create_task(self._handle(conn, peer))
            tasks.add(task)  # keep a reference until the connection ends
            task.add_done_callback(tasks.discard)

    async def serve(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        listener = socket.create_server((self.cfg.listen_host, self.cfg.listen_port), backlog=128)
        listener.setblocking(False)
        self.port = listener.getsockname()[1]
        log.info(
            "DMZ gateway listening on %s:%d (TLS 1.3, client certificates required)", self.cfg.listen_host, self.port
        )
        self.reporter.start()
        self.status.start()
        print(f"READY relay-dmz {self.cfg.listen_host}:{self.port}", flush=True)  # for supervisors (stack, demo)
        if ready is not None:
            ready.set()
        acceptor = asyncio.create_task(self._accept(listener))
        flusher = asyncio.create_task(self._flush_periodically())
        await stop.wait()
        acceptor.cancel()
        flusher.cancel()
        listener.close()
        self.reporter.stop()
        self._worker.shutdown(wait=True)
        self.acceptor.close()
        self.acceptor.spool.close()
        self.status.stop()


def run_gateway(config: FlowlineConfig) -> None:
    gateway = Gateway(config)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await gateway.serve(stop)

    asyncio.run(main())
