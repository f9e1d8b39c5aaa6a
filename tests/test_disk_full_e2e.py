"""Full disks under the spools, on the real path: publisher -> Mosquitto -> collector -> OT spool ->
relay -> DMZ spool -> writer -> InfluxDB.

Each zone has one real, small disk (a tmpfs mounted here, so the test needs root, as CI has; it
skips otherwise): the OT disk holds the OT spool (``data_dir/spool/mqtt``) and the OT sender's
journal (``data_dir/relay-ot``), the DMZ disk the DMZ spool and the gateway's sequence file and
audit log (``data_dir/relay-dmz``). While a QoS 1 publisher streams, another writer fills one disk,
then the other, then both, and keeps them full (taking any space the relay frees) for a while; then
the space is freed. The spools see real ENOSPC and short writes. Then it reconciles: every message
the broker acknowledged is in InfluxDB with its value. It prints the figures: messages acknowledged,
refused while full, lost (0), duplicates spooled by the collector (redeliveries), and checks the
collector's MQTT connection only ever dropped when the collector asked (keep-alive runs on while the
spool refuses).
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from flowline.lab.services import wait_until
from flowline.lab.stack import LocalStack, StackOptions, StageProcess
from tests.conftest import unavailable
from tests.test_chaos_pipeline import AckedPublisher, expected_value

pytestmark = pytest.mark.slow

TMPFS_BYTES = 4 << 20
SEGMENT_BYTES = 64 << 10  # small segments, so the relay frees space while the disk is small
FULL_S = 8.0
RATE = 200  # messages/s


def _mount_tmpfs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES},mode=0755", "tmpfs", str(folder)],
        check=True,
        capture_output=True,
        text=True,
    )


def _unmount(folder: Path) -> None:
    if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)  # a process still holds a file


@pytest.fixture
def tmpfs_stack(tmp_path: Path) -> Iterator[tuple[LocalStack, dict[str, Path]]]:
    if os.geteuid() != 0:
        unavailable("mounting a tmpfs needs root (CI runs as root)")
    stack = LocalStack(tmp_path / "stack", StackOptions(simulate=False, backfill_days=0))
    mounted: list[Path] = []
    try:
        stack.prepare()
        layout = {"ot": ("spool/mqtt", "relay-ot"), "dmz": ("spool/dmz", "relay-dmz")}
        for zone, folders in layout.items():
            disk = stack.workdir / f"{zone}-disk"
            try:
                _mount_tmpfs(disk)
            except subprocess.CalledProcessError as exc:
                unavailable(f"cannot mount a tmpfs here: {exc.stderr.strip()}")
            mounted.append(disk)
            for name in folders:  # each zone's state on its own disk, as on a real host
                (disk / name).mkdir(parents=True)
                (stack.data_dir / name).parent.mkdir(parents=True, exist_ok=True)
                (stack.data_dir / name).symlink_to(disk / name)
        stack.start_services()
        stack.write_config()
        yield stack, {"ot": mounted[0], "dmz": mounted[1]}
    finally:
        stack.stop()
        for folder in reversed(mounted):
            _unmount(folder)


class DiskFiller:
    """Keeps a disk full: writes whenever there is room (so it takes what the relay frees), until freed."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.full = threading.Event()

    def _run(self) -> None:
        chunk = b"\0" * 4096
        with open(self.folder / "filler", "ab", buffering=0) as fh:
            while not self._stop.is_set():
                try:
                    fh.write(chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    self.full.set()
                    self._stop.wait(0.005)

    def __enter__(self) -> DiskFiller:
        self._thread.start()
        assert self.full.wait(10), f"{self.folder} never filled up"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        (self.folder / "filler").unlink()


def _config(stack: LocalStack) -> Path:
    doc: dict[str, Any] = yaml.safe_load(stack.config_path.read_text())
    doc["spool"] = {"segment_bytes": SEGMENT_BYTES}
    doc["relay_dmz"]["spool"] = {"segment_bytes": SEGMENT_BYTES}
    doc["relay_ot"].update(spools=["mqtt"], ack_timeout_s=5, reconnect_min_s=0.1, reconnect_max_s=1.0)
    # A short keep-alive: a network thread blocked on a full spool would be disconnected in 3 s.
    doc["collectors"]["mqtt"]["broker"]["keepalive_s"] = 2
    path = stack.workdir / "flowline-tmpfs.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _log(stage: StageProcess) -> str:
    return stage.log_path.read_text(errors="replace")


def _last_metric(stack: LocalStack, name: str, stage: str) -> float:
    rows = stack.query(f"SELECT last(\"value\") FROM \"flowline_{name}\" WHERE \"stage\" = '{stage}'")
    return float(rows[0]["last"]) if rows else 0.0


def test_full_disks_under_both_spools_lose_no_acknowledged_message(
    tmpfs_stack: tuple[LocalStack, dict[str, Path]],
) -> None:
    stack, disks = tmpfs_stack
    config = str(_config(stack))
    stages = {
        "writer": stack.stage("relay-writer", ["relay", "writer", "--config", config], "READY"),
        "gateway": stack.stage("relay-dmz", ["relay", "dmz", "--config", config], "READY"),
        "sender": stack.stage("relay-ot", ["relay", "ot", "--config", config], "READY"),
        "collector": stack.stage("collect-mqtt", ["collect", "mqtt", "--config", config], "READY"),
    }
    for stage in stages.values():
        stage.start()
    publisher = AckedPublisher(stack)

    def stream(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            publisher.publish(RATE // 10)
            time.sleep(0.1)

    def stream_until(predicate: Any, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < end, f"timed out waiting for {what}\n{stages['collector'].log_tail()}"
            stream(0.2)

    collector, gateway = stages["collector"], stages["gateway"]
    try:
        stream(3)
        # 1. The OT disk is full: the collector refuses (no PUBACK), the broker keeps the messages.
        with DiskFiller(disks["ot"]):
            stream_until(lambda: "refusing new input" in _log(collector), 30, "the collector to refuse")
            stream(FULL_S)
        stream_until(lambda: "takes data again" in _log(collector), 30, "the OT spool to take data again")
        stream(3)
        # 2. The DMZ disk is full: the gateway stores nothing and acknowledges nothing, the OT spool grows.
        with DiskFiller(disks["dmz"]):
            stream_until(lambda: "cannot store batch" in _log(gateway), 30, "the gateway to refuse")
            stream(FULL_S)
        stream(3)
        # 3. Both at once.
        refusals = _log(collector).count("refusing new input")
        with DiskFiller(disks["dmz"]), DiskFiller(disks["ot"]):
            stream_until(lambda: _log(collector).count("refusing new input") > refusals, 30, "a second refusal")
            stream(FULL_S)
        stream(3)
        produced = publisher.published
        wait_until(lambda: len(publisher.acknowledged()) == produced, 60, "the broker to acknowledge everything")
        acknowledged = publisher.acknowledged()
        wanted = {publisher.key(i): i for i in acknowledged}
        try:
            stack.wait_for(
                'SELECT count("quality") FROM "telemetry"',
                lambda rows: bool(rows) and rows[0]["count"] >= len(wanted),
                120,
                f"{len(wanted)} acknowledged messages in InfluxDB",
            )
        except TimeoutError as exc:
            print(exc)  # the reconciliation below says what is missing
        rows = stack.query('SELECT "value" FROM "telemetry" GROUP BY "asset", "tag"')
        # The collector's own counter of points spooled, once its last report has landed.
        time.sleep(5)
        spooled = _last_metric(stack, "points_out_total", "collector-mqtt")
    finally:
        publisher.stop()
    values = {(str(r["asset"]), str(r["tag"]), int(r["time"])): float(r["value"]) for r in rows}
    lost = [i for key, i in wanted.items() if key not in values]
    wrong = [key for key, i in wanted.items() if key in values and values[key] != expected_value(i)]
    collector_log, gateway_log = _log(collector), _log(gateway)
    refused = sum(int(n) for n in re.findall(r"(\d+) points were refused meanwhile", collector_log))
    dmz_refused = gateway_log.count("closing the connection without ack")
    redelivery = collector_log.count("reconnecting to")
    drops = collector_log.count("disconnected from") - collector_log.count("for the redelivery; paho reconnects")
    print(
        f"\ndisk full (tmpfs {TMPFS_BYTES >> 20} MiB under each spool, {FULL_S:.0f} s full per phase): "
        f"published {produced}, acknowledged by the broker {len(acknowledged)}, refused by the collector "
        f"while full {refused} (redelivered after {redelivery} reconnects), DMZ batches refused {dmz_refused}, "
        f"found {len(wanted) - len(lost)}, lost {len(lost)}, wrong {len(wrong)}, "
        f"duplicates spooled by the collector {spooled - len(set(wanted)):.0f}"
    )
    assert refused > 0 and dmz_refused > 0, "a disk filled but nothing was refused"
    assert not lost, f"{len(lost)} acknowledged messages lost, e.g. {sorted(lost)[:5]}"
    assert not wrong, f"{len(wrong)} stored with the wrong value, e.g. {wrong[:5]}"
    # The collector's connection dropped only when it asked for the redelivery: keep-alive never stopped.
    assert redelivery >= 2 and drops == 0, f"{drops} other disconnects:\n{collector_log[-3000:]}"
    assert "Traceback" not in collector_log + gateway_log + _log(stages["sender"]) + _log(stages["writer"])
