"""Diode receiver (DMZ): rebuilds batches from datagrams, verifies them and accounts every gap exactly.

Rebuilt frames go to the same `BatchAcceptor` as the TLS gateway (signature, approved flows, durable
spool, replay detection). A batch of which too few shares arrived is declared lost after
``diode_gap_timeout_s`` (``flowline_diode_lost_total``, a log line per lost range).

Hostile traffic: every datagram, heartbeats included, is authenticated (`parse_datagram`) before
the receiver keeps any state for it. A new session is admitted only if it starts after the last
batch stored for that sender (an old session's datagrams replayed are dropped), each sender keeps
at most ``diode_sessions_per_sender`` sessions (the least recently heard is evicted), shares waiting
for their batch are bounded by ``diode_max_pending_bytes`` (the oldest batch is given up and counted
lost), the queue between the socket thread and the decoder by ``diode_queue_datagrams``, and
datagrams from outside ``diode_allowed_sources`` are dropped before parsing. Each refusal is
counted in ``flowline_diode_datagrams_total{kind}`` and rate-limited into the audit trail; accounting
runs per session (the one a datagram touched), never over all of them per datagram. Sessions (next
sequence, points resolved) are persisted, so a restarted receiver goes on accounting where it was.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import zfec  # type: ignore[import-untyped]

from flowline.core.config import FlowlineConfig
from flowline.core.files import atomic_write_json
from flowline.core.metrics import Metrics, MetricsReporter
from flowline.core.spool import SpoolError
from flowline.core.status import ProcessStatus
from flowline.inventory import load_site
from flowline.relay.diode_wire import DatagramError, Heartbeat, parse_datagram
from flowline.relay.dmz.acceptor import BatchAcceptor
from flowline.relay.dmz.gateway import load_sender_keys, open_acceptor
from flowline.relay.frames import FrameError, FrameType, decode_wire

log = logging.getLogger(__name__)

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux; not in every Python's socket module
MAX_MARKERS = 4096  # sequence numbers announced ahead of the next one, per session


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
        site = load_site(config.site_file)
        self.metrics = Metrics("relay-dmz", site.site, config.instance)
        self.acceptor: BatchAcceptor = open_acceptor(config, self.metrics)
        self.reporter = MetricsReporter(self.metrics, self.acceptor.append_points, config.metrics_interval_s)
        # The "connected" gauge of target "diode" (heard from the sender lately) becomes the source link.
        self.status = ProcessStatus(config.data_dir, "diode-receive").watch(self.metrics, "source")
        self.status.spool("dmz", config.spool_dir("dmz"))
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
        except (SpoolError, OSError) as exc:
            # No return path to refuse through: a batch the DMZ spool cannot store is lost, and counted.
            self._lose(seq, seq, pending.count, f"the DMZ spool cannot store it: {exc}")
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
        self.status.start()
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
            self.status.stop()
