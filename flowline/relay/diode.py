"""Diode mode: strictly one-way UDP with forward error correction and exact loss accounting.

Sender (OT): builds the same signed batch frames as the TCP relay, cuts each frame into blocks of
``k`` chunks, Reed-Solomon encodes every block into ``m`` shares (zfec: any ``k`` of the ``m``
rebuild the block) and sends each share as one datagram, paced to ``diode_rate_bytes_s``. It never
reads from the network; the spool is acknowledged once a batch is out (a data diode has no way to
say more). A heartbeat tells the receiver the next sequence number and how many points the
session has sent, so a silent link and a loss at the end of a burst are both visible.

Receiver (DMZ): reassembles, verifies the frame signature, hands batches to the same
`BatchAcceptor` as the gateway (policy, durable spool, replay detection) and accounts every gap
exactly: every datagram carries its batch's point count and the number of points the session sent
before it, so even a batch of which nothing arrived is counted in points and sequence numbers
(``flowline_diode_lost_total``, a log line per lost range).

Datagram: ``<2s "FD"><u8 version><u8 kind><u64 session><u64 sequence><u32 points before (low 32
bits)>...`` — see `_DATA`; points are counted in u64 so long sessions do not wrap.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import zfec  # type: ignore[import-untyped]

from flowline.config import FlowlineConfig
from flowline.metrics import Metrics, MetricsReporter
from flowline.relay.acceptor import BatchAcceptor
from flowline.relay.batching import Batch, BatchBuilder, SequenceJournal
from flowline.relay.frames import FrameError, FrameType, decode_wire, encode_frame
from flowline.relay.gateway import load_sender_keys, open_acceptor
from flowline.relay.sender import metrics_spool, open_ot_spools
from flowline.status import ProcessStatus

log = logging.getLogger("flowline.relay.diode")

MAGIC = b"FD"
VERSION = 1
KIND_DATA = 1
KIND_HEARTBEAT = 2
# magic, version, kind, session, sequence, points before, count, frame length, block, blocks, share, k, m
_DATA = struct.Struct(">2sBBQQQIIHHBBB")
# magic, version, kind, session, next sequence, points sent
_HEARTBEAT = struct.Struct(">2sBBQQQ")


class DatagramError(ValueError):
    """A datagram that is not a well-formed diode datagram."""


@dataclass(frozen=True)
class Share:
    session: int
    sequence: int
    points_before: int
    count: int
    frame_len: int
    block: int
    blocks: int
    index: int
    k: int
    m: int
    data: bytes


def encode_shares(
    session: int, sequence: int, points_before: int, count: int, frame: bytes, chunk: int, k: int, m: int
) -> list[bytes]:
    """All datagrams of one frame: ``m`` shares per block of ``k`` chunks."""
    per_block = chunk * k
    blocks = max(1, -(-len(frame) // per_block))
    encoder = zfec.Encoder(k, m)
    out = []
    for b in range(blocks):
        piece = frame[b * per_block : (b + 1) * per_block].ljust(per_block, b"\0")
        shares = encoder.encode([piece[i * chunk : (i + 1) * chunk] for i in range(k)])
        for index, share in enumerate(shares):
            header = _DATA.pack(
                MAGIC, VERSION, KIND_DATA, session, sequence, points_before, count, len(frame), b, blocks, index, k, m
            )
            out.append(header + share)
    return out


def parse_datagram(data: bytes) -> Share | tuple[int, int, int]:
    """A `Share`, or ``(session, next_sequence, points_sent)`` for a heartbeat."""
    if len(data) < _HEARTBEAT.size or data[:2] != MAGIC:
        raise DatagramError(f"not a diode datagram ({len(data)} bytes)")
    if data[2] != VERSION:
        raise DatagramError(f"unsupported diode version {data[2]}")
    if data[3] == KIND_HEARTBEAT and len(data) == _HEARTBEAT.size:
        _, _, _, session, next_seq, sent = _HEARTBEAT.unpack(data)
        return session, next_seq, sent
    if data[3] != KIND_DATA or len(data) <= _DATA.size:
        raise DatagramError(f"bad diode datagram kind {data[3]} / size {len(data)}")
    _, _, _, session, seq, before, count, frame_len, block, blocks, index, k, m = _DATA.unpack_from(data)
    if not (0 < k <= m and index < m and block < blocks):
        raise DatagramError(f"inconsistent share header (k={k} m={m} share={index} block={block}/{blocks})")
    return Share(session, seq, before, count, frame_len, block, blocks, index, k, m, data[_DATA.size :])


# --- sender ------------------------------------------------------------------------------------------


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
        self.chunk = cfg.diode_datagram_bytes - _DATA.size
        self.readers = open_ot_spools(config, cfg)
        self.builder = BatchBuilder(
            self.readers, cfg.batch_max_points, cfg.batch_max_bytes, cfg.batch_max_latency_ms / 1000
        )
        self.journal = SequenceJournal(config.data_dir / "relay-ot")
        self.metrics = Metrics("relay-ot", config.load_site().site, config.instance)
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
            self.sock.sendto(datagram, self.target)
        except OSError as exc:  # e.g. ENOBUFS or no route: the datagram is lost, accounted at the far end
            self.metrics.inc("diode_send_errors_total", error=type(exc).__name__)

    def heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now >= self._next_beat:
            self._send(
                _HEARTBEAT.pack(MAGIC, VERSION, KIND_HEARTBEAT, self.session, self.journal.next, self.points_sent)
            )
            self._next_beat = now + self.cfg.diode_heartbeat_s

    def send_batch(self, batch: Batch) -> None:
        frame = encode_frame(self.key, FrameType.BATCH, self.cfg.sender_id, batch.sequence, batch.count, batch.payload)
        datagrams = encode_shares(
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


# --- receiver ----------------------------------------------------------------------------------------


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
        site = config.load_site()
        self.metrics = Metrics("relay-dmz", site.site, config.instance)
        self.acceptor: BatchAcceptor = open_acceptor(config, self.metrics)
        self.reporter = MetricsReporter(self.metrics, self.acceptor.append_points, config.metrics_interval_s)
        # The "connected" gauge of target "diode" (heard from the sender lately) becomes the source link.
        self.status = ProcessStatus(config.data_dir, "diode-receive").watch(self.metrics, "source")
        self.status.spool("dmz", config.spool_dir("dmz"))
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
        self.status.start()
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
            self.status.stop()
