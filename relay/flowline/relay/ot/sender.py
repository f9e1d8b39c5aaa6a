"""OT sender: pushes spooled points to the DMZ gateway over mutual TLS, acks the spool only on ack.

The OT side never listens: it opens the connection, sends one signed BATCH frame, waits for the
gateway's signed ACK of that sequence number, and only then acknowledges the spool records the
batch came from. Connection failures back off exponentially with jitter and the same batch (same
sequence number, same records) is sent again.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time

from flowline.core.backoff import Backoff
from flowline.core.config import FlowlineConfig, RelayOtConfig
from flowline.core.errors import FlowlineError
from flowline.core.metrics import Metrics, MetricsReporter
from flowline.core.spool import SpoolReader, SpoolWriter
from flowline.core.status import ProcessStatus
from flowline.inventory import load_site
from flowline.relay.frames import LENGTH_PREFIX_BYTES, FrameError, FrameType, decode_frame, encode_frame, frame_length
from flowline.relay.ot.batching import Batch, BatchBuilder, SequenceJournal
from flowline.relay.tls import client_context

log = logging.getLogger("flowline.relay.ot")

METRICS_SPOOL = "relay-ot"


class AckError(FlowlineError, ConnectionError):
    """The gateway answered with something other than the ACK we wait for."""


def recv_exactly(sock: ssl.SSLSocket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise ConnectionError("gateway closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def open_ot_spools(config: FlowlineConfig, cfg: RelayOtConfig) -> dict[str, SpoolReader]:
    names = list(dict.fromkeys([*cfg.spools, METRICS_SPOOL]))
    return {name: SpoolReader(config.spool_dir(name)) for name in names}


def metrics_spool(config: FlowlineConfig) -> SpoolWriter:
    spool = config.spool
    return SpoolWriter(
        config.spool_dir(METRICS_SPOOL), spool.max_bytes, spool.segment_bytes, spool.on_full, spool.fsync
    )


class OtSender:
    def __init__(self, config: FlowlineConfig, stop: threading.Event | None = None) -> None:
        if config.relay_ot is None:
            raise ValueError("the config has no relay_ot section")
        self.cfg = config.relay_ot
        self.key = self.cfg.signing_key.read().encode()
        self.stop = stop or threading.Event()
        self.ssl = client_context(self.cfg.tls)
        self.target = f"{self.cfg.gateway_host}:{self.cfg.gateway_port}"
        self.metrics = Metrics("relay-ot", load_site(config.site_file).site, config.instance)
        self.status = ProcessStatus(config.data_dir, "relay-ot").watch(self.metrics, "sink")
        self.metrics.set("connected", 0, target=self.target)
        self.readers = open_ot_spools(config, self.cfg)
        for name in self.readers:
            self.status.spool(name, config.spool_dir(name))
        self.builder = BatchBuilder(
            self.readers, self.cfg.batch_max_points, self.cfg.batch_max_bytes, self.cfg.batch_max_latency_ms / 1000
        )
        self.journal = SequenceJournal(config.data_dir / "relay-ot")
        self._metrics_spool = metrics_spool(config)
        self.reporter = MetricsReporter(self.metrics, self._metrics_spool.append_points, config.metrics_interval_s)
        self.backoff = Backoff(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)
        self._sock: ssl.SSLSocket | None = None
        self._connects = 0
        self._next: Batch | None = None  # built while the previous batch was in flight

    # --- connection -------------------------------------------------------------------------------

    def _connect(self) -> ssl.SSLSocket:
        self.metrics.inc("connect_attempts_total", target=self.target)
        try:
            raw = socket.create_connection(
                (self.cfg.gateway_host, self.cfg.gateway_port), timeout=self.cfg.ack_timeout_s
            )
        except OSError as exc:
            self._connect_failed(exc)
            raise
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self.ssl.wrap_socket(raw, server_hostname=self.cfg.tls.server_name or self.cfg.gateway_host)
        except BaseException as exc:
            raw.close()
            if isinstance(exc, OSError):
                self._connect_failed(exc)
            raise
        self._connects += 1
        if self._connects > 1:
            self.metrics.inc("reconnects_total", target=self.target)
        self.metrics.set("connected", 1, target=self.target)
        log.info("connected to DMZ gateway %s", self.target)
        return sock

    def _connect_failed(self, exc: OSError) -> None:
        self.metrics.inc("connect_failures_total", target=self.target)
        self.status.connected(self.target, "sink", False, error=f"{type(exc).__name__}: {exc}")

    def _disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.metrics.set("connected", 0, target=self.target)

    def _exchange(self, batch: Batch, frame: bytes) -> None:
        if self._sock is None:
            self._sock = self._connect()
        self._sock.sendall(frame)
        if self._next is None:
            # Encode the next batch while the gateway verifies and stores this one.
            self._next = self.builder.next_batch(batch.sequence + 1, 0, after=batch)
        length = frame_length(recv_exactly(self._sock, LENGTH_PREFIX_BYTES))
        ack = decode_frame(recv_exactly(self._sock, length), lambda s: self.key if s == self.cfg.sender_id else None)
        if ack.type is not FrameType.ACK or ack.sequence != batch.sequence:
            raise AckError(f"expected ACK {batch.sequence}, got {ack.type.name} {ack.sequence}")

    def deliver(self, batch: Batch) -> bool:
        """Send until acknowledged; ``False`` if asked to stop first."""
        frame = encode_frame(self.key, FrameType.BATCH, self.cfg.sender_id, batch.sequence, batch.count, batch.payload)
        while not self.stop.is_set():
            try:
                self._exchange(batch, frame)
                self.backoff.reset()
                self.status.ok(self.target, "sink")
                return True
            except (OSError, FrameError, AckError) as exc:
                # OSError covers refused/reset connections, timeouts and TLS alerts (ssl.SSLError).
                self._disconnect()
                delay = self.backoff.next_delay()
                log.warning(
                    "batch %d not delivered to %s (%s); retrying in %.1fs", batch.sequence, self.target, exc, delay
                )
                self.stop.wait(delay)
        return False

    # --- main loop --------------------------------------------------------------------------------

    def step(self, idle_wait: float = 0.5) -> Batch | None:
        """Build (or rebuild after a crash) one batch, deliver it, ack the spools; the batch or None."""
        batch, self._next = self._next, None
        if batch is not None:
            self.journal.begin(batch)
        elif self.journal.inflight:
            batch = self.builder.rebuild(self.journal.inflight)
        if batch is None:
            if self.journal.inflight is not None:  # delivered and acked before a crash: just close it
                self.journal.next = int(self.journal.inflight["sequence"]) + 1  # type: ignore[call-overload]
                self.journal.inflight = None
                self.journal.save()
            batch = self.builder.next_batch(self.journal.next, idle_wait)
            if batch is None:
                self._report_depth()
                return None
            self.journal.begin(batch)
        if not self.deliver(batch):
            return None
        self.builder.ack(batch)
        self.journal.done(batch)
        self.metrics.inc("points_out_total", batch.count)
        self.metrics.inc("batches_total")
        if batch.newest_ns:
            self.metrics.set("lag_seconds", max(0.0, time.time() - batch.newest_ns / 1e9))
        self._report_depth()
        return batch

    def _report_depth(self) -> None:
        for name, reader in self.readers.items():
            self.metrics.set("spool_bytes", reader.pending_bytes(), spool=name)
            # Records a drop-oldest spool threw away before we could send them: lost, but counted.
            self.metrics.set("spool_dropped_total", reader.dropped_records, spool=name)
            # Torn or corrupt bytes the reader passed over (docs/spool.md): after a disk fault, a loss.
            self.metrics.set("spool_skipped_bytes_total", reader.skipped_bytes, spool=name)

    def run(self) -> None:
        log.info("OT sender %s -> %s, spools %s", self.cfg.sender_id, self.target, ", ".join(self.readers))
        self.reporter.start()
        self.status.start()
        print(f"READY relay-ot {self.cfg.sender_id} -> {self.target}", flush=True)  # for supervisors
        try:
            while not self.stop.is_set():
                self.step()
        finally:
            self.reporter.stop()
            self._disconnect()
            self._metrics_spool.close()
            self.status.stop()
