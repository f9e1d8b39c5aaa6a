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

Hostile traffic: every datagram, heartbeats included, carries its sender id and a truncated
HMAC-SHA256 under that sender's key, checked before the receiver keeps any state for it. A new
session is admitted only if it starts after the last batch stored for that sender (an old
session's datagrams replayed are dropped), each sender keeps at most ``diode_sessions_per_sender``
sessions (the least recently heard is evicted), shares waiting for their batch are bounded by
``diode_max_pending_bytes`` (the oldest batch is given up and counted lost), the queue between the
socket and the decoder by ``diode_queue_datagrams``; each refusal is counted in
``flowline_diode_datagrams_total{kind}`` and rate-limited into the audit trail. Sessions (next
sequence, points resolved) are persisted, so a restarted receiver goes on accounting where it was.

Datagram: ``<2s "FD"><u8 version 2><u8 kind><u8 sender length><sender>`` then, for data,
``<u64 session><u64 sequence><u64 points before><u32 count><u32 frame length><u16 block><u16
blocks><u8 share><u8 k><u8 m><share bytes>``, for a heartbeat ``<u64 session><u64 next
sequence><u64 points sent>``, and last a 16-byte HMAC-SHA256 tag over everything before it.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zfec  # type: ignore[import-untyped]

from flowline.config import FlowlineConfig
from flowline.metrics import Metrics, MetricsReporter
from flowline.relay.acceptor import BatchAcceptor, atomic_write_json
from flowline.relay.batching import Batch, BatchBuilder, SequenceJournal
from flowline.relay.frames import FrameError, FrameType, decode_wire, encode_frame
from flowline.relay.gateway import load_sender_keys, open_acceptor
from flowline.relay.sender import metrics_spool, open_ot_spools

log = logging.getLogger("flowline.relay.diode")

MAGIC = b"FD"
VERSION = 2
KIND_DATA = 1
KIND_HEARTBEAT = 2
TAG_BYTES = 16
_PREFIX = struct.Struct(">2sBBB")  # magic, version, kind, sender length
# session, sequence, points before, count, frame length, block, blocks, share, k, m
_DATA = struct.Struct(">QQQIIHHBBB")
# session, next sequence, points sent
_HEARTBEAT = struct.Struct(">QQQ")
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux; not in every Python's socket module
MAX_MARKERS = 4096  # sequence numbers announced ahead of the next one, per session


class DatagramError(ValueError):
    """A datagram that is not a well-formed, authentic diode datagram."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # malformed | unknown_sender | bad_tag


@dataclass(frozen=True)
class Share:
    sender: str
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


@dataclass(frozen=True)
class Heartbeat:
    sender: str
    session: int
    next_sequence: int
    points_sent: int


def _prefix(kind: int, sender: bytes) -> bytes:
    return _PREFIX.pack(MAGIC, VERSION, kind, len(sender)) + sender


def _tag(key: bytes, signed: bytes) -> bytes:
    return hmac.digest(key, signed, "sha256")[:TAG_BYTES]  # one C call: this runs for every datagram


def overhead(sender: str) -> int:
    """Bytes of a data datagram that are not share data."""
    return _PREFIX.size + len(sender.encode()) + _DATA.size + TAG_BYTES


def encode_heartbeat(sender: str, key: bytes, session: int, next_sequence: int, points_sent: int) -> bytes:
    signed = _prefix(KIND_HEARTBEAT, sender.encode()) + _HEARTBEAT.pack(session, next_sequence, points_sent)
    return signed + _tag(key, signed)


def encode_shares(
    sender: str,
    key: bytes,
    session: int,
    sequence: int,
    points_before: int,
    count: int,
    frame: bytes,
    chunk: int,
    k: int,
    m: int,
) -> list[bytes]:
    """All datagrams of one frame: ``m`` shares per block of ``k`` chunks, each signed."""
    per_block = chunk * k
    blocks = max(1, -(-len(frame) // per_block))
    encoder = zfec.Encoder(k, m)
    prefix = _prefix(KIND_DATA, sender.encode())
    out = []
    for b in range(blocks):
        piece = frame[b * per_block : (b + 1) * per_block].ljust(per_block, b"\0")
        shares = encoder.encode([piece[i * chunk : (i + 1) * chunk] for i in range(k)])
        for index, share in enumerate(shares):
            signed = (
                prefix + _DATA.pack(session, sequence, points_before, count, len(frame), b, blocks, index, k, m) + share
            )
            out.append(signed + _tag(key, signed))
    return out


def parse_datagram(data: bytes, key_for: Callable[[str], bytes | None]) -> Share | Heartbeat:
    """Parse and authenticate one datagram; `DatagramError` says why it is refused (nothing is kept)."""
    if len(data) < _PREFIX.size + 1 + _HEARTBEAT.size + TAG_BYTES or data[:2] != MAGIC:
        raise DatagramError("malformed", f"not a diode datagram ({len(data)} bytes)")
    _, version, kind, sender_len = _PREFIX.unpack_from(data)
    if version != VERSION:
        raise DatagramError("malformed", f"unsupported diode version {version}")
    body = _PREFIX.size + sender_len
    if sender_len == 0 or len(data) < body + TAG_BYTES:
        raise DatagramError("malformed", f"bad sender length {sender_len} in {len(data)} bytes")
    try:
        sender = data[_PREFIX.size : body].decode()
    except UnicodeDecodeError as exc:
        raise DatagramError("malformed", "sender id is not UTF-8") from exc
    key = key_for(sender)
    if key is None:
        raise DatagramError("unknown_sender", f"datagram from unknown sender {sender!r}")
    signed = data[:-TAG_BYTES]
    if not hmac.compare_digest(_tag(key, signed), data[-TAG_BYTES:]):
        raise DatagramError("bad_tag", f"datagram claiming sender {sender!r} does not verify")
    if kind == KIND_HEARTBEAT and len(signed) == body + _HEARTBEAT.size:
        return Heartbeat(sender, *_HEARTBEAT.unpack_from(signed, body))
    if kind != KIND_DATA or len(signed) <= body + _DATA.size:
        raise DatagramError("malformed", f"bad diode datagram kind {kind} / size {len(data)}")
    session, seq, before, count, frame_len, block, blocks, index, k, m = _DATA.unpack_from(signed, body)
    if not (0 < k <= m and index < m and block < blocks):
        raise DatagramError(
            "malformed", f"inconsistent share header (k={k} m={m} share={index} block={block}/{blocks})"
        )
    return Share(
        sender, session, seq, before, count, frame_len, block, blocks, index, k, m, signed[body + _DATA.size :]
    )


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
        self.chunk = cfg.diode_datagram_bytes - overhead(cfg.sender_id)
        if self.chunk < 64:
            raise ValueError(f"relay_ot.diode_datagram_bytes leaves {self.chunk} bytes of data per datagram")
        self.readers = open_ot_spools(config, cfg)
        self.builder = BatchBuilder(
            self.readers, cfg.batch_max_points, cfg.batch_max_bytes, cfg.batch_max_latency_ms / 1000
        )
        self.journal = SequenceJournal(config.data_dir / "relay-ot")
        self.metrics = Metrics("relay-ot", config.load_site().site, config.instance)
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
        print(f"READY relay-diode-send -> udp {self.target[0]}:{self.target[1]}", flush=True)
        try:
            while not self.stop.is_set():
                self.step()
        finally:
            self.heartbeat(force=True)
            self.reporter.stop()
            self._metrics_spool.close()
            self.sock.close()


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
    size: int = 0  # bytes held (shares and decoded blocks), counted in the receiver's bound


@dataclass
class _Session:
    sender: str
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
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._size_receive_buffer(32 << 20)
        self.sock.bind((cfg.diode_listen_host, cfg.diode_listen_port))
        self.sock.settimeout(0.1)
        self.lost_points = 0
        self.delivered_points = 0
        self.pending_bytes = 0
        self._queue: deque[tuple[bytes, str]] = deque()
        self._queue_full = 0  # counted by the socket thread, published by the decoder
        self._oversized = 0
        self._foreign = 0
        self._wake = threading.Event()
        self._state_path = config.data_dir / "relay-dmz" / "diode-sessions.json"
        self._dirty = False
        self._refusals: dict[tuple[str, str], int] = {}  # (kind, source) -> repeats not yet counted
        self.sessions: dict[int, _Session] = self._load_sessions(self._state_path)

    def _size_receive_buffer(self, wanted: int) -> None:
        """A large kernel buffer rides out bursts (a diode cannot ask the sender to slow down).

        SO_RCVBUF is capped by net.core.rmem_max (often 208 KiB); SO_RCVBUFFORCE is not, but needs
        CAP_NET_ADMIN. Say so when neither gets the size.
        """
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, wanted)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wanted)
        got = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2  # the kernel reports double
        if got < wanted:
            log.warning(
                "diode receive buffer is %d KiB, not %d KiB: raise net.core.rmem_max (sysctl) or run with "
                "CAP_NET_ADMIN, or bursts and floods will drop datagrams in the kernel",
                got >> 10,
                wanted >> 10,
            )

    # --- persisted session state ----------------------------------------------------------------

    def _load_sessions(self, path: Path) -> dict[int, _Session]:
        if not path.exists():
            return {}
        try:
            saved = json.loads(path.read_text())
            now = time.monotonic()
            sessions = {
                int(s["session"]): _Session(
                    str(s["sender"]), int(s["next_seq"]), int(s["resolved_points"]), last_heard=now
                )
                for s in saved["sessions"]
                if s["sender"] in self.keys
            }
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("diode session state %s unreadable (%s): sessions start afresh", path, exc)
            return {}
        for session, state in sessions.items():
            log.info("diode session %016x of %s resumed at sequence %d", session, state.sender, state.next_seq)
        return sessions

    def _save_sessions(self) -> None:
        if not self._dirty:
            return
        sessions = [
            {"session": sid, "sender": s.sender, "next_seq": s.next_seq, "resolved_points": s.resolved_points}
            for sid, s in self.sessions.items()
        ]
        atomic_write_json(self._state_path, {"sessions": sessions})
        self._dirty = False

    # --- receiving ------------------------------------------------------------------------------

    # Receiving runs on its own thread so the kernel buffer is drained while a batch is being stored.
    # It only copies datagrams into a bounded queue; everything else happens on the decoder's thread.
    def _receive(self) -> None:
        limit = self.cfg.diode_max_datagram_bytes
        allowed = frozenset(self.cfg.diode_allowed_sources)
        while not self.stop.is_set():
            try:
                data, peer = self.sock.recvfrom(limit + 1)
            except TimeoutError:
                continue
            except OSError:
                return
            if allowed and peer[0] not in allowed:
                self._foreign += 1  # cheapest refusal there is: not even queued
            elif len(data) > limit:
                self._oversized += 1
            elif len(self._queue) >= self.cfg.diode_queue_datagrams:
                self._queue_full += 1
            else:
                idle = not self._queue
                self._queue.append((data, peer[0]))
                if idle:  # the decoder drains the whole queue once woken: one wake-up per burst
                    self._wake.set()

    def _refuse(self, kind: str, message: str, source: str) -> None:
        """Count a refused datagram: the first per (kind, source) goes to the audit trail's limiter now,
        repeats only into a local count that `account` hands over a few times a second (a flood costs
        a dict update per datagram, not locks, metrics and log formatting)."""
        key = (kind, source)
        seen = self._refusals.get(key)
        if seen is not None:
            self._refusals[key] = seen + 1
            return
        if len(self._refusals) >= 1024:  # a flood from many (spoofed) sources: fold the rest together
            self._refusals[(kind, "other-sources")] = self._refusals.get((kind, "other-sources"), 0) + 1
            return
        self._refusals[key] = 0
        self.metrics.inc("diode_datagrams_total", kind=kind)
        event = self.acceptor.admit_event(f"diode_{kind}", "unknown", message, source)
        if event is not None:
            self.acceptor.record_event(event, 1, message, {})

    def _hand_over_refusals(self) -> None:
        refusals, self._refusals = self._refusals, {}
        for (kind, source), count in refusals.items():
            if count:
                self.metrics.inc("diode_datagrams_total", count, kind=kind)
                self.metrics.inc("rejected_total", count, reason=f"diode_{kind}")
                self.acceptor.limiter.admit(
                    (f"diode_{kind}", "unknown", "", "", source), count, f"{kind} datagrams", {}
                )

    def _session(self, sender: str, session: int, seq: int, points_before: int, source: str) -> _Session | None:
        """The session this authentic datagram belongs to, admitted if new; None if it must be ignored."""
        now = time.monotonic()
        state = self.sessions.get(session)
        if state is None:
            last = self.acceptor.last_seq.get(sender)
            if last is not None and seq <= last:
                # A session that starts at or before what is stored: an old session's datagrams replayed.
                self._refuse(
                    "replayed", f"datagram of {sender} for sequence {seq}, already stored up to {last}", source
                )
                return None
            mine = [sid for sid, s in self.sessions.items() if s.sender == sender]
            if len(mine) >= self.cfg.diode_sessions_per_sender:
                oldest = min(mine, key=lambda sid: self.sessions[sid].last_heard)
                self._evict(oldest, "a newer session of the same sender started")
            log.info(
                "diode session %016x of %s: joined at sequence %d (%d points sent before)",
                session,
                sender,
                seq,
                points_before,
            )
            state = self.sessions[session] = _Session(sender, seq, points_before)
            self._dirty = True
        elif state.sender != sender:
            self._refuse("session_mismatch", f"{sender} sent for session {session:016x} of {state.sender}", source)
            return None
        state.last_heard = now
        if seq >= state.next_seq and seq not in state.markers and len(state.markers) < MAX_MARKERS:
            state.markers[seq] = (points_before, now)
        return state

    def _evict(self, session: int, why: str) -> None:
        state = self.sessions.pop(session)
        held = sum(p.size for p in state.pending.values())
        self.pending_bytes -= held
        self.metrics.inc("diode_sessions_evicted_total")
        self._dirty = True
        log.warning(
            "diode session %016x of %s evicted (%s); %d bytes of unfinished batches dropped",
            session,
            state.sender,
            why,
            held,
        )

    def _make_room(self, needed: int) -> None:
        """Give up the oldest unfinished batches until ``needed`` more bytes fit in the bound."""
        while self.pending_bytes + needed > self.cfg.diode_max_pending_bytes:
            candidates = [(p.first_seen, sid, seq) for sid, s in self.sessions.items() for seq, p in s.pending.items()]
            if not candidates:
                return
            _, sid, seq = min(candidates)
            state = self.sessions[sid]
            pending = state.pending.pop(seq)
            self.pending_bytes -= pending.size
            self.metrics.inc("diode_datagrams_total", kind="evicted_batch")
            # Accounted as lost when its turn comes: a marker keeps its point count.
            state.markers.setdefault(seq, (pending.points_before, pending.first_seen))

    def handle(self, data: bytes, source: str = "") -> None:
        try:
            item = parse_datagram(data, self.keys.get)
        except DatagramError as exc:
            self._refuse(exc.reason, str(exc), source)
            return
        if isinstance(item, Heartbeat):
            self.metrics.inc("diode_datagrams_total", kind="heartbeat")
            state = self._session(item.sender, item.session, item.next_sequence, item.points_sent, source)
            if state is not None:
                self._account_session(state, time.monotonic())
            return
        state = self._session(item.sender, item.session, item.sequence, item.points_before, source)
        if state is None:
            return
        if item.sequence < state.next_seq or item.sequence in state.ready:
            self.metrics.inc("diode_datagrams_total", kind="duplicate")
            return
        pending = state.pending.get(item.sequence)
        if pending is None:
            if item.frame_len > self.cfg.max_frame_bytes + 4 or item.blocks != max(
                1, -(-item.frame_len // (len(item.data) * item.k))
            ):
                self._refuse("malformed", f"batch {item.sequence} of {item.sender}: inconsistent frame size", source)
                return
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
        self._make_room(len(item.data))
        if state.pending.get(item.sequence) is not pending:  # given up to make room: its shares are gone
            return
        shares[item.index] = item.data
        pending.size += len(item.data)
        self.pending_bytes += len(item.data)
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
            self.pending_bytes -= pending.size
            # Stored in sequence order (by `account`): an earlier batch still being rebuilt must not
            # look like a replay to the acceptor once this one is stored.
            state.ready[item.sequence] = (pending, frame)
        self._account_session(state, time.monotonic())

    def _deliver(self, state: _Session, seq: int, pending: _Pending, frame: bytes) -> None:
        try:
            decoded = decode_wire(frame, self.keys.get, self.cfg.max_frame_bytes)
            if decoded.type is not FrameType.BATCH or decoded.sequence != seq or decoded.sender != state.sender:
                raise FrameError("bad_frame", f"diode frame {seq} carries {decoded.type.name} {decoded.sequence}")
            result = self.acceptor.accept(decoded)
        except FrameError as exc:
            self.acceptor.security_event(exc.reason, state.sender, f"diode batch {seq}: {exc}")
            self._lose(seq, seq, pending.count, "rejected")
            return
        if result.replay:  # sent again by a restarted sender: already stored in an earlier session
            self.metrics.inc("diode_datagrams_total", kind="replayed_batch")
        else:
            self.delivered_points += pending.count

    def _lose(self, first: int, last: int, points: int, why: str) -> None:
        self.lost_points += points
        self.metrics.inc("diode_lost_total", points)
        self.metrics.inc("diode_lost_batches_total", last - first + 1)
        rng = f"{first}" if first == last else f"{first}-{last}"
        log.warning("diode: lost batch %s (%d points, %s)", rng, points, why)

    def _account_session(self, state: _Session, now: float) -> None:
        """Resolve one session's sequence numbers in order: delivered, or lost after ``diode_gap_timeout_s``."""
        timeout = self.cfg.diode_gap_timeout_s
        while True:
            seq = state.next_seq
            if seq in state.ready:
                pending, frame = state.ready.pop(seq)
                self._deliver(state, seq, pending, frame)
                state.resolved_points = pending.points_before + pending.count
            elif seq in state.pending and now - state.pending[seq].first_seen > timeout:
                p = state.pending.pop(seq)
                self.pending_bytes -= p.size
                self._lose(seq, seq, p.count, "not enough shares to rebuild it")
                state.resolved_points = p.points_before + p.count
            else:
                if seq in state.pending:
                    break
                later = [s for s in state.markers if s > seq]
                if not later:
                    break
                nxt = min(later)
                before, seen = state.markers[nxt]
                if now - seen <= timeout:
                    break
                # Nothing at all arrived for seq..nxt-1: the next batch says how many points that was.
                self._lose(seq, nxt - 1, before - state.resolved_points, "no datagram arrived")
                state.resolved_points = before
                state.next_seq = nxt
                for stale in [s for s in state.markers if s < nxt]:
                    del state.markers[stale]
                self._dirty = True
                continue
            state.markers.pop(seq, None)
            state.next_seq = seq + 1
            self._dirty = True

    def account(self, now: float | None = None) -> None:
        """Resolve every session (timeouts need a clock, not a datagram); persist what changed."""
        now = time.monotonic() if now is None else now
        for state in self.sessions.values():
            self._account_session(state, now)
        heard = max((s.last_heard for s in self.sessions.values()), default=0.0)
        self.metrics.set(
            "connected", 1 if now - heard < 3 * max(1.0, self.cfg.diode_gap_timeout_s) else 0, target="diode"
        )
        self.metrics.set("diode_sessions", len(self.sessions))
        self.metrics.set("diode_pending_bytes", self.pending_bytes)
        self.metrics.set("diode_queue_datagrams", len(self._queue))
        for kind, attr in (("queue_full", "_queue_full"), ("oversized", "_oversized"), ("foreign_source", "_foreign")):
            count = getattr(self, attr)
            if count:
                setattr(self, attr, 0)  # only this thread resets; the socket thread only increments
                self.metrics.inc("diode_datagrams_total", count, kind=kind)
        self._hand_over_refusals()
        self._save_sessions()
        self.acceptor.flush_events()

    def run(self) -> None:
        log.info("diode receiver listening on udp %s:%d", self.cfg.diode_listen_host, self.sock.getsockname()[1])
        self.reporter.start()
        receiver = threading.Thread(target=self._receive, name="diode-recv", daemon=True)
        receiver.start()
        print(f"READY relay-diode-receive udp {self.sock.getsockname()[0]}:{self.sock.getsockname()[1]}", flush=True)
        last_heard = time.monotonic()
        last_account = 0.0
        silent = False
        try:
            while not self.stop.is_set():
                self._wake.wait(0.2)
                self._wake.clear()
                while self._queue:
                    self.handle(*self._queue.popleft())
                    last_heard = time.monotonic()
                    silent = False
                    if last_heard - last_account > 0.2:  # timeouts and persistence also during a flood
                        self.account(last_heard)
                        last_account = last_heard
                self.account()
                last_account = time.monotonic()
                if not silent and time.monotonic() - last_heard > 5 * max(1.0, self.cfg.diode_gap_timeout_s):
                    log.warning(
                        "diode link silent for %.0fs: no datagram, not even a heartbeat", time.monotonic() - last_heard
                    )
                    self.metrics.set("connected", 0, target="diode")
                    silent = True
        finally:
            self.sock.close()
            receiver.join(1)
            self._save_sessions()
            self.reporter.stop()
            self.acceptor.close()
            self.acceptor.spool.close()
