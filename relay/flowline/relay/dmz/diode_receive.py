"""Diode receiver (DMZ): rebuilds batches from datagrams, verifies them and accounts every gap exactly.

Rebuilt frames go to the same `BatchAcceptor` as the TLS gateway (signature, approved flows, durable
spool, replay detection). A batch of which too few shares arrived is declared lost after
``diode_gap_timeout_s`` (``flowline_diode_lost_total``, a log line per lost range).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import zfec  # type: ignore[import-untyped]

from flowline.core.config import FlowlineConfig
from flowline.core.metrics import Metrics, MetricsReporter
from flowline.inventory import load_site
from flowline.relay.diode_wire import DatagramError, parse_datagram
from flowline.relay.dmz.acceptor import BatchAcceptor
from flowline.relay.dmz.gateway import load_sender_keys, open_acceptor
from flowline.relay.frames import FrameError, FrameType, decode_wire

log = logging.getLogger(__name__)

@dataclass
class _Pending:
    points_before: int
    count: int
    frame_len: int
    blocks: int
    first_seen: float
    shares: dict[int, dict[int, bytes]] = field(default_factory=dict)  # block -> share index -> data
    decoded: dict[int, bytes] = field(default_factory=dict)  # block -> its k chunks joined


@dataclass
class _Session:
    next_seq: int  # first sequence not yet resolved (delivered or declared lost)
    resolved_points: int  # points the sender sent before next_seq
    ready: dict[int, tuple[_Pending, bytes]] = field(default_factory=dict)  # rebuilt, awaiting its turn
    pending: dict[int, _Pending] = field(default_factory=dict)
    markers: dict[int, tuple[int, float]] = field(default_factory=dict)  # seq -> (points before, first seen)
    last_heard: float = 0.0


class DiodeReceiver:
    def __init__(self, config: FlowlineConfig, stop: threading.Event | None = None) -> None:
        cfg = config.relay_dmz
        if cfg is None:
            raise ValueError("the config has no relay_dmz section")
        self.cfg = cfg
        self.stop = stop or threading.Event()
        self.keys = load_sender_keys(cfg)
        site = load_site(config.site_file)
        self.metrics = Metrics("relay-dmz", site.site, config.instance)
        self.acceptor: BatchAcceptor = open_acceptor(config, self.metrics)
        self.reporter = MetricsReporter(self.metrics, self.acceptor.append_points, config.metrics_interval_s)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
        self.sock.bind((cfg.diode_listen_host, cfg.diode_listen_port))
        self.sock.settimeout(0.1)
        self.sessions: dict[int, _Session] = {}
        self.lost_points = 0
        self.delivered_points = 0
        self._queue: deque[bytes] = deque()
        self._wake = threading.Event()

    # Receiving runs on its own thread so the kernel buffer is drained while a batch is being stored.
    def _receive(self) -> None:
        while not self.stop.is_set():
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self._queue.append(data)
            self._wake.set()

    def _session(self, session: int, seq: int, points_before: int) -> _Session:
        state = self.sessions.get(session)
        if state is None:
            log.info("diode session %016x: joined at sequence %d (%d points sent before)", session, seq, points_before)
            state = self.sessions[session] = _Session(seq, points_before)
        state.last_heard = time.monotonic()
        if seq >= state.next_seq and seq not in state.markers:
            state.markers[seq] = (points_before, time.monotonic())
        return state

    def handle(self, data: bytes) -> None:
        try:
            item = parse_datagram(data)
        except DatagramError as exc:
            self.metrics.inc("diode_datagrams_total", kind="bad")
            self.metrics.inc("rejected_total", reason="bad_frame")
            log.debug("dropped datagram: %s", exc)
            return
        if isinstance(item, tuple):
            self._session(*item)
            self.metrics.inc("diode_datagrams_total", kind="heartbeat")
            return
        state = self._session(item.session, item.sequence, item.points_before)
        if item.sequence < state.next_seq or item.sequence in state.ready:
            self.metrics.inc("diode_datagrams_total", kind="duplicate")
            return
        pending = state.pending.get(item.sequence)
        if pending is None:
            pending = state.pending[item.sequence] = _Pending(
                item.points_before, item.count, item.frame_len, item.blocks, time.monotonic()
            )
        if item.block in pending.decoded:
            self.metrics.inc("diode_datagrams_total", kind="duplicate")
            return
        shares = pending.shares.setdefault(item.block, {})
        if item.index in shares:
            self.metrics.inc("diode_datagrams_total", kind="duplicate")
            return
        shares[item.index] = item.data
        self.metrics.inc("diode_datagrams_total", kind="received")
        if len(shares) == item.k:
            numbers = sorted(shares)
            try:
                chunks = zfec.Decoder(item.k, item.m).decode([shares[n] for n in numbers], numbers)
            except Exception as exc:  # zfec raises plain errors on inconsistent shares
                log.warning("diode batch %d block %d undecodable: %s", item.sequence, item.block, exc)
                return
            pending.decoded[item.block] = b"".join(chunks)
            del pending.shares[item.block]
            if any(n >= item.k for n in numbers):
                self.metrics.inc("diode_datagrams_total", kind="recovered")
        if len(pending.decoded) == pending.blocks:
            frame = b"".join(pending.decoded[b] for b in range(pending.blocks))[: pending.frame_len]
            del state.pending[item.sequence]
            # Stored in sequence order (by `account`): an earlier batch still being rebuilt must not
            # look like a replay to the acceptor once this one is stored.
            state.ready[item.sequence] = (pending, frame)
        self.account()

    def _deliver(self, state: _Session, seq: int, pending: _Pending, frame: bytes) -> None:
        try:
            decoded = decode_wire(frame, self.keys.get, self.cfg.max_frame_bytes)
            if decoded.type is not FrameType.BATCH or decoded.sequence != seq:
                raise FrameError("bad_frame", f"diode frame {seq} carries {decoded.type.name} {decoded.sequence}")
            result = self.acceptor.accept(decoded)
        except FrameError as exc:
            self.acceptor.security_event(exc.reason, "unknown", f"diode batch {seq}: {exc}")
            self._lose(state, seq, seq, pending.count, "rejected")
            return
        if result.replay:  # sent again by a restarted sender: already stored in an earlier session
            self.metrics.inc("diode_datagrams_total", kind="replayed_batch")
        else:
            self.delivered_points += pending.count

    def _lose(self, state: _Session, first: int, last: int, points: int, why: str) -> None:
        self.lost_points += points
        self.metrics.inc("diode_lost_total", points)
        self.metrics.inc("diode_lost_batches_total", last - first + 1)
        rng = f"{first}" if first == last else f"{first}-{last}"
        log.warning("diode: lost batch %s (%d points, %s)", rng, points, why)

    def account(self, now: float | None = None) -> None:
        """Resolve sequence numbers in order: delivered, or lost after ``diode_gap_timeout_s``."""
        now = time.monotonic() if now is None else now
        timeout = self.cfg.diode_gap_timeout_s
        for state in self.sessions.values():
            while True:
                seq = state.next_seq
                if seq in state.ready:
                    pending, frame = state.ready.pop(seq)
                    self._deliver(state, seq, pending, frame)
                    state.resolved_points = pending.points_before + pending.count
                elif seq in state.pending and now - state.pending[seq].first_seen > timeout:
                    p = state.pending.pop(seq)
                    self._lose(state, seq, seq, p.count, "not enough shares to rebuild it")
                    state.resolved_points = p.points_before + p.count
                else:
                    later = [s for s in state.markers if s > seq]
                    if seq in state.pending or not later:
                        break
                    nxt = min(later)
                    before, seen = state.markers[nxt]
                    if now - seen <= timeout:
                        break
                    # Nothing at all arrived for seq..nxt-1: the next batch says how many points that was.
                    self._lose(state, seq, nxt - 1, before - state.resolved_points, "no datagram arrived")
                    state.resolved_points = before
                    state.next_seq = nxt
                    for stale in [s for s in state.markers if s < nxt]:
                        del state.markers[stale]
                    continue
                state.markers.pop(seq, None)
                state.next_seq = seq + 1
            # A heartbeat marker at next_seq with no data yet is the normal idle state.
            self.metrics.set("connected", 1 if now - state.last_heard < 3 * max(1.0, timeout) else 0, target="diode")

    def run(self) -> None:
        log.info("diode receiver listening on udp %s:%d", self.cfg.diode_listen_host, self.sock.getsockname()[1])
        self.reporter.start()
        receiver = threading.Thread(target=self._receive, name="diode-recv", daemon=True)
        receiver.start()
        print(f"READY relay-diode-receive udp {self.sock.getsockname()[0]}:{self.sock.getsockname()[1]}", flush=True)
        last_heard = time.monotonic()
        silent = False
        try:
            while not self.stop.is_set():
                self._wake.wait(0.2)
                self._wake.clear()
                while self._queue:
                    self.handle(self._queue.popleft())
                    last_heard = time.monotonic()
                    silent = False
                self.account()
                if not silent and time.monotonic() - last_heard > 5 * max(1.0, self.cfg.diode_gap_timeout_s):
                    log.warning(
                        "diode link silent for %.0fs: no datagram, not even a heartbeat", time.monotonic() - last_heard
                    )
                    self.metrics.set("connected", 0, target="diode")
                    silent = True
        finally:
            self.sock.close()
            receiver.join(1)
            self.reporter.stop()
            self.acceptor.close()
            self.acceptor.spool.close()
