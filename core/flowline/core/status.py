"""Per-process health in a small JSON file, readable without opening a connection into OT.

Every long-running Flowline process keeps one `ProcessStatus` and rewrites
``<data_dir>/status/<process>.json`` every `WRITE_EVERY_S` seconds (write to a temporary file,
then rename: a reader never sees half a file). The file holds:

* per link (a source the process reads from, or a sink it writes to): connected or not and since
  when, connection attempts and failures, the last successful read or write, the last error;
* per spool: its depth (bytes not yet acknowledged by its reader);
* for the process: pid, state (``running``, ``degraded``, ``failed``, ``stopped``), when it last read
  and wrote data, the last warning or error it logged.

Most of it needs no wiring in the stages: `ProcessStatus.watch` listens to the stage's `Metrics`
(every stage already sets the ``connected`` gauge per target and counts ``points_in_total`` and
``points_out_total``), and a logging handler keeps the last warning or error. Stages only add
`ProcessStatus.ok` where a link succeeds, and declare their spools.

`flowline status`, the Docker health check and the systemd units read these files; under systemd
(``Type=notify``) each write also tells the service manager ``READY``, ``WATCHDOG`` and a one-line
``STATUS`` (shown by ``systemctl status``), so a process that stops writing is restarted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from flowline.core.files import atomic_write_text
from flowline.core.metrics import Metrics

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WRITE_EVERY_S = 2.0
# A file not rewritten for this long means the process is dead or hung (it writes every 2 s).
STALE_AFTER_S = 30.0
# A link down for longer than this makes the process unhealthy (a blip or a restart of the peer does not).
DISCONNECTED_GRACE_S = 60.0

LinkKind = Literal["source", "sink"]
State = Literal["starting", "running", "degraded", "failed", "stopped"]

# The process name of each long-running command: the status file's name, and how a container's
# health check finds the file of the process it runs (from PID 1's command line).
PROCESS_NAMES: dict[tuple[str, ...], str] = {
    ("collect", "mqtt"): "collector-mqtt",
    ("collect", "opcua"): "collector-opcua",
    ("relay", "ot"): "relay-ot",
    ("relay", "dmz"): "relay-dmz",
    ("relay", "writer"): "relay-writer",
    ("relay", "diode-send"): "diode-send",
    ("relay", "diode-receive"): "diode-receive",
    ("analyze",): "analytics",
    ("historian", "rollup"): "rollup",
}


def status_dir(data_dir: Path) -> Path:
    return data_dir / "status"


def now_iso(epoch_s: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if epoch_s is None else epoch_s, UTC).isoformat(timespec="seconds")


def parse_iso(text: object) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


@dataclass
class Link:
    kind: LinkKind
    connected: bool | None = None  # None until the first attempt says
    since: float | None = None  # when `connected` took its current value
    last_ok: float | None = None  # last successful read (source) or write (sink)
    last_error: str | None = None
    last_error_at: float | None = None


def sd_notify(message: str) -> bool:
    """Send ``message`` to systemd's notify socket (``Type=notify`` units); False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True


class _LastProblem(logging.Handler):
    """Keeps the newest WARNING-or-worse record of the ``flowline`` loggers for the status file."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.message: str | None = None
        self.at: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):  # a status handler must never break logging
            self.message = f"{record.levelname}: {record.getMessage()}"[:500]
            self.at = record.created


class ProcessStatus:
    """The status file of one process. `start` it once the process runs, `stop` it on the way out."""

    def __init__(self, data_dir: Path, process: str, interval_s: float = WRITE_EVERY_S) -> None:
        self.path = status_dir(data_dir) / f"{process}.json"
        self.process = process
        self.interval_s = interval_s
        self.started_at = time.time()
        self.state: State = "starting"
        self.links: dict[str, Link] = {}
        self.spools: dict[str, Path] = {}
        self.extra: dict[str, Any] = {}  # process-specific facts (e.g. the last analytics pass)
        self.last_read: float | None = None
        self.last_write: float | None = None
        self._metrics: Metrics | None = None
        self._watched_kind: LinkKind = "source"
        self._seen = {"points_in_total": 0.0, "points_out_total": 0.0}
        self._problem = _LastProblem()
        self._error: tuple[str, float] | None = None  # set by `fail`, outranks logged problems
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready_sent = False

    # --- what stages report ----------------------------------------------------------------------

    def watch(self, metrics: Metrics, links: LinkKind = "source") -> ProcessStatus:
        """Follow ``metrics``: each ``connected{target}`` gauge becomes a link of kind ``links``."""
        self._metrics = metrics
        self._watched_kind = links
        metrics.add_listener(self._on_gauge)
        return self

    def spool(self, name: str, folder: Path) -> ProcessStatus:
        """Report the depth of the spool in ``folder`` (read from disk, as any reader would)."""
        self.spools[name] = folder
        return self

    def link(self, name: str, kind: LinkKind) -> Link:
        with self._lock:
            return self.links.setdefault(name, Link(kind))

    def connected(self, name: str, kind: LinkKind, up: bool, error: str | None = None) -> None:
        link = self.link(name, kind)
        with self._lock:
            if link.connected is not up:
                link.connected, link.since = up, time.time()
            if error is not None:
                link.last_error, link.last_error_at = error, time.time()

    def ok(self, name: str, kind: LinkKind) -> None:
        """A read from (source) or write to (sink) ``name`` succeeded: it is connected, now."""
        link = self.links.get(name) or self.link(name, kind)
        link.last_ok = time.time()  # hot path: a plain store, no lock (a float assignment is atomic)
        if link.connected is not True:
            self.connected(name, kind, True)

    def fail(self, message: str) -> None:
        """The process is ending on this error: the file says ``failed`` and why."""
        self._error = (message, time.time())
        self.state = "failed"
        self.write()

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> ProcessStatus:
        logging.getLogger("flowline").addHandler(self._problem)
        self.state = "running"
        self.write()
        self._thread = threading.Thread(target=self._run, name="status-file", daemon=True)
        self._thread.start()
        return self

    def stop(self, state: State = "stopped") -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 5)
        if self.state != "failed":
            self.state = state
        self.write()
        logging.getLogger("flowline").removeHandler(self._problem)
        if self._metrics is not None:
            self._metrics.remove_listener(self._on_gauge)

    def __enter__(self) -> ProcessStatus:
        return self.start()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is not None and self.state != "failed" and not isinstance(exc, KeyboardInterrupt | SystemExit):
            self.fail(f"{type(exc).__name__}: {exc}")
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.write()
            except Exception as exc:  # the status must never take the process down; say it once a cycle
                log.warning("cannot write status file %s: %s", self.path, exc)

    # --- the file --------------------------------------------------------------------------------

    def _on_gauge(self, name: str, value: float, labels: dict[str, str]) -> None:
        if name == "connected" and "target" in labels:
            self.connected(labels["target"], self._watched_kind, value >= 1)

    def _follow_counters(self, now: float) -> dict[str, float]:
        """Totals of the stage's counters; a counter that grew since the last write is a read/write now."""
        if self._metrics is None:
            return {}
        totals = {name: self._metrics.total(name) for name in self._seen}
        if totals["points_in_total"] > self._seen["points_in_total"]:
            self.last_read = now
        if totals["points_out_total"] > self._seen["points_out_total"]:
            self.last_write = now
        self._seen = totals
        return {name.removesuffix("_total"): value for name, value in totals.items()}

    def _link_doc(self, name: str, link: Link) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "kind": link.kind,
            "connected": link.connected,
            "since": now_iso(link.since) if link.since else None,
            "last_ok": now_iso(link.last_ok) if link.last_ok else None,
            "last_error": link.last_error,
            "last_error_at": now_iso(link.last_error_at) if link.last_error_at else None,
        }
        if self._metrics is not None:
            for counter in ("connect_attempts_total", "connect_failures_total", "reconnects_total"):
                doc[counter.removesuffix("_total")] = int(self._metrics.counter(counter, target=name))
        return doc

    def document(self) -> dict[str, Any]:
        now = time.time()
        counters = self._follow_counters(now)
        with self._lock:
            links = {name: self._link_doc(name, link) for name, link in self.links.items()}
        spools: dict[str, Any] = {}
        for name, folder in self.spools.items():
            spools[name] = {"folder": str(folder), "depth_bytes": _spool_depth(folder)}
        if self._error is not None:
            error: dict[str, Any] | None = {"message": self._error[0], "at": now_iso(self._error[1])}
        elif self._problem.message is not None:
            error = {"message": self._problem.message, "at": now_iso(self._problem.at)}
        else:
            error = None
        state = self.state
        if state == "running" and any(link["connected"] is False for link in links.values()):
            state = "degraded"
        return {
            "version": FORMAT_VERSION,
            "process": self.process,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "state": state,
            "started_at": now_iso(self.started_at),
            "updated_at": now_iso(now),
            "interval_s": self.interval_s,
            "last_read": now_iso(self.last_read) if self.last_read else None,
            "last_write": now_iso(self.last_write) if self.last_write else None,
            "counters": counters,
            "links": links,
            "spools": spools,
            "last_error": error,
            **({"extra": self.extra} if self.extra else {}),
        }

    def write(self) -> None:
        doc = self.document()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Atomic, not durable: rewritten every few seconds, and a reader treats a bad file as stale.
        atomic_write_text(self.path, json.dumps(doc, indent=1) + "\n", durable=False)
        if doc["state"] in ("running", "degraded"):
            if not self._ready_sent:
                self._ready_sent = sd_notify("READY=1")
            sd_notify(f"WATCHDOG=1\nSTATUS={verdict(doc, time.time()).summary}")
        elif doc["state"] in ("stopped", "failed"):
            sd_notify(f"STOPPING=1\nSTATUS={verdict(doc, time.time()).summary}")


def _spool_depth(folder: Path) -> int | None:
    from flowline.core.spool import SpoolReader  # the reader's own view of what is still to send

    if not folder.is_dir():
        return None
    try:
        return SpoolReader(folder).pending_bytes()
    except (OSError, ValueError):
        return None


# --- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    summary: str  # one line: what is wrong, or that all is well


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def since_text(iso: object, now: float) -> str:
    """``since 01:02:03 (4 min ago)``; the date is added when it is not today."""
    at = parse_iso(iso)
    if at is None:
        return "since ?"
    moment = datetime.fromtimestamp(at, UTC)
    today = datetime.fromtimestamp(now, UTC).date() == moment.date()
    shown = moment.strftime("%H:%M:%S" if today else "%Y-%m-%d %H:%M:%S")
    return f"since {shown} UTC ({_ago(max(0.0, now - at))} ago)"


def link_summary(name: str, link: dict[str, Any], now: float) -> str:
    """``mqtt://host:1883 disconnected since 01:02:03 UTC (40 s ago), 5 attempts: connection refused``."""
    if link.get("connected") is None:
        return f"{name} not connected yet"
    word = "connected" if link["connected"] else "disconnected"
    text = f"{name} {word} {since_text(link.get('since'), now)}"
    if not link["connected"]:
        attempts = link.get("connect_attempts") or link.get("connect_failures")
        if attempts:
            text += f", {attempts} attempt{'s' if attempts != 1 else ''}"
        if link.get("last_error"):
            text += f": {link['last_error']}"
    return text


def verdict(doc: dict[str, Any], now: float, stale_after_s: float = STALE_AFTER_S) -> Verdict:
    """Healthy or not, with the reason in one line (what `flowline status --check` prints)."""
    name = doc.get("process", "?")
    updated = parse_iso(doc.get("updated_at"))
    state = doc.get("state")
    error = doc.get("last_error") or {}
    if state in ("failed", "unreadable"):
        return Verdict(False, f"{name}: {state}: {error.get('message', 'no message')}")
    if state == "stopped":
        return Verdict(False, f"{name}: stopped")
    if updated is None or now - updated > max(stale_after_s, 3 * float(doc.get("interval_s", WRITE_EVERY_S))):
        age = "never" if updated is None else f"{_ago(now - updated)} ago"
        return Verdict(False, f"{name}: status file last written {age} (process hung or dead?)")
    links = doc.get("links") or {}
    down = {n: link for n, link in links.items() if link.get("connected") is False}
    if down:
        since = [parse_iso(link.get("since")) for link in down.values()]
        unhealthy = any(at is None or now - at > DISCONNECTED_GRACE_S for at in since)
        return Verdict(not unhealthy, f"{name}: " + "; ".join(link_summary(n, v, now) for n, v in down.items()))
    return Verdict(True, f"{name}: {state}")


def read_status(path: Path) -> dict[str, Any]:
    """One status file; an unreadable one becomes a document that says so (never an exception)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        return doc
    except (OSError, ValueError) as exc:
        return {"process": path.stem, "state": "unreadable", "last_error": {"message": f"{path}: {exc}"}}


def read_all(data_dir: Path) -> list[dict[str, Any]]:
    folder = status_dir(data_dir)
    if not folder.is_dir():
        return []
    return [read_status(path) for path in sorted(folder.glob("*.json"))]


def process_name(args: Sequence[str]) -> str | None:
    """The process name for a ``flowline`` command line (options and program name skipped)."""
    words = [a for a in args if not a.startswith("-")]
    for start in range(len(words)):
        for size in (2, 1):
            key = tuple(words[start : start + size])
            if key in PROCESS_NAMES:
                return PROCESS_NAMES[key]
    return None


@contextlib.contextmanager
def process_status(
    data_dir: Path, process: str, metrics: Metrics | None = None, links: LinkKind = "source",
    spools: dict[str, Path] | None = None,
) -> Iterator[ProcessStatus]:
    """`ProcessStatus` for the duration of a ``with`` block: started, failed on an exception, stopped."""
    status = ProcessStatus(data_dir, process)
    if metrics is not None:
        status.watch(metrics, links)
    for name, folder in (spools or {}).items():
        status.spool(name, folder)
    with status:
        yield status
