"""Diode sender (OT): signed batches as forward-error-corrected UDP datagrams, never reading the network.

The spool is acknowledged once a batch is out (a data diode has no way to say more); a heartbeat
tells the receiver the next sequence number and how many points the session has sent, so a silent
link and a loss at the end of a burst are both visible. Pacing keeps under ``diode_rate_bytes_s``.
Every datagram is signed (see `flowline.relay.diode_wire`), heartbeats included.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from flowline.core.config import FlowlineConfig
from flowline.core.metrics import Metrics, MetricsReporter
from flowline.core.status import ProcessStatus
from flowline.inventory import load_site
from flowline.relay.diode_wire import encode_heartbeat, encode_shares, overhead
from flowline.relay.frames import FrameType, encode_frame
from flowline.relay.ot.batching import Batch, BatchBuilder, SequenceJournal
from flowline.relay.ot.sender import metrics_spool, open_ot_spools

log = logging.getLogger(__name__)


class DiodeSender:
    def __init__(self, config: FlowlineConfig, stop: threading.Event | None = None) -> None:
        cfg = config.relay_ot
        if cfg is None or cfg.diode_host is None or cfg.diode_port is None:
            raise ValueError("diode mode needs relay_ot.diode_host and relay_ot.diode_port")
        self.cfg = cfg
        self.stop = stop or threading.Event()
        self.key = cfg.signing_key.read().encode()
        self.session = int.from_bytes(os.urandom(8), "big")
        self.target = (cfg.diode_host, cfg.diode_port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        # Connected: the socket takes datagrams from the receiver's address only and is not a
        # listening socket (``ss -l`` in OT shows none); no packet is ever read from it anyway.
        self.sock.connect(self.target)
        self.chunk = cfg.diode_datagram_bytes - overhead(cfg.sender_id)
        if self.chunk < 64:
            raise ValueError(f"relay_ot.diode_datagram_bytes leaves {self.chunk} bytes of data per datagram")
        self.readers = open_ot_spools(config, cfg)
        self.builder = BatchBuilder(
            self.readers, cfg.batch_max_points, cfg.batch_max_bytes, cfg.batch_max_latency_ms / 1000
        )
        self.journal = SequenceJournal(config.data_dir / "relay-ot")
        self.metrics = Metrics("relay-ot", load_site(config.site_file).site, config.instance)
        # One-way: there is no peer to be connected to, so the status shows spools and sends only.
        self.status = ProcessStatus(config.data_dir, "diode-send").watch(self.metrics, "sink")
        for name in self.readers:
            self.status.spool(name, config.spool_dir(name))
        self._metrics_spool = metrics_spool(config)
        self.reporter = MetricsReporter(self.metrics, self._metrics_spool.append_points, config.metrics_interval_s)
        self.points_sent = 0
        self._next_beat = 0.0
        self._budget_t = time.monotonic()

    def _pace(self, nbytes: int) -> None:
        """Token bucket: never faster than the configured rate (the receiver cannot ask us to slow down)."""
        self._budget_t = max(self._budget_t, time.monotonic() - 0.05) + nbytes / self.cfg.diode_rate_bytes_s
        delay = self._budget_t - time.monotonic()
        if delay > 0.001:
            time.sleep(delay)

    def _send(self, datagram: bytes) -> None:
        self._pace(len(datagram) + 28)
        try:
            self.sock.send(datagram)
        except OSError as exc:  # e.g. ENOBUFS or no route: the datagram is lost, accounted at the far end
            self.metrics.inc("diode_send_errors_total", error=type(exc).__name__)

    def heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now >= self._next_beat:
            self._send(
                encode_heartbeat(self.cfg.sender_id, self.key, self.session, self.journal.next, self.points_sent)
            )
            self._next_beat = now + self.cfg.diode_heartbeat_s

    def send_batch(self, batch: Batch) -> None:
        frame = encode_frame(self.key, FrameType.BATCH, self.cfg.sender_id, batch.sequence, batch.count, batch.payload)
        datagrams = encode_shares(
            self.cfg.sender_id,
            self.key,
            self.session,
            batch.sequence,
            self.points_sent,
            batch.count,
            frame,
            self.chunk,
            self.cfg.diode_data_shares,
            self.cfg.diode_total_shares,
        )
        for datagram in datagrams:
            self._send(datagram)
        self.points_sent += batch.count
        self.metrics.inc("points_out_total", batch.count)
        self.metrics.inc("batches_total")
        self.metrics.inc("diode_datagrams_total", len(datagrams), kind="sent")

    def step(self) -> Batch | None:
        batch = self.builder.rebuild(self.journal.inflight) if self.journal.inflight else None
        if batch is None:
            if self.journal.inflight is not None:
                self.journal.next = int(self.journal.inflight["sequence"]) + 1  # type: ignore[call-overload]
                self.journal.inflight = None
            batch = self.builder.next_batch(self.journal.next, min(0.5, self.cfg.diode_heartbeat_s))
            if batch is None:
                self.heartbeat()
                return None
            self.journal.begin(batch)
        self.send_batch(batch)
        self.builder.ack(batch)
        self.journal.done(batch)
        self.heartbeat()
        return batch

    def run(self) -> None:
        log.info("diode sender %s -> udp %s:%d, session %016x", self.cfg.sender_id, *self.target, self.session)
        self.reporter.start()
        self.status.start()
        print(f"READY relay-diode-send -> udp {self.target[0]}:{self.target[1]}", flush=True)
        try:
            while not self.stop.is_set():
                self.step()
        finally:
            self.heartbeat(force=True)
            self.reporter.stop()
            self._metrics_spool.close()
            self.sock.close()
            self.status.stop()
