"""Hostile traffic against the real DMZ processes while a real stream goes through them.

Used by ``bench/flood.py`` (1,000,000 datagrams) and, smaller, by ``tests/test_flood.py``. Two
phases, each with its own DMZ install (the diode receiver and the gateway do not share a spool):

- diode: forged (wrong key), replayed (authentic, already stored) and malformed datagrams at the
  diode receiver, paced at ``rate`` per second, while ``diode-send`` streams a pre-filled spool;
- TCP: half-open connections (connect, say nothing) and failed handshakes at the gateway from
  another address, while ``relay ot`` streams a pre-filled spool.

Each phase reports the DMZ process's resident memory before, at its peak during, and after the
flood (from /proc), whether every real point arrived, and what the audit trail holds.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import random
import re
import resource
import socket
import threading
import time
from pathlib import Path

from flowline.core.spool import SpoolReader
from flowline.lab.pki import CertificateAuthority
from flowline.lab.services import wait_until
from flowline.relay.body import decode_body
from flowline.relay.diode_wire import encode_heartbeat, encode_shares
from tests.relay_helpers import SENDER, RelayRig, points

ATTACKER = "127.0.0.2"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError(f"no VmRSS for {pid}")


class MemoryWatch:
    """Samples a process's RSS every 0.1 s on a thread; `peak` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_kib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.peak = max(self.peak, rss_kib(self.pid))
            except (OSError, ValueError):  # the process ended: the test says why
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _datagram_mix(key: bytes, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    frame = rng.randbytes(20_000)
    forged = encode_shares(SENDER, rng.randbytes(32), rng.getrandbits(64), 5, 0, 10, frame, 1100, 10, 16)
    replayed = [
        encode_shares(SENDER, key, rng.getrandbits(64), 0, 0, 10, frame[:2000], 1100, 2, 3)[0] for _ in range(200)
    ]
    replayed += [encode_heartbeat(SENDER, key, rng.getrandbits(64), 0, 0) for _ in range(100)]
    malformed = [rng.randbytes(rng.randrange(0, 1400)) for _ in range(200)]
    malformed += [d[: rng.randrange(1, len(d))] for d in forged[:50]]  # truncated
    mix = [*forged, *replayed, *malformed] * 2
    rng.shuffle(mix)
    return mix


def _flood_process(port: int, key: bytes, count: int, rate: float, seed: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    mix = _datagram_mix(key, seed)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((ATTACKER, 0))
    target = ("127.0.0.1", port)
    start = time.monotonic()
    sent = 0
    while sent < count:
        for datagram in mix[: min(1000, count - sent)]:
            with contextlib.suppress(OSError):  # ENOBUFS: lost like on a wire
                sock.sendto(datagram, target)
            sent += 1
        mix = mix[1000:] + mix[:1000]
        delay = start + sent / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    out.put((sent, time.monotonic() - start))


class DmzCount:
    """Telemetry points in the DMZ spool, read incrementally: polling must not load the machine under test."""

    def __init__(self, rig: RelayRig) -> None:
        self.reader = SpoolReader(rig.dmz.spool_dir("dmz"))
        self.position = self.reader.acked
        self.points = 0

    def __call__(self) -> int:
        for record in self.reader.read(after=self.position, max_records=100_000, max_bytes=1 << 40):
            series, _ = decode_body(record.payload)
            self.points += sum(len(rests) for measurement, _tags, rests in series if measurement == "telemetry")
            self.position = record.end
        return self.points


LOST = re.compile(r"diode: lost batch \S+ \((\d+) points")


def _lost_points(log: Path) -> int:
    """Points the receiver accounted as lost (its log names every lost range with its count)."""
    return sum(int(n) for n in LOST.findall(log.read_text(errors="replace")))


def _fill(rig: RelayRig, total: int) -> None:
    with rig.ot_spool() as spool:
        for i in range(0, total, 5000):
            spool.append_points(points(min(5000, total - i), start_ns=1_700_000_000_000_000_000 + i * 1_000_000))


def _audit(rig: RelayRig) -> tuple[list[dict[str, object]], int]:
    folder = rig.root / "dmz" / "relay-dmz"
    lines: list[dict[str, object]] = []
    size = 0
    for path in sorted(folder.glob("audit.jsonl*")):
        size += path.stat().st_size
        lines += [json.loads(line) for line in path.read_text().splitlines()]  # every line must parse
    return lines, size


def diode_flood(
    root: Path, pki: CertificateAuthority, datagrams: int, stream_points: int, rate: float
) -> dict[str, float]:
    rig = RelayRig(root, pki)
    rig.update_dmz(security_event_interval_s=2, diode_gap_timeout_s=10)
    _fill(rig, stream_points)
    try:
        receiver = rig.start("diode-receive", "--config", str(rig.dmz_path))
        wait_until(lambda: "READY" in (rig.root / "diode-receive-0.log").read_text(), 30, "the diode receiver")
        # Paced so that the real stream lasts about as long as the flood: they overlap throughout.
        spool_bytes = sum(f.stat().st_size for f in rig.ot.spool_dir("opcua").iterdir())
        pace = max(50_000.0, spool_bytes * 2 / (datagrams / rate))
        # Small batches: each must arrive whole within the receiver's gap timeout at this slow pace.
        ot = rig.write_ot_config("ot-diode.yaml", diode_rate_bytes_s=pace, batch_max_points=2000)
        rig.start("diode-send", "--config", str(ot))
        wait_until((rig.root / "dmz" / "relay-dmz" / "sequences.json").exists, 60, "the first real batch stored")
        before = rss_kib(receiver.pid)
        watch = MemoryWatch(receiver.pid)
        out: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
        key = rig.key_file.read_text().strip().encode()
        flood = multiprocessing.Process(target=_flood_process, args=(rig.diode_port, key, datagrams, rate, 1, out))
        flood.start()
        sent, seconds = out.get(timeout=datagrams / rate * 3 + 120)
        flood.join()
        log = rig.root / "diode-receive-0.log"
        count = DmzCount(rig)
        wait_until(
            lambda: count() + _lost_points(log) >= stream_points,
            120,
            "every point of the real stream delivered or accounted lost",
            interval=1,
        )
        time.sleep(3)  # a few aggregation intervals: the repeats' lines are written
        peak = watch.stop()
        after = rss_kib(receiver.pid)
        delivered = count()
        lost = _lost_points(log)
    finally:
        rig.stop_all()
    lines, size = _audit(rig)
    absorbed = sum(int(str(a["count"])) for a in lines if str(a["reason"]).startswith("diode_"))
    return {
        "datagrams_sent": sent,
        "flood_seconds": round(seconds, 2),
        "datagrams_absorbed": absorbed,
        "absorbed_per_s": round(absorbed / seconds),
        "rss_before_mib": round(before / 1024, 1),
        "rss_peak_mib": round(peak / 1024, 1),
        "rss_after_mib": round(after / 1024, 1),
        "stream_points": stream_points,
        "stream_delivered": delivered,
        "stream_lost": lost,
        "audit_lines": len(lines),
        "audit_bytes": size,
    }


def _half_open_flood(port: int, connections: int, held: int, stop: threading.Event, result: dict[str, int]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, held + 1000)), hard))
    open_: list[socket.socket] = []
    done = 0
    while done < connections and not stop.is_set():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((ATTACKER, 0))
        try:
            sock.connect(("127.0.0.1", port))
            if done % 2:
                sock.sendall(b"\x16\x03\x01\x02\x00" + random.randbytes(64))  # a ClientHello that is not
        except OSError:
            sock.close()
            continue
        open_.append(sock)
        done += 1
        if len(open_) > held:
            open_.pop(0).close()
    for sock in open_:
        sock.close()
    result["connections"] = done


def gateway_flood(root: Path, pki: CertificateAuthority, connections: int, stream_points: int) -> dict[str, float]:
    rig = RelayRig(root, pki)
    rig.update_dmz(security_event_interval_s=2)
    _fill(rig, stream_points)
    try:
        gateway = rig.start_gateway()
        before = rss_kib(gateway.pid)
        watch = MemoryWatch(gateway.pid)
        stop = threading.Event()
        result: dict[str, int] = {}
        attacker = threading.Thread(target=_half_open_flood, args=(rig.port, connections, 500, stop, result))
        started = time.monotonic()
        attacker.start()
        rig.start("ot", "--config", str(rig.ot_path))
        count = DmzCount(rig)
        wait_until(lambda: count() >= stream_points, 120, "the real stream complete", interval=1)
        attacker.join()
        seconds = time.monotonic() - started
        time.sleep(3)
        peak = watch.stop()
        after = rss_kib(gateway.pid)
        delivered = count()
    finally:
        stop.set()
        rig.stop_all()
    lines, size = _audit(rig)
    return {
        "connections": result.get("connections", 0),
        "connections_per_s": round(result.get("connections", 0) / seconds),
        "rss_before_mib": round(before / 1024, 1),
        "rss_peak_mib": round(peak / 1024, 1),
        "rss_after_mib": round(after / 1024, 1),
        "stream_points": stream_points,
        "stream_delivered": delivered,
        "audit_lines": len(lines),
        "audit_bytes": size,
    }
