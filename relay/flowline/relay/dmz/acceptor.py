"""What the DMZ does with a verified batch: sequence check, flow policy, durable spool, audit.

Shared by the TCP gateway and the diode receiver. `BatchAcceptor.accept` returns only once the
accepted points, the security events they caused and the sender's sequence are on disk, so the
caller may acknowledge (TCP) or forget (diode) the batch.

Policy per point: ``telemetry`` must be an approved flow of the site file for that sender
(`Site.is_flow_approved`); the pipeline's own ``flowline_*`` metrics from an authenticated sender
pass; anything else (e.g. an OT sender forging ``asset_health`` or ``security_event``) is refused.
Refused points are aggregated per (reason, sender, asset, tag) into ``security_event`` points (count,
first/last seen; the point's timestamp is the first sighting, so later updates overwrite the same
row) and written as JSON lines to the append-only audit log. Events are rate-limited per key
(`EventLimiter`): the first of an interval is logged, audited and stored at once, the repeats are
counted and recorded as one line with their count when `flush_events` finds the interval over, so a
misconfigured flow or a flood costs one line per key and interval, not one per batch or packet.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from flowline.core.files import atomic_write_json
from flowline.core.metrics import Metrics
from flowline.core.points import TELEMETRY, LineProtocolError, Point, series_key
from flowline.core.spool import SpoolWriter
from flowline.inventory import Site
from flowline.relay.body import BodyError, decode_body, encode_body
from flowline.relay.dmz.audit import AuditLog, EventLimiter, LimitKey
from flowline.relay.frames import Frame, FrameError

log = logging.getLogger("flowline.relay.dmz")

SECURITY_EVENT = "security_event"


@dataclass(frozen=True)
class AcceptResult:
    sequence: int
    accepted: int
    refused: int
    replay: bool
    gap: int  # batches missing before this one (0 when in order)


class BatchAcceptor:
    def __init__(
        self,
        site: Site,
        spool: SpoolWriter,
        metrics: Metrics,
        state_dir: Path,
        max_body_bytes: int,
        event_interval_s: float = 60.0,
        audit_max_bytes: int = 16 << 20,
        audit_keep_files: int = 5,
    ) -> None:
        self.site = site
        self.spool = spool
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        state_dir.mkdir(parents=True, exist_ok=True)
        self._seq_path = state_dir / "sequences.json"
        self.last_seq: dict[str, int] = (
            {str(k): int(v) for k, v in json.loads(self._seq_path.read_text()).items()}
            if self._seq_path.exists()
            else {}
        )
        self.audit = AuditLog(state_dir / "audit.jsonl", audit_max_bytes, audit_keep_files)
        self.limiter = EventLimiter(event_interval_s)
        self._events: dict[LimitKey, list[int | str]] = {}  # key -> [count, first_ns, last_ns, message]
        self._approved: dict[tuple[str, str, str], bool] = {}
        self._lock = threading.Lock()  # the spool writer is shared with the metrics reporter thread

    # --- durable outputs ------------------------------------------------------------------------

    def append_points(self, points: list[Point]) -> None:
        """Metrics sink and security events: durable in the DMZ spool like any accepted batch."""
        if points:
            with self._lock:
                self.spool.append([encode_body(points)])

    def _event_points(self, keys: list[LimitKey]) -> list[Point]:
        out = []
        for key in keys:
            reason, sender, asset, tag, source = key
            count, first, last, message = self._events[key]
            tags = {"site": self.site.site, "sender": sender, "reason": reason}
            if asset:
                tags["asset"] = asset
            if tag:
                tags["tag"] = tag
            if source:
                tags["source"] = source
            fields: dict[str, float | int | bool | str] = {
                "count": int(count),
                "first_seen_ns": int(first),
                "last_seen_ns": int(last),
                "message": str(message),
            }
            out.append(Point(SECURITY_EVENT, tags, fields, int(first)))
        return out

    def _note_events(self, events: dict[LimitKey, int], message: str, extra: dict[str, object]) -> list[Point]:
        now = time.time_ns()
        records: list[dict[str, object]] = []
        for key, count in events.items():
            entry = self._events.get(key)
            if entry is None:
                self._events[key] = [count, now, now, message]
            else:
                entry[0] = int(entry[0]) + count
                entry[2] = now
                entry[3] = message
            reason, sender, asset, tag, source = key
            record: dict[str, object] = {
                "time_ns": now,
                "reason": reason,
                "sender": sender,
                "asset": asset,
                "tag": tag,
                "count": count,
                "message": message,
                **extra,
            }
            if source:
                record["source"] = source
            records.append(record)
        self.audit.write(records)
        return self._event_points(list(events))

    def admit_event(
        self, reason: str, sender: str, message: str, source: str = "", extra: dict[str, object] | None = None
    ) -> LimitKey | None:
        """Count a connection-level event; the key to record now, or None (a repeat, recorded later).

        Cheap and free of I/O: callers on an event loop call this there and `record_event` elsewhere.
        """
        self.metrics.inc("rejected_total", reason=reason)
        return self.limiter.admit((reason, sender, "", "", source), 1, message, extra or {})

    def record_event(self, key: LimitKey, count: int, message: str, extra: dict[str, object]) -> None:
        """Log, audit (fsync) and store one event line; blocking, so never on an event loop."""
        reason, sender, _, _, source = key
        log.warning("security event %s from %s%s: %s", reason, sender, f" at {source}" if source else "", message)
        with self._lock:
            points = self._note_events({key: count}, message, extra)
            self.spool.append([encode_body(points)])

    def security_event(self, reason: str, sender: str, message: str, source: str = "", **extra: object) -> None:
        """A connection-level event (bad certificate, bad signature, bad frame): log, audit, store."""
        key = self.admit_event(reason, sender, message, source, dict(extra))
        if key is not None:
            self.record_event(key, 1, message, dict(extra))

    def flush_events(self, force: bool = False) -> int:
        """Record the repeats of every key whose interval is over (all with ``force``); returns how many lines."""
        due = self.limiter.due(force)
        for key, count, message, extra in due:
            summary = f"{count} more in the last {self.limiter.interval_s:.0f}s; last: {message}"
            self.record_event(key, count, summary, extra)
        return len(due)

    # --- batches ---------------------------------------------------------------------------------

    def _is_approved(self, sender: str, measurement: object, tags: object) -> bool:
        if not isinstance(measurement, str) or not isinstance(tags, dict):
            return False
        if measurement.startswith("flowline_"):
            return True
        if measurement != TELEMETRY:
            return False
        key = (sender, str(tags.get("asset", "")), str(tags.get("tag", "")))
        ok = self._approved.get(key)
        if ok is None:
            ok = self._approved[key] = self.site.is_flow_approved(*key)
        return ok

    def _check(self, frame: Frame) -> tuple[bytes, int, int, dict[LimitKey, int]]:
        """(record to store, points in, points kept, refused per event key) for one batch body."""
        sender, seq = frame.sender, frame.sequence
        payload = frame.payload(self.max_body_bytes)
        try:
            series, raw = decode_body(payload)
            for measurement, tags, rests in series:
                series_key(measurement, tags)  # the writer will build lines from it: must be valid
                if "\n" in "".join(rests):
                    raise BodyError(f"a point of {measurement} {tags} carries a line break outside a string")
        except (BodyError, LineProtocolError) as exc:
            raise FrameError("bad_frame", f"batch {seq} from {sender!r}: {exc}") from exc
        refused: dict[LimitKey, int] = {}
        kept_series, kept_raw = [], []
        total = kept = 0
        for entry in series:
            measurement, tags, rests = entry
            total += len(rests)
            if self._is_approved(sender, measurement, tags):
                kept_series.append(entry)
                kept += len(rests)
            else:
                key = ("unapproved_flow", sender, tags.get("asset", ""), tags.get("tag", measurement), "")
                refused[key] = refused.get(key, 0) + len(rests)
        for item in raw:
            total += 1
            name, labels = (item[0], item[1]) if isinstance(item, list) and len(item) == 4 else (None, None)
            if self._is_approved(sender, name, labels):
                kept_raw.append(item)
                kept += 1
            else:
                labels = labels if isinstance(labels, dict) else {}
                key = ("unapproved_flow", sender, str(labels.get("asset", "")), str(labels.get("tag", name)), "")
                refused[key] = refused.get(key, 0) + 1
        # The common case keeps every point: store the sender's bytes instead of re-encoding them.
        record = payload if not refused else orjson.dumps({"series": kept_series, "points": kept_raw})
        return record, total, kept, refused

    def accept(self, frame: Frame) -> AcceptResult:
        """Verify sequence and policy, make the result durable; raises `FrameError` on a bad body."""
        sender, seq = frame.sender, frame.sequence
        last = self.last_seq.get(sender)
        if last is not None and seq <= last:
            self.metrics.inc("replays_total", sender=sender)
            log.info("batch %d from %s already stored (last %d): acknowledged again, not rewritten", seq, sender, last)
            return AcceptResult(seq, 0, 0, True, 0)
        record, total, kept, refused = self._check(frame)
        gap = seq - last - 1 if last is not None else 0
        records: list[bytes] = [record] if kept else []
        with self._lock:
            if refused:
                n = sum(refused.values())
                self.metrics.inc("rejected_total", n, reason="unapproved_flow")
                extra: dict[str, object] = {"sequence": seq}
                now = {
                    key: count
                    for key, count in refused.items()
                    if self.limiter.admit(key, count, "not an approved flow", extra) == key
                }
                if now:  # repeats within the interval are counted and recorded by flush_events
                    log.warning("batch %d from %s: %d points of unapproved flows dropped", seq, sender, n)
                    records.append(encode_body(self._note_events(now, "not an approved flow", extra)))
            if gap > 0:
                message = (
                    f"sequence gap: expected {last + 1 if last is not None else '?'}, got {seq} ({gap} batches missing)"
                )
                log.warning("%s from %s", message, sender)
                self.metrics.inc("sequence_gaps_total", sender=sender)
                gap_key: LimitKey = ("sequence_gap", sender, "", "", "")
                records.append(encode_body(self._note_events({gap_key: 1}, message, {"sequence": seq})))
            self.spool.append(records)
        self.last_seq[sender] = seq
        atomic_write_json(self._seq_path, self.last_seq)
        self.metrics.inc("points_in_total", total)
        self.metrics.inc("points_out_total", kept)
        self.metrics.inc("batches_total")
        self.metrics.set("spool_bytes", self.spool.size_bytes, spool="dmz")
        return AcceptResult(seq, kept, total - kept, False, gap)

    def close(self) -> None:
        self.flush_events(force=True)
        self.audit.close()
